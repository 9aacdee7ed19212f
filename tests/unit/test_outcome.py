"""aioproxy.outcome: the usage an upstream reported, from a body or from a stream's last events."""

from __future__ import annotations

import random

import pytest

from aioproxy import outcome as outcome_module
from aioproxy.outcome import Outcome, Usage, _events_from_end
from aioproxy.streaming import DONE, data_of, split_events, sse_data, sse_event


def body_outcome(body: bytes) -> Outcome:
    outcome = Outcome(200, stream=False)
    outcome.body = body
    return outcome


def stream_outcome(*events: bytes) -> Outcome:
    outcome = Outcome(200, stream=True)
    outcome.last_events = events
    return outcome


CHAT_USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
RESPONSES_USAGE = {
    "input_tokens": 8,
    "output_tokens": 3,
    "total_tokens": 11,
    "output_tokens_details": {"reasoning_tokens": 0},
}


def test_defaults() -> None:
    outcome = Outcome(201, stream=False)
    assert (outcome.status, outcome.stream) == (201, False)
    assert outcome.body is None and outcome.last_events == () and outcome.events == 0
    assert outcome.ttfb is None and outcome.elapsed == 0.0 and outcome.disconnected is False
    assert outcome.usage() is None


def test_usage_from_chat_body() -> None:
    body = (
        b'{"id":"c","object":"chat.completion","choices":[{"message":{"content":"hi"}}],'
        b'"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,'
        b'"prompt_tokens_details":{"cached_tokens":0}}}'
    )
    assert body_outcome(body).usage() == Usage(12, 5, 17)


def test_usage_from_responses_body() -> None:
    body = b'{"object":"response","usage":{"input_tokens":8,"output_tokens":3,"total_tokens":11}}'
    assert body_outcome(body).usage() == Usage(8, 3, 11)


def test_usage_from_embeddings_body() -> None:
    body = b'{"object":"list","data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}'
    assert body_outcome(body).usage() == Usage(4, 0, 4)


def test_total_computed_when_missing() -> None:
    assert body_outcome(b'{"usage":{"prompt_tokens":2,"completion_tokens":3}}').usage() == Usage(
        2, 3, 5
    )


def test_usage_from_chat_stream() -> None:
    outcome = stream_outcome(
        sse_data({"choices": [{"delta": {"content": "x"}}], "usage": None}),
        sse_data({"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None}),
        sse_data({"choices": [], "usage": CHAT_USAGE}),
        DONE,
    )
    assert outcome.usage() == Usage(12, 5, 17)


def test_usage_from_responses_stream() -> None:
    outcome = stream_outcome(
        sse_event("response.output_text.done", {"type": "response.output_text.done", "text": "x"}),
        sse_event(
            "response.completed",
            {"type": "response.completed", "response": {"id": "r", "usage": RESPONSES_USAGE}},
        ),
    )
    assert outcome.usage() == Usage(8, 3, 11)


def test_data_line_without_space() -> None:
    outcome = stream_outcome(
        b'data:{"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n', b"data:[DONE]\n\n"
    )
    assert outcome.usage() == Usage(1, 1, 2)


@pytest.mark.parametrize(
    "outcome",
    [
        # absent
        pytest.param(body_outcome(b'{"id":"x","choices":[]}'), id="body-no-usage"),
        pytest.param(body_outcome(b'{"usage":null}'), id="body-null"),
        pytest.param(body_outcome(b'{"usage":{}}'), id="body-empty"),
        pytest.param(stream_outcome(), id="no-events"),
        pytest.param(stream_outcome(DONE), id="done-only"),
        pytest.param(
            stream_outcome(sse_data({"choices": [], "usage": None}), DONE), id="chunks-null"
        ),
        pytest.param(stream_outcome(b": keep-alive\n\n"), id="comment"),
        # a Responses stream cut before response.completed: an event with a response, no usage
        pytest.param(
            stream_outcome(
                sse_event(
                    "response.in_progress",
                    {"type": "response.in_progress", "response": {"usage": None}},
                )
            ),
            id="responses-cut",
        ),
        # malformed
        pytest.param(body_outcome(b""), id="empty"),
        pytest.param(body_outcome(b"not json"), id="text"),
        pytest.param(body_outcome(b"[1,2]"), id="array"),
        pytest.param(body_outcome(b'{"usage":"lots"}'), id="usage-string"),
        pytest.param(body_outcome(b'{"usage":{"prompt_tokens":1'), id="truncated"),
        pytest.param(stream_outcome(b"data: {truncated\n\n", DONE), id="bad-event"),
        pytest.param(stream_outcome(b"data: [1]\n\n"), id="array-event"),
        pytest.param(
            stream_outcome(sse_event("response.completed", {"response": "nope"})),
            id="bad-response",
        ),
    ],
)
def test_none_when_absent_or_malformed(outcome: Outcome) -> None:
    assert outcome.usage() is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"usage":{"prompt_tokens":"abc","completion_tokens":1}}',
        b'{"usage":{"prompt_tokens":[1],"total_tokens":3}}',
        b'{"usage":{"total_tokens":"many"}}',
    ],
)
def test_none_when_token_counts_malformed(body: bytes) -> None:
    assert body_outcome(body).usage() is None


