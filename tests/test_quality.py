"""The code base passes its own linters: ruff over everything, mypy --strict over the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "streamer", "clients", "tests", "recipes"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict():
    proc = subprocess.run([sys.executable, "-m", "mypy", "streamer", "recipes"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the layers: engine <- model/decoder <- aio <- cli ------------------------------------------

ENGINE = {"engine", "ctc", "events", "endpoint", "exceptions"}
"""the sans-I/O engine: windows, CTC merge, endpointing, typed events"""


def _imports(path: Path) -> set[str]:
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def _modules() -> dict[str, set[str]]:
    pkg = ROOT / "streamer"
    return {".".join(p.relative_to(pkg).with_suffix("").parts): _imports(p) for p in pkg.rglob("*.py")}


def test_the_engine_layer_imports_no_config_model_torch_or_asyncio():
    allowed_outside = {"__future__", "collections", "collections.abc", "dataclasses", "typing", "json", "numpy"}
    modules = _modules()
    assert ENGINE <= set(modules)
    for name in ENGINE:
        for imp in modules[name]:
            if imp.startswith("streamer."):
                assert imp.removeprefix("streamer.") in ENGINE, f"streamer.{name} imports {imp}"
            else:
                assert imp in allowed_outside, f"streamer.{name} imports {imp}"


def test_each_layer_imports_only_the_layers_below():
    for name, imports in _modules().items():
        inner = {i.removeprefix("streamer.").split(".")[0] for i in imports if i.startswith("streamer.")}
        if not name.startswith(("aio", "cli", "__main__")):
            assert not inner & {"aio", "cli"}, f"streamer.{name} reaches up into {inner & {'aio', 'cli'}}"
        if name.startswith("aio"):
            assert "cli" not in inner, f"streamer.{name} imports the command line"
