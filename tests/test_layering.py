"""The package's layers: every import points down (or within its own package), and no modules import each other.

Layers, low to high (DESIGN.md): the shared vocabulary (config, metric and model registries, tracking names and
store, report item names) < trainer < evaluation < analysis < study < report < bench, ui < the command line
(`mgbench.cli` and each package's `cli` module). Imports inside functions count: a lazy import is still a
dependency; imports under `if TYPE_CHECKING:` do not (annotations only). The test reads the source (ast).
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "mgbench"

BASE = {"mgbench", "mgbench.data", "mgbench.redact", "mgbench.metric_registry", "mgbench.archs", "mgbench.tracking",
        "mgbench.stores", "mgbench.config", "mgbench.report.items"}
ORDER = ["base", "trainer", "evaluation", "analysis", "study", "report", "bench|ui", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = PKG.parent.joinpath(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def runtime_imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of `path` at any depth, without those under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only]


def imports(path: Path) -> set[str]:
    """The mgbench modules `path` imports, at any depth of the file (a `from pkg import mod` names the module)."""
    name = module_name(path)
    found = set()
    for node in runtime_imports(path):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mgbench"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mgbench":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if is_module(sub) else target)
    found.discard(name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def layer(module: str) -> str | None:
    """The module's layer (an entry of ORDER); None for a package no layer names."""
    if module in BASE:
        return "base"
    parts = module.split(".")
    if module in ("mgbench.cli", "mgbench.__main__") or parts[-1] == "cli":
        return "cli"
    group = parts[1]
    return next((entry for entry in ORDER if group in entry.split("|")), None)


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer(m) is None] == []


def test_trainer_and_evaluation_know_nothing_of_optuna_submitit_mlflow_or_studies():
    """The trainer runs alone (`mgbench train`, torchrun) and logs through `tracking.Tracker` only."""
    banned = {"optuna", "submitit", "mlflow"}
    found = []
    for path in sorted((PKG / "trainer").rglob("*.py")) + sorted((PKG / "evaluation").rglob("*.py")):
        for node in runtime_imports(path):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{module_name(path)} imports {n}" for n in names if n.split(".")[0] in banned]
    assert found == []


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    upward = []
    for module, targets in edges.items():
        if layer(module) is None or any(layer(t) is None for t in targets):
            continue   # test_every_module_has_a_layer names it
        here = ORDER.index(layer(module))
        for target in sorted(targets):
            there = ORDER.index(layer(target))
            same_package = module.split(".")[:2] == target.split(".")[:2]
            if there > here or (there == here and here != 0 and layer(module) != "cli" and not same_package):
                upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    return upward


def test_imports_point_down():
    assert upward_imports(graph()) == []


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                loop = trail[trail.index(nxt):] if nxt in trail else []
                cycles.append(" -> ".join(loop + [node, nxt]))
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_the_check_sees_an_upward_import():
    """The parser finds the imports (else the tests above could pass on nothing), and the rule flags the shapes
    the re-layering removed: the trainer reaching up, config reaching into the trainer, siblings importing each
    other, a package reaching a command-line module."""
    found = imports(PKG / "trainer" / "loop.py")
    assert {"mgbench.config", "mgbench.tracking"} <= found
    third_party = {a.name for n in runtime_imports(PKG / "study" / "trial.py") if isinstance(n, ast.Import)
                   for a in n.names}
    assert {"optuna", "submitit"} <= third_party   # what the trainer test looks for is found where it is imported
    assert "mgbench.study.spec" in imports(PKG / "study" / "runner.py")   # `from mgbench.study.spec import X`
    bad = {"mgbench.trainer.startup": {"mgbench.evaluation.metrics"}, "mgbench.config": {"mgbench.trainer.models"},
           "mgbench.bench.harness": {"mgbench.ui"}, "mgbench.study.spec": {"mgbench.report.cli"}}
    assert len(upward_imports(bad)) == 4
    fine = {"mgbench.report.cli": {"mgbench.study.spec", "mgbench.cli"}, "mgbench.study.spec": {"mgbench.report.items"}}
    assert upward_imports(fine) == []
