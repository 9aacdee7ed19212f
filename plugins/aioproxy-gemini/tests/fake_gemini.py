"""A fake Gemini API (generativelanguage v1beta) for tests, speaking the wire format of Google's
API reference: ``models/{model}:generateContent``, ``:streamGenerateContent?alt=sse``,
``:embedContent`` and ``:batchEmbedContents``, the key in ``x-goog-api-key``.

Start it with pytest-aiohttp: ``server = await aiohttp_server(fake.app())`` and give the proxy
``api_base = str(server.make_url("/"))``. Every request is recorded (``fake.requests``).

Answers are deterministic. With function declarations (and a mode other than NONE) and no
functionResponse in the last user turn, the model calls the first allowed function with
``TOOL_ARGS``; otherwise it says ``"Hello! You said: <last user text>"`` (after a function
response: ``"The tool said: <its response as JSON>"``), or, with ``responseMimeType:
application/json``, ``{"echo": "<last user text>"}``. A token is a word with the whitespace before
it: ``maxOutputTokens`` and ``stopSequences`` cut the answer as Gemini does. Each of
``candidateCount`` candidates says the same. Streams send one token per SSE event (``data:
{...}\\r\\n\\r\\n``), ``fake.delay`` seconds apart; the last carries the finishReason and usage.

Checks are Gemini's: the key (a wrong one is a 400 with an ``API_KEY_INVALID`` ErrorInfo, as
Gemini answers), no unknown fields at the top or in generationConfig, roles user/model, each part
holding one kind of data, responseSchema and responseJsonSchema not both, a functionResponse
naming a function called in the turn before.

``faults`` (a FIFO, one per request): ``"status:NAME"`` answers that google.rpc status
(RESOURCE_EXHAUSTED with RetryInfo 6.2s); ``"key"``: a refused key; ``"unknown_model"``;
``"text:NNN"``: a plain-text NNN from a proxy in front; ``"cut"``: a stream cut after two events;
``"stream_error"``: a stream whose second chunk is an error; ``"blocked"``: a prompt blocked by
promptFeedback; ``"safety"``: an answer stopped for SAFETY; ``"malformed"``: candidates of the
wrong type; ``"unfinished"``: a stream ending without a finishReason; ``"empty"``: no candidates (and no
promptFeedback to say why).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web

from aioproxy.testing import FakeUpstream

__all__ = ["API_KEY", "CODES", "MODEL_ID", "TOOL_ARGS", "FakeGemini", "split_tokens"]

API_KEY = "AIzaSy-fake-upstream-secret"
MODEL_ID = "gemini-2.5-flash"
TOOL_ARGS = {"city": "Paris", "unit": "celsius"}
CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_MESSAGES = {
    "INVALID_ARGUMENT": "* GenerateContentRequest.contents: contents is not specified",
    "FAILED_PRECONDITION": "User location is not supported for the API use.",
    "PERMISSION_DENIED": "You do not have permission to access the File abc or it may not exist.",
    "NOT_FOUND": "File abc is not found.",
    "RESOURCE_EXHAUSTED": "You exceeded your current quota, please check your plan.",
    "INTERNAL": "An internal error has occurred.",
    "UNAVAILABLE": "The model is overloaded. Please try again later.",
    "DEADLINE_EXCEEDED": "Deadline expired before operation could complete.",
}
_TOP = frozenset(
    {
        "contents",
        "systemInstruction",
        "tools",
        "toolConfig",
        "generationConfig",
        "safetySettings",
        "cachedContent",
    }
)
_GENERATION = frozenset(
    {
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "thinkingConfig",
    }
)
_DATA = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
_TOKEN = re.compile(r"\s*\S+")


class _Refused(Exception):
    """A request Gemini would refuse with 400 INVALID_ARGUMENT."""


def split_tokens(text: str) -> list[str]:
    """Words, each with the whitespace before it: they join back to the text."""
    return _TOKEN.findall(text)


def error_body(code: int, status: str, message: str, details: list[Any] | None = None) -> Any:
    return {"error": {"code": code, "message": message, "status": status, "details": details or []}}


class FakeGemini(FakeUpstream):
    """Fake Gemini upstream; state is shared by every app built from one instance."""

    def __init__(self) -> None:
        super().__init__()
        self.cached_tokens = 0  # cachedContentTokenCount to report
        self.thoughts_tokens = 0  # thoughtsTokenCount to report
        self.signature: str | None = None  # thoughtSignature to put on function calls
        self.gate: asyncio.Event | None = None  # a stream's second event waits for it

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1beta/models/{target}", self._models)]

    async def _models(self, request: web.Request) -> web.StreamResponse:
        record = await self.record(request)
        model, _, method = request.match_info["target"].partition(":")
        fault = record.fault = self.next_fault()
        if request.headers.get("x-goog-api-key") != API_KEY or fault == "key":
            info = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
            message = "API key not valid. Please pass a valid API key."
            return web.json_response(
                error_body(400, "INVALID_ARGUMENT", message, [info]), status=400
            )
        if fault == "unknown_model" or model != MODEL_ID:
            message = f"models/{model} is not found for API version v1beta"
            return web.json_response(error_body(404, "NOT_FOUND", message), status=404)
        if isinstance(fault, str) and fault.startswith("status:"):
            return _status(fault.removeprefix("status:"))
        if isinstance(fault, str) and fault.startswith("text:"):
            return web.Response(status=int(fault[5:]), text="<html>upstream trouble</html>")
        body = record.body
        try:
            if method == "generateContent":
                answer = self._answer(body, fault)
                return web.json_response(answer)
            if method == "streamGenerateContent" and request.query.get("alt") == "sse":
                return await self._stream(request, self._answer(body, fault), fault)
            if method == "embedContent":
                return web.json_response({"embedding": _embedding(body)})
            if method == "batchEmbedContents":
                return web.json_response({"embeddings": _batch(body)})
        except _Refused as exc:
            return web.json_response(error_body(400, "INVALID_ARGUMENT", str(exc)), status=400)
        message = f"Method {method} not found"
        return web.json_response(error_body(404, "NOT_FOUND", message), status=404)

    # -- answers ---------------------------------------------------------------------------

    def _answer(self, body: Any, fault: Any) -> dict[str, Any]:
        _check(body)
        config = body.get("generationConfig", {})
        prompt_tokens = len(split_tokens(_all_text(body)))
        if fault == "blocked":
            usage = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
            feedback = {"blockReason": "SAFETY", "safetyRatings": []}
            return {"promptFeedback": feedback, "usageMetadata": usage, "modelVersion": MODEL_ID}
        parts, reason, tokens = self._parts(body, config)
        if fault == "safety":
            reason = "SAFETY"
        n = config.get("candidateCount", 1)
        candidates = []
        for index in range(n):
            candidate: dict[str, Any] = {
                "content": {"parts": parts, "role": "model"},
                "finishReason": reason,
            }
            if index:  # proto3 JSON leaves a 0 out
                candidate["index"] = index
            candidates.append(candidate)
        if fault == "malformed":
            candidates = 5  # type: ignore[assignment]
        elif fault == "empty":
            candidates = []
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": tokens * n,
            "totalTokenCount": prompt_tokens + tokens * n + self.thoughts_tokens,
        }
        if self.cached_tokens:
            usage["cachedContentTokenCount"] = self.cached_tokens
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        return {
            "candidates": candidates,
            "usageMetadata": usage,
            "modelVersion": MODEL_ID,
            "responseId": "fake-response-1",
        }

    def _parts(self, body: Any, config: Any) -> tuple[list[dict[str, Any]], str, int]:
        """The model's parts, its finishReason and its token count."""
        last = body["contents"][-1]
        responses = [p["functionResponse"] for p in last["parts"] if "functionResponse" in p]
        calling = body.get("toolConfig", {}).get("functionCallingConfig", {})
        mode = calling.get("mode", "AUTO")
        functions = [f for t in body.get("tools", []) for f in t.get("functionDeclarations", [])]
        if functions and mode != "NONE" and not responses and last["role"] == "user":
            allowed = calling.get("allowedFunctionNames")
            name = allowed[0] if allowed else functions[0]["name"]
            part: dict[str, Any] = {"functionCall": {"name": name, "args": TOOL_ARGS}}
            if self.signature:
                part["thoughtSignature"] = self.signature
            return [part], "STOP", len(json.dumps(TOOL_ARGS).split())
        said = " ".join(p["text"] for p in last["parts"] if "text" in p)
        if responses:
            text = "The tool said: " + json.dumps(responses[-1]["response"])
        elif config.get("responseMimeType") == "application/json":
            text = json.dumps({"echo": said})
        else:
            media = [p.get("inlineData", p.get("fileData")) for p in last["parts"]]
            seen = [m["mimeType"] for m in media if m and "mimeType" in m]
            text = "Hello! You said: " + said + (f" (with {', '.join(seen)})" if seen else "")
        reason = "STOP"
        for stop in config.get("stopSequences", []):
            if stop in text:
                text = text[: text.index(stop)]
        tokens = split_tokens(text)
        limit = config.get("maxOutputTokens")
        if limit is not None and len(tokens) > limit:
            tokens, reason = tokens[:limit], "MAX_TOKENS"
        return [{"text": "".join(tokens)}], reason, len(tokens)

    # -- streams ---------------------------------------------------------------------------

    async def _stream(
        self, request: web.Request, answer: dict[str, Any], fault: Any
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i, chunk in enumerate(_chunks(answer)):
                if fault == "cut" and i == 2:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if fault == "stream_error" and i == 1:
                    chunk = error_body(503, "UNAVAILABLE", "The model is overloaded.")
                if fault == "unfinished" and "usageMetadata" in chunk and i:
                    break
                if i == 1 and self.gate is not None:
                    await self.gate.wait()
                if i and self.delay:
                    await asyncio.sleep(self.delay)
                data = json.dumps(chunk, separators=(",", ":"))
                await response.write(f"data: {data}\r\n\r\n".encode())
                if fault == "stream_error" and i == 1:
                    break
            await response.write_eof()
        except ConnectionError:
            pass  # the proxy went away; nobody is left to write to
        return response


def _chunks(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole answer as Gemini streams it: a chunk per token of each candidate's text (calls
    whole), then each candidate's finishReason, the usage on the last chunk."""
    if "candidates" not in answer:
        return [answer]
    chunks: list[dict[str, Any]] = []
    for candidate in answer["candidates"]:
        pieces: list[dict[str, Any]] = []
        for part in candidate["content"]["parts"]:
            if "text" in part:
                pieces += [{"text": token} for token in split_tokens(part["text"])]
            else:
                pieces.append(part)
        for piece in pieces or [{"text": ""}]:
            one = {"content": {"parts": [piece], "role": "model"}}
            if "index" in candidate:
                one["index"] = candidate["index"]
            chunks.append({"candidates": [one], "modelVersion": MODEL_ID})
    chunks += [
        {"candidates": [{**c, "content": {"parts": [{"text": ""}], "role": "model"}}]}
        for c in answer["candidates"]
    ]
    chunks[-1]["usageMetadata"] = answer["usageMetadata"]
    return chunks


def _status(name: str) -> web.Response:
    code = CODES[name]
    details: list[Any] = []
    if name == "RESOURCE_EXHAUSTED":
        details = [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "6.2s"},
        ]
    return web.json_response(error_body(code, name, _MESSAGES[name], details), status=code)


