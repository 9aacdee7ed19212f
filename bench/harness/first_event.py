"""Time to first event, and whether events are coalesced or held back on the way.

Issue #5: "a stream's first event reaches the client within 1 ms of leaving the upstream; events
are never coalesced or held back".  nginx sends payloads.GAPPED (10 SSE events, each flushed on
its own, GAP_MS apart) to a small asyncio client that times the send and every socket read
(one ``data_received`` per read) and splits the reads into events.  Direct (the client on nginx)
is when events leave the upstream, plus the client's own constant cost; a proxy's figures
minus direct's are what its hop adds.  The gap is wide so that two events in one read can only
mean that the first was held back, not that they happened to arrive together.
"""

from __future__ import annotations

import asyncio
import math
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import procs
from .payloads import GAPPED, GAPPED_EVENTS, Kind
from .procs import Cores
from .report import FirstEventRow
from .servers import Target

EVENTS = GAPPED_EVENTS + 1  # with `data: [DONE]`
BLOCK = 25  # requests to one target before the next one's turn: drift hits all of them alike
WARMUP = 2  # unmeasured requests at the start of each block (caches after nginx moved cores)
TIMEOUT_S = 10.0


class AnswerError(RuntimeError):
    """A target answered the stream wrongly: its timings would be worthless."""


