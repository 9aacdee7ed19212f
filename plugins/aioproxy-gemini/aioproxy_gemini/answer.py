"""Gemini ``GenerateContentResponse`` -> OpenAI chat completions (whole, or chunk by chunk).

What is read of Gemini's answers is typed: an answer of another shape is the upstream's fault (a
502), never a crash of ours. Fields a newer API version may add are skipped.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from aioproxy import (
    ABSENT,
    ChunkMaker,
    assistant_choice,
    chat_completion,
    token_count,
    tool_call,
)

from .translate import tool_call_id

__all__ = [
    "Answer",
    "Candidate",
    "ErrorStatus",
    "StreamTranslator",
    "UsageMetadata",
    "decode_answer",
    "finish_reason",
    "to_chat_completion",
    "to_usage",
]

# Gemini's finishReason -> OpenAI's finish_reason. Every block for content (safety, recitation,
# blocklists, PII, an unsupported language) is a content filter; STOP, or a reason added later,
# a normal stop. A candidate that called functions finished for tool_calls (see finish_reason).
_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}


class _Base(msgspec.Struct, rename="camel"):
    """Gemini's JSON names its fields in camelCase."""


class FunctionCall(_Base):
    name: str = ""
    args: msgspec.Raw = ABSENT


class Part(_Base):
    text: str | None = None
    thought: bool = False  # a thought summary (includeThoughts): not the answer's content
    function_call: FunctionCall | None = None
    thought_signature: str | None = None


class Content(_Base):
    parts: list[Part] = []


class Candidate(_Base):
    content: Content | None = None
    finish_reason: str | None = None
    index: int = 0  # omitted when 0, as proto3 JSON does


class PromptFeedback(_Base):
    block_reason: str | None = None


class UsageMetadata(_Base):
    prompt_token_count: int = 0  # cached tokens included
    candidates_token_count: int = 0  # thoughts not included
    cached_content_token_count: int = 0
    thoughts_token_count: int = 0
    tool_use_prompt_token_count: int = 0


class ErrorStatus(_Base):
    """``{"code", "message", "status", "details"}``: an error answer's, or a stream chunk's."""

    code: int | None = None
    message: str | None = None
    status: str | None = None
    details: list[dict[str, Any]] = []


class Answer(_Base):
    """A whole answer, or one chunk of a stream (the same shape)."""

    candidates: list[Candidate] = []
    prompt_feedback: PromptFeedback | None = None
    usage_metadata: UsageMetadata | None = None
    response_id: str | None = None
    error: ErrorStatus | None = None  # a stream that fails midway says so in a chunk


decode_answer = msgspec.json.Decoder(Answer).decode


def finish_reason(reason: str | None, called: bool) -> str:
    """Gemini's finishReason; ``called``: the candidate called a function."""
    mapped = _FINISH_REASONS.get(reason or "", "stop")
    return "tool_calls" if called and mapped == "stop" else mapped


def to_usage(usage: UsageMetadata | None) -> dict[str, Any]:
    """Gemini's usage in OpenAI terms.

    Gemini counts thoughts apart from the candidates; OpenAI counts reasoning inside the
    completion, so both add up to ``completion_tokens`` and thoughts are its reasoning tokens.
    Cached tokens are part of Gemini's prompt count already, as of OpenAI's; tool-use prompts
    (search results, say) are prompt tokens too.
    """
    usage = usage or UsageMetadata()
    prompt = token_count(usage.prompt_token_count) + token_count(usage.tool_use_prompt_token_count)
    thoughts = token_count(usage.thoughts_token_count)
    completion = token_count(usage.candidates_token_count) + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": token_count(usage.cached_content_token_count)},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def _tool_call(call: FunctionCall, signature: str | None) -> dict[str, Any]:
    return tool_call(tool_call_id(signature), call.name, call.args)


def _completion_id(answer: Answer) -> str:
    return "chatcmpl-" + (answer.response_id or uuid.uuid4().hex)


