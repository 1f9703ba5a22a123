"""`pdp serve` as a real process at its edges: bind errors, the open-file limit and the
connection cap, and the drain on SIGTERM under load."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from loadtests.gateway_harness import Pdp, Proc, free_port, poll, request
from tests.test_cli import _one_error_line, _pdp

BODY = json.dumps({
    "subject": {"type": "user", "id": "u", "properties": {"tenant": "t"}},
    "action": {"name": "read"},
    "resource": {"type": "doc", "id": "1"},
}).encode()  # fmt: skip


# --- bind errors ----------------------------------------------------------------------


def test_a_busy_port_is_named_not_blamed_on_postgresql(db_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _pdp("serve", "--port", str(port), PDP_DATABASE_URL=db_url)
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result)
    assert line.startswith(f"pdp: error: cannot listen on 127.0.0.1:{port}: "), line
    assert line.endswith(": address already in use"), line
    assert "PostgreSQL" not in line


def test_an_unknown_host_is_named(db_url: str) -> None:
    result = _pdp("serve", "--host", "999.1.1.1", "--port", "0", PDP_DATABASE_URL=db_url)
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result)
    assert line.startswith("pdp: error: cannot listen on 999.1.1.1:0: "), line
    assert "PostgreSQL" not in line


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_a_config_error_on_flag_and_variable(port: str) -> None:
    by_flag = _pdp("serve", "--port", port)
    assert by_flag.returncode == 2
    assert _one_error_line(by_flag).startswith("pdp: error: --port: not a TCP port (0-65535)")
    by_env = _pdp("serve", PDP_PORT=port)
    assert by_env.returncode == 2
    assert _one_error_line(by_env).startswith("pdp: error: PDP_PORT: not a TCP port (0-65535)")


# --- the open-file limit and the connection cap ---------------------------------------

SOFT, HARD = 200, 256  # descriptors of the served process: cap 256 - 32 = 224


def _low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


def _sockets(n: int, port: int, first: bytes = b"") -> Iterator[socket.socket]:
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first:
            sock.sendall(first)
        yield sock


def _rejected(port: int) -> float:
    """pdp_http_connections_rejected_total, or 0 while /metrics itself is refused."""
    reply = request(port, "GET", "/metrics", timeout=5)
    if reply.status != 200:
        return 0.0
    text = reply.body.decode()
    match = re.search(r"^pdp_http_connections_rejected_total (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


def test_under_a_low_file_limit_idle_sockets_cannot_starve_other_clients(
    tmp_path: Path, db_url: str
) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env = {**clean, "PDP_DATABASE_URL": db_url, "PDP_PORT": str(port),
           "PDP_REQUEST_READ_TIMEOUT_SECONDS": "2"}  # fmt: skip
    argv = [sys.executable, "-m", "pdp", "serve"]
    proc = Proc("pdp", argv, tmp_path / "pdp.log", env, preexec_fn=_low_file_limit)
    try:
        poll(lambda: request(port, "GET", "/readyz", timeout=2).status == 200, 60, "pdp", proc)
        assert f"open-file limit raised from {SOFT} to the hard limit {HARD}" in proc.tail()
        with ExitStack() as held:
            # More idle sockets than descriptors: the oldest idle ones are closed for room.
            for sock in _sockets(HARD + 50, port):
                held.enter_context(sock)
            assert request(port, "GET", "/healthz", timeout=5).status == 200
            assert _rejected(port) == 0
        with ExitStack() as held:
            # Busy ones (half a request each) are kept until the read timeout: refused.
            for sock in _sockets(HARD, port, b"GET /healthz HTTP/1.1\r\n"):
                held.enter_context(sock)
            try:  # a JSON 503, or a reset when the request raced the close
                refused = request(port, "GET", "/healthz", timeout=5)
            except ConnectionResetError:
                pass
            else:
                assert refused.status == 503, refused
                assert refused.json()["error"] == "unavailable"
        poll(lambda: _rejected(port) > 0, 20, "the refusals counted", proc)
        assert request(port, "GET", "/healthz", timeout=5).status == 200
        assert "refused a connection" in proc.tail(200)
        assert "Traceback" not in proc.log.read_text()
    finally:
        assert proc.stop() == 0, proc.tail()


# --- the drain on SIGTERM ---------------------------------------------------------------

DRAIN = 4.0


class Hammer:
    """Threads asking checks in a loop (new connections and one keep-alive), until stopped."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.answered: list[float] = []  # when (monotonic) each 200 arrived
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._fresh) for _ in range(threads)]
        self._threads.append(threading.Thread(target=self._keepalive))
        for thread in self._threads:
            thread.start()

    def _one(self, conn: http.client.HTTPConnection) -> None:
        try:
            conn.request("POST", "/access/v1/evaluation", BODY, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.failures.append(repr(exc))
            return
        if response.status == 200:
            self.answered.append(time.monotonic())
        else:
            self.failures.append(f"status {response.status}")

    def _fresh(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self._one(conn)
            conn.close()

    def _keepalive(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            self._one(conn)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def _readiness(port: int) -> tuple[int, dict[str, object]]:
    reply = request(port, "GET", "/readyz", timeout=5)
    return reply.status, reply.json()


def test_sigterm_drains_under_load_and_exits_0(tmp_path: Path, db_url: str) -> None:
    pdp = Pdp(db_url, tmp_path, {"PDP_DRAIN_SECONDS": f"{DRAIN:g}",
                                 "PDP_CONSISTENCY_WAIT_MS": "3000"})  # fmt: skip
    hammer = Hammer(pdp.port)
    slow: list[int] = []
    try:
        poll(lambda: len(hammer.answered) > 50, 30, "load", pdp.proc)
        signalled = time.monotonic()
        pdp.proc.signal(signal.SIGTERM)
        took = poll(lambda: _readiness(pdp.port)[0] == 503, 5, "readyz 503", pdp.proc)
        assert took < 1.0, took
        assert _readiness(pdp.port)[1]["reason"] == "draining"
        during = request(pdp.port, "GET", "/healthz", timeout=5)
        assert (during.status, during.header("Connection")) == (200, "close")

        def in_flight() -> None:  # waits 3 s for a revision that never comes, then SQL
            conn = http.client.HTTPConnection("127.0.0.1", pdp.port, timeout=20)
            headers = {"Content-Type": "application/json", "X-PDP-Min-Revision": str(10**15)}
            conn.request("POST", "/access/v1/evaluation", BODY, headers)
            slow.append(conn.getresponse().status)
            conn.close()

        # Served on during the drain; a request started 1 s before its end outlives it.
        time.sleep(max(0.0, signalled + DRAIN - 1.0 - time.monotonic()))  # the drain is time
        slow_thread = threading.Thread(target=in_flight)
        launched = time.monotonic()
        slow_thread.start()
        # Still served after the slow request set off (an answer to wait for, not a pause).
        poll(
            lambda: any(t > launched for t in hammer.answered), 5, "answers late in the drain",
            pdp.proc,
        )  # fmt: skip
        hammer.stop()
        assert any(t > signalled + DRAIN - 1.5 for t in hammer.answered)
        slow_thread.join(20)
        assert pdp.proc.popen.wait(20) == 0, pdp.proc.tail()
    finally:
        hammer.stop()
        pdp.stop()
    assert hammer.failures == []
    assert slow == [200]
    assert "SIGTERM: draining" in pdp.proc.tail(100)
    assert "Traceback" not in pdp.proc.tail(500)


def test_sigterm_while_starting_stops_at_once(tmp_path: Path) -> None:
    with socket.socket() as blackhole:  # accepts PostgreSQL connections, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen()
        blackhole.settimeout(30)
        url = f"postgresql://pdp@127.0.0.1:{blackhole.getsockname()[1]}/pdp"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
        argv = [sys.executable, "-m", "pdp", "serve", "--port", "0"]
        proc = Proc("pdp", argv, tmp_path / "pdp.log", {**clean, "PDP_DATABASE_URL": url})
        try:
            connection, _ = blackhole.accept()  # pdp is connecting: starting, not serving
            with connection:
                proc.signal(signal.SIGTERM)
                assert proc.popen.wait(10) == 0, proc.tail()
        finally:
            proc.stop()
    assert "SIGTERM before the sidecar had started: stopping" in proc.tail()


# --- the runtime ----------------------------------------------------------------------


def test_the_serving_runtime_hands_the_gil_to_the_loop_within_a_millisecond() -> None:
    # A build in a worker thread (a reload while serving) keeps the GIL this long at most
    # before the event loop may take it back (see sidecar.SWITCH_INTERVAL).
    from pdp import sidecar

    before = sys.getswitchinterval()
    try:
        sidecar.event_loop_policy()
        assert sys.getswitchinterval() == pytest.approx(sidecar.SWITCH_INTERVAL)
        assert sidecar.SWITCH_INTERVAL <= 0.001
    finally:
        sys.setswitchinterval(before)
        asyncio.set_event_loop_policy(None)
