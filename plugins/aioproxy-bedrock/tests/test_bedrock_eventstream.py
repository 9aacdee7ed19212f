"""The event-stream framing: the fake's encoder against AWS's vectors, and the plugin's reader
(botocore's decoder) fed a recorded ConverseStream cut at every byte boundary."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aioproxy_bedrock.eventstream import FrameError, FrameReader, StreamStalled
from aioproxy_bedrock.translate import StreamTranslator, decode_event

from .conftest import fake_bedrock

frame = fake_bedrock.frame
event = fake_bedrock.event

# The event-stream encoding's published test vectors (awslabs/aws-c-event-stream's
# test/encoded/positive/payload_no_headers and payload_one_str_header, which botocore's
# tests/unit/test_eventstream.py repeats): (headers, payload) -> the bytes on the wire.
PAYLOAD_NO_HEADERS = b"\x00\x00\x00\x1d\x00\x00\x00\x00\xfdR\x8cZ{'foo':'bar'}\xc3e96"
PAYLOAD_ONE_STR_HEADER = (
    b"\x00\x00\x00=\x00\x00\x00 \x07\xfd\x83\x96\x0ccontent-type\x07\x00\x10"
    b"application/json{'foo':'bar'}\x8d\x9c\x08\xb1"
)

# A ConverseStream answer as Bedrock sends it: text, a tool call in two pieces, the stop, the
# usage; framed by the fake, whose framing the vectors above check.
RECORDED = [
    ("messageStart", {"role": "assistant"}),
    ("contentBlockDelta", {"delta": {"text": "Let me"}, "contentBlockIndex": 0}),
    ("contentBlockDelta", {"delta": {"text": " check."}, "contentBlockIndex": 0}),
    ("contentBlockStop", {"contentBlockIndex": 0}),
    (
        "contentBlockStart",
        {"start": {"toolUse": {"toolUseId": "t1", "name": "get_weather"}}, "contentBlockIndex": 1},
    ),
    ("contentBlockDelta", {"delta": {"toolUse": {"input": '{"city"'}}, "contentBlockIndex": 1}),
    ("contentBlockDelta", {"delta": {"toolUse": {"input": ': "Paris"}'}}, "contentBlockIndex": 1}),
    ("contentBlockStop", {"contentBlockIndex": 1}),
    ("messageStop", {"stopReason": "tool_use"}),
    ("metadata", {"usage": {"inputTokens": 11, "outputTokens": 4, "totalTokens": 15}}),
]
STREAM = b"".join(event(kind, body) for kind, body in RECORDED)


def test_the_fakes_framing_is_the_specs() -> None:
    assert frame({}, b"{'foo':'bar'}") == PAYLOAD_NO_HEADERS
    assert frame({"content-type": "application/json"}, b"{'foo':'bar'}") == PAYLOAD_ONE_STR_HEADER


def test_the_vectors_decode() -> None:
    messages = list(FrameReader().feed(PAYLOAD_NO_HEADERS + PAYLOAD_ONE_STR_HEADER))
    assert [(m.headers, m.payload) for m in messages] == [
        ({}, b"{'foo':'bar'}"),
        ({"content-type": "application/json"}, b"{'foo':'bar'}"),
    ]


def _decoded(chunks: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    reader = FrameReader()
    out = []
    for chunk in chunks:
        for message in reader.feed(chunk):
            assert message.kind == "event"
            out.append((message.event_type, json.loads(message.payload)))
    return out


EXPECTED = [(kind, {**body, "p": "abcdefgh"}) for kind, body in RECORDED]


def test_a_stream_cut_at_any_byte_decodes_the_same() -> None:
    for cut in range(len(STREAM) + 1):  # one test: ~1,700 cases cost milliseconds, not seconds
        assert _decoded([STREAM[:cut], STREAM[cut:]]) == EXPECTED, f"cut at byte {cut}"


def test_a_stream_a_byte_at_a_time_decodes_the_same() -> None:
    assert _decoded([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_each_message_comes_out_as_soon_as_it_is_complete() -> None:
    reader = FrameReader()
    first = event(*RECORDED[0])
    assert list(reader.feed(first[:-1])) == []
    assert [m.event_type for m in reader.feed(first[-1:])] == ["messageStart"]


def test_pending_is_what_an_unfinished_message_holds() -> None:
    """What the provider tells Upstream.chunks it holds: the bytes since the last message."""
    ends = []  # where each message of the stream ends
    for kind, body in RECORDED:
        ends.append((ends[-1] if ends else 0) + len(event(kind, body)))
    reader = FrameReader()
    for i in range(len(STREAM)):
        list(reader.feed(STREAM[i : i + 1]))
        fed = i + 1
        assert reader.pending() == fed - max([end for end in ends if end <= fed], default=0)
    assert reader.pending() == 0


def test_the_recorded_stream_translates_to_chunks() -> None:
    translator = StreamTranslator(id="chatcmpl-x", model="m", created=1, include_usage=True)
    chunks = []
    for message in FrameReader().feed(STREAM):
        chunks += translator.feed(message.event_type, decode_event(message.payload))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    calls = [
        call
        for c in chunks
        if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls", [])
    ]
    assert text == "Let me check."
    assert calls[0] == {
        "index": 0,
        "id": "t1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"]["total_tokens"] == 15 and chunks[-1]["choices"] == []
    assert translator.stopped and translator.finished


@pytest.mark.parametrize("at", [3, 9, 20, -2])
def test_a_spoilt_byte_is_a_frame_error(at: int) -> None:
    spoilt = bytearray(event(*RECORDED[0]))
    spoilt[at] ^= 0x01
    with pytest.raises(FrameError):
        list(FrameReader().feed(bytes(spoilt)))


def test_messages_before_a_broken_one_come_out_first() -> None:
    broken = bytearray(event(*RECORDED[1]))
    broken[-1] ^= 0x01
    got = []
    with pytest.raises(FrameError):
        for message in FrameReader().feed(event(*RECORDED[0]) + bytes(broken)):
            got.append(message.event_type)
    assert got == ["messageStart"]


def test_a_trickle_that_completes_nothing_stalls() -> None:
    now = [0.0]
    reader = FrameReader(idle=5.0, clock=lambda: now[0])
    message = event(*RECORDED[1])
    assert list(reader.feed(message[:4])) == []  # the stall starts
    now[0] = 4.9
    assert list(reader.feed(message[4:8])) == []
    now[0] = 5.0
    with pytest.raises(StreamStalled):
        list(reader.feed(message[8:12]))


def test_a_completed_message_restarts_the_stall_clock() -> None:
    now = [0.0]
    reader = FrameReader(idle=5.0, clock=lambda: now[0])
    first, second = event(*RECORDED[0]), event(*RECORDED[1])
    assert list(reader.feed(first[:4])) == []
    now[0] = 4.0
    assert len(list(reader.feed(first[4:] + second[:4]))) == 1
    now[0] = 8.0
    assert list(reader.feed(second[4:8])) == []  # 4 s since the message: the stall starts now
    now[0] = 12.9
    assert list(reader.feed(second[8:12])) == []
