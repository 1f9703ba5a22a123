"""The README's read-your-writes example, run as written on the embedded default.

`make run` (migrate, seed --demo, serve with no PDP_DATABASE_URL) then the README's
shell block in another shell: `psql "$(.venv/bin/pdp db url)"` must reach the
sidecar's embedded server, so the write is seen and carol may write the roadmap.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from loadtests.gateway_harness import Proc, free_port, poll, request

ROOT = Path(__file__).resolve().parent.parent


def _example() -> str:
    """The shell block after "Read your own writes" in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Read your own writes") :]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found is not None
    return found.group(1)


def test_read_your_writes_example_works_after_make_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env |= {"PDP_DATA_DIR": str(tmp_path / "pgdata"), "PDP_PORT": "0"}
    pdp = [sys.executable, "-m", "pdp"]
    for step in (["migrate"], ["seed", "--demo", "--replace"]):
        done = subprocess.run([*pdp, *step], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
    port = free_port()
    serve = Proc("serve", [*pdp, "serve"], tmp_path / "serve.log", env | {"PDP_PORT": str(port)})
    try:
        poll(lambda: request(port, "GET", "/readyz", timeout=2).status == 200, 60, "serve", serve)
        lines = _example().splitlines()
        command, expected = "\n".join(lines[:-1]), json.loads(lines[-1])
        command = command.replace(".venv/bin/pdp", shlex.join(pdp))
        command = command.replace("localhost:8282", f"127.0.0.1:{port}")
        shown = subprocess.run(["bash", "-euo", "pipefail", "-c", command], env=env,
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        answer = json.loads(shown.stdout)
        assert answer["decision"] is True, answer
        assert answer["context"]["reason"] == expected["context"]["reason"] == "granted"
        assert answer["context"]["scope"] == expected["context"]["scope"]
    finally:
        assert serve.stop() == 0, serve.tail()
