"""aioproxy provider ``anthropic``: chat completions served by Anthropic's Messages API.

Requests and answers are translated both ways (``translate``), streams event by event, and
Anthropic's errors become OpenAI error objects (``errors``). Deployment settings:
``anthropic_version`` (header, default 2023-06-01) and ``default_max_tokens`` (when the request
gives none, default 4096). Anthropic's own Messages API (``/v1/messages``, ``count_tokens``) is
passed through; the other endpoint kinds reach it through the core's chat bridges.
"""

from __future__ import annotations

from aioproxy import RegisterProvider, hookimpl

from .provider import AnthropicProvider

__all__ = ["AnthropicProvider", "register_providers"]


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(AnthropicProvider)
