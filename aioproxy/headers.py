"""Which client headers may travel to an upstream (``[upstream] forward_headers``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

__all__ = ["forwarded_names", "never_forwarded"]

log = logging.getLogger("aioproxy")

# The client's credentials: forwarded, they would reach the upstream or replace the deployment's.
_CREDENTIALS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"}
)
# Parts of a name that mark a credential whatever its spelling (x-auth-token, x-goog-api-key...).
_CREDENTIAL_MARKS = (
    "auth",
    "token",
    "secret",
    "password",
    "credential",
    "cookie",
    "api-key",
    "apikey",
    "access-key",
    "subscription-key",
    "session",
)
# Hop-by-hop headers (RFC 9110 7.6.1) and those framing the body, which the proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "expect",
    }
)


def never_forwarded(name: str) -> str | None:
    """Why the header ``name`` must never be forwarded (a phrase), or None when it may be."""
    lowered = name.strip().lower()
    if lowered in _CREDENTIALS or any(mark in lowered for mark in _CREDENTIAL_MARKS):
        return "a credential"
    if lowered in _HOP_BY_HOP or lowered.startswith("proxy-"):
        return "a hop-by-hop or body-framing header"
    return None


def forwarded_names(names: Iterable[str]) -> tuple[str, ...]:
    """The configured names once each, lower-cased (header names ignore case), bar those never
    forwarded; resolved at start-up so that each request only looks them up.

    A loaded config has had them refused already; a Config built in Python has not.
    """
    kept: dict[str, None] = {}
    for name in names:
        lowered = name.strip().lower()
        if reason := never_forwarded(lowered):
            log.warning("forward_headers: '%s' is %s, never forwarded; dropped", name, reason)
        else:
            kept[lowered] = None
    return tuple(kept)
