"""`studio bench report --compare OLD.json`: what got better or worse between two reports, and by how much.

Every figure of both reports is matched by its row (trainer and concept; composer and pair kind; base guidance,
object count and attribute) and judged against a noise margin:

- a fraction of 0/1 judgements (concept found, composition success, attribute accuracy): twice the standard error
  of the difference of two proportions, from the raw judgement counts of both reports (pooled p:
  `2 * sqrt(p (1 - p) (1/n_old + 1/n_new))`, a two-sided test at about 95%);
- a mean of continuous judgements (subject fidelity): twice the standard error of the difference of the means;
- seconds, time ratios and memory: a relative margin (timings on a shared machine move by tens of percent):
  `RELATIVE_MARGIN` of the old value; trainable parameters: any change.

A difference beyond its margin is "better" or "worse" by the figure's direction (drift, seconds, time, memory and
parameters are better lower); within it, "same".
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from studio.errors import StudioError


RELATIVE_MARGIN = {"seconds": 0.25, "time_ratio": 0.25, "peak_memory_mb": 0.15, "trainable_params": 0.0}
LOWER_IS_BETTER = {"seconds", "time_ratio", "peak_memory_mb", "trainable_params"}
Z = 2.0  # standard errors of the difference that count as a change


def margin_raw(old: list[float], new: list[float]) -> float:
    """The noise margin of the difference of two means of raw judgements (see the module docstring)."""
    if not old or not new:
        return math.inf
    if all(v in (0, 1) for v in (*old, *new)):
        p = (sum(old) + sum(new)) / (len(old) + len(new))
        return Z * math.sqrt(p * (1 - p) * (1 / len(old) + 1 / len(new)))
    var = [statistics.pvariance(v) if len(v) > 1 else 0.0 for v in (old, new)]
    return Z * math.sqrt(var[0] / len(old) + var[1] / len(new))


def _entry(where: str, metric: str, old: float | None, new: float | None, margin: float, lower_better: bool,
           how: str) -> dict:
    if old is None or new is None:
        return {"where": where, "metric": metric, "old": old, "new": new, "diff": None, "margin": None,
                "verdict": "only in " + ("new" if old is None else "old"), "how": how}
    diff = new - old
    verdict = "same"
    if abs(diff) > margin + 1e-12:
        verdict = "better" if (diff < 0) == lower_better else "worse"
    return {"where": where, "metric": metric, "old": round(old, 4), "new": round(new, 4), "diff": round(diff, 4),
            "margin": round(margin, 4), "verdict": verdict, "how": how}


def _raw_mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _compare_raw(where: str, metric: str, old: list[float] | None, new: list[float] | None,
                 lower_better: bool = False) -> dict:
    old_v = _raw_mean(old) if old is not None else None
    new_v = _raw_mean(new) if new is not None else None
    how = f"raw judgements: {len(old or [])} old, {len(new or [])} new"
    return _entry(where, metric, old_v, new_v, margin_raw(old or [], new or []), lower_better, how)


def _compare_value(where: str, metric: str, old: float | None, new: float | None) -> dict:
    rel = RELATIVE_MARGIN[metric]
    margin = abs(old or 0.0) * rel
    return _entry(where, metric, old, new, margin, metric in LOWER_IS_BETTER, f"relative margin {rel:.0%}")


def _index(rows: list[dict], *keys: str) -> dict[tuple, dict]:
    return {tuple(r[k] for k in keys): r for r in rows}


def compare(old: dict, new: dict) -> list[dict]:
    """Every matched figure of two reports (report.json contents), with its difference, margin and verdict."""
    out = []
    olds, news = _index(old["trainers"], "method", "concept"), _index(new["trainers"], "method", "concept")
    for key in dict.fromkeys([*olds, *news]):
        o, n = olds.get(key, {}), news.get(key, {})
        where = f"trainer {key[0]}, {key[1]}"
        for metric in ("found", "position", "trigger_free"):
            if metric in o.get("raw", {}) or metric in n.get("raw", {}):
                out.append(_compare_raw(where, metric, o.get("raw", {}).get(metric), n.get("raw", {}).get(metric)))
        for metric in ("seconds", "peak_memory_mb", "trainable_params"):
            if o.get(metric) is not None or n.get(metric) is not None:
                out.append(_compare_value(where, metric, o.get(metric), n.get(metric)))
    old_memory, new_memory = old.get("trainer_memory", {}), new.get("trainer_memory", {})
    for method in dict.fromkeys([*old_memory, *new_memory]):  # fresh-process runs (reports before them have none)
        out.append(_compare_value(f"trainer {method}, fresh process", "peak_memory_mb",
                                  old_memory.get(method, {}).get("peak_memory_mb"),
                                  new_memory.get(method, {}).get("peak_memory_mb")))
    rows = ("composers", "controls")
    olds = _index([r for k in rows for r in old[k]], "composer")
    news = _index([r for k in rows for r in new[k]], "composer")
    for key in dict.fromkeys([*olds, *news]):
        o, n = olds.get(key, {"kinds": {}}), news.get(key, {"kinds": {}})
        for kind in dict.fromkeys([*o["kinds"], *n["kinds"]]):
            ok, nk = o["kinds"].get(kind, {}).get("raw", {}), n["kinds"].get(kind, {}).get("raw", {})
            for metric in ("success", "subject_fidelity"):
                out.append(_compare_raw(f"composer {key[0]}, {kind.replace('_', ' ')}", metric, ok.get(metric),
                                        nk.get(metric)))
        out.append(_compare_value(f"composer {key[0]}", "time_ratio", o.get("time_ratio"), n.get("time_ratio")))
    olds, news = _index(old["base"], "guidance", "set"), _index(new["base"], "guidance", "set")
    for key in dict.fromkeys([*olds, *news]):
        o, n = olds.get(key, {}).get("raw", {}), news.get(key, {}).get("raw", {})
        for metric in dict.fromkeys([*o, *n]):
            out.append(_compare_raw(f"base guidance {key[0]}, {key[1]}", metric, o.get(metric), n.get(metric)))
    return out


def markdown(entries: list[dict], old_name: str, new_name: str) -> str:
    """Worse first, then better, then the count of unchanged figures."""
    changed = [e for e in entries if e["verdict"] in ("worse", "better")]
    changed.sort(key=lambda e: (e["verdict"] != "worse", -abs(e["diff"])))
    others = [e for e in entries if e["verdict"] not in ("worse", "better", "same")]
    same = sum(e["verdict"] == "same" for e in entries)
    lines = [f"# {new_name} against {old_name}", "",
             f"{sum(e['verdict'] == 'worse' for e in entries)} worse, {sum(e['verdict'] == 'better' for e in entries)}"
             f" better, {same} within their noise margin (twice the standard error of the difference for judgements; "
             "a relative margin for seconds, time ratios and memory).", "",
             "| verdict | where | metric | old | new | difference | margin | margin from |", "|---" * 8 + "|"]
    for e in [*changed, *others]:
        lines.append(f"| {e['verdict']} | {e['where']} | {e['metric']} | {e['old']} | {e['new']} | "
                     f"{'' if e['diff'] is None else format(e['diff'], '+.4g')} | {e['margin']} | {e['how']} |")
    return "\n".join(lines) + "\n"


def load(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StudioError(f"{path} does not exist; give the report.json of an earlier `studio bench report`") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StudioError(f"{path} is not JSON; give the report.json of an earlier `studio bench report`") from None
    if not isinstance(report, dict) or not {"trainers", "composers", "base"} <= set(report):
        raise StudioError(f"{path} is not a report.json of `studio bench report` (no trainers, composers, base)")
    return report


def compare_files(old: Path, new: Path, out: Path | None = None) -> int:
    """Print (and write to `out`) the comparison of two report.json files; the number of worse figures."""
    from studio.atomic import write_text

    entries = compare(load(old), load(new))
    text = markdown(entries, str(old), str(new))
    if out is not None:
        write_text(out, text)
    print(text)
    return sum(e["verdict"] == "worse" for e in entries)
