"""`studio bench report`: every trainer and every composer side by side on one base, as one folder of tables and plots.

It runs the existing benches unit by unit and keeps each unit's result as its own JSON part in the report folder, in
this order: the compose bench's adapter set (`studio bench compose --prepare`), its control rows, one part per
composer (its "alone" row only timed, the time ratio's reference in the same part; the judged controls are the control
part's), the base (`studio bench base`), the base's trigger-free accuracy (measured once: every trainer's drift
reference) and one part per trainer (`studio bench adapters --method M`). The compose units come first because they
share one work folder (the adapters they compose); every later part stands alone. A part is keyed by the code (a hash
of the committed code outside `NOT_CODE` plus `git diff HEAD` on it, or "no-git") and the unit's settings: a part
whose key matches is reused (the report says from when), any other is run again, so nothing is silently stale, and a
killed run continues from the parts already on disk. Parts copied into another clone of the same code are reused the
same way (the compose adapters' part only with its work folder), so a long report can run in sittings. Each part keeps
its seconds and the machine's load average while it ran.
`--quick` uses fewer steps, prompts and seeds (each reduction is stated in the report and in every figure's
caption); the full report uses each bench's own bar settings. Tables, figures and the coverage check are in
`benches.report_tables`; `--compare` in `benches.report_compare`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.models import DEFAULT_MODEL


ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit keys the parts
# The full report: each bench's own bar settings (`studio bench adapters`, `compose`, `base` at their defaults).
FULL = {"train": {}, "emblems": 3, "texture": "stripes", "n_base": 50, "n_texture": 20, "steps": 20,
        "compose_train_steps": None, "seeds": 8, "pairs": None, "base_n": 100, "guidances": [None, 7.5]}
# --quick: what each number is cut to for a first run (its aim: 15 minutes on 2 idle CPU cores). Measured end to end
# (2026-12-04, `studio bench report --quick --threads 2` on 2 otherwise idle cores, nothing reused): 717 s, 12.0
# minutes; trainers 30-52 s each, the compose adapters 94 s, composers 20-36 s each but CLoRA 151 s (its test-time
# optimisation at the paper's settings), the base 43 s. The same report took over an hour at load 5-6 when
# OpenMP threads spun at their barriers (the CLI lets them sleep on busy cores: studio.openmp). At 60 training steps
# no composer composes (all rows 0.00): the quick report checks the machinery and the costs; composition needs the full
# report's adapters.
QUICK = {"train": {"train_steps": 60, "sample_steps": 4, "num_class_images": 4}, "emblems": 1, "texture": None,
         "n_base": 10, "n_texture": 5, "steps": 10, "compose_train_steps": 60, "seeds": 2, "pairs": 1, "base_n": 10,
         "guidances": [None, 7.5]}
REDUCTIONS = [  # stated in report.md and in every caption of a quick report
    "60 training steps per adapter (defaults: 700), previews and class images at 4 steps, 4 class images",
    "one emblem per trainer and no texture adapter (full: 3 emblems and a texture)",
    "drift on 10 trigger-free prompts (full: 50); B-LoRA judged on 5 prompts per row (full: 20)",
    "10 sampling steps (full: 20)",
    "compose: one case per pair kind, 2 seeds (full: 6, 4 and 8 cases, 8 seeds)",
    "base: 10 prompts per set (full: 100)",
]
# The full report's time, measured (2026-12-05, code 8bbb57dac2f9, 2 threads on 2 cores, in two sittings): the
# parts' seconds add up to 3.7 hours: the compose adapters 32 minutes, composers 6-10 minutes each but CLoRA 27, the
# base 6, trainers 21-25 minutes each (B-LoRA 4). Each trainer part now adds its fresh-process memory run (~15 s).
FULL_HOURS = "about 3.7 hours on 2 CPU cores (measured: the parts' seconds of the published full report)"
# Steps of each trainer's memory run: a fresh process, so that its peak is its own. In one long process the peak RSS
# a block adds depends on what ran before it (the allocator keeps freed pages): the first adapters of kronecker (the
# sitting's first training) and orthogonal read 275 and 428 MB, every other adapter 14-41 MB (code 8bbb57dac2f9).
MEMORY_STEPS = 6


def reports_root() -> Path:
    """Where reports go unless `--out` says otherwise: $STUDIO_BENCH_OUT, default ./bench-out."""
    return Path(os.environ.get("STUDIO_BENCH_OUT", "bench-out")).expanduser()


def default_out(quick: bool) -> Path:
    return reports_root() / ("report-quick" if quick else "report")


# What the figures do not depend on: a commit touching only these reuses every part (publishing a report, the docs).
NOT_CODE = ("README.md", "docs", "tests", ".ci", ".gitignore", "dev")


def tree_id(root: Path = ROOT) -> str:
    """The code's identity: a hash of the committed code (every top-level entry but `NOT_CODE`) and of `git diff
    HEAD` on it when the tree is dirty, or "no-git". A commit of docs alone keeps it; any code change moves it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
        return done.stdout

    try:
        listing = [line for line in git("ls-tree", "HEAD").splitlines() if line.split("\t", 1)[1] not in NOT_CODE]
        diff = git("diff", "HEAD", "--", ".", *(f":(exclude){name}" for name in NOT_CODE))
    except (OSError, subprocess.CalledProcessError):
        return "no-git"
    return hashlib.sha256("\n".join([*listing, diff]).encode()).hexdigest()[:16]


def commit_id(root: Path = ROOT) -> str:
    """The commit the report ran at (`+dirty` with uncommitted changes), for people; parts are keyed by `tree_id`."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no-git"
    return commit + ("+dirty" if dirty else "")


def part_key(tree: str, unit: str, settings: dict) -> str:
    """The key a stored part must carry to be reused: the code and the unit's settings."""
    text = json.dumps({"tree": tree, "unit": unit, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Unit:
    name: str  # base-accuracy | trainer-M | compose-adapters | compose-controls | composer-C | base
    settings: dict  # everything the unit's figures depend on (with the code, its key)
    run: Callable[[Path], dict]  # work folder -> the unit's result (JSON-able)
    shared: bool = False  # later units read its work folder: its part is reused only while that folder is there


def run_unit(out: Path, unit: Unit, tree: str, log: Callable[[str], object] = print) -> dict:
    """The unit's stored part when its key matches, otherwise run it (in a fresh work folder) and store the part."""
    from studio.atomic import write_json

    key = part_key(tree, unit.name, unit.settings)
    path = out / "parts" / f"{unit.name}.json"
    work = out / "work" / unit.name
    stored = json.loads(path.read_text()) if path.is_file() else None
    done = bool(stored) and stored.get("key") == key and stored.get("state") == "done"
    if done and (not unit.shared or work.is_dir()):
        log(f"{unit.name}: reused from {stored['finished']}")
        return {**stored, "reused": True}
    if done:
        log(f"{unit.name}: its part is here but not the work folder later parts read (parts copied from another "
            "clone); running it again")
    elif stored and stored.get("key") != key:  # other code or settings: what the folder holds is stale
        log(f"{unit.name}: {'settings' if stored.get('tree') == tree else 'code'} changed since "
            f"{stored.get('finished') or stored.get('started')}; running it again")
        shutil.rmtree(work, ignore_errors=True)
    elif stored:
        log(f"{unit.name}: a run stopped during it at {stored['started']}; continuing with what it left")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write_json(path, {"unit": unit.name, "key": key, "tree": tree, "settings": unit.settings, "state": "running",
                      "started": started})  # a killed run finds this key and continues in the same work folder
    began, load = time.perf_counter(), load_average()
    result = unit.run(work)
    part = {"unit": unit.name, "key": key, "tree": tree, "settings": unit.settings, "state": "done",
            "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "seconds": round(time.perf_counter() - began, 1), "load": [load, load_average()], "result": result}
    write_json(path, part)
    return {**part, "reused": False}


def load_average() -> float | None:
    """The machine's 1-minute load average (other work shares the cores when it is above the threads used)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def stored(out: Path, unit: str) -> dict:
    """The result of a unit that ran earlier in this report (a unit that needs it runs after it)."""
    path = out / "parts" / f"{unit}.json"
    part = json.loads(path.read_text()) if path.is_file() else {}
    if part.get("state") != "done":
        raise StudioError(f"{path} is not finished; run `studio bench report` again (it runs {unit} first)")
    return part["result"]


def _rel(out: Path, path: Path) -> str:
    return str(path.relative_to(out)) if path.is_file() else ""


def plan(out: Path, settings: dict, model: str, device: str, composer_options: dict | None = None) -> list[Unit]:
    """The units of a report over every trainer and composer in the registries, in running order: the compose units
    first, as they share the compose adapters' work folder (one sitting), then parts that stand alone."""
    import torch

    import composers
    from benches import adapters, base, compose
    from benches import train as train_bench
    from trainers import METHODS

    s, units = settings, []
    train = {"device": device, **s["train"]}
    library = out / "work" / "compose-adapters" / "library"
    categories = compose.CATEGORIES
    adapter_settings = {"model": model, "train_steps": s["compose_train_steps"], "pairs": s["pairs"],
                        "train": {k: v for k, v in train.items() if k != "train_steps"},
                        "adapters": compose.needed(categories, s["pairs"])}

    def run_prepare(work: Path) -> dict:
        trained = compose.prepare(model, library, s["compose_train_steps"], adapter_settings["adapters"],
                                  adapter_settings["train"])
        return {"library": str(library.relative_to(out)), "trained": trained}

    units.append(Unit("compose-adapters", adapter_settings, run_prepare, shared=True))
    scoring = {"adapters": adapter_settings, "seeds": s["seeds"], "steps": s["steps"], "pairs": s["pairs"]}

    def run_compose(work: Path, rows: list[str], controls: tuple[str, ...], timed_only: tuple[str, ...] = ()) -> dict:
        options = composer_options or {}

        def configure(name: str, config: Any) -> Any:
            import dataclasses

            return dataclasses.replace(config, **options.get(name, {})) if options.get(name) else config

        before = os.environ.get("STUDIO_LIBRARY")  # the compose bench points the library at its own
        try:
            report = compose.run_bench(model, library, rows, s["seeds"], s["steps"], work, pairs=s["pairs"],
                                       categories=categories, controls=controls, configure=configure,
                                       timed_only=timed_only)
        finally:
            if before is None:
                os.environ.pop("STUDIO_LIBRARY", None)
            else:
                os.environ["STUDIO_LIBRARY"] = before
        return {**report, "grid": _rel(out, work / "compose-bench-grid.png")}

    units.append(Unit("compose-controls", {**scoring, "rows": list(compose.CONTROLS)},
                      lambda work: run_compose(work, [], compose.CONTROLS)))
    for name in composers.COMPOSERS:
        options = (composer_options or {}).get(name, {})
        units.append(Unit(f"composer-{name}", {**scoring, "composer": name, "options": options},
                          lambda work, name=name: run_compose(work, [name], ("alone",), ("alone",))))

    def run_base(work: Path) -> dict:
        report = base.run_bench(model, s["base_n"], s["steps"], s["guidances"], work, device=device)
        return {**report, "grid": _rel(out, work / "base-bench-grid.png")}

    units.append(Unit("base", {"model": model, "n": s["base_n"], "steps": s["steps"], "guidances": s["guidances"]},
                      run_base))

    # The base's trigger-free accuracy, every emblem's drift reference: measured once, not once per trainer.
    accuracy = {"model": model, "n_base": s["n_base"], "steps": s["steps"], "device": device}
    units.append(Unit("base-accuracy", accuracy,
                      lambda work: adapters.base_single_accuracy(model, s["n_base"], s["steps"], device)))
    for method in METHODS:
        def run_trainer(work: Path, method: str = method) -> dict:
            # first: seconds, and a failure here does not cost the adapter bench's minutes
            memory = train_bench.measure(method, model, MEMORY_STEPS, torch.get_num_threads(), device)
            report = adapters.run_bench(model, [method], work, steps=s["steps"], n_base=s["n_base"],
                                        n_texture=s["n_texture"], texture=s["texture"], overrides=dict(train),
                                        n_emblems=s["emblems"], device=device, base=stored(out, "base-accuracy"))
            return {"rows": report.get("rows", []), "b_lora": report.get("b_lora", []),
                    "base_accuracy": report.get("base_accuracy"), "grid": _rel(out, work / "adapters-bench-grid.png"),
                    "memory": {"peak_memory_mb": round(memory["peak_memory_bytes"] / 2**20, 1),
                               "kind": f"{memory['peak_memory_kind']}, {MEMORY_STEPS} steps", "steps": MEMORY_STEPS}}

        units.append(Unit(f"trainer-{method}", {"model": model, "method": method, "train": train,
                                                "memory_steps": MEMORY_STEPS,
                                                **{k: s[k] for k in ("steps", "n_base", "n_texture", "texture",
                                                                     "emblems")}}, run_trainer))
    return units


def run_report(out: Path, *, quick: bool = False, model: str = DEFAULT_MODEL, device: str = "cpu",
               composer_options: dict | None = None, settings: dict | None = None,
               progress: Callable[[int, int, str], object] | None = None, cancel: Any = None,
               log: Callable[[str], object] = print) -> dict:
    """Run (or reuse) every unit, then write `report.md`, `report.json` and the figures into `out`.

    `progress(done, total, unit)` is called before each unit; `cancel` (a threading.Event) stops between units
    (the parts done so far stay on disk). `settings` replaces the quick or full settings (tests use tiny ones)."""
    import platform

    import torch

    from benches.report_tables import assemble, write_report

    out = Path(out)
    chosen = settings or (QUICK if quick else FULL)
    tree = tree_id()
    units = plan(out, chosen, model, device, composer_options)
    began, parts = time.perf_counter(), {}
    for i, unit in enumerate(units):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"stopped before {unit.name}; {i} of {len(units)} parts are kept and reused next time")
        if progress is not None:
            progress(i, len(units), unit.name)
        parts[unit.name] = run_unit(out, unit, tree, log)
    meta = {"model": model, "quick": quick, "settings": chosen, "reductions": REDUCTIONS if quick else [],
            "machine": machine(device), "threads": torch.get_num_threads(), "tree": tree, "commit": commit_id(),
            "python": platform.python_version(), "composer_options": composer_options or {},
            "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "seconds_this_run": round(time.perf_counter() - began, 1),
            "full_expected": FULL_HOURS}
    report = assemble(parts, meta)
    write_report(out, report)
    if progress is not None:
        progress(len(units), len(units), "written")
    return report


class Cancelled(StudioError):
    """The run was stopped between units."""


def machine(device: str) -> str:
    """The machine in words: the GPU's name, or the CPU's model and core count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = ""
    try:
        model = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        model = platform.processor() or platform.machine()
    return f"{model or 'CPU'}, {os.cpu_count()} cores"


def parse_options(values: list[str] | None) -> dict[str, dict]:
    """`--composer-option lora_composer.isolation=false` (value in JSON) -> {"lora_composer": {"isolation": False}}."""
    import composers

    out: dict[str, dict] = {}
    for text in values or []:
        name, _, rest = text.partition(".")
        field, eq, value = rest.partition("=")
        if not (name and field and eq):
            raise StudioError(f"--composer-option {text!r}: write COMPOSER.FIELD=VALUE, e.g. lora_composer.boxes={{}}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        composers.make_config(name, {field: parsed})  # an unknown composer or field: its own clear error
        out.setdefault(name, {})[field] = parsed
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from benches.report_compare import compare_files

    if args.new and not args.compare:
        raise StudioError("--new NEW.json compares against --compare OLD.json; give both")
    out = Path(args.out) if args.out else default_out(args.quick)
    if not (args.new or args.no_run):
        torch.set_num_threads(args.threads)
        bar = tqdm(desc="bench report", unit="part")

        def progress(done: int, total: int, unit: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(unit)
            bar.refresh()

        run_report(out, quick=args.quick, model=args.model, device=args.device,
                   composer_options=parse_options(args.composer_option), progress=progress, log=tqdm.write)
        bar.close()
        print((out / "report.md").read_text())
    if args.publish:
        from benches.report_publish import publish

        print(f"published {out} to {publish(out, ROOT).parent / 'docs' / 'benchmarks'} and the README")
    if args.compare:
        new = Path(args.new) if args.new else out / "report.json"
        worse = compare_files(Path(args.compare), new, out / "compare.md" if not args.new else None)
        return 1 if worse else 0
    return 0


def register_bench(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("report", help="every trainer and composer side by side: tables, plots, --compare")
    parser.add_argument("--quick", action="store_true", help="fewer steps, prompts and seeds (stated in the report): "
                        "the one to run first (12 minutes on 2 idle CPU cores)")
    parser.add_argument("--out", default=None, help="the report folder (default $STUDIO_BENCH_OUT/report or "
                        "report-quick, $STUDIO_BENCH_OUT defaulting to ./bench-out)")
    parser.add_argument("--compare", metavar="OLD.json", help="compare the report with an earlier report.json")
    parser.add_argument("--new", metavar="NEW.json", help="with --compare: compare these two files, run nothing")
    parser.add_argument("--no-run", action="store_true", help="run nothing: --publish or --compare the report "
                        "already in --out, as it was written")
    parser.add_argument("--publish", action="store_true", help="then copy the report to docs/benchmarks and show "
                        "its headline table in the README")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--composer-option", action="append", metavar="COMPOSER.FIELD=VALUE",
                        help="run a composer with one of its fields changed, e.g. lora_composer.isolation=false "
                        "(repeatable; part of the composer's key)")
    parser.set_defaults(func=run)
