"""`studio bench fuzz`: mutated kohya, LyCORIS, diffusers and PEFT adapters through `studio library import`.

Seed adapters per format are made with random (non-identity) weights on the base (LoRA on attention, feed-forward,
ResNet convolutions and the text encoder; LoKr on attention), exported, then mutated with a seeded generator
(benches/mutations.py): tensors dropped, added, renamed, reshaped, recast, filled with NaN; alphas and metadata broken;
headers flipped, truncated and given giant declared sizes; PEFT configs with missing keys, wrong types and giant
ranks. Each mutant is imported into a scratch library with the base given (so compatibility is checked), under a
timer. The outcome is one of:

    imported   the entry reads back, its tensors equal what the importer read, and it loads into the base and unloads
    refused    a StudioError (the one-line message the user sees), and the library is exactly as before
    crash      any other exception, or an import that cannot be read back or loaded: a bug
    hang       no answer within --timeout seconds: a bug
    partial    a refused import that left a folder or a staging directory behind: a bug

The run fails (exit status 1) on any crash, hang or partial entry.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benches.mutations import mutate
from studio.errors import StudioError
from studio.models import DEFAULT_MODEL


FORMATS = ("kohya", "lycoris", "diffusers", "peft")


class Hang(Exception):
    pass


def _random_weights(method: Any, seed: int) -> tuple[dict[str, torch.Tensor], Any]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return method.export()


def make_seeds(model: str, work: Path, lora_targets: str | None = None) -> dict[str, list[Path]]:
    """Valid adapter files (folders for PEFT) per format, with random weights on `model` (LoRA on `lora_targets`,
    default DreamBooth-LoRA's: attention, feed-forward, projections and ResNet convolutions)."""
    from studio.library import Library, export_adapter
    from studio.models import load_pipeline
    from trainers import DreamBoothLoRA, DreamBoothLoRAConfig, Kronecker, KroneckerConfig

    lib = Library(work / "seed-library")
    lora = DreamBoothLoRA(DreamBoothLoRAConfig(rank=4, **({"target_modules": lora_targets} if lora_targets else {})))
    lora.attach(load_pipeline(model))
    lib.add("seed-lora", *_random_weights(lora, 1))
    lokr = Kronecker(KroneckerConfig(factor=4, target_modules="to_q,to_k,to_v,to_out.0"))
    lokr.attach(load_pipeline(model))
    lib.add("seed-lokr", *_random_weights(lokr, 2))
    out = work / "seeds"
    seeds = {
        "kohya": [export_adapter("seed-lora", "kohya", out / "kohya.safetensors", library=lib)],
        "lycoris": [export_adapter("seed-lokr", "lycoris", out / "lycoris.safetensors", library=lib)],
        "diffusers": [export_adapter("seed-lora", "diffusers", out / "diffusers.safetensors", library=lib)],
        "peft": [export_adapter("seed-lora", "peft", out / "peft-lora", library=lib),
                 export_adapter("seed-lokr", "peft", out / "peft-lokr", library=lib)],
    }
    return seeds


def _snapshot(root: Path) -> set[str]:
    """What the library folder holds, less its lock and index (created on first use; the index is compared apart)."""
    return {p.name for p in root.iterdir()} - {".lock", "index.jsonl"} if root.is_dir() else set()


def _index(root: Path) -> str:
    path = root / "index.jsonl"
    return path.read_text() if path.is_file() else ""


def check_imported(name: str, path: Path, pipe: Any, lib: Any) -> str | None:
    """None when the entry is whole (reads back equal to the importer's tensors, loads and unloads), else why not."""
    from studio.library import load_adapters, unload_adapters
    from studio.library.adapter import read_adapter
    from studio.library.compat import align_names
    from studio.library.formats import read_any

    expected, meta = align_names(pipe, *(lambda i: (i.state_dict, i.meta))(read_any(path, pipe=pipe)))
    tensors, _ = read_adapter(lib.root / name)
    if tensors.keys() != expected.keys():
        return f"stored keys differ from the file's ({len(tensors)} vs {len(expected)})"
    for key, value in expected.items():
        if not torch.equal(tensors[key], value):
            return f"stored tensor {key} differs from the file's"
    try:
        load_adapters(pipe, [name], library=lib)
    except StudioError as err:
        return f"imported but does not load: {err}"
    finally:
        unload_adapters(pipe)
    return None


def try_one(path: Path, name: str, pipe: Any, lib: Any, timeout: float) -> tuple[str, str]:
    """(outcome, detail) of importing one mutant; see the module docstring."""
    from studio.library import import_adapter

    before, index = _snapshot(lib.root), _index(lib.root)

    def alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"no answer in {timeout:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        import_adapter(path, name=name, pipe=pipe, library=lib)
        problem = check_imported(name, path, pipe, lib)
        outcome, detail = ("crash", problem) if problem else ("imported", "")
    except Hang as err:
        outcome, detail = "hang", str(err)
    except StudioError as err:
        outcome, detail = "refused", str(err)
    except Exception as err:  # noqa: BLE001 - the thing being measured
        outcome, detail = "crash", f"{type(err).__name__}: {err}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    after = _snapshot(lib.root)
    if outcome == "refused" and (after != before or _index(lib.root) != index):
        return "partial", f"left {sorted(after ^ before)} ({detail})"
    if outcome in ("imported", "crash") and name in after:
        shutil.rmtree(lib.root / name)  # keep the scratch library small; the next list() heals the index
    leftovers = sorted(n for n in after - before if n != name)
    if leftovers:
        return "partial", f"left {leftovers} ({detail})"
    return outcome, detail


def run(
    model: str, per_format: int, seed: int, timeout: float, work: Path | None = None, lora_targets: str | None = None
) -> dict[str, Any]:
    from studio.library import Library
    from studio.models import load_pipeline

    start = time.perf_counter()
    work = Path(work or tempfile.mkdtemp(prefix="studio-fuzz-"))
    seeds = make_seeds(model, work, lora_targets)
    pipe = load_pipeline(model)
    lib = Library(work / "library")
    rng = random.Random(seed)
    report: dict[str, Any] = {"model": model, "seed": seed, "per_format": per_format,
                              "threads": torch.get_num_threads()}
    totals: collections.Counter[str] = collections.Counter()
    bugs: list[dict[str, str]] = []
    for fmt in FORMATS:
        counts: collections.Counter[str] = collections.Counter()
        ops: collections.Counter[str] = collections.Counter()
        messages: collections.Counter[str] = collections.Counter()
        for i in range(per_format):
            source = seeds[fmt][i % len(seeds[fmt])]
            target = work / "mutants" / fmt / (f"{i:05d}" + ("" if source.is_dir() else ".safetensors"))
            description = mutate(source, target, fmt, rng)
            ops[description.split(":")[0]] += 1
            outcome, detail = try_one(target, f"{fmt}-{i:05d}", pipe, lib, timeout)
            counts[outcome] += 1
            if outcome == "refused":
                messages[_shape_of(detail)] += 1
            elif outcome != "imported":
                bugs.append({"format": fmt, "mutant": str(target), "mutation": description, "outcome": outcome,
                             "detail": detail})
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        report[fmt] = {"mutants": per_format, **{k: counts.get(k, 0) for k in
                                                 ("imported", "refused", "crash", "hang", "partial")},
                       "mutations": dict(ops.most_common()), "refusals": dict(messages.most_common(8))}
        totals.update(counts)
        print(f"{fmt}: {dict(counts)}", file=sys.stderr, flush=True)
    report["total"] = {"mutants": per_format * len(FORMATS),
                       **{k: totals.get(k, 0) for k in ("imported", "refused", "crash", "hang", "partial")}}
    report["library_after"] = {"entries": len(Library(lib.root).list()),
                               "hidden_leftovers": sorted(n for n in _snapshot(lib.root) if n.startswith(".")
                                                          and n not in (".lock",))}
    report["bugs"] = bugs[:20]
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _shape_of(message: str) -> str:
    """A refusal message with its paths and numbers blanked, so alike messages count together."""
    import re

    text = re.sub(r"(?<![\w/])/\S+", "<path>", message)
    return re.sub(r"\d+", "N", text)[:160]


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("fuzz", help="mutated kohya/LyCORIS/diffusers/PEFT files: clean errors, never crashes")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the base the adapters are made on and imported to")
    parser.add_argument("--per-format", type=int, default=500, help="mutants per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before an import counts as a hang")
    parser.add_argument("--lora-targets", default=None, help="layers of the LoRA seeds (default DreamBooth-LoRA's)")

    def main(args: argparse.Namespace) -> int:
        report = run(args.model, args.per_format, args.seed, args.timeout, lora_targets=args.lora_targets)
        print(json.dumps(report, indent=2))
        return 1 if any(report["total"][k] for k in ("crash", "hang", "partial")) else 0

    parser.set_defaults(func=main)
