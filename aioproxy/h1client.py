"""A lean HTTP/1.1 client for the hot path: keep-alive connections to upstreams, pooled per app.

aiohttp's ClientSession spends ~50 µs of Python per request (trace hooks, cookie and proxy
handling, redirects, request and response objects built for every case) on a call that a
gateway makes the same way every time: POST some bytes to a URL it knows, read or relay the
answer. This client does only that, with aiohttp's own pieces where the work is: its C HTTP
response parser (chunked bodies, gzip/deflate, limits) and its StreamReader (flow control), so
responses read exactly as through a ClientSession. Measured on this project's machines, it costs
~26 µs of CPU per request against ~69 µs for ClientSession (bench/clients.py).

What it leaves out, on purpose: redirects (a gateway never follows them: it would carry the
key elsewhere), cookies, HTTP proxies, Expect: 100-continue. Providers that need those use the
app's ClientSession, which stays available to every plugin.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import select
import socket
import ssl
from collections.abc import Mapping
from urllib.parse import quote, unquote, urlsplit

import aiohappyeyeballs
import aiohttp
from aiohttp import StreamReader
from multidict import CIMultiDictProxy

from ._aiohttp import (
    EMPTY_PAYLOAD,
    BaseProtocol,
    HttpResponseParser,
    RawResponseMessage,
    take_arrived,
)
from .budget import BufferBudget
from .config import Timeouts

__all__ = ["H1Pool", "H1Response", "UpstreamConnectError", "UpstreamProtocolError"]

# What may stand unescaped in a request target (RFC 3986 pchar, "/" and, in the query, "?"); "%"
# too, so escapes already in the URL stay as they are. Anything else (a space, a non-ASCII
# letter) is percent-encoded, as yarl does for ClientSession: a space would split the request line.
_PATH_SAFE = "/:@!$&'()*+,;=%"
_QUERY_SAFE = _PATH_SAFE + "?"

_READ_LIMIT = 2**16  # the StreamReader's buffer before it pauses the socket (aiohttp's default)
_DRAIN_ABOVE = 2**16  # a request body bigger than this waits for the socket to take it
_KEEPALIVE = 60.0  # seconds an idle connection is kept; upstreams close theirs after ~60-75 s
# Interim answers that the real answer follows; any other 1xx (101 Switching Protocols above
# all) means the connection no longer speaks HTTP to us.
_INTERIM = frozenset({100, 103})
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
_DNS_TTL = 300.0  # seconds a host's addresses are kept (ClientSession's ttl_dns_cache here)
_HAPPY_EYEBALLS_DELAY = 0.25  # seconds before trying the next address family (as aiohttp)
_MAX_TARGETS = 1024  # parsed URLs kept; deployments are few, but plugins may make URLs up
_MAX_HEADS = 256  # serialized header sets kept
# Headers whose value is new on each request (the request id, a trace's parent), named in
# lower case as the core and its plugins send them: sent after the cached bytes of the rest,
# so that they do not make every header set a new one.
_PER_REQUEST_NAMES = ("x-request-id", "traceparent", "tracestate")
_PER_REQUEST = frozenset(_PER_REQUEST_NAMES)
_USER_AGENT = f"aioproxy aiohttp/{aiohttp.__version__}"
# Headers this client writes itself; a caller's are dropped so none is ever sent twice.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
# Sent unless the caller sets them (as aiohttp does): compressed answers are decoded on arrival.
_DEFAULT_HEADERS = {"user-agent": _USER_AGENT, "accept-encoding": "gzip, deflate"}


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """The upstream could not be reached (refused, unresolvable, TLS failed)."""


class UpstreamProtocolError(aiohttp.ClientError):
    """The upstream's answer is not valid HTTP/1.1."""


