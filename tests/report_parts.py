"""Synthetic parts of `studio bench report`, shaped as the benches write them (seeded judgements, no training), for
tests of the report's assembly, figures, coverage check, keys and comparison, and for the browser test's report."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any


CATEGORIES = ("two_subjects", "subject_object", "subject_style")


def _judged(rng: random.Random, n: int, p: float) -> list[int]:
    return [int(rng.random() < p) for _ in range(n)]


def _frac(values: list[int]) -> float:
    return round(sum(values) / len(values), 4)


def trainer_part(method: str, rng: random.Random, quality: float = 0.7) -> dict:
    """One trainer's part: an emblem row (B-LoRA: its one-image row) and its fresh-process memory run."""
    memory = {"peak_memory_mb": 900.0 + 100 * rng.random(), "kind": "cpu peak rss of a fresh process, 6 steps",
              "steps": 6}
    if method == "b_lora":
        raw = {"reproduced": _judged(rng, 20, quality)}
        style = {"position": _judged(rng, 20, 0.8)}
        row = {"method": method, "kind": "one image", "concept": "stripes", "seconds": 80.0 + rng.random(),
               "trainable_params": 300_000, "peak_memory_mb": 150.0,
               "both": {"reproduced": _frac(raw["reproduced"]), "raw": raw},
               "style": {"position": _frac(style["position"]), "raw": style}}
        return {"result": {"rows": [], "b_lora": [row], "grid": "", "memory": memory}}
    raw = {k: _judged(rng, 20, quality) for k in ("emblem", "position", "background")}
    single = {k: _judged(rng, 10, 0.9) for k in ("shape", "colour", "position", "background")}
    accuracy = {k: _frac(v) for k, v in single.items()}
    accuracy["mean"] = round(sum(accuracy.values()) / 4, 4)
    row = {"method": method, "kind": "emblem", "concept": "123", "seconds": 100.0 + 50 * rng.random(),
           "trainable_params": {"dreambooth_lora": 1_325_056, "kronecker": 120_000}.get(method, 700_000),
           "peak_memory_mb": 200.0 + 10 * rng.random(), **{k: _frac(v) for k, v in raw.items()}, "raw": raw,
           "single_accuracy": {**accuracy, "raw": single}, "drift": round(0.9 - accuracy["mean"], 4)}
    return {"result": {"rows": [row], "b_lora": [], "base_accuracy": {"mean": 0.9}, "grid": "", "memory": memory}}


def compose_part(rows: list[str], rng: random.Random, success: dict[str, float] | None = None, seeds: int = 8) -> dict:
    """A compose bench result for `rows` (+ "alone"), `success[row]` its chance of a successful image."""
    figures, raw, seconds = {}, {}, {}
    for row in [*rows, "alone"]:
        p = (success or {}).get(row, 0.5)
        raw[row] = {cat: {"composition_success": _judged(rng, seeds, p), "both_right": _judged(rng, seeds, p),
                          "subject_fidelity": [round(rng.random() * p, 4) for _ in range(seeds)],
                          "prompt_fidelity": [round(rng.random(), 4) for _ in range(seeds)]} for cat in CATEGORIES}
        seconds[row] = [1.0 + (row not in ("alone", "none")) + 0.05 * rng.random() for _ in CATEGORIES]
    alone = sorted(seconds["alone"])[1]
    for row in raw:
        figures[row] = {cat: {k: round(sum(v) / len(v), 4) for k, v in per.items()} for cat, per in raw[row].items()}
        figures[row].update(time_ratio=round(sorted(seconds[row])[1] / alone, 3), install_seconds=0.0)
    return {"result": {"rows": figures, "raw": raw, "raw_seconds": seconds, "single_adapter_s_per_image": alone,
                       "seeds": seeds, "grid": ""}}


def base_part(rng: random.Random) -> dict:
    results = {}
    for g in ("3", "7.5"):
        sets = {}
        for name, n in (("single", 10), ("two", 20)):
            raw = {k: _judged(rng, n, 0.85) for k in ("shape", "colour", "size", "position", "background",
                                                      "objects_correct")}
            sets[name] = {**{k: _frac(v) for k, v in raw.items()}, "raw": raw}
        results[g] = {"guidance": float(g), **sets, "s_per_image": 0.5}
    return {"result": {"results": results, "grid": ""}}


def parts(seed: int = 0, success: dict[str, float] | None = None) -> dict[str, dict]:
    """Every part of a report over the registries as they stand."""
    import composers
    from trainers import METHODS

    rng = random.Random(seed)
    out: dict[str, Any] = {f"trainer-{m}": trainer_part(m, rng) for m in METHODS}
    out["compose-controls"] = compose_part(["none"], rng, success)
    out.update({f"composer-{c}": compose_part([c], rng, success) for c in composers.COMPOSERS})
    out["base"] = base_part(rng)
    for part in out.values():
        part.update(finished="2026-01-01 00:00:00 UTC", seconds=1.0, reused=False)
    return out


def meta() -> dict:
    from benches.report import QUICK, REDUCTIONS

    return {"model": "studio-tiny", "quick": True, "settings": QUICK, "reductions": REDUCTIONS,
            "machine": "test CPU, 2 cores", "threads": 1, "tree": "0123456789abcdef", "written": "2026-01-01",
            "full_expected": "hours", "composer_options": {}}


def write_report(out: Path, seed: int = 0, success: dict[str, float] | None = None) -> dict:
    """A whole synthetic report (tables, JSON, figures) in `out`; returns it."""
    from benches.report_tables import assemble
    from benches.report_tables import write_report as write

    report = assemble(parts(seed, success), meta())
    write(out, report)
    return report
