"""What a trace reads from an answer: the model that answered and why it stopped."""

from __future__ import annotations

import msgspec

from aioproxy import Outcome, data_of, split_events

__all__ = ["answer_facts"]


class _Choice(msgspec.Struct):
    finish_reason: str | None = None


class _Response(msgspec.Struct):
    model: str | None = None
    status: str | None = None


class _Answer(msgspec.Struct):
    """A chat/completions answer or chunk, or a Responses object or event: only these fields."""

    model: str | None = None
    choices: list[_Choice] | None = None
    response: _Response | None = None


_decode = msgspec.json.Decoder(_Answer).decode


def answer_facts(outcome: Outcome) -> tuple[str | None, list[str]]:
    """The answering model and the finish reasons, from the body or a stream's last events."""
    model: str | None = None
    reasons: list[str] = []
    for data in _payloads(outcome):
        try:
            answer = _decode(data)
        except msgspec.DecodeError:
            continue
        if answer.response is not None:  # Responses API
            model = answer.response.model or model
            if answer.response.status:
                reasons = [answer.response.status]
            continue
        model = answer.model or model
        found = [c.finish_reason for c in answer.choices or () if c.finish_reason]
        if found:
            reasons = found
    return model, reasons


def _payloads(outcome: Outcome) -> list[bytes]:
    if outcome.body is not None:
        return [outcome.body]
    payloads = []
    for block in outcome.last_events:
        for event in split_events(block):
            data = data_of(event)
            if data and data != b"[DONE]":
                payloads.append(data)
    return payloads
