"""A plain install works: the wheel, no extras, in a new venv, migrates, seeds and serves.

This is what a Dockerfile or a user's `pip install pdp` does. Extras (orjson, msgspec, uvloop,
the test tools) hide missing runtime dependencies, so none is installed here. Slow
(it installs the runtime dependencies from the package index into a new venv).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from loadtests.run import Sidecar, free_port

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "pdp", "sync", "migrations")


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=600, check=False, env=env
    )
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_plain_install_migrates_seeds_and_serves(tmp_path: Path, db_url: str) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:  # a clean copy: the build leaves nothing in the checkout
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path / "dist", source)
    wheel = next((tmp_path / "dist").glob("pdp-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "pip", "install", "--quiet", wheel)
    # The plain path: the optional `fast` extra is absent.
    probe = "import importlib.util as u; print([m for m in ('orjson', 'uvloop', 'msgspec', 'hiredis') if u.find_spec(m)])"
    assert _run(venv / "bin" / "python", "-c", probe).strip() == "[]"

    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "PDP_DATABASE_URL": db_url}
    _run(venv / "bin" / "pdp", "migrate", env=env)
    assert _run(venv / "bin" / "pdp", "seed", "--demo", env=env).startswith("demo: users=5 ")

    sidecar = Sidecar(db_url, free_port(), tmp_path / "serve.log", "demo", command=[str(venv / "bin" / "pdp"), "serve"])
    sidecar.start(deadline_s=60)
    try:
        body = {
            "subject": {"type": "user", "id": "bob"},
            "action": {"name": "write"},
            "resource": {"type": "document", "id": "roadmap"},
        }
        request = urllib.request.Request(  # noqa: S310 -- our own loopback URL
            f"{sidecar.base}/access/v1/evaluation", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 -- loopback
            answer = json.load(response)
        assert answer["decision"] is True
        assert answer["context"]["via_group"] == "engineering"
    finally:
        sidecar.stop()
