"""Microsoft Entra ID tokens from a command (``az account get-access-token``, a script): read at
start-up, refreshed in the background before they expire, so that no request waits for one
while the current token is still good."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec

__all__ = ["Clock", "RunCommand", "TokenError", "TokenSource", "parse_token", "run_command"]

log = logging.getLogger("aioproxy.azure")

Clock = Callable[[], float]  # seconds since the epoch: token expiries are wall-clock times
RunCommand = Callable[[Sequence[str], float], Awaitable[bytes]]  # (command, timeout) -> stdout

COMMAND_TIMEOUT = 60.0  # seconds a token command may take (az can be slow to start)
RETRY_INTERVAL = 30.0  # seconds between background refreshes while the command fails
_MAX_ERROR_TEXT = 300


class TokenError(Exception):
    """The token command failed or printed no token; the message names no token."""


async def run_command(command: Sequence[str], timeout: float) -> bytes:
    """Run ``command`` (no shell) and return what it printed; TokenError if it fails."""
    name = command[0]
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise TokenError(f"token command '{name}' could not start: {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise TokenError(f"token command '{name}' did not finish in {timeout:g} s") from None
    if process.returncode != 0:
        said = err.decode("utf-8", "replace").strip()[:_MAX_ERROR_TEXT]
        raise TokenError(f"token command '{name}' failed (exit {process.returncode}): {said}")
    return out


class _Printed(msgspec.Struct):
    """What token commands print as JSON: az CLI's ``accessToken`` and ``expires_on`` (epoch
    seconds), or OAuth's ``access_token`` and ``expires_in``."""

    access_token_az: str | None = msgspec.field(name="accessToken", default=None)
    access_token: str | None = None
    expires_on: int | float | str | None = None
    expires_in: int | float | str | None = None


_decode_printed = msgspec.json.Decoder(_Printed).decode


def parse_token(output: bytes, now: float, lifetime: float) -> tuple[str, float]:
    """A command's output as ``(token, expires_at)``: JSON as az prints it, or the bare token
    (then valid for ``lifetime`` seconds from ``now``)."""
    text = output.strip()
    expires_at = now + lifetime
    if text.startswith(b"{"):
        try:
            printed = _decode_printed(text)
            token = printed.access_token_az or printed.access_token or ""
            if printed.expires_on is not None:
                expires_at = float(printed.expires_on)
            elif printed.expires_in is not None:
                expires_at = now + float(printed.expires_in)
        except (msgspec.DecodeError, ValueError):
            raise TokenError("the token command printed JSON without a token") from None
    else:
        token = text.decode("utf-8", "replace")
    if not token or any(c.isspace() for c in token):
        raise TokenError("the token command printed no token")
    return token, expires_at


class TokenSource:
    """One token command's token, refreshed ``margin`` seconds before it expires.

    Args:
        command: the command and its arguments (no shell).
        margin: how long before expiry the refresh starts.
        lifetime: how long a token lasts when the command does not say.
        clock: the time now, in epoch seconds (tests pass their own).
        run: what runs the command (tests may pass their own; ``run_command`` by default).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        margin: float,
        lifetime: float,
        clock: Clock = time.time,
        run: RunCommand = run_command,
    ) -> None:
        self.command = tuple(command)
        self.margin = margin
        self.lifetime = lifetime
        self.clock = clock
        self._run = run
        self._token = ""
        self._refresh_at = self._expires_at = -math.inf  # nothing read yet
        self._refreshing: asyncio.Task[None] | None = None
        self._failure: TokenError | None = None
        self.refreshes = 0  # tokens read so far

    async def token(self) -> str:
        """A valid token: the current one (refreshed behind it once within ``margin`` of its
        expiry), else a fresh one, waited for; TokenError if none can be had."""
        now = self.clock()
        if now < self._refresh_at:
            return self._token
        if now < self._expires_at:
            self._start_refresh()  # this request still has a good token
            return self._token
        await self.refresh()
        return self._token

    async def refresh(self) -> None:
        """Read a token now (one command run, whoever else waits for it); TokenError if the
        command fails and the current token has expired."""
        await asyncio.shield(self._start_refresh())
        if self.clock() >= self._expires_at:
            raise self._failure or TokenError("the token command gave an expired token")

    def _start_refresh(self) -> asyncio.Task[None]:
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.create_task(self._read())
        return task

    async def _read(self) -> None:
        """Run the command; on failure keep the current token (if still valid) and try again
        after RETRY_INTERVAL. Never raises: waiters read the failure."""
        try:
            output = await self._run(self.command, COMMAND_TIMEOUT)
            token, expires_at = parse_token(output, self.clock(), self.lifetime)
        except TokenError as exc:
            self._failure = exc
            now = self.clock()
            self._refresh_at = min(now + RETRY_INTERVAL, self._expires_at)
            if now < self._expires_at:
                log.warning("Entra ID token refresh failed, keeping the current token: %s", exc)
        else:
            now = self.clock()
            self._token, self._expires_at, self._failure = token, expires_at, None
            # A token shorter-lived than the margin is refreshed halfway through its life.
            self._refresh_at = max(expires_at - self.margin, now + (expires_at - now) / 2)
            self.refreshes += 1
        finally:
            self._refreshing = None

    async def close(self) -> None:
        """Stop a refresh under way."""
        task = self._refreshing
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
