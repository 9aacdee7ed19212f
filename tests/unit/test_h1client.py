"""aioproxy.h1client: the lean keep-alive HTTP/1.1 client, against real servers on 127.0.0.1.

Well-behaved upstreams are aiohttp test servers; misbehaving ones (garbage, truncated bodies,
hang-ups, silence) are bare asyncio servers that write the bytes each test needs.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aioproxy import h1client
from aioproxy.config import Timeouts
from aioproxy.failures import as_proxy_error
from aioproxy.h1client import H1Pool, UpstreamConnectError, UpstreamProtocolError
from aioproxy.transport import Transport, UpstreamResponse

# Far longer than any test takes: a timer firing must never be what makes a test pass.
TIMEOUT = Timeouts(total=20, connect=5, read=10)
OK = b'{"ok":true}'
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


# -- helpers -----------------------------------------------------------------------------------


async def eventually(check: Callable[[], bool], within: float = 2.0) -> None:
    """Wait until ``check()`` holds (server-side effects land a few loop turns later)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def answer(body: bytes = OK, *extra: str, status: str = "200 OK") -> bytes:
    """An HTTP/1.1 answer with a Content-Length body."""
    lines = [
        f"HTTP/1.1 {status}",
        "Content-Type: application/json",
        *extra,
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def headers_of(head: bytes) -> list[tuple[str, str]]:
    """A request head's header lines as (lower-case name, value), in order, repeats kept."""
    pairs = []
    for line in head.decode().split("\r\n")[1:]:
        if line:
            name, _, value = line.partition(":")
            pairs.append((name.lower(), value.strip()))
    return pairs


class Peer:
    """One accepted connection of a RawUpstream."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawUpstream
    ) -> None:
        self.reader, self.writer, self.server = reader, writer, server
        self.requests = 0

    async def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body; None when the client hung up."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for name, value in headers_of(head):
            if name == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        self.requests += 1
        self.server.requests.append((head, body))
        return head, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self) -> None:
        """Read (and drop) until the client closes the connection; counted in ``hangups``."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.server.hangups += 1

    async def serve(self, reply: bytes = answer()) -> None:
        """Answer every request on this connection with ``reply``, until the client hangs up."""
        while await self.request() is not None:
            await self.send(reply)
        self.server.hangups += 1


class RawUpstream:
    """A bare TCP server: ``handler(peer)`` runs for each connection; counts connections."""

    def __init__(self, handler: Callable[[Peer], Awaitable[None]]) -> None:
        self.handler = handler
        self.connections = 0  # accepted so far
        self.open = 0  # open now
        self.max_open = 0
        self.hangups = 0  # connections a handler saw the client close
        self.requests: list[tuple[bytes, bytes]] = []
        self.tasks: set[asyncio.Future[None]] = set()  # the handlers running
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> None:
        self.server = await asyncio.start_server(self._serve, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, path: str = "/v1/chat/completions", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The handler runs in a task of its own: stop() cancels that one, and asyncio's
        # connection callback never sees a cancelled task.
        task = asyncio.ensure_future(self.handler(Peer(reader, writer, self)))
        self.tasks.add(task)
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await task
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self.tasks.discard(task)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


RawFactory = Callable[[Callable[[Peer], Awaitable[None]]], Awaitable[RawUpstream]]


async def hung_up(upstream: RawUpstream, pool: H1Pool) -> None:
    """Wait for the upstream to see its one connection closed: the pool holds none after it."""
    await eventually(lambda: upstream.hangups == 1)
    assert pool.open_connections == 0  # busy or idle


async def failed_and_hung_up(
    error: BaseException, status: int, upstream: RawUpstream, pool: H1Pool
) -> None:
    """``error`` is the client's ``status``, and the pool dropped the connection it broke."""
    assert as_proxy_error(error, None).status == status
    await hung_up(upstream, pool)


async def answered_afresh(pool: H1Pool, upstream: RawUpstream) -> None:
    """The next request is answered, on a second connection."""
    _, body = await post(pool, upstream.url())
    assert body == OK
    assert upstream.connections == 2


async def cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and see the cancellation through."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def silent(peer: Peer) -> None:
    """An upstream that reads the request and never answers."""
    await peer.request()
    await peer.until_closed()


@pytest.fixture
async def raw() -> AsyncIterator[RawFactory]:
    servers: list[RawUpstream] = []

    async def start(handler: Callable[[Peer], Awaitable[None]]) -> RawUpstream:
        server = RawUpstream(handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[H1Pool]:
    pool = H1Pool(asyncio.get_running_loop())
    yield pool
    await pool.close()


class Seen:
    """What an aiohttp test server saw: the client address of each request (one per connection)."""

    def __init__(self) -> None:
        self.peers: list[Any] = []

    def note(self, request: web.Request) -> None:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))

    @property
    def connections(self) -> int:
        return len(set(self.peers))


async def app_server(
    aiohttp_server: Any, seen: Seen, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> TestServer:
    async def noted(request: web.Request) -> web.StreamResponse:
        seen.note(request)
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", noted)
    return await aiohttp_server(app)


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/json")


async def post(
    transport: Transport,
    url: str,
    body: bytes = b"{}",
    headers: dict[str, str] | None = None,
    timeout: Timeouts = TIMEOUT,
) -> tuple[UpstreamResponse, bytes]:
    """One call, read whole; a hang fails the test instead of stalling the suite."""
    response = await asyncio.wait_for(transport.post(url, body, headers or {}, timeout), 5)
    return response, await asyncio.wait_for(response.read(), 5)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- keep-alive --------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(aiohttp_server: Any, pool: H1Pool) -> None:
    """Five calls one after another go over one connection, which then waits idle."""
    seen = Seen()
    server = await app_server(aiohttp_server, seen, echo)
    for i in range(5):
        response, body = await post(pool, str(server.make_url("/v1/x")), b'{"n":%d}' % i)
        assert (response.status, body) == (200, b'{"n":%d}' % i)
        assert response.content_length == len(body)
        assert response.content_type == "application/json"
    assert len(seen.peers) == 5
    assert seen.connections == 1
    assert (pool.open_connections, pool.idle_connections, pool.busy_connections) == (1, 1, 0)


async def test_concurrent_requests_open_several(aiohttp_server: Any, pool: H1Pool) -> None:
    """Calls in flight together each get a connection; afterwards all of them wait idle."""
    seen = Seen()
    arrived = asyncio.Event()
    go = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        if len(seen.peers) == 3:
            arrived.set()
        await go.wait()
        return await echo(request)

    server = await app_server(aiohttp_server, seen, held)
    calls = [
        asyncio.create_task(post(pool, str(server.make_url("/")), b"[%d]" % i)) for i in range(3)
    ]
    await asyncio.wait_for(arrived.wait(), 2)
    assert (pool.open_connections, pool.idle_connections, pool.busy_connections) == (3, 0, 3)
    go.set()
    results = await asyncio.gather(*calls)
    assert [body for _, body in results] == [b"[0]", b"[1]", b"[2]"]
    assert seen.connections == 3
    assert (pool.open_connections, pool.idle_connections, pool.busy_connections) == (3, 3, 0)
    # The next three calls, one at a time, take idle connections and open none.
    for _ in range(3):
        await post(pool, str(server.make_url("/")))
    assert seen.connections == 3


# -- the request as sent -----------------------------------------------------------------------


async def test_request_line_headers_and_body(raw: RawFactory, pool: H1Pool) -> None:
    """The request line, our Host/Content-Length, the caller's headers and the body, exactly."""
    upstream = await raw(lambda peer: peer.serve())
    body = '{"text":"héllo\\r\\n"}\n'.encode()
    caller = {"Authorization": "Bearer sk-1", "Content-Type": "application/json", "X-Trace": "a b"}
    response, _ = await post(pool, upstream.url("/v1/chat?api-version=2024-10-01"), body, caller)
    assert response.status == 200
    [(head, sent)] = upstream.requests
    assert head.startswith(b"POST /v1/chat?api-version=2024-10-01 HTTP/1.1\r\n")
    assert sent == body
    headers = headers_of(head)
    assert headers.count(("host", f"127.0.0.1:{upstream.port}")) == 1
    assert headers.count(("content-length", str(len(body)))) == 1
    assert ("authorization", "Bearer sk-1") in headers
    assert ("content-type", "application/json") in headers
    assert ("x-trace", "a b") in headers
    assert ("user-agent", f"aioproxy aiohttp/{aiohttp.__version__}") in headers
    assert ("accept-encoding", "gzip, deflate") in headers
    assert [name for name, _ in headers if name in ("connection", "transfer-encoding")] == []
    assert len(headers) == len({name for name, _ in headers})  # no header twice


async def test_per_request_headers_are_sent_but_not_cached(raw: RawFactory, pool: H1Pool) -> None:
    """A request id (new on every request) goes out with its own request, once, and does not
    make each request's header set a new entry of the cache of serialized heads."""
    upstream = await raw(lambda peer: peer.serve())
    for rid in ("req-1", "req-2", "req-3"):
        caller = {"content-type": "application/json", "x-request-id": rid, "traceparent": rid}
        _, body = await post(pool, upstream.url("/"), b"{}", caller)
        assert body == OK
    sent = [headers_of(head) for head, _ in upstream.requests]
    assert [[v for n, v in h if n == "x-request-id"] for h in sent] == [
        ["req-1"],
        ["req-2"],
        ["req-3"],
    ]
    assert [[v for n, v in h if n == "traceparent"] for h in sent] == [
        ["req-1"],
        ["req-2"],
        ["req-3"],
    ]
    assert len(pool._heads) == 1


async def test_callers_own_framing_headers_are_dropped(raw: RawFactory, pool: H1Pool) -> None:
    """The caller's Content-Length/Connection/Transfer-Encoding never reach the wire; its
    Host (a deployment's ingress routing), User-Agent and Accept-Encoding replace the defaults."""
    upstream = await raw(lambda peer: peer.serve())
    caller = {
        "content-length": "9999",
        "HOST": "evil.example",
        "Connection": "close",
        "Transfer-Encoding": "chunked",
        "User-Agent": "my-agent/1",
        "accept-encoding": "identity",
    }
    for _ in range(2):
        _, body = await post(pool, upstream.url("/"), b"abc", caller)
        assert body == OK
    head, sent = upstream.requests[0]
    assert sent == b"abc"
    headers = headers_of(head)
    assert sorted(headers) == sorted(
        [
            ("host", "evil.example"),
            ("content-length", "3"),
            ("user-agent", "my-agent/1"),
            ("accept-encoding", "identity"),
        ]
    )
    # The caller's "Connection: close" was not sent: the connection was kept.
    assert upstream.connections == 1


@pytest.mark.parametrize(
    ("url", "request_line"),
    [
        ("http://api.example.com/v1/x", "POST /v1/x HTTP/1.1\r\nHost: api.example.com\r\n"),
        ("http://api.example.com:80/v1/x", "POST /v1/x HTTP/1.1\r\nHost: api.example.com\r\n"),
        ("https://api.example.com/v1", "POST /v1 HTTP/1.1\r\nHost: api.example.com\r\n"),
        ("https://api.example.com:8443", "POST / HTTP/1.1\r\nHost: api.example.com:8443\r\n"),
        ("http://api.example.com:443/", "POST / HTTP/1.1\r\nHost: api.example.com:443\r\n"),
        ("http://[::1]:8080/v1?a=1", "POST /v1?a=1 HTTP/1.1\r\nHost: [::1]:8080\r\n"),
        ("https://[2001:db8::1]/v1", "POST /v1 HTTP/1.1\r\nHost: [2001:db8::1]\r\n"),
        ("http://API.Example.com/a b", "POST /a%20b HTTP/1.1\r\nHost: api.example.com\r\n"),
        ("http://h.example/d/é?q=ü", "POST /d/%C3%A9?q=%C3%BC HTTP/1.1\r\nHost: h.example\r\n"),
        (
            "http://h.example/keep%2Fescapes?x=a%20b",
            "POST /keep%2Fescapes?x=a%20b HTTP/1.1\r\nHost: h.example\r\n",
        ),
    ],
)
def test_request_line_and_host_header(url: str, request_line: str) -> None:
    """Host carries the port only when it is not the scheme's; IPv6 literals are bracketed; the
    path is percent-encoded where it must be (a space would break the request line)."""
    target = h1client._Target(url)
    assert target.request_line + f"Host: {target.host_header}\r\n" == request_line


async def test_each_upstream_gets_its_own_host_header(raw: RawFactory, pool: H1Pool) -> None:
    """Two upstreams with the same path and headers: each request names its own host (the
    serialized header set is kept per target, not per path)."""
    first = await raw(lambda peer: peer.serve())
    second = await raw(lambda peer: peer.serve())
    for upstream in (first, second, first):
        await post(pool, upstream.url("/v1/chat/completions"), b"{}", {"x-same": "1"})
    hosts = [
        dict(headers_of(head))["host"]
        for upstream in (first, second)
        for head, _ in upstream.requests
    ]
    assert hosts == [f"127.0.0.1:{first.port}"] * 2 + [f"127.0.0.1:{second.port}"]


async def test_url_userinfo_is_basic_auth(raw: RawFactory, pool: H1Pool) -> None:
    """user:password in the URL is sent as Basic auth (as ClientSession does), unless the
    caller sets Authorization itself; it never appears in the request line."""
    upstream = await raw(lambda peer: peer.serve())
    url = upstream.url("/v1").replace("http://", "http://us%40er:p%3Ass@")
    await post(pool, url, b"{}", {})
    await post(pool, url, b"{}", {"Authorization": "Bearer sk-own"})
    (first, _), (second, _) = upstream.requests[:2]
    assert ("authorization", "Basic dXNAZXI6cDpzcw==") in headers_of(first)  # us@er:p:ss
    assert b"us%40er" not in first and b"p%3Ass" not in first
    assert [v for n, v in headers_of(second) if n == "authorization"] == ["Bearer sk-own"]


@pytest.mark.parametrize("url", ["ftp://h.example/", "h.example/v1", "http:///v1", "unix:/tmp/s"])
async def test_not_an_http_url(url: str, pool: H1Pool) -> None:
    with pytest.raises(ValueError):
        await pool.post(url, b"", {}, TIMEOUT)
    assert pool.open_connections == 0


async def test_ipv6_literal(pool: H1Pool) -> None:
    """An IPv6 upstream is reached, and named in Host with brackets."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer())
        await writer.drain()
        writer.close()

    try:
        server = await asyncio.start_server(handle, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = server.sockets[0].getsockname()[1]
    try:
        _, body = await post(pool, f"http://[::1]:{port}/v1", b"")
    finally:
        server.close()
        await server.wait_closed()
    assert body == OK
    assert ("host", f"[::1]:{port}") in headers_of(requests[0])


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Injected": "a\r\nEvil: 1"},
        {"X-Injected": "a\nEvil: 1"},
        {"X-Injected": "a\rb"},
        {"X-Bad\r\nEvil": "1"},
        {"X-Bad: Evil": "1"},
    ],
)
async def test_line_breaks_in_headers_are_refused(
    raw: RawFactory, pool: H1Pool, headers: dict[str, str]
) -> None:
    """A header that would split the request is a ValueError, and nothing is sent."""
    upstream = await raw(lambda peer: peer.serve())
    with pytest.raises(ValueError):
        await pool.post(upstream.url(), b"{}", headers, TIMEOUT)
    await asyncio.sleep(0.02)
    assert upstream.connections == 0
    assert pool.open_connections == 0


async def test_large_request_body_arrives_whole(aiohttp_server: Any, pool: H1Pool) -> None:
    """A body of several MiB (bigger than the socket takes at once) arrives intact."""
    seen = Seen()

    async def digest(request: web.Request) -> web.Response:
        data = await request.read()
        return web.json_response({"size": len(data), "sha": hashlib.sha256(data).hexdigest()})

    server = await app_server(aiohttp_server, seen, digest)
    body = bytes(range(256)) * (6 * 4096)  # 6 MiB
    for _ in range(2):
        response = await pool.post(str(server.make_url("/")), body, {}, TIMEOUT)
        reply = await response.read()
        assert reply == (
            b'{"size": %d, "sha": "%s"}' % (len(body), hashlib.sha256(body).hexdigest().encode())
        )
    assert seen.connections == 1


# -- answers -----------------------------------------------------------------------------------


async def test_chunked_answer(aiohttp_server: Any, transport: Transport) -> None:
    seen = Seen()

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b'{"a":', b'"' + b"x" * 70000 + b'"', b"}"):
            await response.write(piece)
        await response.write_eof()
        return response

    server = await app_server(aiohttp_server, seen, chunked)
    for _ in range(2):
        response, body = await post(transport, str(server.make_url("/")))
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.content_length is None
        assert response.content_type == "application/json"
        assert body == b'{"a":"' + b"x" * 70000 + b'"}'
    assert seen.connections == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_answer_is_decoded(raw: RawFactory, pool: H1Pool, encoding: str) -> None:
    """A gzip/deflate answer reads decoded; its length is not known ahead (the header counts
    the compressed bytes), and the connection is reused."""
    data = b'{"text":"' + b"hello " * 20000 + b'"}'
    packed = gzip.compress(data) if encoding == "gzip" else zlib.compress(data)
    upstream = await raw(lambda peer: peer.serve(answer(packed, f"Content-Encoding: {encoding}")))
    for _ in range(2):
        response, body = await post(pool, upstream.url())
        assert body == data
        assert response.headers["Content-Encoding"] == encoding
        assert response.content_length is None
    assert upstream.connections == 1


async def test_compressed_answer_from_aiohttp(aiohttp_server: Any, transport: Transport) -> None:
    """aiohttp's own gzip encoding (chunked, compressed on the fly) reads decoded."""
    seen = Seen()
    data = b"[" + b"1," * 50000 + b"1]"

    async def compressed(request: web.Request) -> web.Response:
        response = web.Response(body=data, content_type="application/json")
        response.enable_compression(web.ContentCoding.gzip)
        return response

    server = await app_server(aiohttp_server, seen, compressed)
    response, body = await post(transport, str(server.make_url("/")))
    assert response.headers["Content-Encoding"] == "gzip"
    assert body == data


@pytest.mark.parametrize("pause", [False, True], ids=["at-once", "in-pieces"])
async def test_answer_until_eof(raw: RawFactory, pool: H1Pool, pause: bool) -> None:
    """An answer with neither length nor chunks ends when the upstream closes: read in full,
    and its connection is not reused."""

    async def until_eof(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        for piece in (b'{"a":', b"1", b"}"):
            if pause:
                await asyncio.sleep(0.03)
            await peer.send(piece)
        peer.writer.close()

    upstream = await raw(until_eof)
    for _ in range(2):
        response, body = await post(pool, upstream.url())
        assert (response.status, body, response.content_length) == (200, b'{"a":1}', None)
        await eventually(lambda: pool.open_connections == 0)
    assert upstream.connections == 2
    assert pool.idle_connections == 0


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",  # 304 never has a body
    ],
    ids=["204", "length-0", "304"],
)
async def test_empty_answers(raw: RawFactory, pool: H1Pool, reply: bytes) -> None:
    """Bodiless answers read as b"" and free their connection at once."""
    upstream = await raw(lambda peer: peer.serve(reply))
    for _ in range(3):
        response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
        assert (pool.idle_connections, pool.busy_connections) == (1, 0)
        assert await response.read() == b""
        response.release()
    assert upstream.connections == 1


async def test_large_answer_read_slowly(aiohttp_server: Any, pool: H1Pool) -> None:
    """Several MiB read with pauses longer than sock_read: flow control holds the upstream back
    (not the whole body is buffered), the read timeout does not count our own pauses, no byte is
    lost, and the connection is reused afterwards."""
    seen = Seen()
    data = hashlib.sha256(b"seed").digest() * (6 * 2**20 // 32)  # 6 MiB

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="application/octet-stream")

    server = await app_server(aiohttp_server, seen, big)
    timeout = Timeouts(total=5, read=0.1)
    response = await pool.post(str(server.make_url("/")), b"", {}, timeout)
    assert response.content_length == len(data)
    received = []
    async for chunk in response.content.iter_any():
        received.append(chunk)
        if len(received) <= 2:
            await asyncio.sleep(0.25)  # longer than sock_read: our pause, not the upstream's
            assert response.content.total_bytes < len(data) // 2  # the socket was paused
    assert b"".join(received) == data
    assert pool.idle_connections == 1
    _, body = await post(pool, str(server.make_url("/")))
    assert body == data
    assert seen.connections == 1


async def test_sse_pieces_come_as_they_are_sent(aiohttp_server: Any, transport: Transport) -> None:
    """Each event reaches iter_any() before the upstream sends the next one."""
    seen = Seen()
    got = asyncio.Queue[bytes]()
    events = [b'data: {"n":%d}\n\n' % i for i in range(4)] + [b"data: [DONE]\n\n"]

    async def sse(request: web.Request) -> web.StreamResponse:
        if len(seen.peers) > 1:
            return web.json_response({})  # the call after the stream
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            # The client must have this event before the next is written.
            assert await asyncio.wait_for(got.get(), 1) == event
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    server = await app_server(aiohttp_server, seen, sse)
    response = await transport.post(str(server.make_url("/")), b"{}", {}, TIMEOUT)
    assert response.content_type == "text/event-stream"
    received = []
    async for chunk in response.content.iter_any():
        received.append(chunk)
        got.put_nowait(chunk)
    assert received == events
    response.release()
    await post(transport, str(server.make_url("/")), b"{}")
    assert seen.connections == 1


async def test_informational_answers_are_skipped(raw: RawFactory, transport: Transport) -> None:
    """A 100 Continue or 103 Early Hints before the answer is not the answer."""

    async def hints(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0.01)
            await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer(b"{}"))

    upstream = await raw(hints)
    for _ in range(2):
        response, body = await post(transport, upstream.url())
        assert (response.status, body) == (200, b"{}")
    assert upstream.connections == 1


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["101", "102", "200-upgrade"],
)
async def test_an_upgrade_breaks_the_connection(
    raw: RawFactory, pool: H1Pool, interim: bytes
) -> None:
    """A 101 (or any 1xx but 100/103, or any upgrade) means the connection no longer speaks
    HTTP to us: the call fails (a 502 for the client), the connection is closed, never pooled,
    and the next call is served on a new one."""

    async def upgrade_first(peer: Peer) -> None:
        if upstream.connections == 1:
            await peer.request()
            await peer.send(interim + b"raw upgraded bytes")
            await peer.until_closed()
        else:
            await peer.serve()

    upstream = await raw(upgrade_first)
    with pytest.raises(UpstreamProtocolError) as caught:
        await post(pool, upstream.url())
    await failed_and_hung_up(caught.value, 502, upstream, pool)
    await answered_afresh(pool, upstream)


