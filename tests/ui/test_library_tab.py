"""The Library tab's handlers: listing with previews and metadata, search, edit, export, import, merge, delete."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gradio as gr
import pytest

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
    assert rows[0][:6] == ["emblem-a", "subject", "dreambooth_lora", "lora", "sd1", "sks"]

    card, previews, summary, triggers, tags, kind, description = entry_view("emblem-a")
    assert card.lstrip().startswith("# emblem-a") and "![" not in card  # no YAML header, no broken image links
    assert [Path(p).name for p in previews] == ["seed0000.png", "loss.png"] and summary["name"] == "emblem-a"
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
