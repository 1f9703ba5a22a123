"""PDP_ROUTES in a real `pdp serve`: validated at start, reloaded on SIGHUP without
dropping a request, a bad new file leaving the old table in force."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from loadtests.gateway_harness import Pdp, poll, request
from tests.test_cli import _one_error_line, _pdp

TABLE_A = "public: ['GET /a']\n"
TABLE_B = "public: ['GET /a', 'GET /b']\n"


def _status(pdp: Pdp, path: str) -> int:
    return request(pdp.port, "GET", f"/forward-auth{path}", timeout=5).status


def test_a_bad_route_file_fails_start_naming_the_entry(tmp_path: Path, db_url: str) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  - path: /ok\n  - path: /b/{x}/{x}\n")
    result = _pdp("serve", "--port", "0", PDP_DATABASE_URL=db_url, PDP_ROUTES=str(routes),
                  PDP_DEFAULT_TENANT="t")  # fmt: skip
    assert result.returncode == 2
    line = _one_error_line(result)
    assert line == (
        f"pdp: error: PDP_ROUTES: {routes}: routes[1] (/b/{{x}}/{{x}}): "
        "path parameter {x} appears twice"
    ), line


def test_sighup_reloads_the_table_without_dropping_requests(tmp_path: Path, db_url: str) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(TABLE_A)
    env = {"PDP_ROUTES": str(routes), "PDP_FORWARD_AUTH_MODE": "envoy", "PDP_DEFAULT_TENANT": "t"}
    pdp = Pdp(db_url, tmp_path, env)
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                status = _status(pdp, "/a")
            except OSError as exc:
                failures.append(repr(exc))
                continue
            answered += 1
            if status != 200:
                failures.append(f"status {status}")

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        assert _status(pdp, "/b") == 403
        routes.write_text(TABLE_B)
        pdp.proc.signal(signal.SIGHUP)
        poll(lambda: _status(pdp, "/b") == 200, 10, "the new table", pdp.proc)
        # A broken file: logged, and the table in force stays.
        routes.write_text("public: ['GET /a', 'GET']\n")
        pdp.proc.signal(signal.SIGHUP)
        poll(lambda: "route table not reloaded" in pdp.proc.tail(), 10, "the refusal", pdp.proc)
        assert "public[1]" in pdp.proc.tail()
        assert _status(pdp, "/b") == 200
        started = answered
        deadline = time.monotonic() + 10
        while answered < started + 20:  # the hammer still runs after both reloads
            assert time.monotonic() < deadline
            time.sleep(0.01)  # waiting on a counter a thread moves: no event to wait on
    finally:
        stop.set()
        worker.join(10)
        assert pdp.stop() == 0, pdp.proc.tail()
    assert failures == []
    assert answered > 20
