"""The one-way layers of DESIGN.md section 1, checked on every import the project's code writes.

lora_kernels <- core (studio/ less its face) <- trainers | composers <- benches <- face (studio.cli, studio.ui, app)

`lora_kernels` imports nothing of the project; the core imports no trainer, composer, bench or screen; trainers and
composers import the core (and kernels) and never each other, so they meet only through the library; benches may use
both; the face may use everything. Imports inside functions count the same as those at the top of a file, and no
two modules may import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("studio", "trainers", "composers", "lora_kernels", "benches")
FACE = ("studio.cli", "studio.ui", "studio.__main__", "app")
# each layer -> the layers it may import (its own included)
ALLOWED = {
    "kernels": {"kernels"},
    "core": {"core", "kernels"},
    "trainers": {"trainers", "core", "kernels"},
    "composers": {"composers", "core", "kernels"},
    "benches": {"benches", "trainers", "composers", "core", "kernels"},
    "face": {"face", "benches", "trainers", "composers", "core", "kernels"},
}


def layer_of(module: str) -> str:
    if any(module == f or module.startswith(f + ".") for f in FACE):
        return "face"
    top = module.split(".")[0]
    return {"studio": "core", "lora_kernels": "kernels"}.get(top, top)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (an import of `a.b.c` names the deepest module that exists)."""
    files = [p for top in PACKAGES for p in sorted((root / top).rglob("*.py"))]
    files += [root / "app.py"] if (root / "app.py").is_file() else []
    raw: dict[str, set[str]] = {}
    for path in files:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{path}: relative import; the project writes absolute imports only")
        raw[module_name(path, root)] = {n for n in names if n.split(".")[0] in (*PACKAGES, "app")}

    def resolve(name: str) -> str:
        while name and name not in raw:
            name = name.rpartition(".")[0]
        return name

    return {m: {resolve(n) for n in names if resolve(n) not in ("", m)} for m, names in raw.items()}


def crossings(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) not in ALLOWED[layer_of(m)]
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan). A package importing its own submodules is its
    interface, not a loop, so edges into an enclosing package's `__init__` are left out."""
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way_down_the_layers() -> None:
    graph = import_graph(ROOT)
    assert {"studio.generate", "trainers.loop", "composers.merge", "studio.cli"} <= set(graph)
    assert crossings(graph) == []


def test_no_two_modules_import_each_other() -> None:
    assert cycles(import_graph(ROOT)) == []


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("studio/generate.py", "from trainers import train"),  # core -> trainers
        ("trainers/run.py", "import composers.merge"),  # trainers -> composers
        ("composers/merge.py", "from studio.cli.options import add_dataclass_arguments"),  # composers -> face
        ("studio/library/store.py", "from benches import BENCHES"),  # core -> benches
    ],
)
def test_a_planted_crossing_import_is_caught(tmp_path: Path, module: str, planted: str) -> None:
    """The rule can fail: the same check on a copy of the tree with one crossing import added inside a function."""
    for top in PACKAGES:
        if (ROOT / top).is_dir():
            shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n\ndef _planted() -> None:\n    {planted}\n")
    new = set(crossings(import_graph(tmp_path))) - set(crossings(import_graph(ROOT)))
    assert len(new) == 1 and next(iter(new)).startswith(module_name(target, tmp_path) + " "), new


def test_a_planted_loop_is_caught(tmp_path: Path) -> None:
    for top in PACKAGES:
        if (ROOT / top).is_dir():
            shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    for module, planted in (("errors.py", "from studio import atomic"), ("atomic.py", "from studio import errors")):
        target = tmp_path / "studio" / module
        target.write_text(target.read_text() + f"\n\ndef _planted() -> None:\n    {planted}\n")
    assert ["studio.atomic", "studio.errors"] in cycles(import_graph(tmp_path))
