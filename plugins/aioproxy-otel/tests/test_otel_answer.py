"""aioproxy_otel.answer: the answering model and finish reasons, read from a stream's end."""

from __future__ import annotations

import json

from aioproxy_otel.answer import answer_facts

from aioproxy import Outcome


def _event(data: object) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _stream(*blocks: bytes) -> Outcome:
    outcome = Outcome(200, stream=True)
    outcome.last_events = blocks
    return outcome


def test_a_streams_last_model_and_reasons() -> None:
    chunks = [{"model": "early", "choices": [{"finish_reason": None}]} for _ in range(48)]
    chunks.append(
        {"model": "late", "choices": [{"finish_reason": "stop"}, {"finish_reason": None}]}
    )
    chunks.append({"model": "", "choices": [], "usage": {"prompt_tokens": 1}})  # the usage chunk
    burst = b"".join(_event(chunk) for chunk in chunks) + b"data: [DONE]\n\n"
    assert answer_facts(_stream(burst)) == ("late", ["stop"])
    # Across the last two blocks: the reason in the earlier one, nothing in the final one.
    first, last = _event(chunks[-2]), _event(chunks[-1]) + b"data: [DONE]\n\n"
    assert answer_facts(_stream(first, last)) == ("late", ["stop"])


def test_responses_events_and_bodies() -> None:
    done = {"type": "response.completed", "response": {"model": "m", "status": "completed"}}
    created = {"type": "response.created", "response": {"model": "m0", "status": "in_progress"}}
    assert answer_facts(_stream(_event(created) + _event(done))) == ("m", ["completed"])
    body = Outcome(200, stream=False)
    body.body = json.dumps({"model": "b", "choices": [{"finish_reason": "length"}]}).encode()
    assert answer_facts(body) == ("b", ["length"])
    assert answer_facts(_stream(b"data: {broken\n\n")) == (None, [])
