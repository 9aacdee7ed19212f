"""Markdown rendering of one benchmark run."""

from __future__ import annotations

from dataclasses import dataclass

from .payloads import KINDS


@dataclass(frozen=True)
class Row:
    kind: str
    connections: int
    target: str
    rps: float
    p50_us: int
    p99_us: int
    cpu_us_per_req: float
    requests: int
    other_cpu_pct: float  # CPU of processes outside the benchmark, in % of one core


@dataclass(frozen=True)
class Startup:
    target: str
    ready_ms: float | None  # health endpoint 200: aioproxy's /health, LiteLLM's /health/liveliness
    first_ok_ms: float | None  # first proxied request answered 200
    rss_idle_kib: int
    rss_after_kib: int
    rss_peak_kib: int


# Above this much foreign CPU (in % of one core) during a run, its figures are suspect.
NOISY_PCT = 10.0

# Ratio pairs: (numerator, denominator) target names.
PAIRS = [("aioproxy", "reference"), ("aioproxy", "direct"), ("reference", "direct")]
# Other gateways (--peers) against aioproxy, in a table of their own.
PEERS = {"litellm": "LiteLLM"}
SHORT = {"aioproxy": "aio", "reference": "ref", "direct": "direct", "litellm": "litellm"}


def _ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _opt_ms(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.0f}"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def results_tables(rows: list[Row]) -> list[str]:
    out: list[str] = []
    for kind in dict.fromkeys(r.kind for r in rows):
        out += ["", f"### {KINDS[kind].title}", ""]
        body = [
            [
                str(r.connections),
                r.target,
                f"{r.rps:,.0f}",
                _ms(r.p50_us),
                _ms(r.p99_us),
                f"{r.cpu_us_per_req:,.0f}",
                f"{r.requests:,}",
                f"{r.other_cpu_pct:.0f}",
            ]
            for r in rows
            if r.kind == kind
        ]
        header = [
            "conns",
            "target",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU µs/req",
            "requests",
            "other CPU %",
        ]
        out += _table(header, body, text_columns=2)
    return out


def _factor(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def peer_table(rows: list[Row], peer: str, title: str) -> list[str]:
    """How many times aioproxy beats a peer on each metric (so above 1: aioproxy is better),
    and the peer's CPU/request over the reference's (its distance from the minimum)."""
    by_key = {(r.kind, r.connections, r.target): r for r in rows}
    body = []
    for kind, conns in dict.fromkeys((r.kind, r.connections) for r in rows):
        aio, other = by_key.get((kind, conns, "aioproxy")), by_key.get((kind, conns, peer))
        if aio is None or other is None:
            continue
        ref = by_key.get((kind, conns, "reference"))
        body.append(
            [
                kind,
                str(conns),
                _factor(aio.rps / other.rps),
                _factor(other.p99_us / max(aio.p99_us, 1)),
                _factor(other.cpu_us_per_req / aio.cpu_us_per_req),
                _factor(other.cpu_us_per_req / ref.cpu_us_per_req) if ref else "–",
            ]
        )
    if not body:
        return []
    header = [
        "kind",
        "conns",
        f"req/s aio÷{peer}",
        f"p99 {peer}÷aio",
        f"CPU/req {peer}÷aio",
        f"CPU/req {peer}÷ref",
    ]
    return [
        "",
        f"### aioproxy vs {title}",
        "",
        (
            f"How many times aioproxy is better than {title} (above 1: aioproxy is better), and "
            f"{title}'s CPU/request over the reference pass-through's."
        ),
        "",
        *_table(header, body, text_columns=2),
    ]


def ratio_table(rows: list[Row]) -> list[str]:
    by_key = {(r.kind, r.connections, r.target): r for r in rows}
    targets = {r.target for r in rows}
    pairs = [(a, b) for a, b in PAIRS if a in targets and b in targets]
    if not pairs:
        return []
    header = ["kind", "conns"]
    for a, b in pairs:
        name = f"{SHORT[a]}/{SHORT[b]}"
        header += [f"{name} req/s", f"{name} p99", f"{name} CPU"]
    body = []
    for kind, conns in dict.fromkeys((r.kind, r.connections) for r in rows):
        line = [kind, str(conns)]
        for a, b in pairs:
            ra, rb = by_key.get((kind, conns, a)), by_key.get((kind, conns, b))
            if ra is None or rb is None:
                line += ["–"] * 3
                continue
            line += [
                f"{ra.rps / rb.rps:.2f}",
                f"{ra.p99_us / max(rb.p99_us, 1):.2f}",
                f"{ra.cpu_us_per_req / rb.cpu_us_per_req:.2f}" if rb.cpu_us_per_req else "–",
            ]
        body.append(line)
    return [
        "",
        "### Ratios",
        "",
        "req/s above 1 is better; p99 and CPU/request below 1 are better.",
        "",
        *_table(header, body, text_columns=2),
    ]


def startup_table(startups: list[Startup]) -> list[str]:
    header = [
        "target",
        "to health 200 ms",
        "to first 200 ms",
        "RSS idle MiB",
        "RSS after load MiB",
        "peak RSS MiB",
    ]
    body = [
        [
            s.target,
            _opt_ms(s.ready_ms),
            _opt_ms(s.first_ok_ms),
            _mib(s.rss_idle_kib),
            _mib(s.rss_after_kib),
            _mib(s.rss_peak_kib),
        ]
        for s in startups
    ]
    return [
        "",
        "### Start-up and memory",
        "",
        *_table(header, body),
        "",
        (
            "Health: aioproxy's `GET /health`, LiteLLM's `GET /health/liveliness` (the reference has "
            "none).  RSS of the process tree."
        ),
    ]


def render(title: str, env: dict[str, str], rows: list[Row], startups: list[Startup]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    lines += results_tables(rows) + ratio_table(rows)
    for peer, name in PEERS.items():
        lines += peer_table(rows, peer, name)
    lines += startup_table(startups)
    lines += [
        "",
        (
            "CPU µs/req: user+system CPU of the target's process tree during the run "
            "(for direct: nginx's), divided by requests completed.  other CPU %: what processes "
            "outside the benchmark used meanwhile, in % of one core."
        ),
    ]
    noisy = [r for r in rows if r.other_cpu_pct > NOISY_PCT]
    if noisy:
        worst = max(r.other_cpu_pct for r in noisy)
        lines += [
            "",
            (
                f"**Warning**: in {len(noisy)} of {len(rows)} runs other processes used more than "
                f"{NOISY_PCT:.0f}% of a core (up to {worst:.0f}%): those figures are unreliable."
            ),
        ]
    return "\n".join(lines) + "\n"
