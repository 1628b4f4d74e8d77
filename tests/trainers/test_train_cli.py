"""`studio train` end to end on the tiny SD1 folder with a Shapes World emblem: the adapter lands in the library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.library import Library


torch.set_num_threads(1)


def test_studio_train_end_to_end(tiny_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    flags = [
        "train",
        "--method",
        "kronecker",
        "--world-emblem",
        "11",
        "--trigger",
        "zq",
        "--name",
        "emblem-11",
        "--model",
        str(tiny_dirs["sd1"]),
        "--device",
        "cpu",
        "--train-steps",
        "3",
        "--world-images",
        "3",
        "--factor",
        "4",
        "--sample-steps",
        "1",
        "--save-every",
        "2",
        "--seed",
        "5",
        "--num-class-images",  # prior preservation is on by default for a world emblem
        "2",
    ]
    assert main(flags) == 0
    assert "added 'emblem-11' to the library" in capsys.readouterr().out
    entry = Library().get("emblem-11")
    assert entry.meta.method == "kronecker" and entry.meta.peft_type == "LOKR" and entry.meta.trigger_words == ["zq"]
    assert entry.meta.method_config["factor"] == 4 and entry.meta.base.family == "sd1"
    assert len(entry.samples) == 4 and entry.samples[0].name == "seed0005.png"  # the emblem's 4 sample prompts
    assert "zq emblem" in entry.card and "emblem 11" in entry.card
    assert "prior preservation on 2 base renders of random Shapes World scenes" in entry.card
    record = json.loads((entry.folder / "train_config.json").read_text())
    assert record["train_steps"] == 3 and record["seed"] == 5 and record["world_emblem"] == 11
    run = Path(record["run_dir"] or Library().root / ".runs" / "emblem-11")
    assert (run / "checkpoint.pt").is_file() and (run / "loss.png").is_file()
    assert [e.name for e in Library().list()] == ["emblem-11"], "the run folder is not a library entry"

    assert main(["library", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["trigger_words"] == ["zq"]
    # a second run of the same name is refused with the fix; so is another method's option
    assert main(flags) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*flags[:-2], "--name", "other", "--alpha", "2"]) == 2
    assert "--alpha is not an option of kronecker" in capsys.readouterr().err
    assert main([*flags[:3], "--trigger", "zq", "--name", "other", "--model", str(tiny_dirs["sd1"])]) == 2
    assert "exactly one of --images" in capsys.readouterr().err


@pytest.mark.heavy
def test_two_gloo_processes_share_the_data_and_agree(tiny_dirs: dict, tmp_path: Path) -> None:
    """`accelerate launch -m studio train` on two CPU processes: both ranks ran, each on its own shard of the data,
    their final weights agree, and the library holds the adapter once."""
    import os
    import shutil
    import subprocess
    import sys

    launcher = Path(sys.executable).parent / "accelerate"
    if shutil.which(str(launcher)) is None:
        pytest.skip("accelerate's launcher is not installed beside this interpreter")
    library = tmp_path / "lib"
    env = {**os.environ, "STUDIO_LIBRARY": str(library), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}  # CPU processes over gloo, also where a GPU is visible
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
           "-m", "studio", "train", "--method", "dreambooth_lora", "--world-emblem", "3", "--trigger", "sks",
           "--name", "two", "--model", str(tiny_dirs["sd1"]), "--train-steps", "3", "--sample-steps", "2",
           "--no-prior-preservation"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((library / ".runs" / "two" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 and r["step"] == 3 for r in ranks)
    assert not set(ranks[0]["positions"]) & set(ranks[1]["positions"])  # each its own shard
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # gradients were averaged: one model
    assert [e["name"] for e in map(json.loads, (library / "index.jsonl").read_text().splitlines())] == ["two"]
