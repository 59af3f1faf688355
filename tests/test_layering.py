"""The house's rules, read from the source (an AST walk, nothing imported):

* the planning side (what `launch plan` and the login node import) has no torch, transformers, peft, deepspeed,
  bitsandbytes, trl, datasets or accelerate at module level, and reaches no rank-side module at module level;
* `kernels` imports nothing from `launcher` or `cluster`; `cluster` nothing from the rank side;
* no import cycles, lazy and TYPE_CHECKING imports counted.

One end-to-end check stays: `launch plan` really loads no torch (tests/plan/test_plan.py runs it in a subprocess).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"launcher": ROOT / "launcher", "cluster": ROOT / "cluster", "ftkernels": ROOT / "kernels" / "ftkernels"}
"""Import name -> source folder (the kernels live in the top-level kernels/ folder as the package `ftkernels`)."""
HEAVY = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "trl", "datasets", "accelerate", "triton",
         "wandb", "mlflow")
OPTIONAL = ("wandb", "mlflow")
"""Optional extras (`ftlaunch[wandb]`, `ftlaunch[mlflow]`): imported only inside functions, anywhere, so that a run
that does not ask for a tracker never needs it installed."""

PLANNING_PACKAGES = ("launcher.config", "launcher.plan", "launcher.common", "launcher.cli")
"""The torch-free side, by package: what `launch plan`, the login node and `launch runs/status/logs/cancel` import."""

PLANNING_EXTRA = {"launcher", "launcher.__main__", "launcher.strategies", "launcher.strategies.registry",
                  "cluster", "cluster.env", "cluster.events", "cluster.errors", "cluster.executor", "cluster.local",
                  "cluster.slurm", "cluster.slurm_executor", "cluster.runs", "cluster.sweep", "cluster.follow",
                  "cluster.run_errors"}
"""Planning-side modules outside those packages: the strategy registry and the cluster side that submits."""

RANK_PACKAGES = ("launcher.train",)
RANK_EXTRA = {"launcher.strategies.base", "launcher.strategies.ddp", "launcher.strategies.fsdp",
              "launcher.strategies.deepspeed"}


def _in(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


KNOWN_CYCLES: set[frozenset[str]] = set()
"""Strongly connected groups of modules allowed to stay (lazy and TYPE_CHECKING imports count). Empty: the five
cycles there were (plan / ds_config / plan_memory / plan_quant, checkpoint / export, train / evaluate, job / prepare,
cluster.slurm / slurm_task) were broken by leaf modules: launcher/plan/resources.py, launcher/common/exits.py, launcher/common/logs.py,
launcher/train/loss.py, cluster/events.py, and `export_run` moved to launcher/train/export.py."""


def module_name(path: Path, source: Path) -> str:
    parts = path.relative_to(source.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p, source): p for source in PACKAGES.values() for p in sorted(source.rglob("*.py"))}


class Imports(ast.NodeVisitor):
    """Imported module names, split into module-level (run at import) and the rest (in functions, TYPE_CHECKING)."""

    def __init__(self, current: str) -> None:
        self.current = current
        self.top: set[str] = set()
        self.lazy: set[str] = set()
        self._depth = 0

    def _add(self, name: str) -> None:
        (self.top if self._depth == 0 else self.lazy).add(name)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative import
            package = self.current.split(".")[: -node.level] if not self.current.endswith("__init__") else []
            base = ".".join([*package, base]) if base else ".".join(package)
        self._add(base)
        for alias in node.names:  # `from launcher.plan import memory_model` imports that module
            self._add(f"{base}.{alias.name}")

    def _nested(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _nested  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            self._nested(node)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:  # `try: import triton except ImportError` is optional, not lazy
        self.generic_visit(node)


def imports_of(name: str, path: Path) -> Imports:
    visitor = Imports(name)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor


def sides() -> tuple[set[str], set[str]]:
    """(planning side, rank side): every launcher module is on exactly one of them."""
    mods = set(modules())
    planning = {m for m in mods if _in(m, PLANNING_PACKAGES)} | PLANNING_EXTRA
    rank = {m for m in mods if _in(m, RANK_PACKAGES)} | RANK_EXTRA
    return planning, rank


def test_every_launcher_module_is_on_one_side() -> None:
    planning, rank = sides()
    launcher = {m for m in modules() if _in(m, ("launcher",))}
    assert not planning & rank, sorted(planning & rank)
    assert launcher <= planning | rank, sorted(launcher - planning - rank)
    assert planning <= set(modules()), sorted(planning - set(modules()))


def _internal(names: set[str], known: set[str]) -> set[str]:
    return {n for n in names if n in known}


def test_planning_side_imports_nothing_heavy_at_module_level() -> None:
    mods = modules()
    planning, rank_side = sides()
    bad = {}
    for name in sorted(planning):
        top = imports_of(name, mods[name]).top
        heavy = sorted(n for n in top if n.split(".")[0] in HEAVY)
        rank = sorted(n for n in top if n in rank_side)
        if heavy or rank:
            bad[name] = heavy + rank
    assert not bad, f"planning-side modules import heavy or rank-side modules at module level: {bad}"


def test_optional_trackers_are_imported_only_where_used() -> None:
    mods = modules()
    eager = {name: sorted(n for n in imports_of(name, path).top if n.split(".")[0] in OPTIONAL)
             for name, path in mods.items()}
    assert not {k: v for k, v in eager.items() if v}, eager
    lazy = {name for name, path in mods.items()
            if {n.split(".")[0] for n in imports_of(name, path).lazy} & set(OPTIONAL)}
    assert lazy == {"launcher.train.tracking"}, lazy  # one module talks to the trackers


def test_planning_side_is_closed_at_module_level() -> None:
    """What a planning module imports at module level is planning side too (so nothing heavy comes in transitively)."""
    mods = modules()
    planning, _ = sides()
    leaks = {name: sorted(_internal(imports_of(name, mods[name]).top, set(mods)) - planning)
             for name in sorted(planning)}
    assert not {k: v for k, v in leaks.items() if v}, leaks


def test_kernels_and_cluster_keep_to_their_side() -> None:
    mods = modules()
    _, rank_side = sides()
    for name, path in mods.items():
        found = imports_of(name, path)
        every = found.top | found.lazy
        if name.startswith("ftkernels"):
            assert not {n for n in every if n.split(".")[0] in ("launcher", "cluster")}, name
        if name.startswith("cluster") and name != "cluster.slurm_task":  # the task runs a rank: it starts the job
            assert not (every & rank_side), (name, sorted(every & rank_side))


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or around a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.add(item)
                if item == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        found = imports_of(name, path)
        # a package's own submodules importing it back is how Python packages work, not a cycle of ours
        graph[name] = {n for n in _internal(found.top | found.lazy, set(mods)) if n != name}
    return graph


def test_no_new_import_cycles() -> None:
    cycles = [frozenset(g) for g in strongly_connected(import_graph())]
    print(f"import cycles (lazy imports counted): {len(cycles)}: {sorted(sorted(c) for c in cycles)}")
    new = [sorted(c) for c in cycles if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, f"new import cycles: {new} (break them with a small leaf module both sides import)"


def test_the_cycle_finder_finds_cycles() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_light_runner_reports_what_was_loaded() -> None:
    """tests/light.py, which five tests use to check the planning side end to end, fails when it should."""
    from light import EXIT_HEAVY, run_light

    assert run_light("import json", heavy=("json",)).returncode == EXIT_HEAVY
    assert run_light("import json", heavy=("torch",)).returncode == 0
    assert run_light("rc = 7").returncode == 7  # the code's own exit code wins
