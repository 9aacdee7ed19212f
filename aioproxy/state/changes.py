"""Publish/subscribe between instances: key and team changes (each instance reloads its key
cache at once, not at its next database poll), and deployment cooldowns (a deployment cooling
on one instance is skipped by all)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .link import PROBE_INTERVAL, RedisLink

__all__ = ["Change", "Changes"]

log = logging.getLogger("aioproxy")

# Seconds without a message before the channel is PINGed; as long again without an answer and
# its connection is taken for dead (a Redis gone silently: a failover to another host, a
# dropped route), not listened to for ever while changes go elsewhere.
QUIET = 3.0


class Change(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message on the channel."""

    source: str  # the sending instance: it ignores its own
    what: str  # "keys" (keys or teams changed) or "cooldown"
    deployment: str | None = None  # cooldown: the deployment's key
    seconds: float = 0.0  # cooldown: how long from now


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Change).decode


class Changes:
    """This instance's end of the channel."""

    def __init__(
        self,
        link: RedisLink,
        reload_keys: Callable[[], Awaitable[None]],
        cool_down: Callable[[str, float], None],
    ) -> None:
        self.link = link
        self.channel = f"{link.prefix}:changes"
        self.source = os.urandom(8).hex()
        self.reload_keys = reload_keys
        self.cool_down = cool_down
        # Its own connection, with no read timeout: a subscriber waits for messages.
        self.subscriber: aioredis.Redis = aioredis.Redis.from_url(
            str(link.config.redis_url), socket_connect_timeout=link.config.timeout
        )
        self.listening = asyncio.Event()  # set once subscribed (tests wait for it)
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        link.on_resume(self._reload)  # changes published while this one could not hear

    async def start(self) -> None:
        """Listen, and wait (within the timeout, when Redis is up) until subscribed and the
        keys reloaded: the key cache was loaded before, and a change announced in between
        (as when workers start one after another and the first already serves) would
        otherwise be missed until the next database poll."""
        self._task = asyncio.create_task(self._listen(), name="aioproxy state changes")
        if self.link.up:
            with contextlib.suppress(TimeoutError):  # the listener goes on trying
                async with asyncio.timeout(self.link.config.timeout):
                    await self.listening.wait()

    async def announce_keys(self) -> None:
        """Keys or teams changed here: the others reload (their poll, and the reload each
        does when Redis comes back, are the net). Tried even while the link is marked down:
        an admin call is rare, and Redis may be back before the probe says so."""
        await self._publish(Change(source=self.source, what="keys"), always=True)

    def announce_cooldown(self, deployment: str, seconds: float) -> None:
        task = asyncio.ensure_future(
            self._publish(
                Change(source=self.source, what="cooldown", deployment=deployment, seconds=seconds)
            )
        )
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _publish(self, change: Change, always: bool = False) -> None:
        if not (self.link.up or always):
            return
        try:
            await self.link.client.publish(self.channel, _encode(change))
        except (RedisError, OSError) as exc:
            self.link.lost(exc)

    async def _listen(self) -> None:
        while True:
            try:
                async with self.subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    # What changed before we could hear it: at start-up, since the key cache
                    # was loaded; later, while the connection was lost.
                    await self._reload()
                    self.listening.set()
                    await self._hear(pubsub)
            except (RedisError, OSError) as exc:
                self.listening.clear()
                self.link.lost(exc)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _hear(self, pubsub: PubSub) -> None:
        """Take messages as they come; PING a quiet channel, and give up on one that does
        not answer (any message, or the PONG) within ``QUIET`` more seconds."""
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=QUIET)
            if message is not None:
                pinged = False
                if message["type"] == "message":
                    self._take(message)
            elif pinged:
                raise TimeoutError(f"no answer on {self.channel} for {2 * QUIET:g} s")
            else:
                await pubsub.ping()
                pinged = True

    def _take(self, message: dict[str, object]) -> None:
        data = message.get("data")
        if not isinstance(data, bytes):
            return
        try:
            change = _decode(data)
        except msgspec.DecodeError:
            log.warning("state: an unreadable message on %s was ignored", self.channel)
            return
        if change.source == self.source:
            return
        if change.what == "keys":
            task = asyncio.ensure_future(self._reload())
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        elif change.what == "cooldown" and change.deployment is not None:
            self.cool_down(change.deployment, change.seconds)

    async def _reload(self) -> None:
        try:
            await self.reload_keys()
        except Exception as exc:  # noqa: BLE001 - the database poll retries
            log.warning("state: cannot reload the key cache: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._sends):
            task.cancel()
        await self.subscriber.aclose()
