"""The layers import downwards only, and no app module imports itself back round a cycle.

    api ──▶ engine, jobs ──▶ core ──▶ grafting        (app.main and app.cli assemble; workers/ runs jobs)

Every import statement counts, wherever it stands (module level, inside a function, under TYPE_CHECKING): a
function-level import dodges a cycle at run time but not the coupling. The checks read the source with ``ast``
and import nothing, so they also hold for modules whose import needs a GPU or a server.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers")

WEB_AND_QUEUE = ("fastapi", "starlette", "redis", "rq")
# layer (package prefix) -> what no module in it may import (a name forbids itself and everything below it)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the maths: no serving, no jobs, no web or queue code
    "app.grafting": ("app.engine", "app.jobs", "app.api", *WEB_AND_QUEUE),
    # shared by engine, jobs and api: knows none of them
    "app.core": ("app.engine", "app.jobs", "app.api"),
    # serving never reaches into the job system or HTTP
    "app.engine": ("app.jobs", "app.api"),
    # Jobs run beside serving, on their own base copy: no HTTP and none of the engine. Nothing in app.jobs
    # imports app.engine today (not even app.engine.registry or app.engine.service), so the whole package is
    # out of bounds; what ties the two together is assembled in app.main.
    "app.jobs": ("app.api", "app.engine"),
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.imported}"


def module_files(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``packages`` below ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in the file, resolved to a module of ``modules`` where it names one (``from a import b``
    is module ``a.b`` when that is a module, else ``a``), else to the dotted name as written."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                source = ".".join([*anchor, source] if source else anchor)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append(Import(module, submodule if submodule in modules else source, node.lineno))
    return found


def all_imports(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> list[Import]:
    modules = module_files(root, packages)
    return [found for module, path in modules.items() for found in imports_of(module, path, modules)]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_violations(imports: Iterable[Import], forbidden: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    return [
        f"{found} (not allowed in {layer})"
        for found in imports
        for layer, banned in forbidden.items()
        if within(found.importer, layer) and any(within(found.imported, name) for name in banned)
    ]


def import_cycles(imports: Iterable[Import], packages: Iterable[str] = PACKAGES) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself) in the graph of
    imports between modules of ``packages``: each is at least one cycle."""
    prefixes = tuple(packages)
    graph: dict[str, set[str]] = {}
    for found in imports:
        if any(within(found.imported, p) for p in prefixes):
            graph.setdefault(found.importer, set()).add(found.imported)
            graph.setdefault(found.imported, set())
    # Tarjan's algorithm, iterative (no recursion limit on a large tree)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        components.append(sorted(component))
    return components


def test_layers_import_downwards_only() -> None:
    imports = all_imports()
    assert len({found.importer for found in imports}) > 40, "the scan found too few modules to mean anything"
    assert layer_violations(imports) == []


def test_no_import_cycle_among_app_modules() -> None:
    assert import_cycles(all_imports()) == []


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A small tree with one violation of each kind, both hidden in function bodies."""
    files = {
        "app/__init__.py": "",
        "app/grafting/__init__.py": "",
        "app/grafting/maths.py": "def f():\n    from app.jobs import runner\n    import redis\n",
        "app/jobs/__init__.py": "",
        "app/jobs/runner.py": "from .work import run\n",
        "app/jobs/work.py": "def run():\n    from app.jobs.runner import x\n",
        "app/jobs/models.py": "from app.grafting import maths\n",  # downwards: neither a violation nor a cycle
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checks_find_planted_violations(planted: Path) -> None:
    imports = all_imports(planted, ("app",))
    assert sorted(layer_violations(imports)) == [
        "app.grafting.maths:2 imports app.jobs.runner (not allowed in app.grafting)",
        "app.grafting.maths:3 imports redis (not allowed in app.grafting)",
    ]
    assert import_cycles(imports, ("app",)) == [["app.jobs.runner", "app.jobs.work"]]