async def test_error_status_read_whole(raw: RawFactory, pool: H1Pool) -> None:
    upstream = await raw(
        lambda peer: peer.serve(
            answer(b'{"error":{"message":"slow down"}}', "Retry-After: 3", status="429 Too Many")
        )
    )
    response, body = await post(pool, upstream.url())
    assert (response.status, response.headers["Retry-After"]) == (429, "3")
    assert body == b'{"error":{"message":"slow down"}}'
    assert pool.idle_connections == 1


# -- connections the upstream closes -----------------------------------------------------------


async def test_connection_close_from_upstream(aiohttp_server: Any, pool: H1Pool) -> None:
    """An answer with "Connection: close" is read in full, and its connection is not reused."""
    seen = Seen()

    async def closing(request: web.Request) -> web.Response:
        response = await echo(request)
        response.force_close()
        return response

    server = await app_server(aiohttp_server, seen, closing)
    for i in range(3):
        response, body = await post(pool, str(server.make_url("/")), b"[%d]" % i)
        assert response.headers["Connection"] == "close"
        assert body == b"[%d]" % i
        await eventually(lambda: pool.open_connections == 0)
    assert seen.connections == 3


async def test_http10_answer_is_not_kept(raw: RawFactory, pool: H1Pool) -> None:
    upstream = await raw(lambda peer: peer.serve(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
    for _ in range(2):
        _, body = await post(pool, upstream.url())
        assert body == b"{}"
    assert upstream.connections == 2


async def test_idle_connection_closed_by_upstream_is_not_reused(
    raw: RawFactory, pool: H1Pool
) -> None:
    """An upstream that closes an idle connection: the pool notices, the next call opens anew."""

    async def one_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer())
        await asyncio.sleep(0.01)

    upstream = await raw(one_then_close)
    await post(pool, upstream.url())
    await eventually(lambda: pool.open_connections == 0)
    await answered_afresh(pool, upstream)


async def test_a_request_the_upstream_read_is_never_resent(raw: RawFactory, pool: H1Pool) -> None:
    """An upstream that reads a request on a warm connection and hangs up at once may have acted
    on it: the caller gets the error (its retry policy decides), the upstream gets it once."""

    async def read_then_hang_up(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer())
        await peer.request()  # the second request on this connection: read, then hang up
        peer.writer.transport.abort()

    upstream = await raw(read_then_hang_up)
    await post(pool, upstream.url())
    with pytest.raises(aiohttp.ServerDisconnectedError) as caught:
        await post(pool, upstream.url())
    assert as_proxy_error(caught.value, None).status == 502
    assert len(upstream.requests) == 2 and upstream.connections == 1  # received once each


class ThreadUpstream:
    """A blocking TCP server on a thread of its own, so that it acts while the event loop is
    blocked: each connection answers one request, then closes (a FIN) while idle."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.receptions: list[int] = []  # requests received, per connection
        self.close_now = threading.Event()  # set by the test: close the idle connection
        self.closed = threading.Event()  # it did
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.listener:
            while True:
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    return
                self.close_now.clear()
                self.receptions.append(0)
                with sock:
                    data = b""
                    while b"\r\n\r\n{}" not in data:
                        data += sock.recv(65536)
                    self.receptions[-1] += 1
                    sock.sendall(answer())
                    self.close_now.wait(5)
                    sock.shutdown(socket.SHUT_WR)  # closes it while the pool keeps it idle
                    self.closed.set()
                    while sock.recv(65536):
                        self.receptions[-1] += 1  # anything more was sent to a dead connection

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def stop(self) -> None:
        self.listener.close()


async def test_a_pooled_connection_closed_while_idle_is_not_used(pool: H1Pool) -> None:
    """The upstream closed the idle connection and the event loop has not seen it yet (it was
    busy): the pool sees the FIN before writing, and the request goes to a new connection."""
    upstream = ThreadUpstream()
    try:
        await post(pool, upstream.url())
        assert pool.idle_connections == 1
        upstream.close_now.set()
        upstream.closed.wait(5)  # blocks the loop: the FIN waits in the socket, unseen by it
        time.sleep(0.05)  # noqa: ASYNC251 - blocks the loop on purpose: the FIN lands unseen
        _, body = await post(pool, upstream.url())
        assert body == OK
        assert upstream.receptions == [1, 1]  # nothing was written on the closed connection
    finally:
        upstream.stop()


async def test_a_pooled_connection_lost_late_is_not_resent(raw: RawFactory, pool: H1Pool) -> None:
    """An upstream that read the request and hung up later (a crash mid-generation) is not
    sent the POST again: the caller's error."""

    async def crash_on_the_second(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer())
        await peer.request()
        await asyncio.sleep(0.15)  # "generating", then the process dies
        peer.writer.transport.abort()

    upstream = await raw(crash_on_the_second)
    await post(pool, upstream.url())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(pool, upstream.url())
    assert len(upstream.requests) == 2 and upstream.connections == 1  # sent once, never again


@pytest.mark.parametrize("when", ["on-accept", "after-request", "after-partial-head"])
async def test_fresh_connection_closed_before_answer(
    raw: RawFactory, pool: H1Pool, when: str
) -> None:
    """An upstream that hangs up on a new connection before answering: ServerDisconnectedError,
    no retry (the upstream may have acted on the request)."""

    async def hang_up(peer: Peer) -> None:
        if when != "on-accept":
            await peer.request()
        if when == "after-partial-head":
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Len")
        peer.writer.close()

    upstream = await raw(hang_up)
    with pytest.raises(aiohttp.ServerDisconnectedError) as caught:
        await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    assert as_proxy_error(caught.value, None).status == 502
    assert upstream.connections == 1
    assert pool.open_connections == 0


@pytest.mark.parametrize("pause", [False, True], ids=["at-once", "in-pieces"])
@pytest.mark.parametrize(
    ("head", "part"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b'{"partial":'),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b'5\r\n{"a":\r\n'),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 500\r\n\r\n",
            gzip.compress(b"x" * 10000)[:40],
        ),
    ],
    ids=["length", "chunked", "gzip"],
)
async def test_truncated_answer(
    raw: RawFactory, pool: H1Pool, head: bytes, part: bytes, pause: bool
) -> None:
    """A body cut short by a hang-up is a ClientPayloadError when read, never a short success."""

    async def truncated(peer: Peer) -> None:
        await peer.request()
        if pause:
            await peer.send(head)
            await asyncio.sleep(0.03)
            await peer.send(part)
            await asyncio.sleep(0.03)
        else:
            await peer.send(head + part)
        peer.writer.close()

    upstream = await raw(truncated)
    response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError) as caught:
        await asyncio.wait_for(response.read(), 2)
    assert as_proxy_error(caught.value, None).status == 502
    await eventually(lambda: pool.open_connections == 0)


