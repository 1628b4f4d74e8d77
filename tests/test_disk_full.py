"""A full disk (ENOSPC at the write call, tests/disk_full.py) leaves every earlier state whole, says so in one
StudioError, and the same command succeeds once there is space: training checkpoints, library writes, batch PNGs,
exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from studio.batch import read_jobs, run_batch
from studio.errors import DiskFull
from studio.library import Library, export_adapter
from studio.library.adapter import read_adapter
from studio.library.meta import AdapterMeta


sys.path.insert(0, str(Path(__file__).parent / "trainers"))
from disk_full import disk_full  # noqa: E402
from trainer_helpers import emblem, quick, tiny_pipe  # noqa: E402

from trainers import DreamBoothLoRA, train_loop  # noqa: E402
from trainers.checkpoint import CHECKPOINT  # noqa: E402


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)


def _temporaries(folder: Path) -> list[Path]:
    return list(folder.rglob("*.tmp"))


def test_training_stops_on_a_full_disk_keeps_its_checkpoint_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    config = quick(train_steps=4, save_every=1)
    straight = train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), config, tmp_path / "straight")
    run = tmp_path / "full"
    with disk_full(lambda p: p.name.startswith(f".{CHECKPOINT}."), after=2) as full:  # the 3rd checkpoint fails
        with pytest.raises(DiskFull, match=r"the disk is full .*checkpoint of step 3 was not written and training "
                                           r"stopped; the checkpoint of step 2 is kept in .*--resume latest"):
            train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), config, run)
    assert len(full.failed) == 1 and _checkpoint(run)["step"] == 2 and not _temporaries(run)
    resumed = train_loop(DreamBoothLoRA(), tiny_pipe(), emblem(), config, run, resume=True)
    assert resumed.status == "done" and resumed.losses == straight.losses
    a, b = _checkpoint(tmp_path / "straight")["method"], _checkpoint(run)["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _adapter(seed: int) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    g = torch.Generator().manual_seed(seed)
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{module}.lora_A.weight": torch.randn(4, 32, generator=g),
               f"{module}.lora_B.weight": torch.randn(32, 4, generator=g)}
    return tensors, AdapterMeta(method="imported", ranks={module: 4}, alphas={module: 4.0})


def test_library_writes_on_a_full_disk_leave_the_library_as_it_was(tmp_path: Path) -> None:
    lib = Library(tmp_path / "lib")
    old, meta = _adapter(0)
    lib.add("kept", old, meta)
    index = (lib.root / "index.jsonl").read_text()
    new, _ = _adapter(1)
    for name in ("fresh", "kept"):  # a new entry, and an overwrite of an existing one
        with disk_full(lambda p: "adapter_model.safetensors" in p.name), pytest.raises(
            DiskFull, match=rf"adapter '{name}' was not written, the library (is unchanged|keeps the previous one)"
        ):
            lib.add(name, new, meta, overwrite=True)
        assert [e.name for e in Library(lib.root).list()] == ["kept"]
        assert sorted(p.name for p in lib.root.iterdir()) == [".lock", "index.jsonl", "kept"]  # no staging left
        assert (lib.root / "index.jsonl").read_text() == index
        assert torch.equal(read_adapter(lib.root / "kept")[0][next(iter(old))], next(iter(old.values())))
    with disk_full(lambda p: p.name.startswith(".index.jsonl.")):  # the index is a cache: the entry still lands
        lib.add("fresh", new, meta)
    assert [e.name for e in Library(lib.root).list()] == ["fresh", "kept"]  # and the index heals on the next list
    assert json.loads((lib.root / "index.jsonl").read_text().splitlines()[0])["name"] == "fresh"


@pytest.mark.parametrize("format", ["kohya", "peft"])
def test_exports_on_a_full_disk_leave_the_previous_export(tmp_path: Path, format: str) -> None:
    lib = Library()
    tensors, meta = _adapter(2)
    lib.add("a", tensors, meta)
    out = tmp_path / ("a.safetensors" if format == "kohya" else "a-peft")
    export_adapter("a", format, out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*") if out.is_dir() else [out]) if p.is_file()}
    lib.add("a", *_adapter(3), overwrite=True)
    with disk_full(lambda p: p.suffix in (".safetensors", ".json", ".tmp")), pytest.raises(
        DiskFull, match=rf"'a' was not exported to {out}, which is unchanged"
    ):
        export_adapter("a", format, out)
    after = {p: p.read_bytes() for p in sorted(out.rglob("*") if out.is_dir() else [out]) if p.is_file()}
    assert after == before and not _temporaries(tmp_path)
    export_adapter("a", format, out)  # space again: the export is the new one
    changed = {p: p.read_bytes() for p in sorted(out.rglob("*") if out.is_dir() else [out]) if p.is_file()}
    assert changed.keys() == before.keys() and changed != before


def test_batch_on_a_full_disk_keeps_finished_pngs_and_the_rerun_finishes(tiny_dirs: dict, tmp_path: Path) -> None:
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps({"prompt": f"a red star {i}", "model": str(tiny_dirs["sd1"]), "seed": i,
                                             "steps": 1, "size": "32x32"}) + "\n" for i in range(3)))
    jobs, out = read_jobs(jobs_file), tmp_path / "out"
    with disk_full(lambda p: p.suffix == ".tmp" and p.parent == out, after=1), pytest.raises(
        DiskFull, match=r"00001.png \(job on line 2\) was not written; 1 of this run's 3 jobs are done and kept; "
                        r"free some space and run the same command again"
    ):
        run_batch(jobs, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png"]
    assert run_batch(jobs, out, progress=False) == {"jobs": 3, "mine": 3, "skipped": 1, "made": 2}
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