def test_body_wins_over_events() -> None:
    outcome = body_outcome(b'{"usage":{"prompt_tokens":1,"completion_tokens":2}}')
    outcome.last_events = (sse_data({"usage": CHAT_USAGE}),)
    assert outcome.usage() == Usage(1, 2, 3)


def test_latest_usage_event_wins() -> None:
    outcome = stream_outcome(
        sse_data({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        sse_data({"usage": CHAT_USAGE}),
        DONE,
    )
    assert outcome.usage() == Usage(12, 5, 17)


def test_usage_details_cached_and_reasoning_tokens() -> None:
    chat = body_outcome(
        b'{"usage": {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,'
        b' "prompt_tokens_details": {"cached_tokens": 64},'
        b' "completion_tokens_details": {"reasoning_tokens": 30}}}'
    )
    assert chat.usage() == Usage(100, 40, 140, cached_tokens=64, reasoning_tokens=30)
    responses = body_outcome(
        b'{"response": {"usage": {"input_tokens": 9, "output_tokens": 5, "total_tokens": 14,'
        b' "input_tokens_details": {"cached_tokens": 8},'
        b' "output_tokens_details": {"reasoning_tokens": 2}}}}'
    )
    assert responses.usage() == Usage(9, 5, 14, cached_tokens=8, reasoning_tokens=2)
    broken = body_outcome(b'{"usage": {"prompt_tokens": 1, "prompt_tokens_details": 5}}')
    assert broken.usage() is None


def test_usage_from_the_end_of_a_long_burst() -> None:
    """A whole stream in one block (50 events): usage is read off its end, the DONE and a
    comment skipped, events before the usage event never looked at."""
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":50}}\n\n'
    for tail in (usage + b"data: [DONE]\n\n", usage + b": keep-alive\n\ndata: [DONE]\n\n\n"):
        outcome = Outcome(200, stream=True)
        outcome.last_events = (chunk * 50 + tail,)
        found = outcome.usage()
        assert found is not None and (found.prompt_tokens, found.completion_tokens) == (3, 50)
    outcome = Outcome(200, stream=True)
    outcome.last_events = (usage + chunk * 3 + b"data: [DONE]\n\n",)  # not in the last three
    assert outcome.usage() is None


PAD = b'"data":[{"embedding":[' + b",".join([b"0.0123456789"] * 400) + b"]}]"  # a long answer


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        # the usage last, as OpenAI puts it: read from its key on
        (
            b'{"object":"list",' + PAD + b',"usage":{"prompt_tokens":4,"total_tokens":4}}',
            Usage(4, 0, 4),
        ),
        # fields after it
        (
            b'{"object":"chat.completion",' + PAD + b',"usage":{"prompt_tokens":2,'
            b'"completion_tokens":1},"system_fingerprint":"fp_1"}',
            Usage(2, 1, 3),
        ),
        # a later "usage" that is no key of the answer: a nested object's, a string value, a
        # quoted word in a string
        (
            b'{"usage":{"prompt_tokens":7,"total_tokens":7},'
            + PAD
            + b',"meta":{"usage":{"prompt_tokens":99}}}',
            Usage(7, 0, 7),
        ),
        (b'{"usage":{"prompt_tokens":7},' + PAD + b',"kind":"usage"}', Usage(7, 0, 7)),
        (
            b'{"usage":{"prompt_tokens":7},' + PAD + b',"text":"the \\"usage\\": {} key"}',
            Usage(7, 0, 7),
        ),
        # none at all, or only a nested one (a Responses event's): as a whole decode reads it
        (b'{"object":"list",' + PAD + b"}", None),
        (
            b'{"type":"response.completed",' + PAD + b',"response":{"usage":{"input_tokens":3}}}',
            Usage(3, 0, 3),
        ),
        # counts that are not counts: no usage
        (b'{"object":"list",' + PAD + b',"usage":{"prompt_tokens":-1}}', None),
    ],
)
def test_usage_of_a_long_body(body: bytes, usage: Usage | None) -> None:
    """A long answer's usage is read from its last "usage" key on, never wrongly: a "usage"
    that is not the answer's own key falls back to decoding the whole answer."""
    assert len(body) > 2048
    assert body_outcome(body).usage() == usage


