"""The comparison's table (Markdown, also printed) and plot (PNG) from its summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.peers.dataset import Dataset, Query, features


def feature_counts(data: Dataset, queries: Sequence[Query]) -> dict[str, int]:
    """How many queries exercise each part of the model (see `dataset.features`)."""
    counts: Counter[str] = Counter()
    for query in queries:
        counts.update(features(data, query))
    return dict(counts.most_common())


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def table(summary: dict[str, Any]) -> str:
    lines = []
    data = summary["dataset"]
    lines.append(
        f"Dataset: {data['users']:,} users, {data['groups']:,} groups, {data['roles']} roles,"
        f" {data['user_roles'] + data['group_roles']:,} assignments;"
        f" {data['queries']:,} queries, {data['allowed']:,} allowed;"
        f" {data['query_sets']['expiry']} depend on an expiry."
    )
    lines += ["", "| engine | agrees with pdp | excluded |", "|---|---|---|"]
    for a in summary["agreement"]:
        verdict = f"{a['agreed']:,}/{a['asked']:,}"
        if a["agreed"] != a["asked"]:
            verdict += " **DISAGREES**"
        lines.append(f"| {a['engine']} | {verdict} | {a['excluded'] or '-'} |")
    if "in_process" in summary:
        lines += ["", "| in process | median us | p99 us | median / pdp's | build s |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, row in summary["in_process"].items():
            if name.endswith(" floor"):
                name = f"({name}: allow-all policy, no data)"  # noqa: PLW2901
            lines.append(
                f"| {name} | {_us(row['median_us'])} | {_us(row['p99_us'])} |"
                f" {row['ratio_to_pdp']:g}x | {row['build_s']:.1f} |"
            )
    if summary.get("server"):
        lines += ["", "| over HTTP, one server core | connections | checks/s | p50 ms | p99 ms |"
                  " checks/s vs pdp |", "|---|---|---|---|---|---|"]  # fmt: skip
        for connections, row in summary["server"].items():
            for name, r in row.items():
                ratio = next(v for k, v in r.items() if k.startswith("ratio_to_"))
                lines.append(
                    f"| {name} | {connections} | {r['rps']:,} | {r['p50_ms']:.2f} |"
                    f" {r['p99_ms']:.2f} | {ratio:g}x |"
                )
        lookup = summary.get("cerbos_lookup")
        if lookup:
            lines.append(
                f"\nCerbos requests carry the principal's assignments: the harness's lookup and"
                f" body per query cost median {_us(lookup['median_us'])} us"
                f" (p99 {_us(lookup['p99_us'])} us), not counted above."
            )
    if summary.get("not_run"):
        lines.append("\nNot run: " + "; ".join(f"{k}: {v}" for k, v in summary["not_run"].items()))
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Left: median and p99 per check in process (log scale). Right: checks/s over
    HTTP per connection count, pdp against Cerbos."""
    import matplotlib  # noqa: PLC0415  (heavy; only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    server = summary.get("server") or {}
    fig, axes = plt.subplots(1, 2 if server else 1, figsize=(9 if server else 5, 3.4), dpi=90)
    left = axes[0] if server else axes
    rows = {k: v for k, v in summary["in_process"].items() if not k.endswith(" floor")}
    names = list(rows)
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], [rows[n]["median_us"] for n in names], 0.4, label="median")
    left.bar([x + 0.2 for x in xs], [rows[n]["p99_us"] for n in names], 0.4, label="p99")
    left.set(yscale="log", ylabel="us per check (log)", title="In process, one check")
    left.set_xticks(list(xs), names)
    left.legend()
    if server:
        right = axes[1]
        counts = list(server)
        contenders = list(server[counts[0]])
        width = 0.8 / len(contenders)
        for i, name in enumerate(contenders):
            right.bar([c + i * width for c in range(len(counts))],
                      [server[c][name]["rps"] for c in counts], width, label=name)  # fmt: skip
        right.set_xticks([c + width * (len(contenders) - 1) / 2 for c in range(len(counts))],
                         [f"{c} conn." for c in counts])  # fmt: skip
        right.set(ylabel="checks/s", title="Over loopback HTTP, one server core")
        right.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
