"""The image's HEALTHCHECK and the Kubernetes probes (exec: pdp listens on loopback).

    healthcheck.py [PATH] [--admin | --relay]

GET PATH (default /healthz; /readyz for readiness) of the check API on
127.0.0.1:PDP_PORT, with --admin the admin API's unauthenticated
/admin/v1/openapi.yaml on 127.0.0.1:PDP_ADMIN_PORT, with --relay `pdp relay`'s
/healthz on 127.0.0.1:PDP_RELAY_PORT (503 while its worker is down). Exit 0 when it
answers 200, else 1.
pdp must listen on loopback (PDP_HOST 127.0.0.1, the default, or 0.0.0.0).
Standard library only.
"""

import os
import ssl
import sys
import urllib.request

args = sys.argv[1:]
admin = "--admin" in args
paths = [a for a in args if a.startswith("/")]
if "--relay" in args:
    url = f"http://127.0.0.1:{os.environ.get('PDP_RELAY_PORT') or '8284'}/healthz"
elif admin:
    url = f"http://127.0.0.1:{os.environ.get('PDP_ADMIN_PORT') or '8283'}/admin/v1/openapi.yaml"
else:
    scheme = "https" if os.environ.get("PDP_TLS_CERT_FILE") else "http"
    port = os.environ.get("PDP_PORT") or "8282"
    url = f"{scheme}://127.0.0.1:{port}{paths[0] if paths else '/healthz'}"
# Loopback to this very pod: its certificate is not for 127.0.0.1, and need not be.
context = ssl._create_unverified_context() if url.startswith("https") else None  # noqa: S323
try:
    with urllib.request.urlopen(url, timeout=2, context=context) as answer:  # noqa: S310
        sys.exit(0 if answer.status == 200 else 1)
except OSError as exc:
    print(f"healthcheck: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
