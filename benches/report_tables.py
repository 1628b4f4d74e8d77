"""The benchmark report's assembly: parts -> one report (rows with their raw judgements), the coverage check against
the registries, `report.md` and the figures.

A trainer row is one adapter: its concept found (an emblem found; a texture found; B-LoRA: the training image's
object in its texture with both entries), the asked position kept, trigger-free accuracy and drift (emblems),
trainable parameters, training seconds and peak training memory. A composer row holds, per pair kind, composition
success (subject + object: the emblem found and the other object entirely right, as `studio bench compose`), and
the time per image as a ratio to single-adapter generation measured in the same part.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from studio.errors import StudioError


PAIR_KINDS = {"two_subjects": ("composition_success", "two subjects"),
              "subject_object": ("both_right", "subject + object"),
              "subject_style": ("composition_success", "subject + style")}
ATTRIBUTES = ("shape", "colour", "size", "position", "background")


def trainer_rows(part: dict) -> list[dict]:
    """One part's adapters as report rows, each keeping its raw judgements (0/1 per image or object)."""
    result, rows = part["result"], []
    for r in result.get("rows", []):
        found = "emblem" if r["kind"] == "emblem" else "texture"
        row = {"method": r["method"], "concept": f"{r['kind']} {r['concept']}", "found": r[found],
               "position": r["position"], "raw": {"found": r["raw"][found], "position": r["raw"]["position"]}}
        if "drift" in r:
            row.update(drift=r["drift"], trigger_free=r["single_accuracy"]["mean"])
            row["raw"]["trigger_free"] = [v for k in sorted(r["single_accuracy"]["raw"])
                                          for v in r["single_accuracy"]["raw"][k]]
        rows.append(row)
    for r in result.get("b_lora", []):
        both, style = r["both"], r["style"]
        rows.append({"method": r["method"], "concept": f"one image {r['concept']}", "found": both["reproduced"],
                     "position": style["position"],
                     "raw": {"found": both["raw"]["reproduced"], "position": style["raw"]["position"]}})
    originals = [*result.get("rows", []), *result.get("b_lora", [])]
    for row, r in zip(rows, originals):
        row.update({k: r.get(k) for k in ("seconds", "trainable_params", "peak_memory_mb")})
        row["reused"] = part.get("reused", False)
    return rows


def composer_row(name: str, part: dict) -> dict:
    """A composer's (or control's) figures per pair kind, with its raw judgements and seconds per image."""
    result = part["result"]
    figures, raw = result["rows"][name], result["raw"][name]
    kinds = {}
    for kind, (key, _) in PAIR_KINDS.items():
        if kind in figures:
            kinds[kind] = {"success": figures[kind][key], "subject_fidelity": figures[kind]["subject_fidelity"],
                           "raw": {"success": raw[kind][key], "subject_fidelity": raw[kind]["subject_fidelity"]}}
    return {"composer": name, "kinds": kinds, "time_ratio": figures["time_ratio"],
            "raw_seconds": result["raw_seconds"][name], "alone_seconds": result["raw_seconds"]["alone"],
            "install_seconds": figures["install_seconds"], "reused": part.get("reused", False)}


def base_rows(part: dict) -> list[dict]:
    rows = []
    for key, r in part["result"]["results"].items():
        for name in ("single", "two"):
            figures, keys = r[name], (*ATTRIBUTES, "objects_correct")
            rows.append({"guidance": key, "set": name, **{k: figures.get(k) for k in keys},
                         "raw": {k: figures["raw"][k] for k in keys if k in figures["raw"]},
                         "s_per_image": r["s_per_image"]})
    return rows


def missing_rows(report: dict) -> list[str]:
    """Registered trainers and composers the report has no row for."""
    import composers
    from trainers import METHODS

    methods = {r["method"] for r in report["trainers"]}
    names = {r["composer"] for r in report["composers"]}
    return ([f"trainer {m}" for m in METHODS if m not in methods]
            + [f"composer {c}" for c in composers.COMPOSERS if c not in names])


