"""Fixed request bodies and the canned upstream responses (for nginx and the fallback alike)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MASTER_KEY = "sk-master"
UPSTREAM_KEY = "sk-upstream"
UPSTREAM_MODEL = "gpt-4o-mini"
MODEL = "bench-model"
# Streaming goes to its own model names whose api_base is a path prefix on the upstream:
# nginx cannot look into the body for `"stream": true`, so the route is chosen by path.
STREAM_MODEL = "bench-model-stream"  # all events in one burst (a static file)
PACED_MODEL = "bench-model-paced"  # events PACE_MS apart, as tokens arrive from a real model
# GAPPED_EVENTS events GAP_MS apart (the first-event part): a gap wide enough that two events in
# one read can only mean that something held the first back.
GAPPED_MODEL = "bench-model-gapped"
API_BASES = {
    MODEL: "/v1",
    STREAM_MODEL: "/stream/v1",
    PACED_MODEL: "/paced/v1",
    GAPPED_MODEL: "/gapped/v1",
}
# Anthropic-format upstreams (provider "anthropic", Messages passed through), by path prefix.
CLAUDE_MODEL = "bench-claude"
CLAUDE_STREAM_MODEL = "bench-claude-stream"
ANTHROPIC_BASES = {CLAUDE_MODEL: "/anthropic", CLAUDE_STREAM_MODEL: "/anthropic-stream"}
PACE_MS = 1
GAP_MS = 10
GAPPED_EVENTS = 9  # data events before `data: [DONE]`: 10 events, 9 gaps, ~90 ms a stream

STREAM_EVENTS = 50  # data events before the closing `data: [DONE]`
EMBED_DIM = 1536  # text-embedding-3-small's size: a realistic ~20 KB response


@dataclass(frozen=True)
class Kind:
    """One kind of request: how the client calls a proxy, and where it goes upstream."""

    name: str
    title: str
    proxy_path: str  # path on a proxy
    upstream_path: str  # path on the fake upstream (what "direct" hits)
    body: bytes


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]

KINDS: dict[str, Kind] = {
    "chat": Kind(
        "chat",
        "chat completions, non-streaming",
        "/v1/chat/completions",
        "/v1/chat/completions",
        _dumps({"model": MODEL, "messages": _MESSAGES, "max_tokens": 64}),
    ),
    "stream": Kind(
        "stream",
        f"chat completions, streaming ({STREAM_EVENTS} SSE events)",
        "/v1/chat/completions",
        "/stream/v1/chat/completions",
        _dumps({"model": STREAM_MODEL, "messages": _MESSAGES, "max_tokens": 64, "stream": True}),
    ),
    "stream-paced": Kind(
        "stream-paced",
        f"chat completions, streaming, {STREAM_EVENTS} SSE events {PACE_MS} ms apart",
        "/v1/chat/completions",
        "/paced/v1/chat/completions",
        _dumps({"model": PACED_MODEL, "messages": _MESSAGES, "max_tokens": 64, "stream": True}),
    ),
    "embeddings": Kind(
        "embeddings",
        f"embeddings (1 x {EMBED_DIM} floats)",
        "/v1/embeddings",
        "/v1/embeddings",
        _dumps({"model": MODEL, "input": "The quick brown fox jumps over the lazy dog."}),
    ),
}

_CLAUDE_MESSAGES = [
    {"role": "user", "content": [{"type": "text", "text": _MESSAGES[0]["content"]}]}
]


def _messages(model: str, stream: bool = False) -> bytes:
    body: dict[str, object] = {"model": model, "max_tokens": 64, "messages": _CLAUDE_MESSAGES}
    return _dumps({**body, "stream": True} if stream else body)


# Anthropic's Messages API (issue 15): passed through to an Anthropic-format upstream, and
# translated onto the chat upstream (the bridge; a bare hop cannot translate, so the reference
# relays the same chat bytes from a copy at the Messages path). Not run unless named (--kinds).
MESSAGES_KINDS: dict[str, Kind] = {
    "messages": Kind(
        "messages",
        "Messages API, passed through to an Anthropic-format upstream",
        "/v1/messages",
        "/anthropic/v1/messages",
        _messages(CLAUDE_MODEL),
    ),
    "messages-stream": Kind(
        "messages-stream",
        f"Messages API, streaming, passed through ({STREAM_EVENTS} content deltas)",
        "/v1/messages",
        "/anthropic-stream/v1/messages",
        _messages(CLAUDE_STREAM_MODEL, stream=True),
    ),
    "messages-bridged": Kind(
        "messages-bridged",
        "Messages API translated onto chat completions",
        "/v1/messages",
        "/v1/chat/completions",
        _messages(MODEL),
    ),
    "messages-bridged-stream": Kind(
        "messages-bridged-stream",
        f"Messages API translated onto chat completions, streaming ({STREAM_EVENTS} SSE events)",
        "/v1/messages",
        "/stream/v1/chat/completions",
        _messages(STREAM_MODEL, stream=True),
    ),
}
DEFAULT_KINDS = tuple(KINDS)
KINDS.update(MESSAGES_KINDS)

# Not in KINDS: the matrix does not load it; bench/harness/first_event.py times it event by event.
GAPPED = Kind(
    "stream-gapped",
    f"chat completions, streaming, {GAPPED_EVENTS + 1} SSE events {GAP_MS} ms apart",
    "/v1/chat/completions",
    "/gapped/v1/chat/completions",
    _dumps({"model": GAPPED_MODEL, "messages": _MESSAGES, "max_tokens": 64, "stream": True}),
)

_USAGE = {"prompt_tokens": 12, "completion_tokens": STREAM_EVENTS - 2, "total_tokens": 60}


def chat_response() -> bytes:
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": UPSTREAM_MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello, benchmark! " * 6},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
        }
    )


def stream_events(count: int = STREAM_EVENTS) -> list[bytes]:
    """A role event, content events, a finish event carrying usage (``count`` data events in
    all), then `[DONE]`."""

    def event(delta: dict[str, str], finish: str | None = None, **extra: object) -> bytes:
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": UPSTREAM_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + _dumps(chunk) + b"\n\n"

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": f" tok{i}"}) for i in range(count - 2)]
    usage = {**_USAGE, "completion_tokens": count - 2, "total_tokens": 12 + count - 2}
    events.append(event({}, "stop", usage=usage))
    return [*events, b"data: [DONE]\n\n"]


def stream_response() -> bytes:
    return b"".join(stream_events())


def embeddings_response() -> bytes:
    vector = [round(((i * 7919) % 2000 - 1000) / 1000 * 0.05, 6) for i in range(EMBED_DIM)]
    return _dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 10, "total_tokens": 10},
        }
    )


def message_response() -> bytes:
    """An Anthropic Message the size of ``chat_response``'s answer."""
    return _dumps(
        {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Hello, benchmark! " * 6}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 36},
        }
    )


