"""`studio bench report --publish`: the report in `--out` becomes the repository's (docs/benchmarks/), and the README's
Benchmarks section shows its headline tables and one figure, with the command that made them, so that the README's
table is always the report's (`tests/benches/test_report.py` checks it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from studio.errors import StudioError


INTRO = """`studio bench report` puts every trainer and every composer of the registries side by side on the
embedded base, scored exactly by the Shapes World evaluator: the adapter bench per trainer, the
compose bench per composer (and its controls) and the base bench, in one folder: `report.md`,
`report.json` (every raw judgement) and PNG figures (concept found against trainable parameters and
against training seconds, drift and peak training memory per trainer; composition success against
time per image per pair kind; the base's attribute accuracy; example grids). Each unit is a part
keyed by the code (docs and tests aside) and its settings: a matching part is reused, any other is
run again, and a killed run continues from the parts it finished. `--quick`
(fewer steps, prompts and seeds, each stated in the report and in every caption) is the one to run
first; `--compare OLD.json` lists every figure that got better or worse beyond its noise margin
(twice the standard error of the difference, from the raw judgement counts). The web UI's Benchmarks
tab shows the latest report and queues a quick run behind any training."""


def section(report: dict, headline: str) -> str:
    """The README's Benchmarks section for `report`."""
    meta = report["meta"]
    command = "studio bench report" + (" --quick" if meta["quick"] else "")
    which = ("the QUICK one (" + "; ".join(meta["reductions"][:2]) + "; ...: it shows the pipeline, not what the "
             "methods reach at their defaults; the full report replaces it)" if meta["quick"] else "the full one")
    return (f"## Benchmarks\n\n{INTRO}\n\nThe report here is {which}, made by `{command}` at commit "
            f"{meta.get('commit', '?')[:12]} (code {meta['tree'][:12]}) on {meta['machine']}, "
            f"{meta['threads']} threads ([docs/benchmarks/report.md](docs/benchmarks/report.md)):\n\n{headline}\n\n"
            "![Trainers: concept found vs trainable parameters](docs/benchmarks/trainers-found-vs-params.png)\n")


def publish(src: Path, repo: Path) -> Path:
    """Copy the report in `src` (report.md, report.json, figures, grids) to `repo`/docs/benchmarks and rewrite the
    README's Benchmarks section from it; returns the README's path."""
    from studio.atomic import write_text

    if not (src / "report.json").is_file():
        raise StudioError(f"{src} holds no report.json; run `studio bench report` with the same --out first")
    dest = repo / "docs" / "benchmarks"
    shutil.rmtree(dest, ignore_errors=True)
    report = json.loads((src / "report.json").read_text())
    for path in ["report.md", "report.json", *report["figures"], *(p for p in report["grids"].values() if p)]:
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / path, dest / path)
    md = (src / "report.md").read_text()
    headline = md.split("\n## Headline\n", 1)[1].split("\nConcept found", 1)[0].strip("\n")
    text = section(report, headline)
    readme = (repo / "README.md").read_text()
    if "\n## Benchmarks\n" in readme:
        readme = re.sub(r"\n## Benchmarks\n.*?(?=\n## )", lambda _: "\n" + text, readme, flags=re.S)
    else:
        readme = readme.replace("\n## Python API\n", "\n" + text + "\n## Python API\n")
    return write_text(repo / "README.md", readme)