class _Response:
    """One HTTP/1.1 response, fed read by read: the head once, then the body (de-chunked, or
    by Content-Length).  ``feed`` returns the body bytes that read carried."""

    def __init__(self) -> None:
        self.buf = b""
        self.status = 0
        self.ctype = ""
        self.chunked = False
        self.head_done = False
        self.left = 0  # body bytes still due: of the current chunk, or of Content-Length
        self.trail = 0  # bytes of the CRLF after a chunk still to skip
        self.last = False  # the 0-size chunk came
        self.complete = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return b""
            self._head(self.buf[:end].decode("latin-1"))
            self.buf = self.buf[end + 4 :]
        return self._chunks() if self.chunked else self._plain()

    def _head(self, text: str) -> None:
        status_line, *lines = text.split("\r\n")
        self.status = int(status_line.split()[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.ctype = headers.get("content-type", "")
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not self.chunked and "content-length" not in headers:
            raise AnswerError(f"neither chunked nor Content-Length (no keep-alive): {text!r}")
        self.left = 0 if self.chunked else int(headers["content-length"])
        self.head_done = True
        self.complete = not self.chunked and self.left == 0

    def _plain(self) -> bytes:
        body, self.buf = self.buf[: self.left], self.buf[self.left :]
        self.left -= len(body)
        self.complete = self.left == 0
        return body

    def _chunks(self) -> bytes:
        out = []
        while not self.complete:
            if self.left:  # inside a chunk's data
                piece = self.buf[: self.left]
                self.buf = self.buf[len(piece) :]
                self.left -= len(piece)
                out.append(piece)
                if self.left:
                    break
                self.trail = 2
            if self.trail:  # the CRLF after a chunk, or the one closing the 0-size chunk
                skipped = min(self.trail, len(self.buf))
                self.buf, self.trail = self.buf[skipped:], self.trail - skipped
                if self.trail:
                    break
                self.complete = self.last
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            size = int(self.buf[:end].split(b";")[0], 16)
            self.buf = self.buf[end + 2 :]
            self.left, self.last = size, size == 0
            self.trail = 2 if self.last else 0  # no trailers expected
        return b"".join(out)


@dataclass
class Exchange:
    """One request: when it was sent, and each read (its time and the body bytes it carried)."""

    sent: float
    response: _Response
    reads: list[tuple[float, bytes]]


class _Client(asyncio.Protocol):
    """One keep-alive connection; the clock is read first thing in each ``data_received``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.done: asyncio.Future[None] | None = None
        self.lost = False
        self.stray = 0  # bytes that came outside a response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.exchange is None or self.done is None or self.done.done():
            self.stray += len(data)  # the next send() raises: framing went wrong somewhere
            return
        try:
            self.exchange.reads.append((now, self.exchange.response.feed(data)))
        except (AnswerError, ValueError, IndexError) as exc:
            self.done.set_exception(AnswerError(f"unparseable response: {exc}"))
            return
        if self.exchange.response.complete:
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection closed mid-response ({exc})"))

    async def send(self, request: bytes) -> Exchange:
        assert self.transport is not None
        if self.stray:
            raise AnswerError(f"{self.stray} bytes came after a complete response")
        self.done = asyncio.get_running_loop().create_future()
        self.exchange = Exchange(time.perf_counter(), _Response(), [])
        self.transport.write(request)  # written at once: the socket buffer is empty
        await asyncio.wait_for(self.done, TIMEOUT_S)
        return self.exchange


def request_bytes(target: Target, kind: Kind) -> bytes:
    """What wrk sends: POST, Host, the target's headers, Content-Length, the body."""
    lines = [
        f"POST {target.path(kind)} HTTP/1.1",
        f"Host: 127.0.0.1:{target.port}",
        *(f"{name}: {value}" for name, value in target.headers().items()),
        f"Content-Length: {len(kind.body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + kind.body


@dataclass(frozen=True)
class Sample:
    """One streamed response: each event's arrival, in seconds after the send, and the reads."""

    arrivals: tuple[float, ...]
    reads: int
    event_reads: int  # reads that completed at least one event
    coalesced: int  # reads that completed more than one


def _events(reads: list[tuple[float, bytes]]) -> list[tuple[float, int, bytes]]:
    """Each complete (`\\n\\n`-terminated) SSE event: when, and in which read, it completed."""
    buf, events = b"", []
    for index, (at, body) in enumerate(reads):
        *complete, buf = (buf + body).split(b"\n\n")
        events += [(at, index, event) for event in complete]
    return events


def _sample(name: str, exchange: Exchange) -> Sample:
    response = exchange.response
    # Comments (`: keepalive`) are not events of the stream; only `data:` events count.
    events = [e for e in _events(exchange.reads) if e[2].startswith(b"data:")]
    problem = None
    if response.status != 200:
        problem = f"status {response.status}"
    elif not response.ctype.startswith("text/event-stream"):
        problem = f"content-type {response.ctype!r}"
    elif response.buf:
        problem = f"{len(response.buf)} bytes after the end of the response"
    elif len(events) != EVENTS or events[-1][2].strip() != b"data: [DONE]":
        problem = f"{len(events)} data events, expected {EVENTS} ending in `data: [DONE]`"
    if problem:
        body = b"".join(body for _, body in exchange.reads)
        raise AnswerError(f"{name} answered the gapped stream wrongly ({problem}): {body[:300]!r}")
    per_read = [0] * len(exchange.reads)
    for _, index, _ in events:
        per_read[index] += 1
    return Sample(
        arrivals=tuple(at - exchange.sent for at, _, _ in events),
        reads=len(exchange.reads),
        event_reads=sum(1 for n in per_read if n),
        coalesced=sum(1 for n in per_read if n > 1),
    )


def _pct(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def summarize(name: str, samples: list[Sample]) -> FirstEventRow:
    first = [s.arrivals[0] * 1000 for s in samples]
    gaps = [(b - a) * 1000 for s in samples for a, b in zip(s.arrivals, s.arrivals[1:])]
    return FirstEventRow(
        target=name,
        requests=len(samples),
        ttfe_p50_ms=statistics.median(first),
        ttfe_p99_ms=_pct(first, 99),
        gap_p50_ms=statistics.median(gaps),
        gap_p99_ms=_pct(gaps, 99),
        events_p50_ms=tuple(
            statistics.median(s.arrivals[i] * 1000 for s in samples) for i in range(EVENTS)
        ),
        reads=sum(s.reads for s in samples),
        event_reads=sum(s.event_reads for s in samples),
        coalesced=sum(s.coalesced for s in samples),
    )


async def _connect(target: Target) -> _Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_Client, "127.0.0.1", target.port)
    return client  # asyncio sets TCP_NODELAY on TCP sockets


async def _collect(
    targets: dict[str, Target], upstream: Target, requests: int, cores: Cores
) -> dict[str, list[Sample]]:
    """Blocks of BLOCK requests per target in turn, over one connection each (reopened only
    if a target closed it); nginx is pinned as in the matrix."""
    clients = {name: await _connect(t) for name, t in targets.items()}
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    try:
        for block in range(math.ceil(requests / BLOCK)):
            count = min(BLOCK, requests - block * BLOCK)
            for name, target in targets.items():
                procs.pin(upstream.pid, cores.sut if target.direct else cores.load)
                request = request_bytes(target, GAPPED)
                for i in range(WARMUP + count):
                    if clients[name].lost:
                        clients[name] = await _connect(target)
                    exchange = await clients[name].send(request)
                    if i >= WARMUP:
                        samples[name].append(_sample(name, exchange))
                target.proc.check_alive()
    finally:
        for client in clients.values():
            if client.transport is not None:
                client.transport.close()
    return samples


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    targets: dict[str, Target], upstream: Target, requests: int, cores: Cores
) -> tuple[list[FirstEventRow], float]:
    """A row per target (named by its key, in order), and the CPU other processes used
    meanwhile, in % of one core.  The client runs on the load core, like wrk."""
    tree = [upstream, *(t for t in targets.values() if t is not upstream)]
    wall, busy = time.perf_counter(), procs.system_busy_seconds()
    ours = sum(procs.cpu_seconds(t.pid) for t in tree) + _own_cpu()
    with procs.pinned_here(cores.load):
        samples = asyncio.run(_collect(targets, upstream, requests, cores))
    ours = sum(procs.cpu_seconds(t.pid) for t in tree) + _own_cpu() - ours
    wall, busy = time.perf_counter() - wall, procs.system_busy_seconds() - busy
    other_pct = max(0.0, (busy - ours) / wall * 100)
    return [summarize(name, s) for name, s in samples.items()], other_pct
