"""The Prometheus text format (node_exporter's textfile collector) that both the publisher's
and the agent's ``status --prometheus`` write."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def exposition(metrics: Iterable[tuple[str, str]], samples: Mapping[str, list[str]]) -> str:
    """The text format: HELP and TYPE (gauge) of each metric (name, help), then its samples
    (each the label set and value that follow the name)."""
    lines = []
    for name, help_text in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{sample}" for sample in samples.get(name, [])]
    return "\n".join(lines) + "\n"
