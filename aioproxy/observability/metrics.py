"""Prometheus metrics (``prometheus-client``): what is counted, its labels, and ``/metrics``.

Label values come only from the config (model names, deployment ids) and from small fixed sets
(endpoint kinds, HTTP statuses, token types): a client sending made-up model names cannot grow
the label set, and no key, address or prompt is ever a label. A finished request is handed over
as one tuple (:data:`Finished`), counted into plain dicts a batch at a time; the counts reach
prometheus-client's values before each scrape (and once a second under ``--workers``, where
another worker's scrape reads them).

Under ``run.py --workers N`` the workers share ``PROMETHEUS_MULTIPROC_DIR`` (set up by the CLI
before it forks: :func:`prepare_multiprocess`), and ``/metrics`` in any worker sums them all.
"""

from __future__ import annotations

import bisect
import functools
import hmac
import itertools
import math
import operator
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from ..config import Config
from ..context import ANONYMOUS
from ..errors import AuthenticationError
from ..keys import runtime_key
from ..outcome import Usage
from ..routes import Kind

__all__ = [
    "COUNT_AT",
    "FLUSH_INTERVAL",
    "MULTIPROC_ENV",
    "UNKNOWN",
    "Finished",
    "Metrics",
    "prepare_multiprocess",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNKNOWN = "unknown"  # the label of a model or deployment the config does not name
NONE = "none"  # the model label of a request that named none (refused before its body)
TOKEN_TYPES = ("input", "output", "cached_input", "reasoning")
RATE_LIMIT_SCOPES = frozenset({"upstream", "deployment", "key", "team", "budget", "gateway"})
CACHE_RESULTS = frozenset({"hit", "miss", "bypass"})
# The codes a stream cut after its 200 is counted under: the gateway's own for how a stream
# ends early (any other, an upstream's own error code, counts as "other").
STREAM_ERROR_CODES = frozenset(
    {
        "bad_gateway",
        "client_disconnected",
        "internal_error",
        "server_shutdown",
        "upstream_disconnected",
        "upstream_error",
        "upstream_invalid_response",
        "upstream_stream_incomplete",
        "upstream_timeout",
        "upstream_too_large",
        "upstream_unreachable",
    }
)
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
            if not _alive(stale):  # another live process's (instances sharing the folder)
                stale.unlink()
    os.environ[MULTIPROC_ENV] = path
    # prometheus-client picks its value class when imported: pick again, now that it is set.
    prometheus_client.values.ValueClass = prometheus_client.values.get_value_class()  # type: ignore[no-untyped-call]
    return path, made


def _alive(values: Path) -> bool:
    """Whether the process that writes ``values`` (``counter_<pid>.db``...) still runs."""
    pid = values.stem.rpartition("_")[2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def remove_multiprocess(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (in flight, cooling) from the sums."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


FLUSH_INTERVAL = 1.0  # seconds between two flushes of a worker's counts into the shared values
COUNT_AT = 1024  # finished requests held at most before they are counted, whatever the flushes

# A finished request, for :meth:`Metrics.flush` to count: its endpoint kind, the model it asked
# for (None: none), the model that served it (None: not routed), its status, its duration in
# seconds, its usage, its cost in USD and its time to the first token (streams), as known.
Finished = tuple[str, str | None, str | None, int, float, Usage | None, float | None, float | None]
_ALIKE = operator.itemgetter(0, 1, 2, 3)  # what requests counted together share (to the status)
_KNOWN = functools.partial(operator.is_not, None)  # filter()'s test for a value that is not None
# Each token type's label (TOKEN_TYPES) and its count in a Usage.
_TOKEN_COUNTS = (
    ("input", operator.attrgetter("prompt_tokens")),
    ("output", operator.attrgetter("completion_tokens")),
    ("cached_input", operator.attrgetter("cached_tokens")),
    ("reasoning", operator.attrgetter("reasoning_tokens")),
)


class _Series:
    """One metric's children by label values (prometheus-client's ``labels()`` costs µs:
    each series is looked up once). A value may be an int (a status): ``labels()`` makes it
    text."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[Any, ...], Any] = {}

    def child(self, labels: tuple[Any, ...]) -> Any:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = self.metric.labels(*labels)
        return child


class _Counter(_Series):
    """A counter. Requests add to a plain dict (a fraction of a µs); :meth:`flush` moves the
    sums into prometheus-client's values (a lock and, under ``--workers``, an mmap write each)
    once a second and before every scrape (``pending`` stays the same dict). ``relabel``, if
    given, turns a pending key into its labels as they are flushed (so that a request adds
    under what it has to hand)."""

    __slots__ = ("pending", "relabel")

    def __init__(
        self, metric: Any, relabel: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
    ) -> None:
        super().__init__(metric)
        self.pending: dict[tuple[Any, ...], float] = {}
        self.relabel = relabel

    def add(self, labels: tuple[Any, ...], amount: float = 1) -> None:
        pending = self.pending
        pending[labels] = pending.get(labels, 0) + amount

    def flush(self) -> None:
        # Emptied in place, not replaced: the observer counts attempts into it as bound.
        pending = self.pending.copy()
        self.pending.clear()
        relabel = self.relabel
        for labels, amount in pending.items():
            self.child(labels if relabel is None else relabel(labels)).inc(amount)


class _Histogram(_Series):
    """A histogram's observations, kept as bucket counts and a sum until flushed (counted
    into ``pending`` by :meth:`Metrics.count_finished`, a batch at a time)."""

    __slots__ = ("bounds", "pending")

    def __init__(self, metric: Any, buckets: tuple[float, ...]) -> None:
        super().__init__(metric)
        self.bounds = (*buckets, math.inf)
        self.pending: dict[tuple[str, ...], list[float]] = {}

    def observe_all(self, labels: tuple[str, ...], values: Sequence[float]) -> None:
        """Histogram.observe for each of ``values``, under ``labels``: their buckets counted
        from the values sorted (in C, not a bisection a value), their sum added in order."""
        counts = self.pending.get(labels)
        if counts is None:
            counts = self.pending[labels] = [0.0] * (len(self.bounds) + 1)  # buckets, then sum
        ordered = sorted(values)
        below = 0  # values under the bucket's lower bound
        for bucket, bound in enumerate(self.bounds):
            up_to = bisect.bisect_right(ordered, bound)  # values <= bound: this bucket's and below
            counts[bucket] += up_to - below
            below = up_to
        # One at a time, in order, as observe() adds them (sum() would round the group's first).
        counts[-1] = functools.reduce(operator.add, values, counts[-1])

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, counts in pending.items():
            child = self.child(labels)
            # What Histogram.observe does per observation, once per bucket: prometheus-client
            # keeps each bucket's own count (not cumulative) and the sum as values.
            child._sum.inc(counts[-1])
            for bucket, count in zip(child._buckets, counts[:-1]):
                if count:
                    bucket.inc(count)


class Metrics:
    """Every metric of one app, with its label vocabulary resolved from the config."""

    def __init__(self, config: Config, deployment_ids: Iterable[str]) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode values live in the shared folder and are read back by a
        # collector; otherwise in a registry of this app's own (two apps never share counts).
        self.registry = CollectorRegistry(auto_describe=True)
        own: CollectorRegistry | None = None if self.multiprocess else self.registry
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.models = frozenset(entry.name for entry in config.models)
        # A model name (None, or a refused call's "": the request named none) -> its label;
        # any other name: UNKNOWN.
        self.labels: dict[str | None, str] = {name: name for name in self.models}
        self.labels[None] = self.labels[""] = NONE
        self.deployments = frozenset(deployment_ids)
        self.active = 0  # requests in flight in this process, set into the gauge when flushed
        self._flushed_active = -1
        # Finished requests, as the observer hands them over (see Finished), counted when
        # flushed: a request pays for a tuple and an append, the counting goes a batch at a time.
        self.finished: list[Finished] = []

        def counter(
            name: str,
            doc: str,
            labels: tuple[str, ...],
            relabel: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None,
        ) -> _Counter:
            return _Counter(Counter(name, doc, labels, registry=own), relabel)

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> _Histogram:
            return _Histogram(Histogram(name, doc, labels, registry=own, buckets=buckets), buckets)

        self.requests = counter(
            "aioproxy_requests_total",
            "Requests finished, by endpoint kind, model and status.",
            ("kind", "model", "status"),
        )
        self.duration = histogram(
            "aioproxy_request_duration_seconds",
            "Request duration, arrival to last byte.",
            ("kind", "model"),
            DURATION_BUCKETS,
        )
        self.ttft = histogram(
            "aioproxy_time_to_first_token_seconds",
            "Streams: seconds to the first event.",
            ("model",),
            TTFT_BUCKETS,
        )
        self.tokens = counter(
            "aioproxy_tokens_total", "Tokens the upstreams reported, by type.", ("model", "type")
        )
        self.spend = counter(
            "aioproxy_spend_usd_total", "Spend in USD (priced requests).", ("model",)
        )
        self.upstream = counter(
            "aioproxy_upstream_requests_total",
            "Upstream attempts, retries included.",
            ("deployment", "status"),
            # An attempt adds under its deployment's id: made a label (or UNKNOWN) when flushed.
            lambda key: (self.deployment(key[0]), key[1]),
        )
        self.retries = counter("aioproxy_retries_total", "Retries on the same model.", ("model",))
        self.fallbacks = counter(
            "aioproxy_fallbacks_total",
            "Moves to a fallback model, by the model asked for.",
            ("model",),
        )
        self.cache = counter(
            "aioproxy_cache_requests_total", "Cache lookups, by result.", ("result",)
        )
        self.rate_limited = counter(
            "aioproxy_rate_limited_total",
            "Requests this gateway refused 429 (scope key, team, budget, deployment), and upstream "
            "attempts answered 429 (scope upstream).",
            ("scope",),
        )
        self.stream_errors = counter(
            "aioproxy_stream_errors_total",
            "Streams cut short after their 200 went out (the client told in one last event, or "
            "gone), by the model asked for and the error's code.",
            ("model", "code"),
        )
        self._series = (
            self.requests,
            self.stream_errors,
            self.duration,
            self.ttft,
            self.tokens,
            self.spend,
            self.upstream,
            self.retries,
            self.fallbacks,
            self.cache,
            self.rate_limited,
        )
        self.in_flight = Gauge(
            "aioproxy_in_flight_requests",
            "Requests being served now.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.cooling_gauge = Gauge(
            "aioproxy_deployment_cooling",
            "1 while a deployment is cooling down after failures.",
            ("deployment",),
            registry=own,
            multiprocess_mode="livemax",
        )
        self._cooling: dict[str, Any] = {}
        self._cooled: dict[str, int] = {}  # the value each cooling child was last set to
        self._prebind()

    def _prebind(self) -> None:
        """Make the series every config shows up front: zeros from the start (so rates work),
        and no ``labels()`` call on a request's path for them."""
        from ..routes import PROVIDER_KINDS

        for model in self.models:
            for kind in PROVIDER_KINDS:
                self.requests.child((kind.value, model, 200))
                self.duration.child((kind.value, model))
            for token_type in TOKEN_TYPES:
                self.tokens.child((model, token_type))
            for series in (self.ttft, self.spend, self.retries, self.fallbacks):
                series.child((model,))
        for deployment in self.deployments:
            self.upstream.child((deployment, 200))
            self.cooling(deployment, False)

    def model(self, name: str | None) -> str:
        """``name`` as a label: a configured model name, else a fixed word."""
        return self.labels.get(name, UNKNOWN)

    def count_finished(self) -> None:
        """The finished requests' counts: by the model asked for, and what each spent and how
        fast it came by the model that served it (a fallback's own). Requests alike (kind,
        models, status) are grouped first, each group picked out in C (a handful a batch: no
        Python step a request), then counted at once, its sums and buckets made in C."""
        finished, self.finished = self.finished, []
        keys: list[tuple[str, str | None, str | None, int]] = list(map(_ALIKE, finished))
        for key in dict.fromkeys(keys):
            self._count_alike(*key, list(itertools.compress(finished, map(key.__eq__, keys))))

    def _count_alike(
        self, kind: str, asked: str | None, served: str | None, status: int, group: list[Finished]
    ) -> None:
        """Count requests alike: ``group``, of ``kind`` for model ``asked``, served by
        ``served`` (None: not routed) with ``status``."""
        labels = self.labels
        model = labels.get(asked, UNKNOWN)
        requests = self.requests.pending
        key: tuple[Any, ...] = (kind, model, status)  # the status made text when flushed
        requests[key] = requests.get(key, 0) + len(group)
        _, _, _, _, elapsed, usages, costs, ttfts = zip(*group)
        self.duration.observe_all((kind, model), elapsed)
        served_label = model if served is None else labels.get(served, UNKNOWN)
        reported: list[Usage] = list(filter(_KNOWN, usages))
        if reported:  # the tokens the upstreams reported, by type
            tokens = self.tokens.pending
            for token_type, count_of in _TOKEN_COUNTS:
                count = sum(map(count_of, reported))
                if count:
                    key = (served_label, token_type)
                    tokens[key] = tokens.get(key, 0) + count
        spent = sum(filter(None, costs))  # the priced requests' (a cost of 0 or None: none)
        if spent:
            spend = self.spend.pending
            key = (served_label,)
            spend[key] = spend.get(key, 0) + spent
        first_tokens: list[float] = list(filter(_KNOWN, ttfts))  # streams'
        if first_tokens:
            self.ttft.observe_all((served_label,), first_tokens)

    def stream_error(self, model: str, code: str) -> None:
        """Count a stream cut after its 200: ``model`` asked for, ``code`` the access line's."""
        self.stream_errors.add((self.model(model), code if code in STREAM_ERROR_CODES else "other"))

    def deployment(self, deployment_id: str) -> str:
        return deployment_id if deployment_id in self.deployments else UNKNOWN

    def cooling(self, deployment_id: str, cooling: bool) -> None:
        label = self.deployment(deployment_id)
        value = int(cooling)
        if self._cooled.get(label) == value:  # each second's refresh: mostly no change to set
            return
        self._cooled[label] = value
        child = self._cooling.get(label)
        if child is None:
            child = self._cooling[label] = self.cooling_gauge.labels(label)
        child.set(value)

    def flush(self) -> None:
        """Move this process's counts into the shared values (what a scrape reads)."""
        if self.finished:
            self.count_finished()
        for series in self._series:
            if series.pending:
                series.flush()
        if self.active != self._flushed_active:
            self._flushed_active = self.active
            self.in_flight.set(self.active)

    def exposition(self) -> bytes:
        self.flush()
        return prometheus_client.generate_latest(self.registry)


def metrics_handler(
    metrics: Metrics,
    refresh: Callable[[], None],
    master_key: str | None,
    public: bool,
    counted: bool = True,
) -> Callable[[web.Request], Any]:
    """``GET /metrics``: the text exposition; the master key is needed unless ``public``
    (with no master key: only on a gateway without any key, whose every route is open).
    ``counted``: the scrape is itself one of the requests in flight (the API port's, which the
    observer counts; not the metrics port's), and is taken off while it reports."""
    expected = f"Bearer {master_key}".encode() if master_key and not public else None

    async def serve_metrics(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                raise AuthenticationError("/metrics needs the master key")
        elif not public and not await _open_gateway(request):
            raise AuthenticationError(
                "/metrics needs the master key (none is set: set one, or [metrics] public)"
            )
        if counted:
            metrics.active -= 1  # a scrape is not one of the requests it reports on
        try:
            refresh()
            body = metrics.exposition()
        finally:
            if counted:
                metrics.active += 1
        return web.Response(
            body=body,
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    return serve_metrics


async def _open_gateway(request: web.Request) -> bool:
    """Whether the gateway has no key at all (no master key, config key nor database key): the
    caller is then anonymous, and every route open to it."""
    principal = await request.app[runtime_key].authenticate(request, Kind.MODELS)
    return principal is ANONYMOUS
