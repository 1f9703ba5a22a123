"""Cerbos: policies on disk, the server as a subprocess, and its request bodies.

Cerbos is stateless: it holds policies, not identity data, so every request carries
what it needs about the principal. Here the harness looks up, per query, the user's
status and its assignments (direct ones, and those of each group it is a member of:
`principal_attr`) and sends them as `principal.attr`; Cerbos does the rest itself:
- one derived role `has_<R>` per role R holding permissions: the principal holds an
  assignment that is live (`!has(a.exp) || a.exp > P.attr.now`), whose scope covers
  the resource (`*`, `kind:*`, `kind:id`) and whose role is R or inherits R
  (the roles inheriting R are listed in the condition: the hierarchy lives in the
  policy text, generated from `role_inherits`);
- one resource policy per kind: each action is allowed to the derived roles of the
  roles whose permissions match it (`kind:action`, `kind:*`, `*:action`, `*:*`).
The lookup is the part a Cerbos user's application does before each call; its cost
is measured and reported beside the throughput, not included in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.peers.dataset import Dataset, Query

DERIVED = "pdp_roles"
CHECK = "/api/check/resources"


def derived_name(role: str) -> str:
    return "has_" + re.sub(r"[^A-Za-z0-9_]", "_", role)


def _yaml(value: Any) -> str:
    """JSON is YAML: the policies are written as JSON documents with .yaml names."""
    return json.dumps(value, indent=1) + "\n"


def policies(data: Dataset) -> dict[str, str]:
    """File name -> policy document."""
    holders = [role for role, permissions in sorted(data.grants.items()) if permissions]
    definitions = []
    for role in holders:
        roles = json.dumps(list(data.inheritors[role]))
        expr = (
            f"P.attr.active && P.attr.assignments.exists(a, a.role in {roles}"
            ' && (a.scope == "*" || a.scope == R.kind + ":*" || a.scope == R.kind + ":" + R.id)'
            " && (!has(a.exp) || a.exp > P.attr.now))"
        )
        definitions.append({
            "name": derived_name(role), "parentRoles": ["user"],
            "condition": {"match": {"expr": expr}},
        })  # fmt: skip
    files = {
        "derived_roles.yaml": _yaml({
            "apiVersion": "api.cerbos.dev/v1",
            "derivedRoles": {"name": DERIVED, "definitions": definitions},
        }),
    }  # fmt: skip
    for kind in data.types:
        rules = []
        for action in data.actions:
            wanted = Query("", kind, "", action).wanted()
            granted = [r for r in holders if set(wanted) & set(data.grants[r])]
            if granted:
                rules.append({
                    "actions": [action], "effect": "EFFECT_ALLOW",
                    "derivedRoles": [derived_name(r) for r in granted],
                })  # fmt: skip
        files[f"resource_{kind}.yaml"] = _yaml({
            "apiVersion": "api.cerbos.dev/v1",
            "resourcePolicy": {
                "version": "default", "resource": kind,
                "importDerivedRoles": [DERIVED], "rules": rules,
            },
        })  # fmt: skip
    return files


def principal_attr(data: Dataset, user: str) -> dict[str, Any]:
    """What the request says about the user: status, the decision time, and every
    assignment it holds, the groups' folded in (the harness's per-query lookup)."""
    assignments = [
        {"role": r, "scope": s, **({"exp": e} if e is not None else {})}
        for r, s, e, _ in data.assignments(user)
    ]
    return {"active": data.active.get(user, False), "now": data.now, "assignments": assignments}


def body(data: Dataset, q: Query, n: int = 0) -> bytes:
    """The `/api/check/resources` request of one query."""
    return json.dumps({
        "requestId": str(n),
        "principal": {"id": q.user, "roles": ["user"], "attr": principal_attr(data, q.user)},
        "resources": [{"actions": [q.action], "resource": {"kind": q.rtype, "id": q.rid}}],
    }, separators=(",", ":")).encode()  # fmt: skip


def allowed(response: bytes, action: str) -> bool:
    results = json.loads(response)["results"]
    return bool(results[0]["actions"][action] == "EFFECT_ALLOW")


def config(policy_dir: Path, http_port: int, grpc_port: int) -> str:
    return _yaml({
        "server": {
            "httpListenAddr": f"127.0.0.1:{http_port}",
            "grpcListenAddr": f"127.0.0.1:{grpc_port}",
        },
        "storage": {"driver": "disk", "disk": {"directory": str(policy_dir)}},
        "audit": {"enabled": False},
        "telemetry": {"disabled": True},
    })  # fmt: skip


def write(data: Dataset, workdir: Path, http_port: int, grpc_port: int) -> Path:
    """Policies and the config file under `workdir`; the config's path."""
    policy_dir = workdir / "policies"
    policy_dir.mkdir(parents=True, exist_ok=True)
    for name, text in policies(data).items():
        (policy_dir / name).write_text(text)
    conf = workdir / "cerbos.yaml"
    conf.write_text(config(policy_dir, http_port, grpc_port))
    return conf


def start(
    binary: Path,
    conf: Path,
    http_port: int,
    log: Path,
    pin: Sequence[str] = (),
    deadline_s: float = 60.0,
) -> subprocess.Popen[bytes]:
    """`cerbos server` (GOMAXPROCS=1 when pinned: Go then runs on the one CPU it may
    use), awaited on its health endpoint with a deadline."""
    # No telemetry (it would call out), and no log line per request (pdp writes none).
    env = {**os.environ, "CERBOS_NO_TELEMETRY": "1", **({"GOMAXPROCS": "1"} if pin else {})}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*pin, str(binary), "server", f"--config={conf}", "--log-level=warn"],
            env=env, stdout=out, stderr=out,
        )  # fmt: skip
    url, started = f"http://127.0.0.1:{http_port}/_cerbos/health", time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"cerbos exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - started > deadline_s:
            proc.kill()
            raise RuntimeError(f"cerbos not healthy after {deadline_s:.0f} s; see {log}")
        time.sleep(0.1)  # polling health with a deadline: the server offers no event
