"""The observability part (issue #14): what metrics, JSON access logs and traces cost.

Four targets, started once and measured in interleaved rounds on the same cells:

- **reference**: the bare pass-through (bench/passthrough.py);
- **aio-off**: aioproxy with ``[metrics] enabled = false`` and no access log;
- **aio-on**: aioproxy with Prometheus metrics and JSON access logs (one line a request, to
  its log file), OpenTelemetry off;
- **aio-otel**: aio-off plus the aioproxy-otel plugin, exporting every span over OTLP/HTTP to
  nginx (an empty 200 for each batch), so that the export's CPU is counted too.

Every round's figures are kept: the report gives the best clean one (as the other parts do)
and the spread over all rounds, since the machine is shared.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from .report import MEASURED_HEADER, Row, _measured, _noise_warning, _table, cleanest

__all__ = [
    "CONNECTIONS",
    "KINDS",
    "ON",
    "OTLP_PATH",
    "TARGETS",
    "Variant",
    "otlp_sink",
    "section",
]

KINDS = ("chat", "stream")
CONNECTIONS = 16
OTLP_PATH = "/otlp/v1/traces"  # a file in nginx's docroot: every POST gets an empty 200
_OFF = "\n[metrics]\nenabled = false\n\n[logging]\naccess_log = false\n"
_ON = '\n[metrics]\nenabled = true\n\n[logging]\naccess_log = true\nformat = "json"\n'
TARGET_ON = 1.0  # aio-on ÷ reference, req/s (the issue: at least the bare pass-through)
TARGET_OWN = 0.95  # aio-on ÷ aio-off, req/s


@dataclass(frozen=True)
class Variant:
    """One aioproxy target: its label, config tail, command-line flags and environment."""

    label: str
    config: str
    args: tuple[str, ...] = ()
    otel: bool = False


ON = Variant("aio-on", _ON, ("--log-format", "json"))
TARGETS = (
    Variant("aio-off", _OFF),
    ON,
    Variant("aio-otel", _OFF, otel=True),
)


def otlp_sink(docroot: Path) -> None:
    """Make nginx answer OTLP/HTTP exports: an empty file where the exporter posts."""
    path = docroot / OTLP_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _spread(values: Iterable[float]) -> str:
    values = sorted(values)
    return f"{values[0]:,.0f}–{values[-1]:,.0f} (median {median(values):,.0f})"


def _ratio(rows: dict[str, Row], a: str, b: str) -> float | None:
    if a in rows and b in rows and rows[b].rps:
        return rows[a].rps / rows[b].rps
    return None


def section(rounds: dict[tuple[str, str], list[Row]], conns: int) -> list[str]:
    """``rounds``: (kind, target) -> every round's row."""
    if not rounds:
        return []
    best = {key: min(rows, key=cleanest) for key, rows in rounds.items()}
    body, spreads, ratios = [], [], []
    for kind in dict.fromkeys(k for k, _ in rounds):
        by_target = {t: best[k, t] for k, t in best if k == kind}
        for target, row in by_target.items():
            body.append([kind, target, *_measured(row)])
            runs = rounds[kind, target]
            spreads.append(
                [
                    kind,
                    target,
                    str(len(runs)),
                    _spread(r.rps for r in runs),
                    _spread(r.cpu_us_per_req for r in runs),
                ]
            )
        cells = []
        for a, b in (
            ("aio-on", "aio-off"),
            ("aio-on", "reference"),
            ("aio-off", "reference"),
            ("aio-otel", "aio-off"),
        ):
            value = _ratio(by_target, a, b)
            cells.append("–" if value is None else f"{value:.2f}")
        ratios.append([kind, *cells])
    out = [
        "",
        f"### Observability: metrics, JSON access logs, traces ({conns} conns)",
        "",
        (
            "aio-off: metrics and access log off; aio-on: Prometheus metrics and JSON access "
            "logs on (OpenTelemetry off); aio-otel: aio-off plus the aioproxy-otel plugin "
            "exporting every span over OTLP/HTTP. Best clean round of each:"
        ),
        "",
        *_table(["kind", "target", *MEASURED_HEADER], body, text_columns=2),
        "",
        "Every round (the machine is shared: the spread is part of the result):",
        "",
        *_table(
            ["kind", "target", "rounds", "req/s min–max", "CPU µs/req min–max"],
            spreads,
            text_columns=2,
        ),
        "",
        (
            f"req/s ratios of the best rounds (issue #14: aio-on ÷ aio-off ≥ {TARGET_OWN}, "
            f"aio-on ÷ reference ≥ {TARGET_ON}):"
        ),
        "",
        *_table(["kind", "on÷off", "on÷ref", "off÷ref", "otel÷off"], ratios, text_columns=1),
    ]
    return out + _noise_warning(best.values())
