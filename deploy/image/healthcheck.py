"""The image's HEALTHCHECK: the check API's GET /healthz on loopback (PDP_PORT), or with
--admin the admin API's unauthenticated GET /admin/v1/openapi.yaml (PDP_ADMIN_PORT).
Exit 0 when it answers 200, else 1. Standard library only."""

import os
import ssl
import sys
import urllib.request

admin = "--admin" in sys.argv[1:]
if admin:
    url = f"http://127.0.0.1:{os.environ.get('PDP_ADMIN_PORT') or '8283'}/admin/v1/openapi.yaml"
else:
    scheme = "https" if os.environ.get("PDP_TLS_CERT_FILE") else "http"
    url = f"{scheme}://127.0.0.1:{os.environ.get('PDP_PORT') or '8282'}/healthz"
# Loopback to this very process: its certificate is not for 127.0.0.1, and need not be.
context = ssl._create_unverified_context() if url.startswith("https") else None  # noqa: S323
try:
    with urllib.request.urlopen(url, timeout=2, context=context) as answer:  # noqa: S310
        sys.exit(0 if answer.status == 200 else 1)
except OSError as exc:
    print(f"healthcheck: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
