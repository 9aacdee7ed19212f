"""Prometheus metrics (``prometheus-client``): what is counted, its labels, and ``/metrics``.

Label values come only from the config (model names, deployment ids) and from small fixed sets
(endpoint kinds, HTTP statuses, token types): a client sending made-up model names cannot grow
the label set, and no key, address or prompt is ever a label. A series is made the first time
it is used and kept in a dict, so that counting costs a dict lookup and an increment.

Under ``run.py --workers N`` the workers share ``PROMETHEUS_MULTIPROC_DIR`` (set up by the CLI
before it forks: :func:`prepare_multiprocess`), and ``/metrics`` in any worker sums them all.
"""

from __future__ import annotations

import hmac
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from ..config import Config
from ..errors import AuthenticationError

__all__ = ["MULTIPROC_ENV", "Metrics", "UNKNOWN", "prepare_multiprocess"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNKNOWN = "unknown"  # the label of a model or deployment the config does not name
NONE = "none"  # the model label of a request that named none (refused before its body)
TOKEN_TYPES = ("input", "output", "cached_input", "reasoning")
RATE_LIMIT_SCOPES = frozenset({"upstream", "deployment", "key", "team", "budget", "gateway"})
CACHE_RESULTS = frozenset({"hit", "miss", "bypass"})
# Seconds: LLM calls range from a cached 5 ms to minutes of thinking.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def prepare_multiprocess(path: str | None = None) -> tuple[str, bool]:
    """Set up ``PROMETHEUS_MULTIPROC_DIR`` for forked workers, before any metric exists.

    Uses ``path`` (or the variable already set), emptied of an earlier run's files, else a new
    temporary folder. Returns the folder and whether it was made here (to remove at exit).
    """
    path = path or os.environ.get(MULTIPROC_ENV)
    made = path is None
    if path is None:
        path = tempfile.mkdtemp(prefix="aioproxy-metrics-")
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in Path(path).glob("*.db"):  # a previous run's counts must not carry over
            stale.unlink()
    os.environ[MULTIPROC_ENV] = path
    # prometheus-client picks its value class when imported: pick again, now that it is set.
    prometheus_client.values.ValueClass = prometheus_client.values.get_value_class()
    return path, made


def remove_multiprocess(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (in flight, cooling) from the sums."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


class _Series:
    """One metric's children by label values, made on first use (``labels()`` costs µs)."""

    __slots__ = ("metric", "children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every metric of one app, with its label vocabulary resolved from the config."""

    def __init__(self, config: Config, deployment_ids: Iterable[str]) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode values live in the shared folder and are read back by a
        # collector; otherwise in a registry of this app's own (two apps never share counts).
        self.registry = CollectorRegistry(auto_describe=True)
        own: CollectorRegistry | None = None if self.multiprocess else self.registry
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)
        self.models = frozenset(entry.name for entry in config.models)
        self.deployments = frozenset(deployment_ids)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> _Series:
            return _Series(Counter(name, doc, labels, registry=own))

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> _Series:
            return _Series(Histogram(name, doc, labels, registry=own, buckets=buckets))

        self.requests = counter(
            "aioproxy_requests_total", "Requests finished, by endpoint kind, model and status.",
            ("kind", "model", "status"),
        )
        self.duration = histogram(
            "aioproxy_request_duration_seconds", "Request duration, arrival to last byte.",
            ("kind", "model"), DURATION_BUCKETS,
        )
        self.ttft = histogram(
            "aioproxy_time_to_first_token_seconds", "Streams: seconds to the first event.",
            ("model",), TTFT_BUCKETS,
        )
        self.tokens = counter(
            "aioproxy_tokens_total", "Tokens the upstreams reported, by type.", ("model", "type")
        )
        self.spend = counter("aioproxy_spend_usd_total", "Spend in USD (priced requests).", ("model",))
        self.upstream = counter(
            "aioproxy_upstream_requests_total", "Upstream attempts, retries included.",
            ("deployment", "status"),
        )
        self.retries = counter("aioproxy_retries_total", "Retries on the same model.", ("model",))
        self.fallbacks = counter(
            "aioproxy_fallbacks_total", "Moves to a fallback model, by the model asked for.",
            ("model",),
        )
        self.cache = counter("aioproxy_cache_requests_total", "Cache lookups, by result.", ("result",))
        self.rate_limited = counter(
            "aioproxy_rate_limited_total", "Requests refused or answered 429, by scope.", ("scope",)
        )
        self.in_flight = Gauge(
            "aioproxy_in_flight_requests", "Requests being served now.",
            registry=own, multiprocess_mode="livesum",
        )
        self.cooling = _Series(Gauge(
            "aioproxy_deployment_cooling", "1 while a deployment is cooling down after failures.",
            ("deployment",), registry=own, multiprocess_mode="livemax",
        ))
        self._prebind(config)

    def _prebind(self, config: Config) -> None:
        """Make the series every config shows up front: zeros from the start (so rates work),
        and no ``labels()`` call on a request's path for them."""
        from ..routes import PROVIDER_KINDS

        for model in self.models:
            for kind in PROVIDER_KINDS:
                self.requests(kind.value, model, "200")
                self.duration(kind.value, model)
            for kind in TOKEN_TYPES:
                self.tokens(model, kind)
            self.ttft(model)
            self.spend(model)
            self.retries(model)
            self.fallbacks(model)
        for deployment in self.deployments:
            self.upstream(deployment, "200")
            self.cooling(deployment).set(0)

    def model(self, name: str | None) -> str:
        """``name`` as a label: a configured model name, else a fixed word."""
        if name is None:
            return NONE
        return name if name in self.models else UNKNOWN

    def deployment(self, deployment_id: str) -> str:
        return deployment_id if deployment_id in self.deployments else UNKNOWN

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def metrics_handler(
    metrics: Metrics, refresh: Callable[[], None], master_key: str | None, public: bool
) -> Callable[[web.Request], Any]:
    """``GET /metrics``: the text exposition; the master key is needed unless ``public``."""
    expected = f"Bearer {master_key}".encode() if master_key and not public else None

    async def serve_metrics(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                raise AuthenticationError("/metrics needs the master key")
        refresh()
        return web.Response(
            body=metrics.exposition(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    return serve_metrics
