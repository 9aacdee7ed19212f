"""aioproxy provider ``echo``: answers every endpoint kind by echoing the input, offline.

Deterministic answers for tests, demos and load runs:

* Chat echoes the last user message, completions each prompt. Nothing to echo gives "Nothing to
  echo.". Responses go through aioproxy's Responses bridge onto chat, like any chat-only
  provider's: stored, so ``previous_response_id`` and ``GET /v1/responses/{id}`` work.
* A token is a whitespace-separated word with the whitespace before it, so streamed deltas join
  back to the exact text. ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` cap
  the answer in words (finish_reason ``length``, or status ``incomplete``).
* Usage counts words: the prompt's (every message) and the answer's.
* Embeddings are unit vectors hashed from each input.
* Deployment settings: ``delay`` (seconds per generated token, default 0) and ``dimensions``
  (embedding size when the request gives none, default 16).
"""

from __future__ import annotations

from aioproxy import RegisterProvider, hookimpl

from .provider import EchoProvider

__all__ = ["EchoProvider", "register_providers"]


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(EchoProvider)
