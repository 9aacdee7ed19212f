#!/usr/bin/env python3
"""How long the dashboard's pages take to render with a large request log (issue 17: under
200 ms with 100,000 rows). Fills a throwaway SQLite database (or ``--database-url``) with rows
spread over 30 days, signs in, and times each page: ``python bench/ui_pages.py [--rows N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aioproxy import create_app
from aioproxy.control.plane import plane_key
from aioproxy.control.requestlog import LogRecord
from aioproxy.ui.dashboard import _warm, _warming_key
from aioproxy.ui.pages import points_key
from tests.ui.support import sign_in

MASTER = "sk-bench-master-key-0123456789"
PAGES = (
    "/ui?range=1h",
    "/ui?range=24h",
    "/ui?range=30d",
    "/ui/models",
    "/ui/keys",
    "/ui/spend?group_by=day",
    "/ui/spend?group_by=key",
    "/ui/spend?group_by=model",
    "/ui/spend.csv?group_by=team",
    "/ui/requests",
    "/ui/requests?model=m3",
    "/ui/requests?status=500",
    "/ui/requests?key=key_7",
    "/ui/requests/req_50000",
)


def fake_rows(count: int, now: float) -> list[dict[str, object]]:
    rng = random.Random(17)
    rows = []
    for i in range(count):
        when = now - rng.random() * 30 * 86400
        status = 200 if rng.random() > 0.03 else rng.choice((429, 500, 502))
        duration = rng.lognormvariate(-0.5, 0.8)
        rows.append(
            {
                "request_id": f"req_{i}",
                "time": when,
                "day": time.strftime("%Y-%m-%d", time.gmtime(when)),
                "key_id": f"key_{i % 50}",
                "key_name": f"key {i % 50}",
                "team_id": f"team_{i % 5}",
                "end_user": None,
                "model": f"m{i % 8}",
                "deployment": f"m{i % 8}#0",
                "provider": "echo",
                "kind": "chat_completions",
                "status": status,
                "error_code": None if status == 200 else "upstream_error",
                "stream": i % 2 == 0,
                "input_tokens": rng.randint(10, 2000),
                "output_tokens": rng.randint(1, 800),
                "cached_tokens": 0,
                "reasoning_tokens": 0,
                "estimated": False,
                "cost": rng.random() / 100,
                "ttft": duration / 3,
                "duration": duration,
            }
        )
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = args.database_url or f"sqlite:///{folder}/bench.sqlite3"
        config = {
            "auth": {"master_key": MASTER},
            "models": [{"name": f"m{i}", "provider": "echo"} for i in range(8)],
            "ui": {"enabled": True},
            "database": {"url": url},
        }
        client = TestClient(TestServer(create_app(config, load_entrypoints=True)))
        await client.start_server()
        try:
            plane = client.app[plane_key]
            rows = fake_rows(args.rows, plane.clock.time())
            # Through the log's writer, as served requests are: it keeps the spend roll-up too.
            for i, row in enumerate(rows, 1):
                plane.log.add(LogRecord.of(row))
                if i % 10_000 == 0:  # within the log's buffer
                    await plane.log.flush()
            await plane.log.flush()
            await sign_in(client, MASTER)
            await client.app[_warming_key]
            # The rows were written after the start-up read-ahead: as if started with them.
            client.app[points_key].points.clear()
            started = time.perf_counter()
            await _warm(client.app)
            ahead = (time.perf_counter() - started) * 1000
            print(f"{args.rows} request log rows; the start-up read-ahead took {ahead:.0f} ms")
            print("page: first view, then the median and worst of the others")
            for path in PAGES:
                timings = []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    response = await client.get(path)
                    await response.read()
                    timings.append((time.perf_counter() - started) * 1000)
                    assert response.status == 200, (path, response.status)
                first, rest = timings[0], timings[1:]
                print(
                    f"  {path:32} {first:7.1f} ms  {statistics.median(rest):7.1f} ms"
                    f"  {max(rest):7.1f} ms"
                )
        finally:
            await client.close()


if __name__ == "__main__":
    asyncio.run(main())