def _embedding(request: Any) -> dict[str, Any]:
    """A vector per text: its length, its words, 0.5 (cut to outputDimensionality)."""
    _check_embed(request)
    text = request["content"]["parts"][0]["text"]
    values = [float(len(text)), float(len(text.split())), 0.5]
    return {"values": values[: request.get("outputDimensionality", 3)]}


def _batch(body: Any) -> list[dict[str, Any]]:
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests or len(requests) > 100:
        raise _Refused("* BatchEmbedContentsRequest.requests: between 1 and 100 requests")
    for request in requests:
        if request.get("model") != f"models/{MODEL_ID}":
            raise _Refused("Model names in requests must match the model in the URL")
    return [_embedding({k: v for k, v in r.items() if k != "model"}) for r in requests]


def _check_embed(request: Any) -> None:
    allowed = {"content", "taskType", "title", "outputDimensionality"}
    for key in sorted(set(request) - allowed):
        raise _Refused(f'Invalid JSON payload received. Unknown name "{key}"')


def _check(body: Any) -> None:
    """Raise _Refused for what Gemini refuses, in its words where known."""
    if not isinstance(body, dict):
        raise _Refused("Invalid JSON payload received.")
    for key in sorted(set(body) - _TOP):
        raise _Refused(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
    for key in sorted(set(body.get("generationConfig", {})) - _GENERATION):
        raise _Refused(f'Invalid JSON payload received. Unknown name "{key}" at generation_config')
    config = body.get("generationConfig", {})
    if "responseSchema" in config and "responseJsonSchema" in config:
        raise _Refused("responseSchema and responseJsonSchema cannot both be set")
    contents = body.get("contents")
    if not contents:
        raise _Refused("* GenerateContentRequest.contents: contents is not specified")
    called: set[str] = set()
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            raise _Refused(f"* GenerateContentRequest.contents[{i}].role: must be user or model")
        parts = content.get("parts")
        if not parts:
            raise _Refused(f"* GenerateContentRequest.contents[{i}].parts: must not be empty")
        for j, part in enumerate(parts):
            kinds = [k for k in _DATA if k in part]
            if len(kinds) != 1:
                raise _Refused(f"* contents[{i}].parts[{j}]: exactly one data field is required")
            response = part.get("functionResponse")
            if response is not None and (
                response.get("name") not in called or not isinstance(response.get("response"), dict)
            ):
                raise _Refused(f"* contents[{i}].parts[{j}].function_response: bad name")
        called = {p["functionCall"]["name"] for p in parts if "functionCall" in p}


def _all_text(body: Any) -> str:
    texts = [p.get("text", "") for p in body.get("systemInstruction", {}).get("parts", [])]
    for content in body["contents"]:
        texts += [p.get("text", "") for p in content["parts"]]
    return " ".join(texts)
