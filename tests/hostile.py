"""What the property tests share: any JSON a client may send, built to reach deep fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

__all__ = ["RESPONSES_FIELDS", "nested"]

# A Responses request's top-level fields that the bridge reads (and a few it refuses).
RESPONSES_FIELDS = [
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "reasoning",
    "max_output_tokens",
    "parallel_tool_calls",
    "stream",
    "background",
    "conversation",
    "prompt",
    "metadata",
    "temperature",
    "top_p",
    "user",
    "store",
    "previous_response_id",
]

Strategy = st.SearchStrategy[Any]


def nested(
    keys: st.SearchStrategy[str], items: int, members: int
) -> Callable[[Strategy], Strategy]:
    """For ``st.recursive``: lists of up to ``items`` and objects of up to ``members`` of
    ``keys``, of the values inside."""

    def lists_and_objects(inner: Strategy) -> Strategy:
        # A named function, not a lambda: hypothesis reads its source to check that it recurses
        # (a lambda's can be misread: HypothesisDeprecationWarning).
        return st.one_of(
            st.lists(inner, max_size=items), st.dictionaries(keys, inner, max_size=members)
        )

    return lists_and_objects
