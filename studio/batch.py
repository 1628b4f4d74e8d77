"""`studio batch JOBS.jsonl --out DIR`: many generations from a job file, resumable and shardable.

Each line of the job file is a JSON object whose keys are the long flags of `studio generate` without dashes
(`{"prompt": "...", "seed": 3, "steps": 20}`); `out` may name the job's file, else it is `NNNNN.png` by line.
Under `accelerate launch -m studio batch ...` job i runs on process i mod world_size, so each job runs exactly
once with no communication. A job is done when its PNG exists: PNGs are written atomically, so a killed run
leaves only whole files, and a restart skips them (stale temporary files of a killed run are removed).
Each PNG records its job index and the rank that made it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.atomic import disk_full
from studio.errors import DiskFull, StudioError


@dataclass(frozen=True)
class Job:
    index: int  # line order among the jobs (0-based)
    line: int  # 1-based line number in the file, for error messages
    options: dict[str, Any]
    out: str  # file name (relative to the output folder) of the first image


def read_jobs(path: str | Path) -> list[Job]:
    """Parse and validate a JSONL job file; every error names the line and what to do."""
    from studio.configs import from_mapping
    from studio.generate import GenerateConfig

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise StudioError(f"cannot read job file {path} ({err}); pass a UTF-8 JSONL file, one job per line") from err
    jobs: list[Job] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise StudioError(f"{path}:{number}: not JSON ({err.msg}); write one JSON object per line") from err
        if not isinstance(options, dict):
            raise StudioError(f"{path}:{number}: a job is a JSON object like {{\"prompt\": \"a red star\"}}")
        out = str(options.pop("out", f"{len(jobs):05d}.png"))
        if Path(out).suffix.lower() != ".png" or Path(out).is_absolute() or ".." in Path(out).parts:
            raise StudioError(f"{path}:{number}: \"out\" must be a relative .png name inside --out, got {out!r}")
        try:
            from_mapping(GenerateConfig, options)
        except StudioError as err:
            raise StudioError(f"{path}:{number}: {err}") from err
        jobs.append(Job(len(jobs), number, options, out))
    if not jobs:
        raise StudioError(f"{path} holds no jobs; write one JSON object per line, e.g. {{\"prompt\": \"a red star\"}}")
    outs = [j.out for j in jobs]
    if len(set(outs)) != len(outs):
        dup = next(o for o in outs if outs.count(o) > 1)
        raise StudioError(f"{path}: two jobs write {dup!r}; give each job its own \"out\"")
    return jobs


def job_files(job: Job, out_dir: Path) -> list[Path]:
    from studio.generate import output_paths

    paths, grid = output_paths(out_dir / job.out, int(job.options.get("num_images", 1)))
    return paths + ([grid] if grid is not None else [])


def remove_stale_temporaries(files: list[Path]) -> None:
    """Delete temporary files a killed writer left beside `files` (atomic writes use `.NAME.*.tmp`)."""
    for f in files:
        for tmp in f.parent.glob(f".{f.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def run_batch(
    jobs: list[Job],
    out_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    device: str | None = None,
    on_image: Callable[[Path], None] | None = None,
    progress: bool = True,
    cancel: threading.Event | None = None,
) -> dict[str, int]:
    """Run this rank's share of `jobs` (job i on rank i mod world_size), skipping finished ones. Setting `cancel`
    stops after the current denoising step (`studio.errors.Cancelled`); finished PNGs stay, a rerun skips them."""
    from tqdm import tqdm

    from studio.configs import from_mapping
    from studio.generate import GenerateConfig, cached_pipeline, generate, make_grid, resolve_device
    from studio.pnginfo import save_png

    out_dir = Path(out_dir)
    mine = [j for j in jobs if j.index % world_size == rank]
    todo = []
    for job in mine:
        files = job_files(job, out_dir)
        remove_stale_temporaries(files)
        if not all(f.is_file() for f in files):
            todo.append(job)
    counts = {"jobs": len(jobs), "mine": len(mine), "skipped": len(mine) - len(todo), "made": 0}
    bar = tqdm(todo, desc=f"batch rank {rank}", unit="job", position=rank, disable=not progress)
    for job in bar:
        config = from_mapping(GenerateConfig, {**job.options, **({"device": device} if device else {})})
        pipe = cached_pipeline(config.model, resolve_device(config.device))
        result = generate(config, pipe=pipe, cancel=cancel)
        files = job_files(job, out_dir)
        extra = {"job": job.index, "rank": rank, "world_size": world_size}
        try:
            for image, params, path in zip(result.images, result.params, files):
                if not path.is_file():  # a restarted job never rewrites a finished file
                    save_png(image, path, {**params, **extra})
                    if on_image is not None:
                        on_image(path)
            if len(files) > len(result.images) and not files[-1].is_file():
                save_png(make_grid(result.images), files[-1], {**result.params[0], **extra})
        except DiskFull as err:  # every PNG written so far is whole; the rerun skips the finished jobs
            raise disk_full(err.path, f"{Path(err.path).name} (job on line {job.line}) was not written; "
                            f"{counts['skipped'] + counts['made']} of this run's {len(mine)} jobs are done and kept",
                            "run the same command again (finished jobs are skipped)") from None
        counts["made"] += 1
    return counts
