"""The served OpenAPI document is the truth: schemathesis fuzzes the live app against it.

The app runs on this test's event loop on a real socket (port 0); the `st` CLI runs
as a subprocess we await, so the loop keeps serving meanwhile. `--checks all`, all
four phases, a fixed seed, 300 examples per operation in CI (30 in the default
suite, PDP_SCHEMATHESIS_EXAMPLES), for both configurations the
document changes with: a default tenant, and none (then every subject must carry
`subject.properties.tenant`, and the document says so).

One expectation is configured per operation, not switched off: a search's
`page.token` may be any string by the schema, but only a token this server issued
for the same request is accepted; any other is a 400 naming `page.token`, as the
document says. So for the searches a schema-valid request may be answered 200 or 400
(`positive_data_acceptance.expected-statuses`). And a schema-violating request can be
too large to read (a batch over maxItems over the body limit): its 413 counts as the
rejection it is (`negative_data_rejection.expected-statuses` adds 413). Every other
check applies as is.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pdp.decision_log import DecisionLog
from pdp.metrics import Metrics
from tests.schemathesis_run import fuzz
from tests.test_web_support import TENANT, Clock, loaded_replica, make_app, settings

CONFIG = """
[checks.negative_data_rejection]
# A request over the body limit is refused with 413 before it is parsed: a rejection.
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[[operations]]
include-path-regex = "^/access/v1/search/"
checks.positive_data_acceptance.expected-statuses = ["200", "400"]
"""
# The default suite runs 30 per operation (about a minute for both configurations);
# .ci/run runs this test again with 300 (about 10 minutes on 2 cores) as its own step.
EXAMPLES = int(os.environ.get("PDP_SCHEMATHESIS_EXAMPLES", "30"))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("default_tenant", "logged"),
    [(TENANT, False), (None, False), (TENANT, True)],
    ids=["default-tenant", "no-default", "decision-log"],
)
async def test_api_conforms_to_its_openapi_document(
    tmp_path: Path, default_tenant: str | None, logged: bool
) -> None:
    config = settings(max_batch=1000, consistency_wait_ms=5, default_tenant=default_tenant)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # Decision logs on (answers carry decision_id); no writer: a full buffer drops.
    decision_log = DecisionLog(metrics) if logged else None
    app = make_app(
        loaded_replica(Clock()), config, registry=registry, metrics=metrics,
        decision_log=decision_log,
    )  # fmt: skip
    code, text = await fuzz(
        app, "/openapi.yaml", CONFIG, tmp_path,
        "--checks", "all", "--max-examples", str(EXAMPLES), timeout=850,
    )  # fmt: skip
    assert code == 0, text
    assert "Tested: 9" in text, text