async def test_truncated_answer_while_iterating(raw: RawFactory, pool: H1Pool) -> None:
    """A stream cut short mid-way: the pieces before the cut, then ClientPayloadError."""

    async def cut(peer: Peer) -> None:
        await peer.request()
        await peer.send(SSE_HEAD)
        await peer.send(b'f\r\ndata: {"n":1}\n\n\r\n')
        await asyncio.sleep(0.03)
        peer.writer.transport.abort()

    upstream = await raw(cut)
    response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    received = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            received.append(chunk)
    assert b"".join(received) == b'data: {"n":1}\n\n'
    assert pool.open_connections == 0


# -- answers that are not HTTP -----------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS hello on a plain-HTTP port
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nbad header line\x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    ],
    ids=["ssh", "tls", "negative-length", "two-lengths", "nul", "huge-header"],
)
async def test_garbage_answer(raw: RawFactory, pool: H1Pool, garbage: bytes) -> None:
    """Bytes that are not an HTTP answer: UpstreamProtocolError, and the connection closed."""

    async def babble(peer: Peer) -> None:
        await peer.request()
        await peer.send(garbage)
        await peer.until_closed()

    upstream = await raw(babble)
    with pytest.raises(UpstreamProtocolError) as caught:
        await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    assert isinstance(caught.value, aiohttp.ClientError)
    await failed_and_hung_up(caught.value, 502, upstream, pool)


