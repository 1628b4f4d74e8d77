"""`studio bench kill-resume`: training SIGKILLed at seeded points resumes to the same final weights.

A reference run trains straight through. Then, for each of `--kills` seeded points, a fresh run (its own run folder
and library) is started in a child process and killed with SIGKILL:

    time         at a seeded moment of the run (set-up, a step, a checkpoint, the previews, the library write)
    mid-write    inside a checkpoint write, half of the new checkpoint in its temporary file
    pre-rename   after a checkpoint's temporary file is written whole, before it replaces the old checkpoint
    library      inside the final library write, the entry half staged

and then resumed the way a user would: `--resume latest` when the run folder holds a checkpoint, the same command
without it when the kill came before the first one, nothing when the entry is already in the library. Every resumed
run must end with tensors bit-identical to the reference's, the run folder holding no temporary file and the
library no staging folder. The children are forked from this process (one torch thread count for all, as resume
exactness needs), so a kill is a real SIGKILL of a process mid-flight.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.models import DEFAULT_MODEL


KINDS = ("time", "mid-write", "pre-rename", "library")


def _config(model: str, steps: int, root: Path, name: str, resume: str | None) -> Any:
    from trainers import TrainConfig

    return TrainConfig(trigger="sks", name=name, world_emblem=3, model=model, train_steps=steps, save_every=1,
                       batch_size=1, world_images=4, prior_preservation=False, sample_steps=2, progress=False,
                       device="cpu", run_dir=str(root / "run"), resume=resume, seed=0)


def _die_inside(target: Any, attribute: str, when: Callable[[Path], bool], half: bool) -> None:
    """Patch `target.attribute` (an atomic writer taking (path, writer)) to SIGKILL this process inside the write."""
    original = getattr(target, attribute)

    def writer(path: Any, write: Callable[[Path], object]) -> Any:
        if not when(Path(path)):
            return original(path, write)

        def partial(tmp: Path) -> None:
            write(tmp)
            if half:
                with open(tmp, "r+b") as f:
                    f.truncate(max(1, tmp.stat().st_size // 2))
            os.kill(os.getpid(), signal.SIGKILL)

        return original(path, partial)

    setattr(target, attribute, writer)


def _child(root: Path, model: str, steps: int, method: str, threads: int, kill: str | None, at: int) -> None:
    """The training process: resumes what the folder holds; `kill` arranges its own death inside a write."""
    import torch

    torch.set_num_threads(threads)
    from studio import atomic
    from studio.library import Library
    from trainers import train

    calls = {"n": 0}

    def nth_checkpoint(path: Path) -> bool:
        if path.name != "checkpoint.pt":
            return False
        calls["n"] += 1
        return calls["n"] == at

    if kill in ("mid-write", "pre-rename"):
        _die_inside(atomic, "atomic_write", nth_checkpoint, half=kill == "mid-write")
    elif kill == "library":
        _die_inside(atomic, "atomic_write", lambda p: p.name == "adapter_model.safetensors" and
                    p.parent.name.startswith(".staging-"), half=True)
    library = Library(root / "library")
    if "kr" in library:
        return
    resume = "latest" if (root / "run" / "checkpoint.pt").is_file() else None
    train(method, _config(model, steps, root, "kr", resume), library=library)


def _fork(fn: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException as err:  # noqa: BLE001 - reported through the exit status
            os.write(2, f"child failed: {type(err).__name__}: {err}\n".encode())  # fd 2: survives capture
        finally:
            os._exit(code)
    return pid


def _wait(pid: int) -> tuple[int, int]:
    """(exit status or -signal, peak RSS in bytes) of a child."""
    _, status, usage = os.wait4(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return code, usage.ru_maxrss * 1024


def _tensors(root: Path) -> dict[str, Any]:
    from studio.library import Library

    return Library(root / "library").get("kr").state_dict()


def run(model: str, steps: int, kills: int, seed: int, threads: int, method: str = "dreambooth_lora",
        work: Path | None = None) -> dict[str, Any]:
    import torch

    if torch.cuda.is_initialized():  # a forked child cannot use, or even query, the parent's CUDA context
        from studio.errors import StudioError

        raise StudioError("studio bench kill-resume forks its training runs: start it in a fresh process")
    torch.set_num_threads(1)  # this process never starts a thread pool that a forked child would inherit broken
    work = Path(work or tempfile.mkdtemp(prefix="studio-kill-resume-"))
    rng = random.Random(seed)
    report: dict[str, Any] = {"model": model, "method": method, "steps": steps, "kills": kills, "seed": seed,
                              "threads": threads, "points": []}
    start = time.perf_counter()
    ref = work / "reference"
    began = time.perf_counter()
    code, peak = _wait(_fork(lambda: _child(ref, model, steps, method, threads, None, 0)))
    if code != 0:
        raise RuntimeError(f"the reference run failed (exit status {code})")
    run_s = time.perf_counter() - began
    reference = _tensors(ref)
    report["reference_run_s"], peaks = round(run_s, 2), [peak]
    kinds = [KINDS[i % len(KINDS)] for i in range(kills)]
    rng.shuffle(kinds)
    for k, kind in enumerate(kinds):
        root = work / f"kill-{k:02d}"
        at = rng.randint(1, steps)  # the final checkpoint (step == steps) too
        delay = rng.uniform(0.0, run_s)
        began = time.perf_counter()
        pid = _fork(lambda: _child(root, model, steps, method, threads, None if kind == "time" else kind, at))
        if kind == "time":
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        code, peak = _wait(pid)
        killed_s = time.perf_counter() - began
        peaks.append(peak)
        checkpoint = root / "run" / "checkpoint.pt"
        saved = torch.load(checkpoint, weights_only=True)["step"] if checkpoint.is_file() else None
        leftovers = [p.name for p in (root / "run").rglob(".*.tmp")] if (root / "run").is_dir() else []
        point = {"kind": kind, "detail": f"{delay:.2f} s" if kind == "time" else f"checkpoint write {at}"
                 if kind != "library" else "staging the entry", "exit": code, "checkpoint_step_after_kill": saved,
                 "temporaries_after_kill": len(leftovers)}
        resumes, began = 0, time.perf_counter()
        while resumes < 3:
            code, peak = _wait(_fork(lambda: _child(root, model, steps, method, threads, None, 0)))
            peaks.append(peak)
            resumes += 1
            if code == 0:
                break
        final = _tensors(root) if code == 0 else {}
        point["resumed_runs"] = resumes
        point["seconds"] = {"until_killed": round(killed_s, 2), "resume": round(time.perf_counter() - began, 2)}
        point["same_weights"] = bool(final) and final.keys() == reference.keys() and all(
            torch.equal(final[key], reference[key]) for key in reference)
        point["temporaries_after_resume"] = len(list((root / "run").rglob(".*.tmp")))
        point["staging_left"] = len(list((root / "library").glob(".staging-*")))  # hidden; reindex removes them
        report["points"].append(point)
        shutil.rmtree(root, ignore_errors=True)
    report["all_same_weights"] = all(p["same_weights"] for p in report["points"])
    report["killed_by_sigkill"] = sum(p["exit"] == -signal.SIGKILL for p in report["points"])
    report["temporaries_after_resume"] = sum(p["temporaries_after_resume"] for p in report["points"])
    report["by_kind"] = {kind: kinds.count(kind) for kind in KINDS}
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["child_peak_rss_mb"] = round(max(peaks) / 2**20, 1)
    report["bench_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    shutil.rmtree(work, ignore_errors=True)
    return report


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("kill-resume", help="training SIGKILLed at seeded points resumes to the same weights")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (a checkpoint after each)")
    parser.add_argument("--kills", type=int, default=12, help="seeded kill points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (resume needs one count)")
    parser.add_argument("--method", default="dreambooth_lora")

    def main(args: argparse.Namespace) -> int:
        report = run(args.model, args.steps, args.kills, args.seed, args.threads, args.method)
        print(json.dumps(report, indent=2))
        return 0 if report["all_same_weights"] else 1

    parser.set_defaults(func=main)
