"""Write deploy/k8s/prometheusrule.yaml from deploy/prometheus/rules.yml: the same
groups, wrapped in a Prometheus Operator PrometheusRule (monitoring.coreos.com/v1).

    .venv/bin/python deploy/k8s/make_prometheusrule.py    # rewrites the file
    .venv/bin/python deploy/k8s/make_prometheusrule.py -  # prints it

tests/test_deploy.py fails when the file is not what this writes, so rules.yml stays
the only place the rules are edited.
"""

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "rules.yml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/k8s/make_prometheusrule.py:
# edit rules.yml and run `.venv/bin/python deploy/k8s/make_prometheusrule.py`.
# runbook_url annotations are relative to the repository: prefix them with where you
# host deploy/RUNBOOK.md. The labels select the Prometheus Operator's rule selector;
# change them to match yours.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, as in rules.yml."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def manifest() -> dict[str, Any]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "pdp",
            "labels": {"app.kubernetes.io/name": "pdp", "prometheus": "k8s", "role": "alert-rules"},
        },
        "spec": {"groups": groups},
    }


def render() -> str:
    body = yaml.dump(manifest(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


if __name__ == "__main__":
    if sys.argv[1:] == ["-"]:
        sys.stdout.write(render())
    else:
        TARGET.write_text(render())
        print(f"wrote {TARGET}")
