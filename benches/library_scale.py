"""`studio bench library`: a library of 1,000 adapters: list, search and `<lora:...>` resolution times, and the
index after writers are killed mid-write.

1. Fill a scratch library with `--adapters` entries through `Library.add` (random rank-4 LoRA weights on attention
   layers of the base, trigger words, tags, kinds, a model card), timing the adds.
2. Time, in this process (median of `--repeats`): `Library().list()` from the index, the same with the index deleted
   (rebuilt from the folders), `search` by free text and by tag, and `<lora:name:w>` resolution (tags split, entry
   found, tensors read and checked), plus loading the resolved adapter into the base and unloading it. Then the
   whole `studio library list` and `studio library list "red star"` commands, as processes (interpreter and imports
   included, reported apart).
3. Crash between writes: `--kills` times, a forked writer adds, edits and removes entries while it is SIGKILLed at a
   seeded moment; then a fresh `Library().list()` must return exactly the complete entry folders, every one readable,
   the index must agree with them, and `reindex` must leave no staging or trash folder behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from studio.models import DEFAULT_MODEL


WORDS = ("star", "ring", "heart", "stripes", "dots", "checker", "red", "blue", "emblem", "glyph", "moon", "sun")
KINDS = ("subject", "style", "content")


def _targets(pipe: Any, count: int = 6) -> list[tuple[str, int, int]]:
    """(module, in, out) of the first `count` attention projections of the UNet."""
    out = []
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_q", "attn1.to_out.0")) and isinstance(
            module, torch.nn.Linear
        ):
            out.append((f"unet.{name}", module.in_features, module.out_features))
    return out[:count]


def make_adapter(i: int, targets: list[tuple[str, int, int]], base: Any) -> tuple[dict[str, torch.Tensor], Any]:
    from studio.library.meta import AdapterMeta

    g = torch.Generator().manual_seed(i)
    rng = random.Random(i)
    tensors = {}
    for module, fan_in, fan_out in targets:
        tensors[f"{module}.lora_A.weight"] = torch.randn(4, fan_in, generator=g) * 0.05
        tensors[f"{module}.lora_B.weight"] = torch.randn(fan_out, 4, generator=g) * 0.05
    meta = AdapterMeta(
        method="dreambooth_lora", kind=rng.choice(KINDS), trigger_words=[f"tok{i}"],
        tags=rng.sample(WORDS, 3), description=f"adapter {i}: a {' '.join(rng.sample(WORDS, 2))} concept",
        ranks={m: 4 for m, _, _ in targets}, alphas={m: 4.0 for m, _, _ in targets}, base=base,
    )
    return tensors, meta


def fill(root: Path, count: int, model: str) -> dict[str, float]:
    from studio.library import Library
    from studio.library.compat import base_info
    from studio.models import load_pipeline

    pipe = load_pipeline(model)
    targets = _targets(pipe)
    base = base_info(pipe, [m for m, _, _ in targets], name=model)
    lib = Library(root)
    times = []
    for i in range(count):
        tensors, meta = make_adapter(i, targets, base)
        start = time.perf_counter()
        lib.add(f"adapter-{i:04d}", tensors, meta)
        times.append(time.perf_counter() - start)
    return {"adds": count, "add_s_median": round(statistics.median(times), 4),
            "add_s_last_100_median": round(statistics.median(times[-100:]), 4)}


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def timings(root: Path, count: int, model: str, repeats: int, cli: bool = True) -> dict[str, Any]:
    from studio.generate import cached_pipeline
    from studio.library import Library, load_adapters, unload_adapters
    from studio.prompt_tags import split_lora_tags

    lib = Library(root)
    name = f"adapter-{count // 2:04d}"
    prompt = f"a large red star <lora:{name}:0.8> on the left"

    def rebuild() -> None:
        (root / "index.jsonl").unlink(missing_ok=True)
        Library(root).list()

    def resolve() -> None:
        _, tags = split_lora_tags(prompt)
        entry = Library(root).get(tags[0][0])
        entry.state_dict()  # read and checked (shapes, finite values, ranks)

    pipe = cached_pipeline(model, "cpu")

    def load() -> None:
        _, tags = split_lora_tags(prompt)
        load_adapters(pipe, [n for n, _ in tags], [w for _, w in tags], library=Library(root))
        unload_adapters(pipe)

    out = {
        "rebuild_index_s": _median_time(rebuild, max(1, repeats // 2)),
        "list_s": _median_time(lambda: Library(root).list(), repeats),
        "search_text_s": _median_time(lambda: Library(root).search("red star"), repeats),
        "search_tag_s": _median_time(lambda: Library(root).search(tag="stripes", kind="style"), repeats),
        "resolve_tag_s": _median_time(resolve, repeats),
        "resolve_and_load_s": _median_time(load, repeats),
        "entries_listed": len(lib.list()),
        "search_hits": len(Library(root).search("red star")),
    }
    env = {**os.environ, "STUDIO_LIBRARY": str(root)}
    commands = {"cli_list_s": ["library", "list"], "cli_search_s": ["library", "list", "red star"],
                "cli_help_s": ["--help"]}
    for key, argv in commands.items() if cli else ():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "studio", *argv], env=env, capture_output=True, check=True)
        out[key] = round(time.perf_counter() - start, 3)
    return out


def _writer(root: Path, seed: int, model_targets: list[tuple[str, int, int]]) -> None:
    """Forever: add, edit or remove entries (runs in a forked child until it is killed)."""
    from studio.library import Library, edit
    from studio.library.meta import BaseInfo

    lib, rng = Library(root), random.Random(seed)
    while True:
        names = [p.name for p in lib.folders()]
        roll = rng.random()
        if roll < 0.5 or len(names) < 5:
            i = rng.randrange(10_000, 20_000)
            lib.add(f"k-{i}", *make_adapter(i, model_targets, BaseInfo()), overwrite=True)
        elif roll < 0.8:
            edit(rng.choice(names), tags=rng.sample(WORDS, 2), library=lib)
        else:
            lib.remove(rng.choice(names))


def crash_between_writes(root: Path, kills: int, seed: int, model: str, max_delay: float = 1.5) -> dict[str, Any]:
    from studio.library import Library
    from studio.library.adapter import read_adapter
    from studio.library.store import INDEX_NAME
    from studio.models import load_pipeline

    targets = _targets(load_pipeline(model))
    rng = random.Random(seed)
    checks = {"kills": 0, "entries_checked": 0, "index_rows_match": 0, "problems": 0, "leftovers_after_reindex": 0,
              "stale_dirs_seen": 0}
    for k in range(kills):
        pid = os.fork()
        if pid == 0:  # the writer: never returns; ends by SIGKILL
            torch.set_num_threads(1)  # no OpenMP pool inherited across fork
            try:
                _writer(root, seed * 1000 + k, targets)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        checks["kills"] += 1
        lib = Library(root)
        entries = lib.list()
        checks["problems"] += len(lib.problems)
        complete = [p.name for p in lib.folders()]
        assert [e.name for e in entries] == complete, "list() must return exactly the entry folders"
        for entry in entries:
            read_adapter(entry.folder)  # whole: config, weights and checks
            checks["entries_checked"] += 1
        rows = [json.loads(line)["name"] for line in (root / INDEX_NAME).read_text().splitlines()]
        checks["index_rows_match"] += rows == complete
        checks["stale_dirs_seen"] += sum(1 for p in root.iterdir() if p.name.startswith((".staging-", ".trash-")))
        lib.reindex(stale_after=0.0)
        checks["leftovers_after_reindex"] += sum(1 for p in root.iterdir()
                                                 if p.name.startswith((".staging-", ".trash-")))
    return checks


def run(
    model: str, count: int, repeats: int, kills: int, seed: int, cli: bool = True, max_delay: float = 1.5
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="studio-library-bench-"))
    try:
        report: dict[str, Any] = {"adapters": count, "threads": torch.get_num_threads(), "model": model}
        start = time.perf_counter()
        report["fill"] = fill(root, count, model)
        report["fill"]["seconds"] = round(time.perf_counter() - start, 1)
        report["index_mb"] = round((root / "index.jsonl").stat().st_size / 2**20, 2)
        report["timings"] = timings(root, count, model, repeats, cli)
        report["crash_between_writes"] = crash_between_writes(root, kills, seed, model, max_delay)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("library", help="1,000 adapters: list/search/<lora:...> times; crashes between writes")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the base the adapters are made for")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kills", type=int, default=10, help="writers SIGKILLed at seeded moments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=1.5, help="latest moment of a kill (seconds)")
    parser.add_argument("--no-cli", dest="cli", action="store_false", help="skip the `studio library` process times")
    parser.set_defaults(func=lambda args: print(json.dumps(
        run(args.model, args.adapters, args.repeats, args.kills, args.seed, args.cli, args.max_delay), indent=2)) or 0)
