"""Masking a deployment's secrets in upstream text: every form in which an upstream may echo them.

An upstream that repeats what it was sent (an error quoting the Authorization header, a debug
dump of the request) can carry a key back to a client or a log, as sent or encoded. The forms of
each secret are worked out once per deployment and kept as one compiled pattern.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

import msgspec
from aiohttp import web

from .config import Secret
from .keys import secrets_key

if TYPE_CHECKING:  # context imports request_ids, which imports this module
    from .context import Deployment

__all__ = [
    "Mask",
    "app_secrets",
    "is_keylike",
    "mark_secrets",
    "mask_client_text",
    "mask_keylike",
    "mask_of",
    "secrets_in",
]

MASKED = "***"
_MIN_SECRET = 3  # shorter values (a header's "1") are no secret, and masking them garbles text
_MIN_B64_CORE = 4  # base64 pieces shorter than this match too much ordinary text

# Anything that looks like a key, whoever's: upstreams echo keys of their own too. A JWT (an
# Entra ID or Google token, a plugin's token command's: held nowhere in the config) is one.
_KEYLIKE = (
    r"\b(?:sk|key|api[-_]?key)[-_][A-Za-z0-9*_\-.]{6,}"
    r"|\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"
)
_KEYLIKE_TEXT = re.compile(_KEYLIKE, re.IGNORECASE)
_KEYLIKE_BYTES = re.compile(_KEYLIKE.encode(), re.IGNORECASE)


def is_keylike(text: str) -> bool:
    """Whether ``text`` holds anything that looks like a key."""
    return _KEYLIKE_TEXT.search(text) is not None


def mask_keylike(text: str) -> str:
    """``text`` with anything key-like masked: what a client sent (a path) told back or logged."""
    return _KEYLIKE_TEXT.sub(MASKED, text)


def mask_client_text(request: web.BaseRequest, text: str) -> str:
    """What a client sent (a path, a model name no deployment has), as logged or traced: the
    config's own keys masked (a master key need not look like a key), then anything key-like.
    The access log and the spans mask it alike."""
    if (secrets := app_secrets(request)) is not None:
        text = secrets.sub(MASKED, text)
    return _KEYLIKE_TEXT.sub(MASKED, text)


def app_secrets(request: web.BaseRequest) -> re.Pattern[str] | None:
    """The app's config keys as one pattern (``secrets_pattern``), if ``request`` has an app
    (not one run.py's server answered unparsed) and the config holds any."""
    if not isinstance(request, web.Request):
        return None
    secrets = request.app.get(secrets_key)
    return secrets if isinstance(secrets, re.Pattern) else None


def _base64_forms(secret: bytes) -> set[bytes]:
    """The base64 of ``secret`` wherever it stands in a larger encoded value (a Basic
    credential, a dumped header): for each of its three alignments, the characters that depend
    on its bytes alone, in the standard and URL-safe alphabets."""
    forms = {base64.b64encode(secret)}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret)
        first = (offset * 8 + 5) // 6  # characters that hold bits of the bytes before it
        last = (offset + len(secret)) * 8 // 6  # characters wholly made of its bits
        core = encoded[first:last]
        if len(core) >= _MIN_B64_CORE:
            forms.add(core)
    return forms | {form.translate(bytes.maketrans(b"+/", b"-_")) for form in forms}


def _forms(secret: str) -> set[str]:
    """``secret`` as sent, URL-encoded, JSON-escaped and base64-encoded."""
    if len(secret) < _MIN_SECRET:
        return set()
    escaped = json.dumps(secret)[1:-1]
    url = quote(secret, safe="")
    forms = {secret, url, url.lower(), quote_plus(secret), escaped, escaped.replace("/", "\\/")}
    forms |= {form.decode("ascii") for form in _base64_forms(secret.encode())}
    return forms


def secrets_in(value: object) -> Iterator[Secret]:
    """Every ``Secret`` in ``value`` (a settings table, or settings decoded into a Struct), at
    any depth."""
    if isinstance(value, Secret):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from secrets_in(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from secrets_in(item)
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield from secrets_in(getattr(value, name))


def mark_secrets(table: Any, secrets: frozenset[str]) -> None:
    """Make each string of ``table`` (a settings table: dicts and lists, changed in place) that
    is one of ``secrets`` a ``Secret``: equal, but masked wherever the deployment's text goes."""
    items = table.items() if isinstance(table, dict) else enumerate(table)
    for key, value in list(items):
        if isinstance(value, str) and value in secrets and not isinstance(value, Secret):
            table[key] = Secret(value)
        elif isinstance(value, (dict, list)):
            mark_secrets(value, secrets)


def _secrets(
    api_key: str | None,
    api_base: str | None,
    header_values: Iterable[str],
    setting_values: Iterable[str] = (),
) -> list[str]:
    """What a deployment holds that must not be seen: its key, header values, secret settings,
    URL credentials (sent as ``Basic base64(user:password)``)."""
    secrets = [api_key or "", *header_values, *setting_values]
    if api_base and "@" in api_base:
        parts = urlsplit(api_base)
        if parts.username is not None:
            user, password = parts.username, parts.password or ""
            secrets += [user, password, unquote(user), unquote(password)]
            secrets.append(f"{unquote(user)}:{unquote(password)}")  # what Basic encodes
    return [secret for secret in secrets if secret]


class Mask:
    """One deployment's secrets, in all their forms, as a pattern for text and one for bytes."""

    __slots__ = ("_bytes", "_text")

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            forms |= _forms(secret)
        ordered = sorted(forms, key=len, reverse=True)  # the longest form first: masked whole
        self._text = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._bytes = (
            re.compile(b"|".join(re.escape(form.encode()) for form in ordered)) if ordered else None
        )

    def text(self, text: str) -> str:
        """``text`` with every form of every secret, and anything key-like, masked."""
        if self._text is not None:
            text = self._text.sub(MASKED, text)
        return mask_keylike(text)

    def bytes(self, data: bytes) -> bytes:
        """The same for raw bytes (a relayed event): what is masked stays valid JSON."""
        if self._bytes is not None:
            data = self._bytes.sub(b"***", data)
        return _KEYLIKE_BYTES.sub(b"***", data)


@lru_cache(maxsize=1024)
def _mask(
    api_key: str | None,
    api_base: str | None,
    header_values: tuple[str, ...],
    setting_values: tuple[str, ...],
) -> Mask:
    return Mask(_secrets(api_key, api_base, header_values, setting_values))


def mask_of(deployment: Deployment) -> Mask:
    """The deployment's mask, built on first use and kept (by what the deployment holds, so
    deployments made per request by a plugin share one). Its settings' secrets are the values
    its provider's ``settings_type`` declares ``Secret`` (marked at start-up: mark_secrets)."""
    settings = deployment.settings
    setting_values = tuple(secrets_in(settings)) if settings else ()
    return _mask(
        deployment.api_key, deployment.api_base, tuple(deployment.headers.values()), setting_values
    )
