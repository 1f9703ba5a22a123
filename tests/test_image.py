"""deploy/Dockerfile, really built and run: podman builds the image on the local
debootstrap base (deploy/image/build-base.sh, made only when localhost/pdp-base is
missing), then buildah runs `pdp migrate` and `pdp serve` from it against this test's
PostgreSQL database (host network) until /readyz answers 200 and decisions are right,
and a SIGTERM under load drains with no request reset (issue 15, items 1 and 7).

Marked `image` (and `slow`): left out of the default run (pyproject's addopts), run by
`.ci/run` with `-m image`. podman, buildah and debootstrap are Debian packages (.ci/run
installs them); a missing one fails these tests, it never skips them.

`podman run` cannot start containers in this sandbox (cgroups), so buildah runs the
image's filesystem with chroot isolation: the entrypoint and user are the image's,
and the container's main process is signalled directly, as a container runtime does.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from loadtests.gateway_harness import Proc, free_port, poll, request
from tests.test_serve_edge import Hammer

pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BUILD_BASE = ROOT / "deploy" / "image" / "build-base.sh"
BASE = "localhost/pdp-base"
IMAGE = "localhost/pdp:test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's ca-certificates bundle
DRAIN = 3.0


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for d in ("/usr/bin", "/usr/sbin") if Path(p := f"{d}/{name}").exists()), None
    )
    assert found, f"{name} is not installed (Debian package {name}; .ci/run installs it)"
    return found


@pytest.fixture(scope="module")
def containers_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of podman/buildah: a containers.conf without default ulimits
    (setting them fails in this sandbox)."""
    conf = tmp_path_factory.mktemp("containers") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{argv}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def image(containers_env: dict[str, str]) -> str:
    """localhost/pdp:test, built from deploy/Dockerfile on the local base image."""
    podman = _tool("podman")
    _tool("debootstrap")
    exists = subprocess.run([podman, "image", "exists", BASE], env=containers_env, check=False)
    if exists.returncode != 0:  # about 3 minutes; podman's storage keeps it afterwards
        _run(["bash", str(BUILD_BASE)], containers_env, 900)
    _run(
        [
            podman, "build", "--isolation", "chroot", "--network", "host",
            "--format", "docker",  # keeps HEALTHCHECK (the OCI format has none)
            "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",  # pip reaches the index through it
            "--build-arg", f"BASE_IMAGE={BASE}",
            "-f", str(DOCKERFILE), "-t", IMAGE, str(ROOT),
        ],
        containers_env,
        900,
    )  # fmt: skip
    # The image this one replaced and the build's cache images (all untagged): podman's
    # storage persists on this machine, and every build would otherwise leave ~800 MB.
    subprocess.run(
        [podman, "image", "prune", "--force"], env=containers_env, capture_output=True, check=False
    )
    return IMAGE


@pytest.fixture
def container(image: str, containers_env: dict[str, str]) -> Iterator[str]:
    """A buildah working container of the image, removed afterwards."""
    buildah = _tool("buildah")
    name = _run([buildah, "from", image], containers_env, 120).stdout.strip().splitlines()[-1]
    yield name
    subprocess.run([buildah, "rm", name], env=containers_env, capture_output=True, check=False)


def _inspect(image: str, env: dict[str, str]) -> dict[str, Any]:
    out = _run([_tool("podman"), "image", "inspect", image], env, 60).stdout
    found: dict[str, Any] = json.loads(out)[0]
    return found


def _buildah_run(container: str, env: dict[str, str], pdp_env: dict[str, str]) -> list[str]:
    """argv of `buildah run` of the image's entrypoint (buildah run uses none itself)."""
    argv = [_tool("buildah"), "run", "--isolation", "chroot", "--network", "host"]
    for key, value in pdp_env.items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, container, "--"]


