"""What run.py does below the API: slow or malformed HTTP, answered and survived."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import running, start_run_py, wait_healthy

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


MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer sk-secret\x01key\r\n\r\n",
    b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    b"NOT-HTTP at all\r\n\r\n",
]


async def _raw_answer(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes; the head and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def _header(head: bytes, name: str) -> str:
    for line in head.decode().split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    raise AssertionError(f"no {name} in {head!r}")


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, object]]:
    """Send raw bytes; the status and JSON body of the answer."""
    head, body = await _raw_answer(port, request)
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, head
    return status, json.loads(body)


async def test_malformed_http_gets_openai_errors_and_no_key_is_echoed(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[models]]\nname = "echo"\nprovider = "echo"\n', encoding="utf-8")
    async with running("--config", str(config)) as (port, _):
        for request in MALFORMED:
            status, body = await raw_exchange(port, request)
            assert 400 <= status < 500
            error = body["error"]
            assert set(error) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
            assert "sk-secret" not in json.dumps(body)
        async with aiohttp.ClientSession() as http:  # and the proxy still serves
            async with http.get(f"http://127.0.0.1:{port}/health") as response:
                assert response.status == 200


async def test_malformed_http_is_logged_and_counted(tmp_path: Path) -> None:
    """A request aiohttp cannot parse never reaches the app: its access line and its count come
    from run.py's server, with the id its answer carried and no byte of what it sent."""
    config = tmp_path / "c.toml"
    config.write_text(
        "[logging]\naccess_log = true\n\n[metrics]\nenabled = true\npublic = true\n\n"
        '[[models]]\nname = "echo"\nprovider = "echo"\n',
        encoding="utf-8",
    )
    process, port, _ = await start_run_py(
        "--config", str(config), "--log-format", "json", stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_healthy(port)
        ids = []
        for request in MALFORMED:
            head, body = await _raw_answer(port, request)
            assert json.loads(body)["error"]["code"] == "malformed_request"
            ids.append(_header(head, "x-request-id"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
    finally:
        process.terminate()
        _, err = await process.communicate()
    counted = {
        (sample.labels["kind"], sample.labels["model"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "aioproxy_requests_total"
    }
    assert counted[("other", "none", "400")] == len(MALFORMED)
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    access = [line for line in lines if "request_id" in line]
    unparsed = [line for line in access if line["error"] == "malformed_request"]
    assert [line["request_id"] for line in unparsed] == ids
    for line in unparsed:
        assert line["status"] == 400 and line["kind"] == "other"
        assert line["method"] is None and line["path"] is None and line["client"] == "127.0.0.1"
    assert "sk-secret" not in err.decode()
