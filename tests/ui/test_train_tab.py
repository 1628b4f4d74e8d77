"""The Train tab: the form becomes `studio train` options; runs go through the queue; cancel, resume, library."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
from PIL import Image

from studio.errors import StudioError
from studio.library import Library
from studio.ui.jobs import JobQueue
from studio.ui.train_tab import EMBLEM, TEXTURE, TEXTURED, UPLOAD, job_view, submit_training, train_options
from studio.ui.uploads import dataset_dir
from trainers import configs_from_mapping


def _form(**changes: Any) -> dict[str, Any]:
    form = {
        "method": "dreambooth_lora", "source": EMBLEM, "uploads": None, "world_emblem": 3, "world_texture": "dots",
        "trigger": "sks", "name": "emb", "model": "studio-tiny", "train_steps": 2, "rank": "", "lr": "",
        "batch_size": 1, "resolution": "", "seed": 0, "world_images": 3, "world_objects": 2, "sample_every": 0,
        "sample_steps": 1,
        "save_every": 0, "lr_scheduler": "constant", "grad_accum": 1, "mixed_precision": "auto",
        "gradient_checkpointing": False, "prior_preservation": "default", "class_prompt": "", "num_class_images": 100,
        "instance_prompt": "",
    }  # fmt: skip
    return {**form, **changes}


def test_the_form_maps_onto_train_config_like_the_cli() -> None:
    options, uploads = train_options(_form(rank="8", lr="0.001", snr_gamma=5))
    method, config = configs_from_mapping(options)
    assert config.snr_gamma == 5.0  # Min-SNR weighting is a setting of the page too
    assert config.world_objects == 2  # emblem renders with company, as `--world-objects 2`
    assert uploads == [] and config.world_emblem == 3 and config.world_texture is None and config.images is None
    assert method.rank == 8 and method.lr == 0.001 and config.resolution is None and config.class_prompt is None
    assert config.progress is False and config.resume is None and config.prior_preservation is None
    assert configs_from_mapping(train_options(_form(prior_preservation="off"))[0])[1].prior_preservation is False
    _, config = configs_from_mapping(train_options(_form(source=TEXTURE), resume=True)[0])
    assert config.world_texture == "dots" and config.world_emblem is None and config.resume == "latest"
    with pytest.raises(StudioError, match="rank must be a whole number"):
        train_options(_form(rank="4.5"))
    method, config = configs_from_mapping(train_options(_form(method="b_lora", source=TEXTURED))[0])
    assert (method.method, config.world_emblem, config.world_texture) == ("b_lora", 3, "dots")
    with pytest.raises(StudioError, match="pick a texture"):
        train_options(_form(source=TEXTURED, world_texture="solid"))


def test_each_method_has_its_settings_and_only_the_chosen_ones_count() -> None:
    from studio.ui.train_tab import method_fields, option_key

    assert "factor" in method_fields("kronecker") and "alpha" in method_fields("dreambooth_lora")
    assert "lr" not in method_fields("kronecker")  # shown once, in the main rows
    assert "trigger_rows" in method_fields("orthogonal") and "trigger" not in method_fields("orthogonal")
    groups = {option_key("kronecker", "factor"): 4, option_key("kronecker", "target_modules"): "to_q,to_v",
              option_key("dreambooth_lora", "alpha"): "8", option_key("dreambooth_lora", "train_text_encoder"): False}
    method, _ = configs_from_mapping(train_options(_form(method="kronecker", **groups))[0])
    assert (method.method, method.factor, method.target_modules) == ("kronecker", 4, "to_q,to_v")
    method, _ = configs_from_mapping(train_options(_form(**groups))[0])
    assert (method.method, method.alpha, method.train_text_encoder) == ("dreambooth_lora", 8.0, False)
    with pytest.raises(StudioError, match="factor must be a whole number"):
        train_options(_form(method="kronecker", **{**groups, option_key("kronecker", "factor"): 2.5}))


def test_uploaded_images_are_checked_and_kept_for_the_run(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(image)
    options, uploads = train_options(_form(source=UPLOAD, uploads=[str(image)], name="mine"))
    assert options["images"] == str(dataset_dir("mine")) and uploads == [image]
    with pytest.raises(StudioError, match="no training images"):
        train_options(_form(source=UPLOAD, uploads=[]))
    with pytest.raises(StudioError, match="is not a slug"):
        train_options(_form(source=UPLOAD, uploads=[str(image)], name="Bad Name"))


def test_bad_settings_are_refused_before_anything_is_queued() -> None:
    jobs = JobQueue()
    with pytest.raises(StudioError, match="--train-steps must be at least 1"):
        submit_training(jobs, _form(train_steps=0))
    with pytest.raises(StudioError, match="unknown method"):
        submit_training(jobs, _form(method="nope"))
    assert jobs.jobs() == []


@pytest.mark.heavy
def test_train_cancel_resume_and_the_result_in_the_library(tiny_dirs: dict) -> None:
    jobs = JobQueue()
    form = _form(model=str(tiny_dirs["sd1"]), train_steps=12, save_every=0)
    job = submit_training(jobs, form)
    deadline = time.time() + 60
    while job.step < 1:
        assert time.time() < deadline and not job.finished, jobs.status(job)
        time.sleep(0.01)
    jobs.cancel(job.id)
    assert jobs.wait(job, timeout=60) and job.state == "cancelled", jobs.status(job)
    assert "Resume continues it" in job.message and "emb" not in Library()
    again = submit_training(jobs, form)  # a new start does not overwrite the stopped run
    assert jobs.wait(again, timeout=60) and "already holds a run of 'emb'" in jobs.status(again)
    resumed = submit_training(jobs, form, resume=True)
    assert jobs.wait(resumed, timeout=120), jobs.status(resumed)
    assert resumed.state == "done", jobs.status(resumed)
    assert resumed.step == 12 and resumed.previews and "emb" in Library()
    status, curve, previews, comparison, rows, seen = job_view(jobs, resumed.id, (-1, -1))
    assert status.startswith("done: emb is in the library (12 steps")
    assert seen == (resumed.version, resumed.preview_version)
    steps = curve[curve["series"] == "raw"].dropna()["step"].tolist()  # a resumed run: from its checkpoint on
    assert steps == list(range(resumed.first_step + 1, 13)) and resumed.checkpoint_step == 12
    assert curve[curve["series"] == "last checkpoint"].dropna()["step"].tolist() == [12, 12]
    prompts = [image.info["prompt"] for image in resumed.previews]
    assert [caption for _, caption in previews] == [f"step 12 · {p}" for p in prompts]
    assert previews[0][0].size == (256, 256)  # the 32x32 previews enlarged 8x for the page
    # after training: each sample prompt without, then with the new adapter, as `compare_adapter` renders them
    assert [caption for _, caption in comparison] == [
        text for i, p in enumerate(prompts) for text in (f"without · seed {i} · {p}", f"with emb · seed {i} · {p}")
    ]
    assert [row[2] for row in rows] == ["done", "failed", "cancelled"]
    assert job_view(jobs, resumed.id, seen)[:4] == (status, gr.skip(), gr.skip(), gr.skip())  # nothing resent
    assert job_view(jobs, resumed.id, (seen[0] - 1, seen[1]))[2] == gr.skip()  # a new loss, the same previews
    with pytest.warns(UserWarning, match="already holds a run"):  # a failure pops up once, as a toast
        job_view(jobs, again.id, (-1, -1))


def test_the_loss_chart_frame_is_numeric_and_names_every_series_from_the_start() -> None:
    """Gradio's chart keeps the axis types and colours of the first frame it gets (see studio.ui.train_view)."""
    from studio.plots import loss_series
    from studio.ui.train_view import LOG_LOSS, SERIES, loss_frame

    empty = loss_frame(loss_series([]))
    assert str(empty["step"].dtype) == "int64" and str(empty["loss"].dtype) == "float64"
    assert empty["series"].tolist() == list(SERIES) and empty["loss"].isna().all()
    frame = loss_frame(loss_series([1.0, 0.1], checkpoint=2))
    assert str(frame["step"].dtype) == "int64" and str(frame["loss"].dtype) == "float64"
    assert frame["series"].tolist()[:3] == list(SERIES)  # the names first, in legend order
    drawn = frame.dropna()
    assert drawn[drawn["series"] == "raw"][["step", "loss"]].values.tolist() == [[1, 1.0], [2, 0.1]]
    assert drawn[drawn["series"] == "smoothed"]["loss"].tolist() == [1.0, 0.55]
    assert drawn[drawn["series"] == "last checkpoint"][["step", "loss"]].values.tolist() == [[2, 0.1], [2, 1.0]]
    assert drawn[LOG_LOSS].round(6).tolist()[:2] == [0.0, -1.0]
