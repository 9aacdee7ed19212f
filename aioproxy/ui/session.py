"""Sign-in sessions and CSRF tokens of the dashboard.

A session is a signed, timestamped cookie (itsdangerous) naming who signed in: ``master`` or a
database key's id, never a secret. Every page re-checks that holder (an admin key disabled,
revoked or expired since ends its sessions at once). The CSRF token is an HMAC of the session's
random nonce: a page carries it, a state-changing call sends it back in ``X-CSRF-Token``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

from ..builtins.config_auth import key_id
from ..config import Config
from ..context import ANONYMOUS, Principal
from ..control.plane import ControlPlane, plane_key
from ..control.records import digest_of
from ..errors import PermissionDenied
from .paths import ROOT, base_of

__all__ = ["COOKIE", "CSRF_HEADER", "Session", "Sessions", "sessions_key"]

COOKIE = "aioproxy_ui"
PRE_COOKIE = "aioproxy_ui_signin"  # the sign-in form's nonce, before there is a session
CSRF_HEADER = "X-CSRF-Token"
MASTER = "master"
_SIGNIN_TTL = 3600  # seconds a sign-in form stays usable


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in operator: ``holder`` is ``master`` or a key id; ``csrf`` its page token."""

    holder: str
    name: str
    csrf: str
    principal: Principal


class Sessions:
    """Issues and checks one app's session cookies; ``now`` is the clock they expire by."""

    def __init__(
        self, config: Config, now: Callable[[], float] = time.time, *, open_mode: bool = False
    ) -> None:
        self.config = config
        self.now = now
        # The gateway needs no key at all (its API is open, to loopback names only): the
        # dashboard then lets anyone in without one, as the API does.
        self.open_mode = open_mode
        self.ttl = int(config.ui.session_ttl)
        secret = config.ui.session_secret
        master = config.auth.master_key
        if secret:
            key = secret.encode()
        elif master:  # every worker and restart derives the same key; a new master key ends all
            key = hmac.new(master.encode(), b"aioproxy-ui-session", hashlib.sha256).digest()
        else:
            key = secrets.token_bytes(32)
        self._key = key
        sessions = self

        class ClockSigner(TimestampSigner):
            def get_timestamp(self) -> int:  # itsdangerous reads time.time() itself
                return int(sessions.now())

        self._signer = URLSafeTimedSerializer(key, salt="aioproxy-ui-session", signer=ClockSigner)

    def csrf_of(self, nonce: str) -> str:
        return hmac.new(self._key, b"csrf:" + nonce.encode(), hashlib.sha256).hexdigest()

    # -- signing in ---------------------------------------------------------------------------

    def signin_token(self, request: web.Request) -> tuple[str, str]:
        """A nonce for the sign-in form's cookie, and the CSRF token the form carries."""
        nonce = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(16)
        return nonce, self.csrf_of("signin:" + nonce)

    def remember_signin(
        self, response: web.StreamResponse, request: web.Request, nonce: str
    ) -> None:
        self._set_cookie(response, request, PRE_COOKIE, nonce, _SIGNIN_TTL)

    def check_signin_token(self, request: web.Request, token: str) -> None:
        nonce = request.cookies.get(PRE_COOKIE)
        if not nonce or not hmac.compare_digest(token, self.csrf_of("signin:" + nonce)):
            raise PermissionDenied("The form's CSRF token is missing or wrong", code="csrf_failed")

    def holder_of(self, secret: str, plane: ControlPlane | None) -> tuple[str, str] | None:
        """Who ``secret`` signs in as (holder, name): the master key or an admin key; else None."""
        master = self.config.auth.master_key
        if master and hmac.compare_digest(secret.encode(), master.encode()):
            return MASTER, "master"
        if self.open_mode and not secret:
            return ANONYMOUS.id, ANONYMOUS.name
        if plane is not None:
            principal = plane.cache.principals.get(digest_of(secret))
            if principal is not None and _usable_admin(plane, principal.id):
                return principal.id, principal.name
        return None

    def start(self, response: web.StreamResponse, request: web.Request, holder: str) -> None:
        value = self._signer.dumps({"h": holder, "n": secrets.token_urlsafe(16)})
        self._set_cookie(response, request, COOKIE, value, self.ttl)
        response.del_cookie(PRE_COOKIE, path=_cookie_path(request))

    def end(self, response: web.StreamResponse, request: web.Request) -> None:
        response.del_cookie(COOKIE, path=_cookie_path(request))

    # -- checking -----------------------------------------------------------------------------

    def read(self, request: web.Request) -> Session | None:
        """The request's session, if its cookie is genuine, unexpired and its holder still
        may sign in; else None."""
        value = request.cookies.get(COOKIE)
        if not value:
            return None
        try:
            data = self._signer.loads(value, max_age=self.ttl)
        except BadSignature:  # also SignatureExpired
            return None
        if not isinstance(data, dict):
            return None
        holder, nonce = data.get("h"), data.get("n")
        if not isinstance(holder, str) or not isinstance(nonce, str):
            return None
        principal = self._principal(request, holder)
        if principal is None:
            return None
        return Session(holder, principal.name, self.csrf_of(nonce), principal)

    def _principal(self, request: web.Request, holder: str) -> Principal | None:
        master = self.config.auth.master_key
        if holder == MASTER:
            return Principal("master", is_master=True, id=key_id(master)) if master else None
        if holder == ANONYMOUS.id:
            return ANONYMOUS if self.open_mode else None
        plane = request.app.get(plane_key)
        if plane is None or not _usable_admin(plane, holder):
            return None
        return next((p for p in plane.cache.principals.values() if p.id == holder), None)

    @staticmethod
    def check_csrf(request: web.Request, session: Session) -> None:
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token, session.csrf):
            raise PermissionDenied(
                f"The {CSRF_HEADER} header is missing or wrong", code="csrf_failed"
            )

    def _set_cookie(
        self, response: web.StreamResponse, request: web.Request, name: str, value: str, ttl: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=ttl,
            path=_cookie_path(request),
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )


def _usable_admin(plane: ControlPlane, id_: str) -> bool:
    entry = plane.cache.keys.get(id_)
    if entry is None or entry.role != "admin" or entry.disabled:
        return False
    return entry.expires_at is None or plane.clock.time() < entry.expires_at


def _cookie_path(request: web.Request) -> str:
    return base_of(request) + ROOT


sessions_key = web.AppKey("aioproxy.ui.sessions", Sessions)