def _choice(candidate: Candidate) -> dict[str, Any]:
    parts = candidate.content.parts if candidate.content else []
    text = "".join(p.text for p in parts if p.text is not None and not p.thought)
    calls = [_tool_call(p.function_call, p.thought_signature) for p in parts if p.function_call]
    reason = finish_reason(candidate.finish_reason, bool(calls))
    return assistant_choice(candidate.index, text, calls, reason)


def to_chat_completion(answer: Answer, *, model: str, created: int, n: int) -> dict[str, Any]:
    """A Gemini answer as a ``chat.completion``; ``model``: the client's model name; ``n``: the
    choices asked for (a blocked prompt gets that many, each finished by the content filter)."""
    if answer.candidates:
        choices = [_choice(c) for c in sorted(answer.candidates, key=lambda c: c.index)]
    else:  # the prompt itself was blocked (promptFeedback.blockReason): nothing was generated
        blocked = Candidate(finish_reason="SAFETY")
        choices = [_choice(msgspec.structs.replace(blocked, index=i)) for i in range(n)]
    usage = to_usage(answer.usage_metadata)
    return chat_completion(
        _completion_id(answer), model=model, created=created, choices=choices, usage=usage
    )


class _Choice:
    """What a stream keeps per candidate: whether it has begun, its calls, whether it ended."""

    __slots__ = ("calls", "finished", "started")

    def __init__(self) -> None:
        self.started = False
        self.calls = 0
        self.finished = False


class StreamTranslator(ChunkMaker):
    """Turns Gemini stream chunks, one at a time, into ``chat.completion.chunk`` objects.

    Each Gemini chunk is a whole ``GenerateContentResponse`` holding the new part of each
    candidate: text, whole function calls, and at the end its finishReason. Usage metadata comes
    with the chunks, the last one being the total. ``finished``: every candidate asked for ended.
    """

    def __init__(self, *, model: str, created: int, n: int = 1, include_usage: bool = False):
        super().__init__("", model=model, created=created, include_usage=include_usage)
        self.usage: UsageMetadata | None = None
        self._choices = [_Choice() for _ in range(n)]

    @property
    def finished(self) -> bool:
        return all(choice.finished for choice in self._choices)

    def feed(self, answer: Answer) -> list[dict[str, Any]]:
        """The chunks one Gemini chunk gives (none for one with nothing new)."""
        if not self.id:
            self.id = _completion_id(answer)
        if answer.usage_metadata is not None:
            self.usage = answer.usage_metadata
        chunks: list[dict[str, Any]] = []
        if not answer.candidates and answer.prompt_feedback and answer.prompt_feedback.block_reason:
            for index in range(len(self._choices)):  # the prompt was blocked: nothing comes
                chunks += self._candidate(Candidate(finish_reason="SAFETY", index=index))
        for candidate in answer.candidates:
            chunks += self._candidate(candidate)
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``."""
        return self.usage_chunk_of(to_usage(self.usage))

    def _candidate(self, candidate: Candidate) -> list[dict[str, Any]]:
        index = candidate.index
        if not 0 <= index < len(self._choices):
            return []  # a candidate not asked for: nothing a client could place
        choice = self._choices[index]
        if choice.finished:
            return []
        chunks = []
        delta: dict[str, Any] = {}
        if not choice.started:
            choice.started = True
            delta = {"role": "assistant", "content": ""}
        parts = candidate.content.parts if candidate.content else []
        text = "".join(p.text for p in parts if p.text is not None and not p.thought)
        if text:
            delta["content"] = text
        calls = []
        for part in parts:
            if part.function_call is not None:
                call = _tool_call(part.function_call, part.thought_signature)
                calls.append({"index": choice.calls, **call})
                choice.calls += 1
        if calls:
            delta["tool_calls"] = calls
        if delta:
            chunks.append(self.chunk(delta, index=index))
        if candidate.finish_reason is not None:
            choice.finished = True
            reason = finish_reason(candidate.finish_reason, choice.calls > 0)
            chunks.append(self.chunk({}, reason, index))
        return chunks
