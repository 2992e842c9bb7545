"""The code base passes its own linters: ruff over everything, mypy --strict over the package, the recipes and the
clients (the benchmarks and tools)."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "streamer", "clients", "tests", "recipes"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict():
    proc = subprocess.run([sys.executable, "-m", "mypy", "streamer", "recipes", "clients"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the import graph: no circles, and layers by folder -------------------------------------------------------------
#
# The graph is read from the source (ast), not from what a run happens to import: every ``import`` and
# ``from ... import`` counts, at module level, inside functions and under ``if TYPE_CHECKING:`` alike; relative
# imports are resolved against the importing module's package. ``from a import b`` is an edge to the module a.b
# when there is one, else to a. Importing a.b.c is an edge to a.b.c alone (not to the packages above it), as
# import-linter and grimp count it.

ENGINE = {"engine", "ctc", "events", "endpoint", "exceptions", "text"}
"""the sans-I/O engine: windows, CTC merge, endpointing, typed events, the script's rules for words"""

EVENT_LOOP_LIBRARIES = {"asyncio", "websockets", "aiomqtt", "h11", "aiohttp", "anyio", "trio", "uvicorn",
                        "starlette", "wyoming"}
"""what the asyncio layer (streamer/aio) and the command line may use, and the modules at the top may not"""

ASYNC_AT_THE_TOP = {"streamer.triton": "TritonRunner.infer is a coroutine: the batching worker awaits its requests"}
"""modules at the top of streamer/ that use asyncio, and why"""


@dataclass(frozen=True)
class Import:
    target: str
    """the module imported: streamer.x.y, or the top-level name of another package (numpy, asyncio)"""
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(folder: str = "streamer") -> dict[str, list[Import]]:
    """Every module under ``folder`` and what it imports (modules of ``streamer`` by full name, others by their
    top-level package)."""
    files = {_module_name(p): p for p in sorted((ROOT / folder).rglob("*.py"))}
    known = files | {_module_name(p): p for p in (ROOT / "streamer").rglob("*.py")}
    graph: dict[str, list[Import]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: list[Import] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for target in targets:
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target != name and Import(target, node.lineno) not in found:
                    found.append(Import(target, node.lineno))
        graph[name] = found
    return graph


def import_circles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    edges = {m: sorted({i.target for i in imports if i.target in graph}) for m, imports in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                circles.append(sorted([v, *component]))

    for v in edges:
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles():
    graph = import_graph()
    circles = import_circles(graph)
    lines = []
    for members in circles:
        lines.append(f"{len(members)} modules import each other: {', '.join(members)}")
        for m in members:
            inside = sorted({f"{i.target} (line {i.line})" for i in graph[m] if i.target in members})
            lines.append(f"  {m} imports {'; '.join(inside)}")
    assert not circles, "import circles in streamer/:\n" + "\n".join(lines)


def test_handlers_see_the_host_not_the_daemon():
    """The protocols and the HTTP front (streamer/aio/protocols, streamer/aio/http) work through the narrow host
    (streamer.aio.host): they never import the daemon (streamer.aio.server) or the process wiring
    (streamer/aio/processes), which route to them."""
    wrong = [f"{name} imports {imp.target} (line {imp.line})" for name, imports in import_graph().items()
             if name.startswith(("streamer.aio.protocols", "streamer.aio.http")) for imp in imports
             if imp.target == "streamer.aio.server" or imp.target.startswith("streamer.aio.processes")]
    assert not wrong, "\n".join(wrong)


def _layer(module: str) -> str:
    """``top`` (the modules at the top of streamer/), ``aio`` or ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("aio", "cli") else "top"


def test_the_engine_layer_imports_no_config_model_torch_or_asyncio():
    allowed_outside = {"__future__", "collections", "dataclasses", "typing", "json", "math", "numpy", "functools",
                       "unicodedata"}
    graph = import_graph()
    assert {f"streamer.{n}" for n in ENGINE} <= set(graph)
    for name in ENGINE:
        for imp in graph[f"streamer.{name}"]:
            if imp.target.startswith("streamer."):
                assert imp.target.removeprefix("streamer.") in ENGINE, f"streamer.{name} imports {imp.target}"
            else:
                assert imp.target.split(".")[0] in allowed_outside, f"streamer.{name} imports {imp.target}"


def test_each_folder_imports_only_the_layers_below():
    """The modules at the top of streamer/ (the sans-I/O core, the backends, decoding, evaluation) import neither
    streamer.aio nor streamer.cli and no event-loop library; streamer.aio never imports the command line; nothing
    outside streamer/cli (but ``python -m streamer``) imports it; and the recipes and the example clients use the
    core only (the clients reach the daemon over the wire)."""
    wrong = []
    graph = import_graph() | import_graph("recipes") | import_graph("clients")
    for name, imports in graph.items():
        layer = _layer(name) if name.startswith("streamer") else "outside"
        for imp in imports:
            to = _layer(imp.target) if imp.target.startswith("streamer.") else None
            if to == "cli" and layer != "cli" and name != "streamer.__main__":
                wrong.append(f"{name} imports the command line ({imp.target}, line {imp.line})")
            elif to == "aio" and layer in ("top", "outside"):
                wrong.append(f"{name} reaches up into the asyncio layer ({imp.target}, line {imp.line})")
            elif (layer == "top" and imp.target.split(".")[0] in EVENT_LOOP_LIBRARIES
                  and name not in ASYNC_AT_THE_TOP):
                wrong.append(f"{name} imports {imp.target} (line {imp.line}): the top of streamer/ is sans-I/O; "
                             "event loops live in streamer/aio")
    assert not wrong, "\n".join(wrong)
