"""Stopping the control plane while a database call is still running: no call may outlive the
app's event loop (aiosqlite's worker thread would post its result to a closed loop, and raise
"Event loop is closed" in the thread, reported at some later test)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioproxy_echo
import aioproxy_openai
import pytest
import sqlalchemy as sa
from aiohttp import web

from aioproxy import create_app
from aioproxy.control.plane import plane_key
from tests.support import gateway_config

# Never reached: the app makes no upstream call here.
_NO_UPSTREAM = "http://127.0.0.1:9/v1"


class _Hold:
    """Holds the first SQLite statement (or connect) run once armed, in its connection's
    worker thread, until released: a database call in flight for as long as the test says."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.entered = asyncio.Event()  # the held call is running (set on the loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._permit = threading.Semaphore(0)  # one once armed: the first call takes it
        self.events: list[str] = []  # in order: the held call's end, the loop's observations

    def arm(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._permit.release()

    def here(self, ended: str) -> None:
        """In the worker thread: held if armed, then ``ended`` noted."""
        if self._loop is None or not self._permit.acquire(blocking=False):
            return
        self._loop.call_soon_threadsafe(self.entered.set)
        self.released.wait()
        self.events.append(ended)

    def on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        # The worker thread is idle during the connect event; the sqlite3 connection is
        # opened with check_same_thread=False.
        dbapi_connection.driver_connection._conn.set_trace_callback(
            lambda _sql: self.here("returned")
        )


class _ReleaseWhenWaited(logging.Handler):
    """Releases the held statement once the control plane says it waits for calls in flight."""

    def __init__(self, hold: _Hold) -> None:
        super().__init__()
        self.hold = hold

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("control plane: waiting for"):
            self.hold.released.set()


@pytest.fixture
def hold() -> Iterator[_Hold]:
    hold = _Hold()
    sa.event.listen(sa.pool.Pool, "connect", hold.on_connect)
    handler = _ReleaseWhenWaited(hold)
    logger = logging.getLogger("aioproxy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield hold
    finally:
        hold.released.set()
        logger.removeHandler(handler)
        logger.setLevel(level)
        sa.event.remove(sa.pool.Pool, "connect", hold.on_connect)


async def _start(tmp_path: Path) -> web.AppRunner:
    config = gateway_config(
        _NO_UPSTREAM,
        database={"url": f"sqlite:///{tmp_path / 'control.sqlite3'}", "poll_interval": 3600},
    )
    runner = web.AppRunner(
        create_app(config, plugins=[aioproxy_openai, aioproxy_echo], load_entrypoints=False)
    )
    await runner.setup()  # the app's contexts started: the control plane open
    return runner


async def _stop_during_a_call(runner: web.AppRunner, hold: _Hold) -> list[str]:
    """A key cache reload (as the state plugin starts on a change message) held mid-query,
    cancelled as the plugin's close cancelled it, then the app stopped: what happened first,
    the held statement's return or the engine's disposal."""
    plane = runner.app[plane_key]
    events = hold.events
    sa.event.listen(
        plane.engine.sync_engine, "engine_disposed", lambda _: events.append("disposed")
    )
    hold.arm()
    reload = asyncio.create_task(plane.cache.reload())
    await hold.entered.wait()
    reload.cancel()
    try:
        await runner.cleanup()
    finally:
        hold.released.set()  # (before, the cleanup did not wait: the statement runs now)
        await asyncio.wait({reload})
    return events


def test_a_call_in_flight_at_stop_returns_before_the_engine_is_disposed(
    tmp_path: Path, hold: _Hold
) -> None:
    """The plane's close waits for the call to return before disposing the engine. Before, it
    disposed the engine under the call; at the loop's close the call's task was cancelled
    again, its connection stopped without waiting, and the statement, once it ended, posted
    its result to the closed loop (RuntimeError: Event loop is closed, in the thread)."""
    with asyncio.Runner() as loop:
        runner = loop.run(_start(tmp_path))
        assert loop.run(_stop_during_a_call(runner, hold)) == ["returned", "disposed"]


def test_a_connect_cancelled_midway_is_waited_for(
    tmp_path: Path, hold: _Hold, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task cancelled while its pool checkout opens a SQLite connection (the key cache's
    poll, stopped at close) ends once the connect returned, and closes what it opened. Before,
    aiosqlite gave the connect up at once: the thread posted its result later, to a loop that
    could have closed meanwhile (RuntimeError: Event loop is closed, in the thread)."""
    connect = sqlite3.connect

    def held_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        hold.here("connected")
        return connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", held_connect)
    with asyncio.Runner() as loop:
        runner = loop.run(_start(tmp_path))
        loop.run(_cancel_while_connecting(runner, hold))
        loop.run(runner.cleanup())
    assert hold.events == ["reload waits", "connected"]


async def _cancel_while_connecting(runner: web.AppRunner, hold: _Hold) -> None:
    plane = runner.app[plane_key]
    async with plane.engine.connect():  # the pool's one connection out: the reload opens one
        hold.arm()
        reload = asyncio.create_task(plane.cache.reload())
        await hold.entered.wait()
        reload.cancel()
        # Turns of the loop, not time: a reload that gave its connect up has ended in one.
        for _ in range(10):
            await asyncio.sleep(0)
        hold.events.append("reload ended" if reload.done() else "reload waits")
        hold.released.set()
        await asyncio.wait({reload})
