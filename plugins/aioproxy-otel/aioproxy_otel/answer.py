"""What a trace reads from an answer: the model that answered and why it stopped."""

from __future__ import annotations

from collections.abc import Iterator

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
    """The answering model and the finish reasons, from the body or a stream's last events.

    A stream is read from its end, and only until both are found: the last chunk holds the
    finish reason and any chunk the model, so a 50-event burst costs two decodes, not 50.
    """
    model: str | None = None
    reasons: list[str] = []
    for data in _payloads_from_end(outcome):
        try:
            answer = _decode(data)
        except msgspec.DecodeError:
            continue
        if answer.response is not None:  # Responses API
            model = model or answer.response.model
            if not reasons and answer.response.status:
                reasons = [answer.response.status]
        else:
            model = model or answer.model
            if not reasons:
                reasons = [c.finish_reason for c in answer.choices or () if c.finish_reason]
        if model and reasons:
            break
    return model, reasons


def _payloads_from_end(outcome: Outcome) -> Iterator[bytes]:
    if outcome.body is not None:
        yield outcome.body
        return
    for block in reversed(outcome.last_events):
        for event in reversed(split_events(block)):
            data = data_of(event)
            if data and data != b"[DONE]":
                yield data