def test_events_are_found_from_the_end_as_a_split_finds_them() -> None:
    """The last events of a block, found backwards without splitting it, carry the data a
    split of the whole block gives, in reverse order, whatever the block's blank lines."""
    rng = random.Random(5)
    parts = [b"data: x", b"data: {}", b"\n", b"\n\n", b"event: y\n", b"z"]
    for _ in range(2000):
        block = b"".join(rng.choice(parts) for _ in range(rng.randrange(14)))
        found = [data_of(event) for event in _events_from_end(block)]
        split = [data_of(event) for event in reversed(split_events(block))]
        assert [d for d in found if d] == [d for d in split if d], block


def anthropic_burst(*, before_start: bytes = b"") -> bytes:
    """Anthropic's whole stream in one block, as one read brings a short answer: message_start
    (input tokens) first, message_delta (output tokens) near the end, 50 deltas between."""
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 7}}}
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}
    final = {"type": "message_delta", "usage": {"output_tokens": 50}}
    return (
        before_start
        + sse_event("message_start", start)
        + sse_event("content_block_delta", delta) * 50
        + sse_event("message_delta", final)
        + sse_event("message_stop", {"type": "message_stop"})
    )


@pytest.mark.parametrize(
    "before_start",
    [
        pytest.param(b"", id="first-event"),
        pytest.param(sse_event("ping", {"type": "ping"}), id="after-a-ping"),
        pytest.param(b': "message_start"\n\n', id="after-a-comment-naming-it"),
    ],
)
def test_anthropic_burst_usage_reads_message_start_without_splitting_the_block(
    monkeypatch: pytest.MonkeyPatch, before_start: bytes
) -> None:
    """The input tokens come from message_start, found by a search: the block (the whole
    stream) is never split into its events for that one (it cost ~60 µs a request)."""
    split: list[int] = []

    def counting_split(block: bytes) -> list[bytes]:
        events = split_events(block)
        split.append(len(events))
        return events

    monkeypatch.setattr(outcome_module, "split_events", counting_split)
    block = anthropic_burst(before_start=before_start)
    outcome = Outcome(200, stream=True)
    outcome.first, outcome.last_events = block, (block,)
    assert outcome.usage() == Usage(7, 50, 57)
    assert split == []


def test_anthropic_usage_without_message_start_keeps_the_final_counts() -> None:
    final = sse_event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 4}})
    for first in (b"", b'data: {"type":"message_start"}', b"data: not json\n\n"):
        outcome = Outcome(200, stream=True)
        outcome.first, outcome.last_events = first, (final,)
        assert outcome.usage() == Usage(0, 4, 4)


def test_a_stream_that_came_whole_counts_its_events_when_read() -> None:
    chunk = sse_data(b'{"choices":[{"delta":{"content":"a"}}]}')
    stream = chunk * 3 + DONE
    outcome = Outcome(200, stream=True)
    outcome.first = stream
    outcome.came_whole()
    assert outcome.first == stream and outcome.last_events == (stream,)
    assert outcome.events == 4  # three chunks and [DONE]
    outcome.events = 7  # a count set wins
    assert outcome.events == 7
    assert Outcome(200, stream=True).events == 0


@pytest.mark.parametrize(
    "event",
    [
        b"data: x\n\n",
        b"data:x",
        b"data: x",
        b"data: a\ndata: b\n\n",
        b"event: e\ndata: y\n\n",
        b": c\n\n",
        b"data: x\r\n\r\n",
        b"data: x\n\nextra",
        b'data: {"a": 1}\n\n\n',
        b"",
        b"data:",
        b"data: x\n: comment\n\n",
    ],
)
def test_data_of_one_line_the_short_way_as_the_long(event: bytes) -> None:
    """An event of one data line is read without a split and a join: the same bytes."""
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    assert data_of(event) == b"\n".join(lines)
