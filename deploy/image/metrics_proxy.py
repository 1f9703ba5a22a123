"""Expose pdp's /metrics, and nothing else, on a pod address while pdp itself listens on
loopback only (the Kubernetes sidecar: deploy/k8s/app-deployment.yaml).

    metrics_proxy.py [--listen 0.0.0.0:9282] [--target http://127.0.0.1:8282/metrics]

GET /metrics is fetched from the target and answered as is (502 JSON when the target
does not answer); any other path is a 404 JSON, any other method a 405 JSON. SIGTERM
stops it at once (a scrape is retried by Prometheus). Standard library only.
"""

import argparse
import json
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--listen", default="0.0.0.0:9282", help="HOST:PORT to listen on")
parser.add_argument("--target", default="http://127.0.0.1:8282/metrics", help="pdp's /metrics")
options = parser.parse_args()
host, _, port = options.listen.rpartition(":")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, error: str, message: str) -> None:
        body = json.dumps({"error": error, "message": message}).encode()
        self._send(status, body, "application/json")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._error(404, "not_found", "only /metrics is served here")
            return
        try:
            with urllib.request.urlopen(options.target, timeout=10) as answer:  # noqa: S310
                body = answer.read()
                content_type = answer.headers.get("Content-Type", "text/plain")
        except (OSError, urllib.error.URLError) as exc:
            self._error(502, "bad_gateway", f"pdp's /metrics did not answer: {exc}")
            return
        self._send(200, body, content_type)

    def _refuse(self) -> None:
        self._error(405, "method_not_allowed", "only GET /metrics")

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _refuse

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: Prometheus scrapes every few seconds."""


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


signal.signal(signal.SIGTERM, _stop)
server = ThreadingHTTPServer((host, int(port)), Handler)
server.daemon_threads = True
print(f"metrics_proxy: {options.target} on http://{options.listen}/metrics", flush=True)
server.serve_forever()
