"""`studio batch`: job files, sharding across two processes, and restart after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.batch import read_jobs
from studio.cli import main
from studio.errors import StudioError
from studio.pnginfo import read_parameters


def _jobs(path: Path, model: Path, n: int) -> Path:
    lines = [json.dumps({"prompt": f"a red star number {i}", "model": str(model), "seed": i, "steps": 2})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    # CPU processes over gloo, also where a GPU is visible (`accelerate launch --cpu` would start only one process)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}


def test_job_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red star"}\n{"prompt": "x", "stepz": 3}\n')
    with pytest.raises(StudioError, match=r"bad.jsonl:2: unknown option 'stepz'"):
        read_jobs(bad)
    bad.write_text('{"prompt": "a red star"}\nnot json\n')
    with pytest.raises(StudioError, match=r":2: not JSON"):
        read_jobs(bad)
    bad.write_text('{"prompt": "a", "out": "x.png"}\n{"prompt": "b", "out": "x.png"}\n')
    with pytest.raises(StudioError, match="two jobs write"):
        read_jobs(bad)
    bad.write_text('{"prompt": "a", "out": "../escape.png"}\n')
    with pytest.raises(StudioError, match="relative .png"):
        read_jobs(bad)
    bad.write_text("\n# only a comment\n")
    assert main(["batch", str(bad), "--out", str(tmp_path / "o")]) == 2
    bad.write_text('{"prompt": "a red star"}\n')
    assert main(["batch", str(bad), "--out", str(tmp_path / "o"), "--group", "0"]) == 2  # says: at least 1


@pytest.mark.heavy
def test_two_processes_share_the_jobs_exactly_once(tiny_dirs: dict, tmp_path: Path) -> None:
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate's launcher is not installed beside this interpreter")
    jobs = _jobs(tmp_path / "jobs.jsonl", tiny_dirs["sd1"], 20)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "studio", "batch", str(jobs), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(20)]
    params = [read_parameters(p) for p in pngs]
    assert sorted(p["job"] for p in params) == list(range(20))  # each job exactly once
    assert {p["rank"] for p in params} == {0, 1} and all(p["world_size"] == 2 for p in params)
    assert all(p["prompt"] == f"a red star number {p['job']}" for p in params)


def test_sigkill_then_restart_keeps_finished_files(tiny_dirs: dict, tmp_path: Path) -> None:
    jobs = _jobs(tmp_path / "jobs.jsonl", tiny_dirs["sd1"], 20)
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "studio", "batch", str(jobs), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while len(list(out.glob("*.png"))) < 7 and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in out.glob("*.png")}
    assert 7 <= len(finished) < 20
    missing = next(f"{i:05d}.png" for i in range(20) if f"{i:05d}.png" not in finished)
    (out / f".{missing}.x1y2.tmp").write_bytes(b"\x89PNG half")  # what a kill mid-write leaves
    assert main(["batch", str(jobs), "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 20 and not list(out.glob(".*"))  # no partial or temporary file remains
    for name, (mtime, inode, data) in finished.items():
        p = out / name
        assert (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) == (mtime, inode, data)
    assert sorted(read_parameters(p)["job"] for p in pngs) == list(range(20))


def test_jobs_that_differ_in_prompt_seed_and_tags_share_a_call(tiny_dirs: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped (`--group 3`), the PNGs are those of one call per job (up to one level in a few pixels), with each
    job's own prompt, tags and seed in its parameters; a job with other settings or several images runs alone."""
    import numpy as np
    from composer_helpers import add_random_adapter
    from PIL import Image

    import studio.generate
    from studio.batch import run_batch
    from studio.generate import cached_pipeline

    model = tiny_dirs["sd1"]
    pipe = cached_pipeline(str(model), "cpu")
    add_random_adapter(pipe, "grp-a", seed=1, scale=0.4)
    add_random_adapter(pipe, "grp-b", seed=2, scale=0.4)
    jobs = [{"prompt": "a red star <lora:grp-a:0.8>", "seed": 1}, {"prompt": "a blue ring", "seed": 2},
            {"prompt": "a green square <lora:grp-b:1> <lora:grp-a:-0.5>", "seed": 3},
            {"prompt": "a red star", "seed": 4, "steps": 3}, {"prompt": "a red ring <lora:grp-b>", "seed": 5},
            {"prompt": "a blue star", "seed": 6, "num_images": 2},
            {"prompt": "a blue ring <lora:grp-a:0.5>", "seed": 7, "guidance": 4.0},  # one adapter set: as usual
            {"prompt": "a red ring <lora:grp-a:0.5>", "seed": 8, "guidance": 4.0}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"model": str(model), "steps": 2, **job}) + "\n" for job in jobs))
    calls = []
    real = studio.generate.generate
    monkeypatch.setattr(studio.generate, "generate", lambda c, **kw: calls.append(c.num_images) or real(c, **kw))
    grouped = run_batch(read_jobs(path), tmp_path / "grouped", progress=False, group=3)
    assert calls == [3, 1, 1, 2, 2] and grouped["made"] == 8  # jobs 0-2, 3, 4 (0-2 was full), 5, 6-7
    calls.clear()
    run_batch(read_jobs(path), tmp_path / "alone", progress=False, group=1)
    assert calls == [1, 1, 1, 1, 1, 2, 1, 1]
    for name in sorted(p.name for p in (tmp_path / "alone").iterdir()):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=np.int16) for d in ("grouped", "alone"))
        assert np.abs(a - b).max() <= 1, name
        params = read_parameters(tmp_path / "grouped" / name)
        if name in ("00000.png", "00002.png", "00007.png"):
            assert params == read_parameters(tmp_path / "alone" / name) | {"job": params["job"]}
    first = read_parameters(tmp_path / "grouped" / "00000.png")
    assert first["prompt"] == "a red star <lora:grp-a:0.8>" and first["seed"] == 1
    assert first["adapters"] == [{"name": "grp-a", "weight": 0.8}]


def test_a_bad_tag_in_a_group_fails_only_its_own_job(tiny_dirs: dict, tmp_path: Path) -> None:
    """The group runs one job at a time: the jobs before the bad one are made, and its error names the adapter."""
    from composer_helpers import add_random_adapter

    from studio.batch import run_batch
    from studio.generate import cached_pipeline

    add_random_adapter(cached_pipeline(str(tiny_dirs["sd1"]), "cpu"), "grp-ok", seed=1)
    jobs = [{"prompt": "a red star <lora:grp-ok>", "seed": 1}, {"prompt": "a blue ring", "seed": 2},
            {"prompt": "a green square <lora:no-such-adapter>", "seed": 3}, {"prompt": "a red ring", "seed": 4}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"model": str(tiny_dirs["sd1"]), "steps": 1, **job}) + "\n" for job in jobs))
    with pytest.raises(StudioError, match="no adapter named 'no-such-adapter'"):
        run_batch(read_jobs(path), tmp_path / "out", progress=False, group=4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png"]
