"""The Library tab's handlers: listing with previews and metadata, search, edit, export, import, merge, delete."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio.errors import StudioError
from studio.library import Library
from studio.ui.errors import shows_errors
from studio.ui.library_tab import entry_view, export_entry, library_view
from trainers import TrainConfig, train


def _train(model: Path, name: str, emblem: int) -> None:
    config = TrainConfig(trigger="sks", name=name, world_emblem=emblem, model=str(model), device="cpu", train_steps=2,
                         world_images=3, sample_steps=1, save_every=0, progress=False, prior_preservation=False,
                         sample_prompts=["a large sks emblem in the center on a white background"])  # fmt: skip
    assert train("dreambooth_lora", config).status == "done"


def test_library_actions_call_the_library_api(tiny_dirs: dict, tmp_path: Path) -> None:
    from studio.library import edit, import_adapter, merge

    _train(tiny_dirs["sd1"], "emblem-a", 3)
    _train(tiny_dirs["sd1"], "emblem-b", 5)
    gallery, rows, names, problems = library_view()
    assert names == ["emblem-a", "emblem-b"] and problems == ""
    assert [caption for _, caption in gallery] == names and all(Path(p).is_file() for p, _ in gallery)
    assert Image.open(gallery[0][0]).size == (256, 256)  # the 32x32 sample, enlarged with nearest-neighbour
    assert rows[0][:7] == ["emblem-a", "", "subject", "dreambooth_lora", "lora", "sd1", "sks"]

    card, previews, loss, summary, triggers, tags, kind, description = entry_view("emblem-a")
    assert card.startswith("# emblem-a") and "![" not in card and "base_model:" not in card  # text, no YAML header
    assert "- Trigger words: sks" in card and "## Sample prompts" in card
    assert len(previews) == 1 and Path(loss).name == "loss.png" and summary["name"] == "emblem-a"
    assert (triggers, tags, kind) == ("sks", "", "subject") and "emblem 3" in description

    edit("emblem-a", tags=["star"], new_name="star-emblem")  # what the Edit form's Save calls
    assert library_view("star")[2] == ["star-emblem"]

    exported = Path(export_entry("star-emblem", "kohya", tmp_path))
    assert exported.name == "star-emblem-kohya.safetensors"
    peft = Path(export_entry("star-emblem", "peft", tmp_path / "peft"))
    assert peft.suffix == ".zip" and any(n.endswith(".safetensors") for n in zipfile.ZipFile(peft).namelist())
    assert import_adapter(exported, name="reimported").name == "reimported"
    assert merge([("star-emblem", 0.5), ("emblem-b", 0.5)], "merged").name == "merged"
    assert library_view()[2] == ["emblem-b", "merged", "reimported", "star-emblem"]

    # filters and sort (Library.search's method, kind and base), and whether each adapter fits a base
    assert library_view(method="merge")[2] == ["merged"] and library_view(method="imported")[2] == ["reimported"]
    assert library_view(kind="subject", base="sd1", method="all")[2] == ["emblem-b", "merged", "star-emblem"]
    assert library_view(base="sdxl")[2] == [] and library_view(kind="unknown")[2] == ["reimported"]
    assert library_view(sort="method")[2] == ["emblem-b", "star-emblem", "reimported", "merged"]
    assert library_view(sort="kind")[2] == ["emblem-b", "merged", "star-emblem", "reimported"]
    assert {row[1] for row in library_view(fits_model=str(tiny_dirs["sd1"]))[1]} == {"✓ fits"}
    gallery, rows, _, _ = library_view(fits_model=str(tiny_dirs["sdxl"]))
    assert {row[1] for row in rows} == {"✗ does not fit"} and gallery[0][1] == "emblem-b ✗ does not fit"
    with pytest.raises(gr.Error, match="sort by one of"):
        library_view(sort="size")

    # the side-by-side the Train tab shows after a run: the base alone, then with the adapter, same seeds
    from studio.compare import compare_adapter
    from studio.generate import GenerateConfig, cached_pipeline, generate
    from studio.library import loaded_adapters

    pipe = cached_pipeline(str(tiny_dirs["sd1"]), "cpu")  # loaded above, for the fit badges
    prompts = ["a large sks emblem in the center on a white background", "a small sks emblem on the left"]
    comparison = compare_adapter("emblem-b", prompts, model=str(tiny_dirs["sd1"]), seed=5, steps=2, pipe=pipe)
    config = GenerateConfig(prompt="", model=str(tiny_dirs["sd1"]), seed=5, steps=2, num_images=2)
    plain = generate(config, pipe=pipe, prompts=prompts).images
    tagged = generate(GenerateConfig(**{**config.__dict__, "prompt": "<lora:emblem-b:1>"}), pipe=pipe,
                      prompts=prompts).images  # fmt: skip
    for ours, theirs in zip([*comparison.without, *comparison.with_adapter], [*plain, *tagged]):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert loaded_adapters(pipe) == {}  # the pipeline is left as it was
    assert [c for _, c in comparison.pairs()][:2] == [f"without · seed 5 · {prompts[0]}",
                                                     f"with emblem-b · seed 5 · {prompts[0]}"]  # fmt: skip
    assert comparison.grid().size == (2 * 32, 2 * 32)

    Library().remove("merged")  # what the confirmed Delete calls
    assert "merged" not in library_view()[2]
    with pytest.raises(gr.Error, match="no adapter named 'merged'"):
        shows_errors(entry_view)("merged")


def test_export_needs_a_chosen_adapter_and_unknown_formats_are_refused() -> None:
    with pytest.raises(gr.Error, match="pick an adapter first"):
        export_entry(None, "kohya")
    with pytest.raises(StudioError):
        export_entry("nothing-here", "kohya")
    assert library_view() == ([], [], [], "") and entry_view(None)[0] == ""