class _Target:
    """A URL taken apart once: where to connect, the request line, the Host header."""

    __slots__ = ("authorization", "host", "host_header", "key", "port", "request_line", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (self.host, self.port, self.tls)
        path = quote(parts.path, safe=_PATH_SAFE) or "/"
        if parts.query:
            path += "?" + quote(parts.query, safe=_QUERY_SAFE)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.request_line = f"POST {path} HTTP/1.1\r\n"
        # user:password in the URL is Basic auth, as ClientSession sends it.
        self.authorization: str | None = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.authorization = "Basic " + base64.b64encode(credentials.encode()).decode()


class _Connection(BaseProtocol):
    """One upstream connection: feeds aiohttp's parser, and enforces the read/total timeouts.

    One timer per request covers both timeouts: it fires at the earlier of the total deadline
    and ``read`` after the last bytes seen, and re-arms itself while data keeps coming, so a
    busy stream costs one clock reading per network read instead of a timer per read.
    """

    def __init__(self, pool: H1Pool, key: tuple[str, int, bool]) -> None:
        super().__init__(pool.loop)
        self.pool = pool
        self.key = key
        self.parser: HttpResponseParser | None = None
        self.head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self.payload: StreamReader | None = None
        self.response: H1Response | None = None
        self.closed = False
        self.used = 0  # requests sent on it
        self.got_bytes = False  # of the current answer
        self.idle_since = 0.0
        self.last_data = 0.0
        self.read_timeout: float | None = None
        self.read_in_body: float | None = None  # read_timeout once the body has begun, if other
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.written = False  # some of the current request reached the socket
        self._poll: select.poll | None = None  # watches the socket while the connection idles

    def watch(self) -> None:
        """Keep an eye on the transport's socket, for ``alive()``."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), _READABLE)

    def alive(self) -> bool:
        """Whether an idle connection is still worth a request: nothing to read on it, not even
        an end of file. An upstream that closed it while idle left a FIN that the event loop
        may not have seen yet; one poll (~1 µs) sees it before the request is written."""
        return not self.closed and (self._poll is None or not self._poll.poll(0))

    # --- asyncio.Protocol ---

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            if data:  # bytes nobody asked for: the connection cannot be trusted any more
                self.abort()
            return
        if data:
            self.got_bytes = True
            self.last_data = self.pool.loop.time()
            if self.read_in_body is not None and self.payload is not None:
                self._body_began()
        try:
            messages, _, _ = parser.feed_data(data)
        except Exception as exc:  # noqa: BLE001 - any parser error: the answer is not HTTP
            head = self.head
            if head is not None and not head.done():
                self._fail(UpstreamProtocolError(f"invalid HTTP answer: {type(exc).__name__}"))
            else:  # the head was fine: it is the body that is broken
                self._fail(aiohttp.ClientPayloadError(f"invalid answer body: {type(exc).__name__}"))
            self.abort()
            return
        for message, payload in messages:
            head = self.head
            if head is None or head.done():
                # A second answer to one request: the connection is out of step with us.
                self.abort()
                return
            if message.code in _INTERIM:
                continue  # 100 Continue, 103 Early Hints: the answer itself follows
            if message.code < 200 or message.upgrade:  # 101 Switching Protocols and the like
                answer = f"answer {message.code} or an upgrade: not HTTP any more"
                self._fail(UpstreamProtocolError(answer))
                self.abort()
                return
            self.payload = payload
            head.set_result((message, payload))

    def connection_lost(self, exc: BaseException | None) -> None:
        by_upstream = not self.closed  # else we aborted it: its EOF ends nothing
        self.closed = True
        super().connection_lost(exc)
        parser, self.parser = self.parser, None
        payload = self.payload
        if by_upstream and parser is not None and payload is not None:
            try:  # ends a body read until EOF; raises for a truncated one
                parser.feed_eof()
            except Exception as parse_error:  # noqa: BLE001 - any parser error: a cut body
                self._fail(
                    aiohttp.ClientPayloadError(f"answer cut short: {type(parse_error).__name__}")
                )
        head = self.head
        if head is not None and not head.done():
            head.set_exception(aiohttp.ServerDisconnectedError())
        if payload is not None and not payload.is_eof():
            self._fail(aiohttp.ClientPayloadError("the connection closed mid-answer"))
        self._stop_timer()
        self.pool.forget(self)

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The answer's reader calls this after each read of its buffer: unpaused (the usual
        # case), there is nothing to resume, no parser backlog nor paused transport (only
        # pause_reading pauses either here), and BaseProtocol's resume would feed the parser
        # an empty read and resume the transport for nothing (~90 bytecodes a request).
        if not self._reading_paused:
            return
        self.last_data = self.pool.loop.time()  # the wait was our reader's: the clock restarts
        super().resume_reading(resume_parser)

    # --- requests ---

    def send(
        self,
        head: bytes,
        body: bytes,
        read: float | None,
        deadline: float | None,
        read_in_body: float | None = None,
    ) -> None:
        """Write the request; ``written`` says whether any of it may have reached the upstream.

        ``read`` bounds each silence of the upstream; ``read_in_body``, if given, replaces it
        once the body has begun (a model may think long before its first event, not between)."""
        loop = self.pool.loop
        self.used += 1
        self.got_bytes = False
        self.written = False
        self.head = loop.create_future()
        self.payload = None
        self.response = None
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():  # lost before writing
            self.head.set_exception(aiohttp.ServerDisconnectedError())
            return
        self._parser = self.parser = HttpResponseParser(
            self,
            loop,
            _READ_LIMIT,
            max_line_size=8190,
            max_field_size=8190,
            payload_exception=aiohttp.ClientPayloadError,
            response_with_body=True,
            read_until_eof=True,
            auto_decompress=True,
        )
        now = loop.time()
        self.last_data = now
        self.read_timeout = read
        self.read_in_body = read_in_body
        self.deadline = deadline
        self._arm(now)
        transport.writelines((head, body))
        # A socket transport's first write goes out at once or fails at once: closing now means
        # the send failed and not a byte left (a transport that cannot tell counts as sent).
        self.written = not transport.is_closing()

    def _arm(self, now: float) -> None:
        when = self.deadline
        if self.read_timeout is not None:
            idle_end = self.last_data + self.read_timeout
            when = idle_end if when is None else min(when, idle_end)
        self.timer = (
            None if when is None else self.pool.loop.call_at(max(when, now), self._on_timer)
        )

    def _body_began(self) -> None:
        self.read_timeout, self.read_in_body = self.read_in_body, None
        self._stop_timer()
        self._arm(self.last_data)

    def _on_timer(self) -> None:
        self.timer = None
        now = self.pool.loop.time()
        if self._reading_paused:  # our reader is behind (flow control): not the upstream's fault
            self.last_data = now
        expired = (self.deadline is not None and now >= self.deadline) or (
            self.read_timeout is not None and now - self.last_data >= self.read_timeout
        )
        if not expired:
            self._arm(now)
            return
        self._fail(aiohttp.ServerTimeoutError("the upstream did not answer in time"))
        self.abort()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fail(self, exc: BaseException) -> None:
        """Fail the answer in progress with ``exc``, unless it failed already: the first cause
        (a timeout) is the one to report, not the hang-up that follows it."""
        head, payload = self.head, self.payload
        if head is not None and not head.done():
            head.set_exception(exc)
        elif payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(exc)

    def answer_ended(self, should_close: bool) -> None:
        """The answer's body is complete: the connection is free for the next request."""
        self._stop_timer()
        self.parser = self._parser = None
        self.head = None
        self.payload = None
        if self.response is not None:
            self.response._conn = None
            self.response = None
        if should_close or self.closed:
            self.abort()
            return
        # (A socket paused for a full reader was resumed already: StreamReader.feed_eof does that
        # before it runs the end-of-body callbacks that call this.)
        self.pool.put_back(self)

    def abort(self) -> None:
        self._stop_timer()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        self.pool.forget(self)


class H1Response:
    """An upstream's answer, with the parts of aiohttp's ClientResponse that a relay reads."""

    __slots__ = (
        "_conn",
        "budget",
        "content",
        "content_length",
        "content_type",
        "headers",
        "status",
    )

    def __init__(
        self, message: RawResponseMessage, payload: StreamReader, conn: _Connection
    ) -> None:
        self.budget = conn.pool.budget  # what reading it whole or by events is counted against
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content: StreamReader = payload
        self._conn: _Connection | None = conn
        content_type = message.headers.get("Content-Type")
        self.content_type = (
            content_type.partition(";")[0].strip().lower()
            if content_type
            else "application/octet-stream"
        )
        length = message.headers.get("Content-Length")
        # A compressed body is decoded as it comes: its length counts bytes the reader never sees
        # (and says nothing of how big the decoded body gets).
        self.content_length = (
            int(length) if length and length.isdigit() and message.compression is None else None
        )

    async def read(self) -> bytes:
        """The whole body. A read that fails or is cancelled closes the connection: the rest of
        that body would otherwise stand in the way of the next answer on it."""
        content = self.content
        try:
            if content.is_eof():  # all of it is in: its buffer taken, no read loop (~100
                return take_arrived(content)  # bytecodes less than read's)
            return await content.read()
        except BaseException:
            self.close()
            raise

    def release(self) -> None:
        """Done with the answer. Its connection goes back to the pool if the body was read to
        its end (that happens by itself, as the last bytes arrive), else it is closed."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.response is self:
            conn.response = None
            conn.abort()

    close = release  # the same for this answer (a stream's close: no call around it)


class H1Pool:
    """Keep-alive connections per (host, port, TLS), reused most-recent first.

    ``limit`` caps the open connections (0: no cap); a request beyond it waits for one to free.
    A pooled connection is checked before a request is written on it (``_Connection.alive``):
    one the upstream closed while it idled is dropped for another. A request is sent again, once,
    on a new connection only when none of it was written on a pooled one (found dead at the
    write); once written, the upstream may have read it and acted on it, so a lost
    connection is the caller's error, and its retry policy decides.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, limit: int = 0, budget: BufferBudget | None = None
    ) -> None:
        self.loop = loop
        self.limit = limit
        self.budget = budget  # the app's bound on buffered answer bytes, for the answers' readers
        self._idle: dict[tuple[str, int, bool], collections.deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._targets: dict[str, _Target] = {}
        self._addresses: dict[
            tuple[str, int], tuple[float, list[aiohappyeyeballs.AddrInfoType]]
        ] = {}
        self._heads: dict[tuple[object, ...], bytes] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # --- the call ---

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeouts: Timeouts
    ) -> H1Response:
        """POST ``body`` to ``url``; the answer once its status and headers are in.

        ``timeouts.total`` bounds the whole call (the wait for a connection included),
        ``connect`` the wait for a connection (a free slot under the cap, then the TCP/TLS
        connect). Once the request is sent, the upstream may stay silent for ``read`` (or
        ``first_byte`` when longer: models that think before their first token) until the
        body begins, then for ``read`` at most each time.
        """
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        head = self._request_head(target, headers, len(body))
        total = timeouts.total
        deadline = self.loop.time() + total if total else None
        read = timeouts.read
        first_byte = timeouts.first_byte
        # The bound on silences until the body begins, and after (None: the same).
        sock_read, read_in_body = (read, None)
        if first_byte is not None and first_byte > read:
            sock_read, read_in_body = first_byte, read
        for retry in (False, True):
            # The retry goes to a new connection: another pooled one may be as stale.
            conn = None if retry else self._take_idle(target.key)
            if conn is None:
                conn = await self._acquire(target, timeouts.connect, deadline, fresh=retry)
            reused = conn.used > 0  # a new connection lost at once is the upstream's doing
            try:
                conn.send(head, body, sock_read, deadline, read_in_body)
                if len(body) > _DRAIN_ABOVE:
                    try:
                        await conn._drain_helper()
                    except ConnectionError:
                        pass  # the connection is lost: the answer's future says how
                assert conn.head is not None
                message, payload = await conn.head
            except aiohttp.ServerDisconnectedError:
                conn.abort()
                if reused and not conn.written and not retry:
                    continue  # it never carried a byte of this request: once more, safely
                raise
            except BaseException:
                conn.head = None  # nobody awaits it any more: its hang-up is nobody's error
                conn.abort()
                raise
            response = H1Response(message, payload, conn)
            conn.head = None
            should_close = message.should_close
            if payload is EMPTY_PAYLOAD or payload.is_eof():
                response._conn = None
                conn.answer_ended(should_close)
            else:
                conn.response = response
                payload.on_eof(functools.partial(conn.answer_ended, should_close))
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _request_head(self, target: _Target, headers: Mapping[str, str], length: int) -> bytes:
        """The request line and headers. A gateway sends a few header sets over and over (one
        per deployment, bar a forwarded request id), so each set's bytes are kept and reused."""
        own = b""
        if not _PER_REQUEST.isdisjoint(headers):  # new on each request: kept out of the cache
            # Taken out by name (a copy and three lookups), not by a walk of every header.
            kept = dict(headers)
            lines = []
            for name in _PER_REQUEST_NAMES:
                if name in kept:
                    lines.append(_header_line(name, kept.pop(name)))
            headers, own = kept, "".join(lines).encode("utf-8", "surrogateescape")
        key = (target, *headers.items())  # the target: its path, Host and URL credentials
        fixed = self._heads.get(key)
        if fixed is None:
            fixed = _serialize(target, headers)
            if len(self._heads) >= _MAX_HEADS:
                self._heads.clear()
            self._heads[key] = fixed
        return b"%s%sContent-Length: %d\r\n\r\n" % (fixed, own, length)

    def _target(self, url: str) -> _Target:
        target = _Target(url)
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        self._targets[url] = target
        return target

    # --- connections ---

    def _take_idle(self, key: tuple[str, int, bool]) -> _Connection | None:
        """The most recently used idle connection to ``key`` still worth using, if any."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < _KEEPALIVE and conn.alive():
                return conn
            conn.abort()
        return None

    async def _acquire(
        self, target: _Target, connect: float | None, deadline: float | None, fresh: bool
    ) -> _Connection:
        """A connection for ``target`` with no idle one at hand: a new one, once the cap allows
        (waiting, then connecting, within ``connect`` seconds and the call's ``deadline``)."""
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        budget = connect
        if deadline is not None:
            left = deadline - self.loop.time()
            budget = left if budget is None else min(budget, left)
        try:
            async with asyncio.timeout(budget):
                while self.limit and len(self._open) >= self.limit:
                    if self._evict_idle():
                        continue
                    await self._wait_turn()
                    if self._closed:
                        raise RuntimeError("the upstream pool is closed")
                    if not fresh:  # one may have come back for this very upstream
                        conn = self._take_idle(target.key)
                        if conn is not None:
                            return conn
                return await self._connect(target)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(
                f"no connection to {target.host}:{target.port} in time"
            ) from exc

    async def _wait_turn(self) -> None:
        """Wait until a connection closes or comes back to the pool."""
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._wake()  # woken, but cancelled before it could act: the next one goes
            raise

    async def _connect(self, target: _Target) -> _Connection:
        conn = _Connection(self, target.key)
        self._open.add(conn)
        ssl_context = self._tls() if target.tls else None
        try:
            addresses = await self._resolve(target.host, target.port)
            # Happy eyeballs, as ClientSession: a dead IPv6 route costs 0.25 s, not the timeout.
            sock = await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY, loop=self.loop
            )
            await self.loop.create_connection(
                lambda: conn,
                sock=sock,
                ssl=ssl_context,
                server_hostname=target.host if ssl_context else None,
            )
            conn.watch()
        except OSError as exc:  # refused, unreachable, no such host, TLS handshake failed
            self.forget(conn)
            if isinstance(exc, TimeoutError):  # the system's own connect timeout
                raise aiohttp.ConnectionTimeoutError(
                    f"connecting to {target.host}:{target.port} timed out"
                ) from exc
            raise UpstreamConnectError(
                f"cannot connect to {target.host}:{target.port}: {exc}"
            ) from exc
        except BaseException:
            conn.abort()
            raise
        if self._closed:  # the pool closed while this one was connecting: it has no use
            conn.closed = True
            if conn.transport is not None:
                conn.transport.abort()
            self.forget(conn)
            raise RuntimeError("the upstream pool is closed")
        return conn

    async def _resolve(self, host: str, port: int) -> list[aiohappyeyeballs.AddrInfoType]:
        """The host's addresses, kept ``_DNS_TTL`` seconds (new connections are rare with
        keep-alive, but come in bursts: one lookup serves a burst)."""
        now = self.loop.time()
        cached = self._addresses.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        infos: list[aiohappyeyeballs.AddrInfoType] = list(found)  # typeshed's tuples, widened
        if not infos:
            raise OSError(f"no address for {host}")
        if len(self._addresses) >= _MAX_TARGETS:
            self._addresses.clear()
        self._addresses[(host, port)] = (now + _DNS_TTL, infos)
        return infos

    def _evict_idle(self) -> bool:
        """Close one idle connection (to another upstream) to make room under the cap."""
        for idle in self._idle.values():
            if idle:
                idle.popleft().abort()
                return True
        return False

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:  # (not setdefault: that would make a deque each time)
            idle = self._idle[conn.key] = collections.deque()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_KEEPALIVE, self._sweep)
        if self._waiters:  # mostly none: no call to wake nobody
            self._wake()

    def forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive time (their upstream would close them)."""
        self._sweeper = None
        cutoff = self.loop.time() - _KEEPALIVE
        for idle in self._idle.values():
            while idle and (idle[0].closed or idle[0].idle_since <= cutoff):
                idle.popleft().abort()
        if any(self._idle.values()):
            self._sweeper = self.loop.call_later(_KEEPALIVE, self._sweep)

    @property
    def open_connections(self) -> int:
        """Connections open now, busy or idle."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        """Open connections waiting in the pool for a request."""
        return sum(1 for idle in self._idle.values() for conn in idle if not conn.closed)

    @property
    def busy_connections(self) -> int:
        """Connections carrying a request (or one being opened for it)."""
        return self.open_connections - self.idle_connections

    async def close(self) -> None:
        """Close every connection; calls waiting for one fail, later ones too."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:  # they see the pool closed when they wake
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports' connection_lost run


def _header_line(name: str, value: str) -> str:
    if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
        raise ValueError(f"header {name!r} holds a line break, or its name a colon")
    return f"{name}: {value}\r\n"


def _serialize(target: _Target, headers: Mapping[str, str]) -> bytes:
    lines = [target.request_line]
    defaults = dict(_DEFAULT_HEADERS)
    defaults["host"] = target.host_header
    if target.authorization is not None:
        defaults["authorization"] = target.authorization
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _OWN_HEADERS:
            continue
        defaults.pop(lowered, None)  # the caller's Host, User-Agent... win, as in ClientSession
        lines.append(_header_line(name, value))
    for lowered, value in defaults.items():
        lines.append(f"{lowered}: {value}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")  # header bytes as they came