async def test_garbage_in_chunked_body(raw: RawFactory, pool: H1Pool) -> None:
    """A broken chunk: the body read fails as a payload error, and the connection is closed."""

    async def bad_chunk(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
        await asyncio.sleep(0.03)
        await peer.send(b"zz\r\nnonsense\r\n")
        await peer.until_closed()

    upstream = await raw(bad_chunk)
    response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 2)
    await hung_up(upstream, pool)


async def test_bytes_while_idle_close_the_connection(raw: RawFactory, pool: H1Pool) -> None:
    """Bytes an idle connection receives (nobody asked) make it untrustworthy: it is closed."""

    async def chatty(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer())
        await asyncio.sleep(0.02)
        await peer.send(answer(b"[unasked]"))
        await peer.until_closed()

    upstream = await raw(chatty)
    _, body = await post(pool, upstream.url())
    assert body == OK
    await hung_up(upstream, pool)
    await answered_afresh(pool, upstream)


async def test_extra_answer_after_the_body_is_not_kept(raw: RawFactory, pool: H1Pool) -> None:
    """A second answer right behind the first (nobody asked for it) is never taken as the
    answer to the next request."""

    async def doubled(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(answer(b"{}") + answer(b'{"smuggled":1}'))

    upstream = await raw(doubled)
    for _ in range(3):
        _, body = await post(pool, upstream.url())
        assert body == b"{}"
    assert upstream.connections == 3  # each one closed: out of step with its requests


# -- timeouts ----------------------------------------------------------------------------------


async def test_no_answer_within_sock_read(raw: RawFactory, pool: H1Pool) -> None:
    upstream = await raw(silent)
    started = time.monotonic()
    with pytest.raises(aiohttp.ServerTimeoutError) as caught:
        await asyncio.wait_for(pool.post(upstream.url(), b"{}", {}, Timeouts(read=0.1)), 2)
    assert time.monotonic() - started > 0.09  # read's bound; wait_for's 2 s is a safety net
    await failed_and_hung_up(caught.value, 504, upstream, pool)


async def test_body_stalls_past_sock_read(raw: RawFactory, pool: H1Pool) -> None:
    """A body that stops coming is a timeout (504), even when the caller reads it late."""

    async def stall(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await peer.until_closed()

    upstream = await raw(stall)
    response = await pool.post(upstream.url(), b"{}", {}, Timeouts(read=0.1))
    await asyncio.sleep(0.3)  # the timeout passes while nobody reads
    with pytest.raises(aiohttp.ServerTimeoutError):
        await asyncio.wait_for(response.read(), 2)
    await hung_up(upstream, pool)


async def test_a_long_first_wait_then_the_shorter_bound_between_events(
    raw: RawFactory, pool: H1Pool
) -> None:
    """With ``first_byte`` longer than ``read``: silence before the body begins may last
    ``first_byte`` (a model thinking), silence once it has begun only ``read``."""
    first_sent = asyncio.Event()

    async def think_then_stall(peer: Peer) -> None:
        await peer.request()
        await peer.send(SSE_HEAD)
        await asyncio.sleep(0.4)  # thinking: longer than `event`
        await peer.send(b"9\r\ndata: 1\n\n\r\n")
        first_sent.set()
        await peer.until_closed()  # then silence, mid-stream

    upstream = await raw(think_then_stall)
    timeout = Timeouts(connect=5, first_byte=60, read=0.1)
    response = await pool.post(upstream.url(), b"{}", {}, timeout)
    assert await asyncio.wait_for(response.content.readany(), 10) == b"data: 1\n\n"
    assert first_sent.is_set()
    with pytest.raises(aiohttp.ServerTimeoutError):  # long before first_byte's 60 s
        await asyncio.wait_for(response.content.readany(), 10)


async def test_steady_stream_outlives_sock_read(aiohttp_server: Any, pool: H1Pool) -> None:
    """sock_read bounds the gaps, not the stream: events every 30 ms for 0.4 s go through."""
    seen = Seen()

    async def steady(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(12):
            await response.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0.03)
        await response.write_eof()
        return response

    server = await app_server(aiohttp_server, seen, steady)
    response = await pool.post(str(server.make_url("/")), b"{}", {}, Timeouts(read=0.15))
    body = await response.read()
    assert body == b"".join(b"data: %d\n\n" % i for i in range(12))
    assert pool.idle_connections == 1


async def test_total_bounds_a_steady_stream(aiohttp_server: Any, pool: H1Pool) -> None:
    seen = Seen()
    gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: {}\n\n")
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise

    server = await app_server(aiohttp_server, seen, endless)
    started = time.monotonic()
    response = await pool.post(str(server.make_url("/")), b"{}", {}, Timeouts(total=0.3, read=0.1))
    received = 0

    async def consume() -> None:
        nonlocal received
        async for chunk in response.content.iter_any():
            received += len(chunk)

    with pytest.raises(aiohttp.ServerTimeoutError):
        await asyncio.wait_for(consume(), 3)
    assert time.monotonic() - started > 0.28  # total's bound, not read's: data kept coming
    assert received > 0
    await asyncio.wait_for(gone.wait(), 2)
    assert pool.open_connections == 0


async def test_total_bounds_the_wait_for_headers(raw: RawFactory, pool: H1Pool) -> None:
    upstream = await raw(silent)
    started = time.monotonic()
    with pytest.raises(aiohttp.ServerTimeoutError):
        await asyncio.wait_for(pool.post(upstream.url(), b"{}", {}, Timeouts(total=0.15)), 2)
    # ServerTimeoutError: total's (no other bound is set); wait_for's 2 s raises a plain one.
    assert time.monotonic() - started > 0.14


async def test_connect_refused(pool: H1Pool) -> None:
    port = closed_port()
    with pytest.raises(UpstreamConnectError) as caught:
        await pool.post(f"http://127.0.0.1:{port}/v1", b"{}", {}, TIMEOUT)
    assert isinstance(caught.value, aiohttp.ClientConnectionError)
    assert str(port) in str(caught.value)
    assert as_proxy_error(caught.value, None).status == 502
    assert pool.open_connections == 0


async def test_unresolvable_host(pool: H1Pool) -> None:
    with pytest.raises(UpstreamConnectError):
        await pool.post("http://no-such-host.invalid/v1", b"{}", {}, TIMEOUT)
    assert pool.open_connections == 0


async def test_connect_timeout_covers_the_wait_for_a_free_connection(raw: RawFactory) -> None:
    """At the cap, a call waits for a connection at most the connect timeout."""
    held = asyncio.Event()

    async def slow(peer: Peer) -> None:
        await peer.request()
        held.set()
        await peer.until_closed()

    upstream = await raw(slow)
    pool = H1Pool(asyncio.get_running_loop(), limit=1)
    try:
        first = asyncio.create_task(pool.post(upstream.url(), b"", {}, TIMEOUT))
        await asyncio.wait_for(held.wait(), 2)
        started = time.monotonic()
        with pytest.raises(aiohttp.ServerTimeoutError) as caught:
            await asyncio.wait_for(pool.post(upstream.url(), b"", {}, Timeouts(connect=0.1)), 2)
        assert time.monotonic() - started > 0.09  # connect's bound (wait_for's is a safety net)
        assert as_proxy_error(caught.value, None).status == 504
        assert upstream.connections == 1
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await pool.close()


# -- cancellation and release ------------------------------------------------------------------


async def test_cancelled_while_awaiting_answer(raw: RawFactory, pool: H1Pool) -> None:
    """A call cancelled before the answer hangs up on the upstream, and pools nothing."""
    arrived = asyncio.Event()

    async def slow(peer: Peer) -> None:
        if await peer.request() is None:
            return
        arrived.set()
        await peer.until_closed()

    upstream = await raw(slow)
    call = asyncio.create_task(pool.post(upstream.url(), b"{}", {}, TIMEOUT))
    await asyncio.wait_for(arrived.wait(), 2)
    await cancelled(call)
    await hung_up(upstream, pool)


async def test_cancelled_while_reading(raw: RawFactory, pool: H1Pool) -> None:
    """A read() cancelled mid-body closes its connection; it never goes back to the pool."""
    streaming = asyncio.Event()

    async def slow_body(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")
        streaming.set()
        await peer.until_closed()

    upstream = await raw(slow_body)
    response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    reading = asyncio.create_task(response.read())
    await asyncio.wait_for(streaming.wait(), 2)
    await asyncio.sleep(0.02)
    await cancelled(reading)
    await hung_up(upstream, pool)


async def test_cancelled_relay_closes_its_response(raw: RawFactory, pool: H1Pool) -> None:
    """A stream relay cancelled mid-way (the client went away) that closes its response, as
    upstream.forward does, hangs up on the upstream."""
    streaming = asyncio.Event()

    async def sse(peer: Peer) -> None:
        await peer.request()
        await peer.send(SSE_HEAD + b"9\r\ndata: 1\n\n\r\n")
        streaming.set()
        await peer.until_closed()

    upstream = await raw(sse)
    response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)

    async def relay() -> None:
        try:
            async for _ in response.content.iter_any():
                pass
        except BaseException:
            response.close()
            raise

    task = asyncio.create_task(relay())
    await asyncio.wait_for(streaming.wait(), 2)
    await asyncio.sleep(0.02)
    await cancelled(task)
    await hung_up(upstream, pool)


async def test_release_before_the_body_closes(raw: RawFactory, pool: H1Pool) -> None:
    async def partial(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")
        peer.server.hangups += 1

    upstream = await raw(partial)
    response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    assert pool.busy_connections == 1
    response.release()
    response.release()  # twice is harmless
    await hung_up(upstream, pool)
    response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    response.close()
    assert upstream.connections == 2


async def test_release_after_the_body_reuses(raw: RawFactory, pool: H1Pool) -> None:
    upstream = await raw(lambda peer: peer.serve())
    for _ in range(3):
        response = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
        assert await response.read() == OK
        response.release()
        response.close()  # after the body, close() is release() too: nothing to hang up
        assert (pool.open_connections, pool.idle_connections) == (1, 1)
    assert upstream.connections == 1


async def test_released_connection_is_not_touched_by_the_old_response(
    raw: RawFactory, pool: H1Pool
) -> None:
    """A response released after its connection went on to another call does not close it."""
    upstream = await raw(lambda peer: peer.serve())
    first = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    assert await first.read() == OK
    second = await pool.post(upstream.url(), b"{}", {}, TIMEOUT)
    first.close()
    assert await second.read() == OK
    assert upstream.connections == 1


# -- the connection cap ------------------------------------------------------------------------


async def test_limit_caps_open_connections(raw: RawFactory) -> None:
    async def slow(peer: Peer) -> None:
        while await peer.request() is not None:
            await asyncio.sleep(0.03)
            await peer.send(answer())

    upstream = await raw(slow)
    pool = H1Pool(asyncio.get_running_loop(), limit=2)
    most = 0

    async def call(i: int) -> bytes:
        nonlocal most
        response = await pool.post(upstream.url(), b"[%d]" % i, {}, TIMEOUT)
        most = max(most, pool.open_connections)
        return await response.read()

    try:
        bodies = await asyncio.gather(*(call(i) for i in range(5)))
    finally:
        await pool.close()
    assert bodies == [OK] * 5
    assert len(upstream.requests) == 5
    assert upstream.max_open == 2
    assert most == 2


async def test_limit_evicts_an_idle_connection_for_another_host(raw: RawFactory) -> None:
    """At the cap with only idle connections (to other hosts), a new host still gets through."""
    first = await raw(lambda peer: peer.serve())
    second = await raw(lambda peer: peer.serve())
    pool = H1Pool(asyncio.get_running_loop(), limit=1)
    try:
        await post(pool, first.url())
        assert pool.idle_connections == 1
        _, body = await asyncio.wait_for(post(pool, second.url()), 2)
        assert body == OK
        await eventually(lambda: first.hangups == 1)
        assert (pool.open_connections, pool.idle_connections) == (1, 1)
    finally:
        await pool.close()


async def test_cancelled_waiter_passes_its_turn_on(raw: RawFactory) -> None:
    """A call cancelled just as a connection freed up for it hands the turn to the next one."""
    upstream = await raw(
        lambda peer: peer.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")
    )  # answers that never end
    pool = H1Pool(asyncio.get_running_loop(), limit=1)
    try:
        holder = await pool.post(upstream.url(), b"", {}, TIMEOUT)
        second = asyncio.create_task(pool.post(upstream.url(), b"", {}, TIMEOUT))
        third = asyncio.create_task(pool.post(upstream.url(), b"", {}, TIMEOUT))
        await asyncio.sleep(0.02)
        assert not second.done() and not third.done()
        holder.release()  # frees the one slot: `second` is woken...
        second.cancel()  # ...but is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await second
        response = await asyncio.wait_for(third, 2)
        assert response.status == 200
        response.close()
    finally:
        await pool.close()


# -- closing the pool --------------------------------------------------------------------------


async def test_close_hangs_up_everything(raw: RawFactory) -> None:
    upstream = await raw(lambda peer: peer.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{"))
    idle_upstream = await raw(lambda peer: peer.serve())
    pool = H1Pool(asyncio.get_running_loop())
    await asyncio.gather(post(pool, idle_upstream.url()), post(pool, idle_upstream.url()))
    busy = await pool.post(upstream.url(), b"", {}, TIMEOUT)
    assert (pool.open_connections, pool.idle_connections) == (3, 2)
    await pool.close()
    assert (pool.open_connections, pool.idle_connections) == (0, 0)
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(busy.read(), 2)
    await eventually(lambda: upstream.hangups + idle_upstream.hangups == 3)
    with pytest.raises(RuntimeError):
        await pool.post(idle_upstream.url(), b"", {}, TIMEOUT)
    assert idle_upstream.connections == 2


async def test_close_fails_calls_waiting_for_a_connection(raw: RawFactory) -> None:
    """Calls queued at the cap fail when the pool closes, and open nothing."""
    upstream = await raw(lambda peer: peer.serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{"))
    pool = H1Pool(asyncio.get_running_loop(), limit=1)
    holder = await pool.post(upstream.url(), b"", {}, TIMEOUT)
    waiting = [asyncio.create_task(pool.post(upstream.url(), b"", {}, TIMEOUT)) for _ in range(2)]
    await asyncio.sleep(0.02)
    await pool.close()
    for task in waiting:
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(task, 1)
    holder.close()
    await asyncio.sleep(0.02)
    assert upstream.connections == 1
    assert pool.open_connections == 0


async def test_close_during_connect(raw: RawFactory) -> None:
    """A connection still being opened when the pool closes is closed, not handed out."""
    upstream = await raw(lambda peer: peer.serve())
    pool = H1Pool(asyncio.get_running_loop())
    call = asyncio.create_task(pool.post(upstream.url(), b"", {}, TIMEOUT))
    await asyncio.sleep(0)  # the connect has started
    await pool.close()
    with pytest.raises((RuntimeError, aiohttp.ClientError)):
        await asyncio.wait_for(call, 1)
    await eventually(lambda: upstream.open == 0)
    assert upstream.requests == []
    assert pool.open_connections == 0


# -- keep-alive expiry -------------------------------------------------------------------------


async def test_idle_connections_expire(
    raw: RawFactory, pool: H1Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections idle past the keep-alive time are closed (the upstream would close them)."""
    monkeypatch.setattr(h1client, "_KEEPALIVE", 0.1)
    upstream = await raw(lambda peer: peer.serve())
    await post(pool, upstream.url())
    await post(pool, upstream.url())
    assert (pool.idle_connections, upstream.connections) == (1, 1)
    await eventually(lambda: upstream.hangups == 1, within=1)
    assert pool.open_connections == 0
    await post(pool, upstream.url())
    assert upstream.connections == 2


async def test_expired_connection_is_not_taken(
    raw: RawFactory, pool: H1Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One past its time is not reused even before the sweep gets to it."""
    upstream = await raw(lambda peer: peer.serve())
    await post(pool, upstream.url())
    monkeypatch.setattr(h1client, "_KEEPALIVE", 0.05)
    await asyncio.sleep(0.06)
    await post(pool, upstream.url())
    assert upstream.connections == 2
    await eventually(lambda: upstream.hangups == 1)