def assemble(parts: dict[str, dict], meta: dict) -> dict:
    """One report from the parts; refuses (StudioError) when a registered method or composer has no row."""
    report: dict = {"meta": meta, "trainers": [], "trainer_memory": {}, "composers": [], "controls": [], "base": [],
                    "grids": {},
                    "parts": {n: {"finished": p.get("finished"), "seconds": p.get("seconds"),
                                  "load": p.get("load"), "reused": p.get("reused", False)} for n, p in parts.items()}}
    for name, part in parts.items():
        result = part.get("result") or {}
        if result.get("grid"):
            report["grids"][name] = result["grid"]
        if name.startswith("trainer-"):
            report["trainers"] += trainer_rows(part)
            if result.get("memory"):  # the method's fresh-process run (parts before it: the rows' in-process peaks)
                report["trainer_memory"][name.removeprefix("trainer-")] = result["memory"]
        elif name == "compose-controls":
            report["controls"] = [composer_row(c, part) for c in result["rows"]]
            report["meta"]["single_adapter_s_per_image"] = result.get("single_adapter_s_per_image")
        elif name.startswith("composer-"):
            report["composers"].append(composer_row(name.removeprefix("composer-"), part))
        elif name == "base":
            report["base"] = base_rows(part)
    missing = missing_rows(report)
    if missing:
        raise StudioError(f"the report has no row for {', '.join(missing)}: every registered method needs one; "
                          "run `studio bench report` again (its parts cover the registries)")
    return report


def caption(meta: dict, what: str = "") -> str:
    s = meta["settings"]
    seeds = f"{s['seeds']} seeds per compose case" if what == "compose" else "one seed per prompt"
    text = (f"{meta['model']} on {meta['machine']}, {meta['threads']} threads, {s['steps']} sampling steps, {seeds}; "
            f"code {meta['tree'][:12]}.")
    if meta["quick"]:
        text += " QUICK report: " + "; ".join(meta["reductions"]) + "."
    return text


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), 4) if values else None


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "" if value is None else format(value, fmt)


def peak_memory(report: dict, method: str) -> float | None:
    """A method's peak training memory: its fresh-process run, or (reports before those runs) the mean of its
    adapters' in-process peaks, which depend on what ran before them in the process."""
    memory = report.get("trainer_memory", {}).get(method)
    if memory:
        return memory["peak_memory_mb"]
    return _mean([r.get("peak_memory_mb") for r in report["trainers"] if r["method"] == method])


def memory_kind(report: dict) -> str:
    """What the peak training memory figures are (the fresh-process runs, or the older in-process peaks)."""
    kinds = {m["kind"] for m in report.get("trainer_memory", {}).values()}
    if kinds:
        return ", ".join(sorted(kinds))
    return "peak rss above the resting process (in one process: depends on what ran before)"


