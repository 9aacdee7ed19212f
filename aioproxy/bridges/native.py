"""Responses an upstream creates natively: whose each id is, which deployment holds it, and the
fallback to the bridge for an upstream that turns out to lack ``/v1/responses``.

Each native response's id is remembered with its deployment and owner (``Principal.id``) in the
response store, off the hot path: the write is queued once the id is known (a whole answer's
body, a stream's ``response.created`` event) and nobody waits for it. Requests that name an id
(``previous_response_id``, ``GET /v1/responses/{id}`` ...) are checked against that record, so one
key never reaches another's responses through the shared upstream account.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable

import msgspec

from ..context import Call, Deployment
from ..errors import NotFound, ProxyError
from ..providers import JSONReply, ProviderMethod, Reply, StreamReply
from ..streaming import data_of, split_events
from .responses import _history as stored_history
from .store import ResponseStore, owner_of

__all__ = ["NativeResponses", "Owner", "route_missing"]

log = logging.getLogger("aioproxy")

# Called when a deployment's upstream lacks the native route: serve ``bridge`` from now on.
FallBack = Callable[[Deployment, ProviderMethod], None]


class _Created(msgspec.Struct):
    """What is read of a native Response: its id and whether the upstream keeps it."""

    id: str = ""
    store: bool | None = None


class _CreatedEvent(msgspec.Struct):
    type: str = ""
    response: _Created | None = None


_decode_created = msgspec.json.Decoder(_Created).decode
_decode_event = msgspec.json.Decoder(_CreatedEvent).decode


class Owner(msgspec.Struct, frozen=True):
    """Who a native response belongs to: the deployment that holds it (None: no longer
    configured) and the principal that created it."""

    deployment: Deployment | None
    deployment_key: str
    principal: str


def route_missing(error: ProxyError) -> bool:
    """The upstream has no such route: a 405, or a 404 that names no code (bar the status
    itself, as some servers put it) or parameter. A missing model or previous response names
    one, and is the client's answer, not a cue to bridge."""
    return error.status == 405 or (
        error.status == 404 and error.code in (None, "404") and error.param is None
    )


def not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


def previous_not_found(response_id: str) -> NotFound:
    return NotFound(
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


class NativeResponses:
    """The record of native response ids, for one app's registry."""

    def __init__(self, store: ResponseStore | None, deployments: Iterable[Deployment]) -> None:
        self.store = store
        # Every deployment a native response may name, by key: the config's, and any a plugin
        # made that created one (since start-up).
        self.deployments: dict[str, Deployment] = {d.key: d for d in deployments}
        self._writes: set[asyncio.Task[None]] = set()
        # Ids being written, by id: (deployment key, owner). Read before the store, so a
        # request that names an id just created finds it, however slow the write is.
        self._unwritten: dict[str, tuple[str, str]] = {}

    def wrap(
        self, native: ProviderMethod, bridge: ProviderMethod | None, fall_back: FallBack
    ) -> ProviderMethod:
        """``native`` (a provider's own ``responses``), with its ids recorded and checked, and
        ``bridge`` serving instead when the upstream answers that it has no such route."""

        async def responses(call: Call) -> Reply:
            if (
                "previous_response_id" in call.fields
                and await self._bridged_previous(call)
                and bridge is not None
            ):
                return await bridge(call)
            try:
                reply = await native(call)
            except ProxyError as exc:
                if bridge is None or not route_missing(exc):
                    raise
                fall_back(call.deployment, bridge)
                return await bridge(call)
            if self.store is None:
                return reply
            if isinstance(reply, JSONReply):
                if reply.status < 300:
                    self._remember_body(reply.body, call)
                return reply
            return StreamReply(
                self._remember_stream(reply.events, call),
                reply.close,
                reply.headers,
                reply.finished,
            )

        return responses

    async def owner(self, response_id: str) -> Owner | None:
        """Who a native response belongs to, or None if the gateway never saw it created."""
        if self.store is None:
            return None
        found = self._unwritten.get(response_id) or await self.store.lookup_native(response_id)
        if found is None:
            return None
        key, principal = found
        return Owner(self.deployments.get(key), key, principal)

    async def drain(self) -> None:
        """Wait for the record's writes in flight (at shutdown, before the store closes)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    # -- previous_response_id --------------------------------------------------------------

    async def _bridged_previous(self, call: Call) -> bool:
        """Check a native request's ``previous_response_id``: True if it names a response the
        bridge made (kept here, so the bridge must serve the request); refused (404) if it names
        another key's response or one the gateway never saw, before the upstream is asked."""
        previous = call.get("previous_response_id")
        if previous is None:
            return False
        if isinstance(previous, str) and (owner := await self.owner(previous)) is not None:
            if owner.principal != owner_of(call.principal):
                raise previous_not_found(previous)
            return False
        # Not created natively through here: the bridge's if this key's, else refused, as the
        # bridge refuses it (an id the gateway never saw may be anybody's: the upstream account
        # is shared). Without the store nothing says whose an id is: refused likewise. Only the
        # response itself is looked up: the bridge then reads its history, within its bound.
        store, asker = self.store, owner_of(call.principal)
        if (
            isinstance(previous, str)
            and store is not None
            and await store.response(previous, asker) is not None
        ):
            return True
        await stored_history(self.store, call, previous)  # raises the bridge's own error
        return True

    # -- remembering ids -------------------------------------------------------------------

    def _remember_body(self, body: bytes, call: Call) -> None:
        try:
            created = _decode_created(body)
        except msgspec.DecodeError:  # not a Response: nothing to remember
            return
        self._remember(created, call)

    async def _remember_stream(
        self, events: AsyncIterator[bytes], call: Call
    ) -> AsyncIterator[bytes]:
        """The events as they come, the response's id noted from ``response.created``."""
        try:
            async for block in events:
                yield block
                if self._first_event_in(block, call):
                    break
            async for block in events:
                yield block
        finally:  # closed now, not by a task the loop would spawn to finalize it
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    def _first_event_in(self, block: bytes, call: Call) -> bool:
        """Whether ``block`` holds the stream's first event (comments aside), remembering the
        response if it is ``response.created``, as it always is: later ones are not read."""
        for event in split_events(block):
            data = data_of(event)
            if not data:
                continue  # a comment (keep-alive)
            try:
                parsed = _decode_event(data)
            except msgspec.DecodeError:
                return True
            if parsed.type == "response.created" and parsed.response is not None:
                self._remember(parsed.response, call)
            return True
        return False

    def _remember(self, created: _Created, call: Call) -> None:
        deployment = call.deployment
        if not created.id or created.store is False or deployment is None or self.store is None:
            return  # an upstream that keeps nothing has nothing to read back
        key = deployment.key
        self.deployments.setdefault(key, deployment)
        owner = owner_of(call.principal)
        self._unwritten[created.id] = (key, owner)
        task = asyncio.ensure_future(self._write(created.id, key, owner))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, response_id: str, deployment: str, principal: str) -> None:
        assert self.store is not None
        try:
            await self.store.remember_native(response_id, deployment, principal)
        except Exception:  # the answer is out; only reading it back through here will fail
            log.exception("could not record native response %s", response_id)
        finally:
            self._unwritten.pop(response_id, None)