def _descendant(pid: int, comm: str) -> int | None:
    """The process below `pid` named `comm` (the container's main process: with chroot
    isolation it shares our PID namespace; buildah's own helpers are named otherwise)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            name = (Path("/proc") / str(child) / "comm").read_text().strip()
        except OSError:
            continue
        if name == comm:
            return child
        todo.extend(children.get(child, []))
    return None


def test_the_image_is_non_root_with_pdp_as_entrypoint_and_a_healthcheck(
    image: str, containers_env: dict[str, str], container: str
) -> None:
    found = _inspect(image, containers_env)
    config = found["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/pdp/bin/pdp"]
    assert config["Cmd"] == ["serve"]
    assert found["Healthcheck"]["Test"] == ["CMD", "/opt/pdp/bin/python", "/opt/pdp/healthcheck.py"]
    # No compiler, no pip, no tests, no sources in the final stage.
    argv = _buildah_run(container, containers_env, {})
    probe = (
        "for t in gcc cc g++ make pip pip3; do command -v $t && exit 1; done; "
        "test ! -e /opt/pdp/bin/pip && test ! -e /src && test ! -e /wheels && "
        "test -f /opt/pdp/healthcheck.py && test -f /opt/pdp/metrics_proxy.py && "
        "python -c 'import importlib.util as u; assert u.find_spec(\"tests\") is None' && id -u"
    )
    result = _run([*argv, "sh", "-c", probe], containers_env, 120)
    assert result.stdout.strip().splitlines()[-1] == "10001"
    # The same image runs every command (`pdp relay` comes with issue 14).
    for command in (["pdp", "migrate", "--help"], ["pdp", "admin", "serve", "--help"]):
        _run([*argv, *command], containers_env, 120)


async def _seed(url: str) -> None:
    """A tiny tenant: alice may read documents, nothing else."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("""
            INSERT INTO pdp.tenants (id, name) VALUES ('acme', 'Acme');
            INSERT INTO pdp.users (tenant_id, id) VALUES ('acme', 'alice'), ('acme', 'bob');
            INSERT INTO pdp.roles (tenant_id, id) VALUES ('acme', 'reader');
            INSERT INTO pdp.role_permissions (tenant_id, role_id, permission)
              VALUES ('acme', 'reader', 'document:read');
            INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope)
              VALUES ('acme', 'alice', 'reader', '*');
        """)
    finally:
        await conn.close()


def _decide(port: int, user: str, action: str) -> bool:
    body = json.dumps({
        "subject": {"type": "user", "id": user, "properties": {"tenant": "acme"}},
        "action": {"name": action},
        "resource": {"type": "document", "id": "roadmap"},
    })  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/access/v1/evaluation", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        return bool(json.loads(response.read())["decision"])
    finally:
        conn.close()


def test_migrate_and_serve_from_the_image_then_sigterm_under_load(
    container: str, containers_env: dict[str, str], empty_db_url: str, tmp_path: Path
) -> None:
    # `pdp migrate` from the image creates the schema in an empty database.
    migrate = _buildah_run(container, containers_env, {"PDP_DATABASE_URL": empty_db_url})
    result = subprocess.run(
        [*migrate, "pdp", "migrate"], env=containers_env, capture_output=True, text=True,
        timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "database at revision head" in result.stderr + result.stdout
    asyncio.run(_seed(empty_db_url))

    port = free_port()
    pdp_env = {
        "PDP_DATABASE_URL": empty_db_url, "PDP_PORT": str(port),
        "PDP_DRAIN_SECONDS": f"{DRAIN:g}", "PDP_LOG_LEVEL": "INFO",
    }  # fmt: skip
    argv = [*_buildah_run(container, containers_env, pdp_env), "/opt/pdp/bin/pdp", "serve"]
    proc = Proc("buildah-pdp", argv, tmp_path / "pdp.log", containers_env)
    hammer: Hammer | None = None
    try:
        poll(lambda: request(port, "GET", "/readyz", timeout=2).status == 200, 120, "readyz", proc)
        assert _decide(port, "alice", "read") is True
        assert _decide(port, "alice", "write") is False
        assert _decide(port, "bob", "read") is False
        # The image's HEALTHCHECK and the Kubernetes probes, run inside the image.
        probe = [*_buildah_run(container, containers_env, {"PDP_PORT": str(port)}), "python"]
        for path in ("/readyz", "/healthz"):
            _run([*probe, "/opt/pdp/healthcheck.py", path], containers_env, 60)
        main = _descendant(proc.popen.pid, "pdp")
        assert main is not None, "the container's pdp process was not found"

        hammer = Hammer(port)
        poll(lambda: len(hammer.answered) > 50, 30, "load", proc)
        signalled = time.monotonic()
        os.kill(main, signal.SIGTERM)  # what the runtime sends the container's PID 1
        poll(lambda: request(port, "GET", "/readyz", timeout=5).status == 503, 5, "503", proc)
        poll(lambda: any(t > signalled + DRAIN - 0.5 for t in hammer.answered), DRAIN + 5, "drain")
        hammer.stop()
        assert proc.popen.wait(30) == 0, proc.tail()
    finally:
        if hammer is not None:
            hammer.stop()
        proc.stop()
    assert hammer.failures == [], hammer.failures[:5]
    log = proc.tail(200)
    assert "SIGTERM: draining" in log
    assert "Traceback" not in log
    # Read-only-root friendly: migrate, serve and the drain wrote no file into the
    # container's own layer (buildah's empty /run mount point aside), not even in /tmp.
    merged = Path(_run([_tool("buildah"), "mount", container], containers_env, 60).stdout.strip())
    try:
        written = [p for p in (merged.parent / "diff").rglob("*") if not p.is_dir()]
    finally:
        subprocess.run(
            [_tool("buildah"), "umount", container],
            env=containers_env,
            capture_output=True,
            check=False,
        )
    assert written == []


def test_the_admin_api_runs_from_the_same_image(
    container: str, containers_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    pdp_env = {"PDP_DATABASE_URL": db_url, "PDP_ADMIN_PORT": str(port)}
    # It refuses to start without an active token: made with the image's own CLI.
    create = [*_buildah_run(container, containers_env, pdp_env), "pdp", "admin", "token", "create"]
    made = _run([*create, "--name", "ops", "--scopes", "read"], containers_env, 120)
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("pdpa_")
    argv = [*_buildah_run(container, containers_env, pdp_env), "/opt/pdp/bin/pdp", "admin", "serve"]
    proc = Proc("buildah-admin", argv, tmp_path / "admin.log", containers_env)
    try:
        poll(
            lambda: request(port, "GET", "/admin/v1/openapi.yaml", timeout=2).status == 200,
            60, "admin", proc,
        )  # fmt: skip
        refused = request(port, "GET", "/admin/v1/tenants")
        assert refused.status == 401
        listed = request(port, "GET", "/admin/v1/tenants", {"Authorization": f"Bearer {token}"})
        assert listed.status == 200, listed.body[:300]
        # The image's healthcheck of the admin API, run inside the image.
        probe = _buildah_run(container, containers_env, {"PDP_ADMIN_PORT": str(port)})
        _run([*probe, "python", "/opt/pdp/healthcheck.py", "--admin"], containers_env, 60)
        main = _descendant(proc.popen.pid, "pdp")
        assert main is not None
        os.kill(main, signal.SIGTERM)
        assert proc.popen.wait(30) == 0, proc.tail()
    finally:
        proc.stop()