def headline(report: dict) -> list[str]:
    """The summary tables (README's Benchmarks section copies them): per trainer and per composer."""
    lines = ["| trainer | concept found | drift | trainable params | train s | peak train MB |",
             "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in report["trainers"]):
        rows = [r for r in report["trainers"] if r["method"] == method]
        lines.append(f"| {method} | {_f(_mean([r['found'] for r in rows]))} | "
                     f"{_f(_mean([r.get('drift') for r in rows]), '+.3f')} | "
                     f"{_f(_mean([r['trainable_params'] for r in rows]), ',.0f')} | "
                     f"{_f(_mean([r['seconds'] for r in rows]), '.0f')} | "
                     f"{_f(peak_memory(report, method), '.0f')} |")
    kinds = [k for k in PAIR_KINDS if any(k in r["kinds"] for r in report["composers"])]
    lines += ["", "| composer | " + " | ".join(PAIR_KINDS[k][1] for k in kinds) + " | time / single adapter |",
              "|---" * (len(kinds) + 2) + "|"]
    for r in [*report["composers"], *report["controls"]]:
        name = r["composer"] if r in report["composers"] else f"({r['composer']})"
        lines.append(f"| {name} | " + " | ".join(_f(r["kinds"].get(k, {}).get("success")) for k in kinds)
                     + f" | {r['time_ratio']:.2f}x |")
    return lines


def markdown(report: dict) -> str:
    meta = report["meta"]
    title = "Benchmark report" + (" (QUICK)" if meta["quick"] else "")
    command = "studio bench report" + (" --quick" if meta["quick"] else "")
    lines = [f"# {title}", "", f"Made by `{command}` on {meta['written']}: {caption(meta)}", ""]
    if meta["quick"]:
        lines += ["Reductions of the quick report (the full one uses each bench's bar settings, "
                  f"{meta['full_expected']}):", "", *(f"- {r}" for r in meta["reductions"]), ""]
    if meta.get("composer_options"):
        lines += [f"Composer options changed: `{meta['composer_options']}`.", ""]
    lines += ["## Headline", "", *headline(report), "",
              "Concept found: emblem found (subjects), texture found (styles), B-LoRA: its training image's object "
              "in its texture with both entries. Drift: drop of the base's trigger-free single-object accuracy with "
              "the adapter loaded. Peak train MB: " + memory_kind(report) + ". Composers: composition success per "
              "pair kind (subject + object: the emblem found "
              "and the other object entirely right); controls in brackets (alone: each adapter on its own; none: no "
              "adapter).", "", "## Trainers", "",
              "| method | concept | found | position | trigger-free acc. | drift | params | train s "
              "| in-process peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["trainers"]:
        lines.append(f"| {r['method']} | {r['concept']} | {r['found']:.2f} | {_f(r['position'])} | "
                     f"{_f(r.get('trigger_free'), '.3f')} | {_f(r.get('drift'), '+.3f')} | "
                     f"{r['trainable_params']:,} | {r['seconds']:.0f} | {_f(r.get('peak_memory_mb'), '.0f')} |")
    lines += ["", "## Composers", "", "| row | pair kind | success | subject fidelity | images | time / single |",
              "|---|---|---|---|---|---|"]
    for r in [*report["composers"], *report["controls"]]:
        for kind, v in r["kinds"].items():
            lines.append(f"| {r['composer']} | {PAIR_KINDS[kind][1]} | {v['success']:.3f} | "
                         f"{v['subject_fidelity']:.3f} | {len(v['raw']['success'])} | {r['time_ratio']:.2f}x |")
    lines += ["", "## Base", "", "| guidance | objects | " + " | ".join(ATTRIBUTES) + " | all objects right |",
              "|---" * (len(ATTRIBUTES) + 3) + "|"]
    for r in report["base"]:
        lines.append(f"| {r['guidance']} | {r['set']} | " + " | ".join(_f(r[k]) for k in ATTRIBUTES)
                     + f" | {_f(r['objects_correct'])} |")
    lines += ["", "## Figures", "", *(f"![{f}]({f})" for f in report.get("figures", [])), "", "## Example images",
              "", "One row per bench row (the bench's own grid):", "",
              *(f"- {name}: ![{name}]({path})" for name, path in report["grids"].items()), "", "## Parts", "",
              "| part | finished | seconds | load average (start, end) | |", "|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        how = f"reused from {p['finished']}" if p["reused"] else "run now"
        load = ", ".join(_f(v) for v in p.get("load") or [])
        lines.append(f"| {name} | {p['finished']} | {p['seconds']} | {load} | {how} |")
    return "\n".join(lines) + "\n"


def figures(out: Path, report: dict) -> list[str]:
    """Draw every figure into `out`; their file names."""
    from benches.report_plots import bars, scatter

    meta, names = report["meta"], []
    methods = list(dict.fromkeys(r["method"] for r in report["trainers"]))
    by_method = {m: [r for r in report["trainers"] if r["method"] == m] for m in methods}
    for x_key, x_label, name, log_x in (
        ("trainable_params", "trainable parameters", "trainers-found-vs-params.png", True),
        ("seconds", "training seconds", "trainers-found-vs-seconds.png", False),
    ):
        scatter(out / name, {m: [(r[x_key], r["found"]) for r in rows] for m, rows in by_method.items()},
                title=f"Trainers: concept found vs {x_label} (one point per adapter)", x_label=x_label,
                y_label="concept found", caption=caption(meta), log_x=log_x)
        names.append(name)
    drift = [_mean([r.get("drift") for r in by_method[m]]) for m in methods]
    bars(out / "trainers-drift.png", methods, {"drift": drift},
         title="Trainers: drift of trigger-free prompts (lower is better)", y_label="accuracy drop",
         caption=caption(meta))
    bars(out / "trainers-memory.png", methods,
         {"peak MB": [peak_memory(report, m) for m in methods]},
         title=f"Trainers: peak training memory ({memory_kind(report)})", y_label="MB",
         caption=caption(meta))
    names += ["trainers-drift.png", "trainers-memory.png"]
    for kind, (_, label) in PAIR_KINDS.items():
        rows = [r for r in [*report["composers"], *report["controls"]] if kind in r["kinds"]]
        if rows:
            name = f"composers-{kind.replace('_', '-')}.png"
            scatter(out / name, {r["composer"]: [(r["time_ratio"], r["kinds"][kind]["success"])] for r in rows},
                    title=f"Composers, {label}: composition success vs time per image", x_label="time per image / "
                    "single-adapter generation", y_label="composition success", caption=caption(meta, "compose"))
            names.append(name)
    if report["base"]:
        series = {f"{'one object' if r['set'] == 'single' else 'two objects'}, guidance {r['guidance']}":
                  [r[k] for k in ATTRIBUTES] for r in report["base"]}
        bars(out / "base-attributes.png", list(ATTRIBUTES), series, title="Base: attribute accuracy",
             y_label="fraction right", caption=caption(meta), y_range=(0.0, 1.0))
        names.append("base-attributes.png")
    return names


def write_report(out: Path, report: dict) -> None:
    from studio.atomic import write_json, write_text

    report["figures"] = figures(out, report)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
