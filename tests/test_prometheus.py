"""deploy/prometheus and deploy/grafana: the rules pass promtool's checks and unit tests,
every alert is unit-tested firing and not firing and has a runbook section, and a real
Prometheus scraping a real sidecar loads the rules and answers every dashboard query
with metrics the sidecar exports.

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it);
a missing binary fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from loadtests.gateway_harness import Pdp, Proc, free_port, poll

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
DASHBOARD = DEPLOY / "grafana" / "pdp-dashboard.json"
METRIC = re.compile(r"\b(pdp_[a-z0-9_]+)\b")


def _binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    assert found, f"{name} is not installed (Debian package prometheus; .ci/run installs it)"
    return found


def _alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def _concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables as Grafana would fill them in."""
    return expr.replace("$__rate_interval", "1m").replace('"$job"', '".*"')


def test_the_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout
    assert "FAILED" not in unit.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    for name in _alerts():
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays silent"


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    assert len(_alerts()) >= 10
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "deploy/RUNBOOK.md", (name, url)
        assert anchor in headings, f"{name}: RUNBOOK.md has no section #{anchor}"


def _query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 bad_data: the query does not parse
        answer = json.loads(exc.read())
    return answer


def _exported(metrics_text: str) -> set[str]:
    """Every series name a /metrics text can have, from its TYPE lines."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
    return names


def test_a_real_prometheus_scrapes_a_sidecar_and_answers_every_dashboard_query(
    db_url: str, tmp_path: Path
) -> None:
    pdp = Pdp(db_url, tmp_path, {})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pdp.port}/metrics", timeout=10) as resp:
            exported = _exported(resp.read().decode())
        # Every metric every panel names is one the sidecar exports.
        for title, expr in _dashboard_queries():
            for name in METRIC.findall(expr):
                assert name in exported, f"panel {title!r}: {name} is not on /metrics"
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "pdp", "static_configs": [{"targets": [f"127.0.0.1:{pdp.port}"]}]}],
        }))  # fmt: skip
        prometheus = Proc("prometheus", [
            _binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ], tmp_path / "prometheus.log", {"PATH": "/usr/bin:/bin"})  # fmt: skip
        try:
            # The sidecar's own series, scraped and queried back through the HTTP API.
            def ready_scraped() -> bool:
                try:
                    result = _query(port, 'pdp_ready{job="pdp"}')["data"]["result"]
                except (OSError, ValueError, KeyError):  # not listening, or 503 while starting
                    return False
                return bool(result) and result[0]["value"][1] == "1"

            poll(ready_scraped, 60, "prometheus", prometheus)
            # The rules loaded and evaluate: a recording rule of the sidecar's series.
            poll(lambda: bool(_query(port, "pdp:sync_staleness:ratio_to_bound")["data"]["result"]),
                 30, "prometheus rules", prometheus)  # fmt: skip
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as resp:
                groups = json.loads(resp.read())["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert {r["name"] for r in rules if r["type"] == "alerting"} == set(_alerts())
            assert all(r["health"] in {"ok", "unknown"} for r in rules), rules
            firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"]
            assert "PdpNotReady" not in firing
            # Every dashboard query parses and runs.
            for title, expr in _dashboard_queries():
                answer = _query(port, _concrete(expr))
                assert answer["status"] == "success", (title, expr, answer)
            assert prometheus.popen.poll() is None, prometheus.tail()
        finally:
            prometheus.stop()
    finally:
        pdp.stop()
