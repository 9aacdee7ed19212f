"""aioproxy provider ``bedrock``: chat completions and embeddings served by AWS Bedrock.

Chat completions go to the Converse API (``converse``, ``converse-stream``, whose binary event
stream is decoded as it arrives), embeddings to InvokeModel (Titan and Cohere models). Requests
are signed with SigV4 by botocore (or carry a Bedrock API key); see ``provider.BedrockSettings``.
The other endpoint kinds reach it through the core's chat bridges. Importing this module loads
no botocore: only a provider that starts does.
"""

from __future__ import annotations

from aioproxy import RegisterProvider, hookimpl

from .provider import BedrockProvider, BedrockSettings

__all__ = ["BedrockProvider", "BedrockSettings", "register_providers"]


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(BedrockProvider)
