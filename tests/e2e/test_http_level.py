"""What run.py does below the API: slow or malformed HTTP, answered and survived."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support import running

# Subprocesses, signals or load: one xdist worker, not starved by parallel hypothesis tests.
pytestmark = pytest.mark.xdist_group("wallclock")


async def test_slow_headers_are_cut_off(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[server]\nheader_timeout = 0.5\n[[models]]\nname = "echo"\nprovider = "echo"\n',
        encoding="utf-8",
    )
    async with running("--config", str(config)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed_after = None
        for _ in range(100):  # one header line every 0.1 s for 10 s, never finishing
            await asyncio.sleep(0.1)
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
            if reader.at_eof() or (await _peek_closed(reader)):
                closed_after = time.monotonic() - started
                break
        writer.close()
        # Cut off while still sending: by header_timeout (0.5 s), not by the end of its headers.
        assert closed_after is not None, "the slow client was never cut off"
        async with aiohttp.ClientSession() as http:  # and the proxy still serves
            async with http.get(f"http://127.0.0.1:{port}/health") as response:
                assert response.status == 200


async def _peek_closed(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), 0.01)
    except TimeoutError:
        return False
    return data == b""


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, object]]:
    """Send raw bytes; the status and JSON body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, head
    return status, json.loads(body)


async def test_malformed_http_gets_openai_errors_and_no_key_is_echoed(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[models]]\nname = "echo"\nprovider = "echo"\n', encoding="utf-8")
    async with running("--config", str(config)) as (port, _):
        cases = [
            b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer sk-secret\x01key\r\n\r\n",
            b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
            b"NOT-HTTP at all\r\n\r\n",
        ]
        for request in cases:
            status, body = await raw_exchange(port, request)
            assert 400 <= status < 500
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
            assert "sk-secret" not in json.dumps(body)
        async with aiohttp.ClientSession() as http:  # and the proxy still serves
            async with http.get(f"http://127.0.0.1:{port}/health") as response:
                assert response.status == 200
