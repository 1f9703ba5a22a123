"""The baseline for `bench_http.py`: a bare aiohttp app that only parses an AuthZEN-shaped
body and looks the answer up in a dict. What pdp costs is measured as a ratio to this.

    .venv/bin/python loadtests/bare_app.py [--port 0] [--no-uvloop]

Prints `PORT <n>` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

try:
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
    dumps: Callable[[Any], bytes] = orjson.dumps
except ImportError:  # pragma: no cover
    loads = json.loads

    def dumps(value: Any) -> bytes:
        return json.dumps(value).encode()


ALLOWED: dict[tuple[str, str, str, str], bool] = {}
_HEADERS = {"Content-Type": "application/json"}


async def evaluation(request: web.Request) -> web.Response:
    body = loads(await request.read())
    key = (
        body["subject"]["id"],
        body["resource"]["type"],
        body["resource"]["id"],
        body["action"]["name"],
    )
    return web.Response(body=dumps({"decision": ALLOWED.get(key, False)}), headers=_HEADERS)


def build() -> web.Application:
    app = web.Application()
    app.router.add_post("/access/v1/evaluation", evaluation)
    return app


async def serve(port: int) -> None:
    runner = web.AppRunner(build(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    run_loop(serve(args.port), uvloop=not args.no_uvloop)


def run_loop(main: Coroutine[Any, Any, None], *, uvloop: bool) -> None:
    """Run `main` on uvloop when asked and installed, else on the plain asyncio loop."""
    if uvloop:
        try:
            import uvloop as fast  # noqa: PLC0415 -- optional, imported only when asked
        except ImportError:
            pass
        else:
            fast.run(main)
            return
    asyncio.run(main)


if __name__ == "__main__":
    main()
