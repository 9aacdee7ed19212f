"""aioproxy.observability.metrics: finished requests, handed over as tuples, counted a batch at
a time when flushed, with the labels and sums a request-at-a-time count would give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aioproxy.config import parse_config
from aioproxy.observability.metrics import Metrics
from aioproxy.outcome import Usage
from tests.support import gateway_config


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def make_metrics() -> Metrics:
    config = parse_config(gateway_config("http://127.0.0.1:9/v1"))
    return Metrics(config, ["gpt-test#0", "echo#0"])


def test_a_batch_counts_each_request_by_its_models() -> None:
    metrics = make_metrics()
    usage = Usage(10, 20, 30, cached_tokens=4, reasoning_tokens=5)
    chat = "chat_completions"
    finished: list[Any] = [
        (chat, "gpt-test", "gpt-test", 200, 0.02, usage, 0.5, None),
        (chat, "gpt-test", "echo", 200, 0.2, usage, 0.25, 0.1),  # served by a fallback
        (chat, "made-up", None, 404, 0.001, None, None, None),
        ("models", None, None, 200, 0.003, None, None, None),
    ]
    metrics.finished.extend(finished)
    got = samples(metrics)
    assert metrics.finished == []

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    requests = "aioproxy_requests_total"
    assert value(requests, kind=chat, model="gpt-test", status="200") == 2
    assert value(requests, kind=chat, model="unknown", status="404") == 1
    assert value(requests, kind="models", model="none", status="200") == 1
    duration = "aioproxy_request_duration_seconds"
    assert value(f"{duration}_count", kind=chat, model="gpt-test") == 2
    assert value(f"{duration}_bucket", kind=chat, model="gpt-test", le="0.025") == 1
    assert value(f"{duration}_bucket", kind=chat, model="gpt-test", le="0.25") == 2
    assert abs(value(f"{duration}_sum", kind=chat, model="gpt-test") - 0.22) < 1e-9
    for model in ("gpt-test", "echo"):
        for token_type, count in (
            ("input", 10),
            ("output", 20),
            ("cached_input", 4),
            ("reasoning", 5),
        ):
            assert value("aioproxy_tokens_total", model=model, type=token_type) == count
    assert value("aioproxy_spend_usd_total", model="gpt-test") == 0.5
    assert value("aioproxy_spend_usd_total", model="echo") == 0.25
    assert value("aioproxy_time_to_first_token_seconds_count", model="echo") == 1
    assert value("aioproxy_time_to_first_token_seconds_count", model="gpt-test") == 0


def test_attempts_added_under_an_id_are_labelled_when_flushed() -> None:
    metrics = make_metrics()
    metrics.upstream.pending[("gpt-test#0", 200)] = 2
    metrics.upstream.pending[("made-at-run-time", 500)] = 1
    got = samples(metrics)
    upstream = "aioproxy_upstream_requests_total"
    assert got[(upstream, (("deployment", "gpt-test#0"), ("status", "200")))] == 2
    assert got[(upstream, (("deployment", "unknown"), ("status", "500")))] == 1


def test_the_shared_folder_keeps_live_processes_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start the folder loses the values of processes that have ended (an earlier run's),
    not those of instances still serving from it."""
    import os

    import prometheus_client

    from aioproxy.observability.metrics import MULTIPROC_ENV, prepare_multiprocess

    monkeypatch.setattr(prometheus_client.values, "ValueClass", prometheus_client.values.ValueClass)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    live = tmp_path / f"counter_{os.getppid()}.db"  # pytest's parent: alive
    ended = tmp_path / "counter_999999999.db"  # no such process
    live.write_bytes(b"live")
    ended.write_bytes(b"ended")
    prepare_multiprocess()
    assert live.exists() and not ended.exists()


def test_a_mixed_batch_counts_as_one_request_at_a_time() -> None:
    """Requests of several kinds, models, servers and statuses, durations on the buckets'
    bounds among them, in several batches: the same counts, buckets and sums as prometheus-
    client's own observe(), a request at a time, would give."""
    import random

    from prometheus_client import CollectorRegistry, Counter, Histogram

    from aioproxy.observability.metrics import DURATION_BUCKETS, TTFT_BUCKETS

    rng = random.Random(14)
    registry = CollectorRegistry()
    requests = Counter("requests", "", ("kind", "model", "status"), registry=registry)
    duration = Histogram(
        "duration", "", ("kind", "model"), buckets=DURATION_BUCKETS, registry=registry
    )
    ttft = Histogram("ttft", "", ("model",), buckets=TTFT_BUCKETS, registry=registry)
    tokens = Counter("tokens", "", ("model", "type"), registry=registry)
    spend = Counter("spend", "", ("model",), registry=registry)
    labels = {"gpt-test": "gpt-test", "echo": "echo", None: "none", "": "none"}
    metrics = make_metrics()
    for _ in range(5):
        for _ in range(rng.randrange(1, 400)):
            kind = rng.choice(["chat_completions", "embeddings", "models"])
            asked = rng.choice(["gpt-test", "echo", "made-up", None, ""])
            served = rng.choice([None, "gpt-test", "echo", "gone"])
            status = rng.choice([200, 200, 429, 500])
            elapsed = rng.choice([*DURATION_BUCKETS, rng.random(), rng.random() * 400])
            usage = rng.choice([None, Usage(rng.randrange(50), rng.randrange(50), 0, 1, 2)])
            cost = rng.choice([None, 0.0, rng.random() / 100])
            first = rng.choice([None, 0.0, *TTFT_BUCKETS, rng.random()])
            metrics.finished.append((kind, asked, served, status, elapsed, usage, cost, first))
            model = labels.get(asked, "unknown")
            served_model = model if served is None else labels.get(served, "unknown")
            requests.labels(kind, model, status).inc()
            duration.labels(kind, model).observe(elapsed)
            if first is not None:
                ttft.labels(served_model).observe(first)
            if usage is not None:
                for token_type, count in (
                    ("input", usage.prompt_tokens),
                    ("output", usage.completion_tokens),
                    ("cached_input", usage.cached_tokens),
                    ("reasoning", usage.reasoning_tokens),
                ):
                    tokens.labels(served_model, token_type).inc(count)
            if cost:
                spend.labels(served_model).inc(cost)
        metrics.count_finished()
    got = samples(metrics)
    for family in registry.collect():
        name = {
            "requests": "aioproxy_requests",
            "duration": "aioproxy_request_duration_seconds",
            "ttft": "aioproxy_time_to_first_token_seconds",
            "tokens": "aioproxy_tokens",
            "spend": "aioproxy_spend_usd",
        }[family.name]
        for sample in family.samples:
            if sample.name.endswith("_created") or not sample.value:
                continue
            key = (
                name + sample.name.removeprefix(family.name),
                tuple(sorted(sample.labels.items())),
            )
            assert got.get(key) == pytest.approx(sample.value, rel=1e-12), key