def message_stream_response(count: int = STREAM_EVENTS) -> bytes:
    """Anthropic's event sequence with ``count`` text deltas, as its API writes it."""

    def event(obj: dict[str, object]) -> bytes:
        return b"event: " + str(obj["type"]).encode() + b"\ndata: " + _dumps(obj) + b"\n\n"

    start = json.loads(message_response())
    start.update(content=[], stop_reason=None, usage={"input_tokens": 12, "output_tokens": 1})
    events = [event({"type": "message_start", "message": start})]
    events.append(
        event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
    )
    events.append(event({"type": "ping"}))
    events += [
        event(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": f" tok{i}"},
            }
        )
        for i in range(count)
    ]
    events.append(event({"type": "content_block_stop", "index": 0}))
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    events.append(
        event({"type": "message_delta", "delta": delta, "usage": {"output_tokens": count}})
    )
    events.append(event({"type": "message_stop"}))
    return b"".join(events)


def write_docroot(root: Path) -> None:
    """Lay the canned responses out as files named by their upstream path (nginx's docroot)."""
    files = {
        "/v1/chat/completions": chat_response(),
        "/stream/v1/chat/completions": stream_response(),
        "/v1/embeddings": embeddings_response(),
        "/anthropic/v1/messages": message_response(),
        "/anthropic-stream/v1/messages": message_stream_response(),
        # What the reference (a bare hop) relays for the translated Messages kinds.
        "/v1/messages": chat_response(),
        "/stream/v1/messages": stream_response(),
    }
    for path, body in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)


def nginx_paced_location(
    path: str = "/paced/v1/chat/completions",
    count: int = STREAM_EVENTS,
    pace_ms: float = PACE_MS,
) -> str:
    """nginx echo-module location sending ``count`` stream events (and `[DONE]`) one by one,
    ``pace_ms`` apart."""

    def quoted(event: bytes) -> str:  # nginx unescapes \\, \' and \n inside quotes
        text = event.decode().replace("\\", "\\\\").replace("'", "\\'")
        return "'" + text.replace("\n", "\\n") + "'"

    pause = f"echo_flush; echo_sleep {pace_ms / 1000};"
    steps = f"\n            {pause}\n".join(
        f"            echo -n {quoted(e)};" for e in stream_events(count)
    )
    return f"location = {path} {{\n            default_type text/event-stream;\n{steps}\n        }}"


def nginx_gapped_location() -> str:
    """The first-event part's stream: GAPPED_EVENTS events (and `[DONE]`) GAP_MS apart."""
    return nginx_paced_location(GAPPED.upstream_path, GAPPED_EVENTS, GAP_MS)
