"""The package layout is the architecture: these tests fail when a module imports across it.

Read statically (every `import`, also inside functions), so an import cycle hidden by a
function-level import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "curation"

#: What each layer may import from the package (besides itself and `curation` for __version__).
ALLOWED = {
    "core": {"core"},
    "config": {"config"},
    "io": {"core", "io"},
    "stages": {"core", "io", "config", "stages"},
    "executor": {"core", "io", "executor"},
    # the training loop, data pipeline and online balancing (torch + open_clip; no Ray: the
    # executor's Ray Train launcher runs the loop a flow hands it)
    "train": {"core", "io", "config", "stages", "train"},
    "flows": {"core", "io", "config", "stages", "executor", "flows", "synth", "train"},
    "synth": {"core", "io", "synth"},
    "tools": {"core", "tools"},
    "cli": {"core", "io", "config", "stages", "executor", "flows", "synth", "tools", "train"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported by `path` (a `from X import name` of a submodule counts it)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n in modules and n != "curation":
                out.add(n)
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_they_may(layer: str) -> None:
    bad = []
    for module, deps in _graph().items():
        if _layer(module) != layer:
            continue
        for d in deps:
            if _layer(d) not in ALLOWED[layer] | {"root"}:
                bad.append(f"{module} -> {d}")
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer])}: {bad}"


def test_only_the_executor_imports_ray() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            is_ray = any(m == "ray" or m.startswith("ray.") for m in mods)
            if is_ray and _layer(_module_name(path)) != "executor":
                bad.append(str(path.relative_to(PKG)))
    assert not bad, f"only curation/executor may import ray: {sorted(set(bad))}"


def test_no_test_hooks_in_the_package() -> None:
    hits = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "CURATION_FAULT_DIR" in p.read_text() or "os._exit(" in p.read_text()
    ]
    assert not hits, f"test fault hooks belong in tests/faults, not in {hits}"


def test_stages_share_one_contract() -> None:
    from curation.core.stage import Source, Stage
    from curation.stages.balance import Balancer
    from curation.stages.filters.apply import FilterStage
    from curation.stages.ingest import Ingestor
    from curation.stages.match import MatchStage
    from curation.stages.score import ScoreStage

    assert issubclass(Ingestor, Source)
    for cls in (MatchStage, Balancer, FilterStage, ScoreStage):
        assert issubclass(cls, Stage), cls
