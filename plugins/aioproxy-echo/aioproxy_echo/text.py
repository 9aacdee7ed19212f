"""The echo's tokens and replies: words with their leading whitespace, capped at a token budget."""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

__all__ = ["EMPTY_REPLY", "Echo", "count_words", "echo", "split_tokens"]

# What the echo says when there is nothing to echo, so a reply is never empty.
EMPTY_REPLY = "Nothing to echo."

# A word with the whitespace before it, and on the last word the trailing whitespace too, so the
# tokens join back to the exact text and a stream's deltas add up to the whole answer.
_TOKEN = re.compile(r"\s*\S+(?:\s+\Z)?")

FinishReason = Literal["stop", "length"]


def split_tokens(text: str) -> list[str]:
    """``"hello world"`` -> ``["hello", " world"]``; whitespace-only text has no tokens."""
    return _TOKEN.findall(text)


def count_words(text: str) -> int:
    """How many tokens ``text`` is (the same count as ``split_tokens``, without building them)."""
    return len(text.split())


class Echo(NamedTuple):
    """One generated answer: its tokens and why it stopped."""

    tokens: list[str]
    finish_reason: FinishReason

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def capped(self) -> bool:
        return self.finish_reason == "length"


def echo(text: str, cap: int | None = None) -> Echo:
    """The reply to ``text``: the text itself (or EMPTY_REPLY), at most ``cap`` tokens long."""
    tokens = split_tokens(text) or split_tokens(EMPTY_REPLY)
    if cap is not None and len(tokens) > cap:
        return Echo(tokens[:cap], "length")
    return Echo(tokens, "stop")
