"""The package layout: no import cycle among spacil's modules, and no module importing from a later stage than its own.

Read from the source with `ast` (lazy imports inside functions count: they are dependencies all the same), so the test
needs nothing imported and names the offending file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "spacil"

# The stages in the order data flows; a module may import from its own stage and from earlier ones only.
# Prefixes name a module or a whole sub-package; the longest matching prefix decides.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("spacil.__init__", "spacil.errors", "spacil.devices", "spacil.fileio", "spacil.recorded_paths", "spacil.config",
              "spacil.metrics", "spacil.plotstyle")),
    ("ops", ("spacil.ops",)),  # SPA's building blocks: torch only
    ("data", ("spacil.data", "spacil.backbone")),
    ("store", ("spacil.store",)),
    ("describe", ("spacil.describe",)),
    ("learner", ("spacil.learner",)),
    ("methods", ("spacil.methods",)),
    ("runner", ("spacil.runner", "spacil.runlock", "spacil.pipeline")),
    ("report", ("spacil.report", "spacil.explain")),
    ("sweep", ("spacil.sweep",)),
    ("demo", ("spacil.demo",)),
    ("cli", ("spacil.cli", "spacil.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported spacil module, line) for every import in the file, top-level or nested."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "spacil"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "spacil":
                continue
            for alias in node.names:  # `from spacil.x import y` names module spacil.x.y when there is one
                target = f"{source}.{alias.name}"
                found.append((target if target in modules else source, node.lineno))
    return [(target, line) for target, line in found if target in modules]


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    lines: dict[tuple[str, str], int] = {}
    for name, path in modules.items():
        for target, line in imports_of(path, name, modules):
            if target != name:
                graph[name].add(target)
                lines.setdefault((name, target), line)
    return graph, lines


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def stage_of(module: str) -> int:
    if module == "spacil":  # the root package: its __init__ holds the version only
        module = "spacil.__init__"
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no stage: add it to STAGES in {Path(__file__).name}")
    return best


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph, lines = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {lines[(a, b)]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle: " + "; ".join(steps))


def test_no_module_imports_a_later_stage():
    graph, lines = import_graph()
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            if stage_of(target) > stage_of(module):
                wrong.append(f"{module} (line {lines[(module, target)]}, stage {STAGES[stage_of(module)][0]}) imports "
                             f"{target} (stage {STAGES[stage_of(target)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


# Within a stage, imports that the layout forbids all the same (the README says why).
FORBIDDEN_WITHIN = [
    ("spacil.sweep.local", "spacil.sweep.slurm"), ("spacil.sweep.slurm", "spacil.sweep.local"),  # two engines, one cell
    ("spacil.sweep.local", "spacil.sweep.grid"), ("spacil.sweep.slurm", "spacil.sweep.grid"),
    ("spacil.sweep.cell", "spacil.sweep.local"), ("spacil.sweep.cell", "spacil.sweep.slurm"),
]


def test_the_sweep_engines_share_only_the_cell():
    graph, lines = import_graph()
    wrong = [f"{a} (line {lines[(a, b)]}) imports {b}" for a, b in FORBIDDEN_WITHIN if b in graph.get(a, ())]
    assert not wrong, "\n".join(wrong)


def test_ops_import_nothing_from_spacil_but_ops():
    graph, lines = import_graph()
    wrong = [f"{a} (line {lines[(a, b)]}) imports {b}" for a, targets in graph.items() if a.startswith("spacil.ops")
             for b in targets if not b.startswith("spacil.ops")]
    assert not wrong, "\n".join(sorted(wrong))


def test_a_module_in_no_stage_is_named():
    with pytest.raises(AssertionError, match="spacil.stray belongs to no stage"):
        stage_of("spacil.stray")
    assert STAGES[stage_of("spacil")][0] == "base"


def test_every_module_is_in_a_stage_and_the_stages_are_sub_packages():
    for module in all_modules():
        stage_of(module)
    for package in ("store", "describe", "ops", "sweep", "demo", "methods"):
        assert (PACKAGE_ROOT / package / "__init__.py").is_file()
    # the old flat modules are gone, not kept as shims
    for old in ("features", "extract", "check", "sweep_local", "sweep_slurm", "sweep_report", "demo_world", "shapes",
                "sampling", "descriptions", "ot", "gaussian", "projectors", "patch_selection"):
        assert not (PACKAGE_ROOT / f"{old}.py").exists(), old
