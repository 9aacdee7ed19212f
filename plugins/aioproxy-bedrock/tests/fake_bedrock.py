"""A fake Bedrock runtime for tests, speaking the wire format of AWS's API reference.

Start it with pytest-aiohttp: ``server = await aiohttp_server(fake.app())`` and give the proxy
``api_base = str(server.make_url(""))``. Every request is recorded (headers, JSON body).

Routes: ``POST /model/{modelId}/converse``, ``/converse-stream`` and ``/invoke`` (Titan and
Cohere embedding bodies). Every request must carry a SigV4 signature that botocore, given the
fake's own copy of the credentials, computes the same (service ``bedrock``, the fake's region),
or a Bedrock API key as a bearer token; anything else is AWS's 403.

Answers are deterministic. With tools (and no tool result in the last user turn) the model calls
the first tool with ``TOOL_INPUT``; otherwise it says ``"Hello! You said: <last user text>"``
(``"The tool said: <result>"`` after a tool result), and adds ``" I see N image(s)."`` and
``" I read N document(s)."`` for the blocks of the last user turn. A token is a word with the
whitespace before it; ``maxTokens`` and ``stopSequences`` cut the answer as Bedrock would.
Streams are ``application/vnd.amazon.eventstream`` messages, framed by :func:`frame` (prelude,
headers, payload, CRCs), one message per write.

``faults`` (a FIFO, one per request): ``("status", NNN, "ThrottlingException")`` answers that
status with AWS's error body and ``x-amzn-ErrorType``; ``("exception", "throttlingException")``
sends a stream exception message after the first delta; ``("exception_first", ...)`` as the
first message; ``"cut"`` hangs up mid-stream; ``"no_metadata"`` ends after messageStop; ``("bad_crc", i)`` spoils message i's checksum.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import re
import struct
import zlib
from typing import Any

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from aioproxy.testing import FakeUpstream

__all__ = ["TOOL_INPUT", "FakeBedrock", "frame", "split_tokens"]

TOOL_INPUT = {"city": "Paris", "unit": "celsius"}
EVENT_STREAM = "application/vnd.amazon.eventstream"
_TOKEN = re.compile(r"\s*\S+")
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[^,]+), Signature=(?P<sig>[0-9a-f]{64})$"
)
# Converse's top-level fields: anything else is refused, as Bedrock does.
_FIELDS = frozenset(
    {
        "messages",
        "system",
        "inferenceConfig",
        "toolConfig",
        "guardrailConfig",
        "additionalModelRequestFields",
        "additionalModelResponseFieldPaths",
        "performanceConfig",
        "promptVariables",
        "requestMetadata",
    }
)
_INFERENCE = frozenset({"maxTokens", "temperature", "topP", "stopSequences"})
_BLOCKS = frozenset({"text", "image", "document", "toolUse", "toolResult"})


def split_tokens(text: str) -> list[str]:
    """Words, each with the whitespace before it: they join back to the text."""
    return _TOKEN.findall(text)


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: a prelude (total and headers length, its CRC32), the headers
    (name length, name, type 7 = string, value length, value), the payload, the message CRC32."""
    encoded = b"".join(
        bytes([len(name)])
        + name.encode()
        + b"\x07"
        + struct.pack(">H", len(value))
        + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(kind: str, body: dict[str, Any]) -> bytes:
    """A ConverseStream event message, padded with ``p`` as Bedrock pads its events."""
    payload = web.json_response({**body, "p": "abcdefgh"}).body
    assert isinstance(payload, bytes)
    headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
    return frame(headers, payload)


def exception(kind: str, message: str) -> bytes:
    payload = web.json_response({"message": message}).body
    assert isinstance(payload, bytes)
    headers = {
        ":exception-type": kind,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return frame(headers, payload)


class _Refused(Exception):
    """A request Bedrock would refuse with 400 ValidationException."""


class FakeBedrock(FakeUpstream):
    """Fake Bedrock runtime; state is shared by every app built from one instance."""

    def __init__(
        self,
        region: str = "us-east-1",
        credentials: dict[str, tuple[str, str | None]] | None = None,
        api_keys: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.region = region
        self.credentials = credentials or {}  # key id -> (secret, session token)
        self.api_keys = api_keys
        self.stream_delay = 0.0  # seconds between stream messages
        self.signed_with: list[str] = []  # the key id (or "bearer") of each authorized request
        self.raw_paths: list[str] = []  # each request's path as sent (percent-encoded)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/model/{model_id}/converse", self._converse),
            web.post("/model/{model_id}/converse-stream", self._converse),
            web.post("/model/{model_id}/invoke", self._invoke),
            web.route("*", "/{tail:.*}", self._unknown),
        ]

    # -- authorization -----------------------------------------------------------------------

    def _refusal(self, request: web.Request, raw: bytes) -> web.Response | None:
        """AWS's 403 unless the request is signed with known credentials, or has an API key."""
        self.raw_paths.append(request.rel_url.raw_path)
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            if authorization[7:] in self.api_keys:
                self.signed_with.append("bearer")
                return None
            return _error(403, "UnrecognizedClientException", "The security token is invalid.")
        match = _AUTH.match(authorization)
        if match is None:
            return _error(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        known = self.credentials.get(match["key"])
        if known is None:
            return _error(403, "UnrecognizedClientException", "The security token is invalid.")
        secret, token = known
        if token is not None and request.headers.get("X-Amz-Security-Token") != token:
            return _error(403, "UnrecognizedClientException", "The security token is invalid.")
        if match["region"] != self.region or match["service"] != "bedrock":
            return _error(403, "InvalidSignatureException", "Credential should be scoped right.")
        amz_date = request.headers.get("X-Amz-Date", "")
        if not amz_date.startswith(match["date"]):
            return _error(403, "InvalidSignatureException", "Date mismatch.")
        # Recompute the signature with botocore from what arrived: the path as sent, the signed
        # headers' values as received, the body's bytes.
        names = match["signed"].split(";")
        if "host" not in names:
            return _error(403, "InvalidSignatureException", "host must be signed")
        headers = {name: request.headers.get(name, "") for name in names}
        url = f"http://{request.host}{request.rel_url.raw_path}"
        aws_request = AWSRequest(method=request.method, url=url, data=raw, headers=headers)
        aws_request.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(match["key"], secret, token), "bedrock", self.region)
        canonical = signer.canonical_request(aws_request)
        expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
        if not hmac.compare_digest(expected, match["sig"]):
            return _error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )
        self.signed_with.append(match["key"])
        return None

    # -- routes ------------------------------------------------------------------------------

    async def _admit(self, request: web.Request) -> tuple[Any, Any, web.Response | None]:
        """Record the request: its JSON body, its fault, and the answer refusing it if any (an
        unauthorized request, or a status fault)."""
        record = await self.record(request)
        refusal = self._refusal(request, record.raw)
        fault = None if refusal is not None else self.next_fault()
        if isinstance(fault, tuple) and fault[0] == "status":
            refusal = _error(fault[1], fault[2], f"injected {fault[2]}")
        return record.body, fault, refusal

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        body, fault, refusal = await self._admit(request)
        if refusal is not None:
            return refusal
        try:
            _check(body)
        except _Refused as exc:
            return _error(400, "ValidationException", str(exc))
        content, stop_reason = _answer(body)
        usage = {"inputTokens": 7, "outputTokens": _output_tokens(content), "totalTokens": 0}
        usage["totalTokens"] = usage["inputTokens"] + usage["outputTokens"]
        if request.path.endswith("/converse-stream"):
            return await self._stream(request, content, stop_reason, usage, fault)
        answer = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop_reason,
            "usage": usage,
            "metrics": {"latencyMs": 12},
        }
        return web.json_response(answer, headers={"x-amzn-RequestId": "req-fake-1"})

    async def _stream(
        self,
        request: web.Request,
        content: list[dict[str, Any]],
        stop_reason: str,
        usage: dict[str, int],
        fault: Any,
    ) -> web.StreamResponse:
        messages = [event("messageStart", {"role": "assistant"})]
        for index, block in enumerate(content):
            if "toolUse" in block:
                tool = block["toolUse"]
                start = {"toolUse": {"toolUseId": tool["toolUseId"], "name": tool["name"]}}
                messages.append(
                    event("contentBlockStart", {"start": start, "contentBlockIndex": index})
                )
                arguments = web.json_response(tool["input"]).text or ""
                for piece in (arguments[:5], arguments[5:]):
                    delta = {"delta": {"toolUse": {"input": piece}}, "contentBlockIndex": index}
                    messages.append(event("contentBlockDelta", delta))
            else:
                for token in split_tokens(block["text"]):
                    delta = {"delta": {"text": token}, "contentBlockIndex": index}
                    messages.append(event("contentBlockDelta", delta))
            messages.append(event("contentBlockStop", {"contentBlockIndex": index}))
        messages.append(event("messageStop", {"stopReason": stop_reason}))
        messages.append(event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
        if isinstance(fault, tuple) and fault[0] == "exception":
            messages[2:] = [exception(fault[1], f"injected {fault[1]}")]
        elif isinstance(fault, tuple) and fault[0] == "exception_first":
            messages = [exception(fault[1], f"injected {fault[1]}")]
        elif fault == "no_metadata":  # the answer ends after messageStop
            messages.pop()
        elif isinstance(fault, tuple) and fault[0] == "bad_crc":  # ("bad_crc", message index)
            spoiled = messages[fault[1]]
            messages[fault[1]] = spoiled[:-1] + bytes([spoiled[-1] ^ 0xFF])
        response = web.StreamResponse(
            headers={"Content-Type": EVENT_STREAM, "x-amzn-RequestId": "req-fake-2"}
        )
        await response.prepare(request)
        try:
            for i, message in enumerate(messages):
                if fault == "cut" and i == 3:
                    assert request.transport is not None
                    request.transport.close()  # hang up mid-answer
                    return response
                await response.write(message)
                if self.stream_delay:
                    await asyncio.sleep(self.stream_delay)
            await response.write_eof()
        except ConnectionResetError:  # the proxy went away: so do we
            pass
        return response

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        body, _, refusal = await self._admit(request)
        if refusal is not None:
            return refusal
        model_id = request.match_info["model_id"]
        if "titan-embed" in model_id:
            text = body["inputText"]
            vector = _vector(text, body.get("dimensions"))
            return web.json_response(
                {"embedding": vector, "inputTextTokenCount": len(text.split())}
            )
        if "cohere.embed" in model_id:
            if body.get("input_type") is None or body.get("embedding_types") != ["float"]:
                return _error(400, "ValidationException", "input_type is required")
            vectors = [_vector(text, None) for text in body["texts"]]
            tokens = sum(len(text.split()) for text in body["texts"])
            return web.json_response(
                {
                    "id": "e-1",
                    "embeddings": {"float": vectors},
                    "response_type": "embeddings_by_type",
                },
                headers={"X-Amzn-Bedrock-Input-Token-Count": str(tokens)},
            )
        return _error(400, "ValidationException", f"{model_id} is not an embedding model")

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        return _error(404, "UnknownOperationException", "Unknown operation")


def _error(status: int, kind: str, message: str) -> web.Response:
    """AWS's error answer: the type in ``x-amzn-ErrorType``, ``{"message"}`` as the body."""
    headers = {
        "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
        "x-amzn-RequestId": "req-fake-error",
    }
    if status == 429:
        headers["Retry-After"] = "7"
    return web.json_response({"message": message}, status=status, headers=headers)


def _vector(text: str, dimensions: int | None) -> list[float]:
    vector = [float(len(text)), float(len(text.split())), 0.5]
    return vector[:dimensions] if dimensions else vector


def _output_tokens(content: list[dict[str, Any]]) -> int:
    return sum(len(split_tokens(block.get("text", ""))) for block in content) or 1


def _check(body: Any) -> None:
    """Converse's request checks, as far as the tests need them."""
    if not isinstance(body, dict):
        raise _Refused("The request body must be a JSON object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise _Refused(f"extraneous key [{min(unknown)}] is not permitted")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Refused("messages: at least one message is required")
    if messages[0].get("role") != "user":
        raise _Refused("A conversation must start with a user message.")
    for i, message in enumerate(messages):
        if i and message["role"] == messages[i - 1]["role"]:
            raise _Refused("A conversation must alternate between user and assistant roles.")
        if not message.get("content"):
            raise _Refused(f"messages.{i}.content: must not be empty")
        for block in message["content"]:
            _check_block(block, body)
    for block in body.get("system", []):
        if set(block) != {"text"}:
            raise _Refused("system blocks hold text")
    unknown = set(body.get("inferenceConfig", {})) - _INFERENCE
    if unknown:
        raise _Refused(f"extraneous key [{min(unknown)}] in inferenceConfig")


def _check_block(block: dict[str, Any], body: dict[str, Any]) -> None:
    if len(block) != 1 or next(iter(block)) not in _BLOCKS:
        raise _Refused(f"invalid content block {sorted(block)}")
    for kind in ("image", "document"):
        if kind in block:
            source = block[kind]["source"]
            if "bytes" in source:
                try:
                    binascii.a2b_base64(source["bytes"], strict_mode=True)
                except binascii.Error:
                    raise _Refused(f"{kind} bytes must be base64") from None
    if ("toolUse" in block or "toolResult" in block) and "toolConfig" not in body:
        raise _Refused("The toolConfig field must be defined when using toolUse and toolResult")
    if "toolUse" in block and not isinstance(block["toolUse"]["input"], dict):
        raise _Refused("toolUse input must be an object")


def _answer(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The content blocks and stopReason this request gets."""
    last = body["messages"][-1]["content"]
    results = [b["toolResult"] for b in last if "toolResult" in b]
    tools = body.get("toolConfig", {}).get("tools", [])
    if tools and not results:
        name = tools[0]["toolSpec"]["name"]
        choice = body["toolConfig"].get("toolChoice", {})
        if "tool" in choice:
            name = choice["tool"]["name"]
        call = {"toolUse": {"toolUseId": "tooluse_fake1", "name": name, "input": TOOL_INPUT}}
        return [{"text": "Let me check that."}, call], "tool_use"
    if results:
        said = " ".join(c.get("text", "") for r in results for c in r["content"])
        text = f"The tool said: {said}"
    else:
        said = " ".join(b["text"] for b in last if "text" in b)
        text = f"Hello! You said: {said}"
    images = [b for b in last if "image" in b]
    documents = [b for b in last if "document" in b]
    if images:
        text += f" I see {len(images)} image(s)."
    if documents:
        text += f" I read {len(documents)} document(s)."
    inference = body.get("inferenceConfig", {})
    tokens = split_tokens(text)
    stop_reason = "end_turn"
    for stop in inference.get("stopSequences", []):
        joined = "".join(tokens)
        if stop in joined:
            tokens = split_tokens(joined[: joined.index(stop)])
            stop_reason = "stop_sequence"
    if "maxTokens" in inference and len(tokens) > inference["maxTokens"]:
        tokens = tokens[: inference["maxTokens"]]
        stop_reason = "max_tokens"
    return [{"text": "".join(tokens)}], stop_reason
