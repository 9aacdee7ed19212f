"""aioproxy provider ``gemini``: chat completions and embeddings served by Google's Gemini API.

Requests and answers are translated both ways (``translate``: chat, ``schema``: JSON Schema to
Gemini's, ``embeddings``), streams chunk by chunk, and Gemini's errors become OpenAI error
objects (``errors``). The key travels in ``x-goog-api-key``. ``/v1/responses`` and
``/v1/completions`` reach it through the core's chat bridges.
"""

from __future__ import annotations

from aioproxy import RegisterProvider, hookimpl

from .provider import GeminiProvider, GeminiSettings

__all__ = ["GeminiProvider", "GeminiSettings", "register_providers"]


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(GeminiProvider)
