"""The engine is a pure core: importing it loads no I/O, async or metrics library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pdp.engine

FORBIDDEN = ("aiohttp", "asyncpg", "redis", "sqlalchemy", "prometheus_client", "asyncio")
ENGINE_DIR = Path(pdp.engine.__file__).parent


def _forbidden_loaded_by(module: str) -> str:
    """The FORBIDDEN modules loaded by importing `module` in a fresh interpreter."""
    code = (
        f"import {module}, sys; "
        f"print(','.join(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stderr == ""
    return result.stdout.strip()


def test_import_in_fresh_interpreter_loads_nothing_impure() -> None:
    assert _forbidden_loaded_by("pdp.engine") == ""
    # The probe sees them when they are loaded (the web layer's, say).
    loaded = set(_forbidden_loaded_by("pdp.web.app").split(","))
    assert {"aiohttp", "asyncio", "prometheus_client"} <= loaded


def test_engine_imports_only_stdlib_and_itself() -> None:
    imported: set[str] = set()
    for path in ENGINE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    # The walk saw the modules' imports (an empty walk would pass everything below).
    assert {"pdp", "dataclasses"} <= imported
    outside = {m for m in imported if m != "pdp" and m not in sys.stdlib_module_names}
    assert outside == set()
    assert "asyncio" not in imported
