"""Fixtures for the control plane: a real PostgreSQL cluster (once per session) and SQLite,
a proxy on either with a clock the test moves, and admin API helpers."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from aioproxy import create_app
from aioproxy.control.clock import ControlClock
from aioproxy.control.engine import open_engine
from aioproxy.control.plane import clock_key, plane_key
from tests.support import MASTER_KEY, gateway_config, sdk

PRICE = {"input": 2.0, "output": 8.0, "cached_input": 0.5}  # USD per million tokens


class FakeControlClock(ControlClock):
    """Wall-clock and monotonic time that move only when the test says so."""

    def __init__(self, start: float = 1_900_000_000.0) -> None:
        super().__init__(lambda: self.now, lambda: self.now)
        self.now = start

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs it (Debian's postgresql)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(*command: str) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="session")
def postgres_port() -> Iterator[int]:
    """A throwaway PostgreSQL cluster on a free port for the session, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="aioproxy-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    port = _free_port()
    subprocess.run(
        _as_postgres(
            _pg_bin("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ),
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
    )
    subprocess.run(
        _as_postgres(
            _pg_bin("pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(base / "log"),
            "-w",
            "start",
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield port
    finally:
        subprocess.run(
            _as_postgres(_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
            check=False,
            capture_output=True,
        )
        # Removed in the background: a cluster that made a database per test holds ~1 GB of
        # files, which took the last test's teardown 30-85 s to delete on a busy disk.
        subprocess.run(["sh", "-c", 'rm -rf -- "$0" >/dev/null 2>&1 &', str(base)], check=False)


# Databases migrated once per session (per xdist worker), by kind: each test gets a copy.
_TEMPLATES: dict[str, str] = {}


async def _migrated(url: str) -> None:
    engine = await open_engine(url)
    await engine.dispose()


async def _sqlite_template(folder: Path) -> Path:
    """A SQLite file migrated to the shipped schema, in rollback-journal mode so that the one
    file holds it all (the engine switches each copy back to WAL as it connects)."""
    if "sqlite" not in _TEMPLATES:
        path = folder / "control-template.sqlite3"
        await _migrated(f"sqlite:///{path}")
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.execute("PRAGMA journal_mode=DELETE")
        _TEMPLATES["sqlite"] = str(path)
    return Path(_TEMPLATES["sqlite"])


async def _create_database(port: int, name: str, template: str = "") -> str:
    connection = await asyncpg.connect(
        host="127.0.0.1", port=port, user="postgres", database="postgres"
    )
    # FILE_COPY (PostgreSQL 15+): a small template is copied file by file, not written
    # through the WAL block by block as by default (half the disk writes per database).
    strategy = " STRATEGY FILE_COPY" if connection.get_server_version().major >= 15 else ""
    try:
        await connection.execute(
            f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "") + strategy
        )
    finally:
        await connection.close()
    return f"postgresql://postgres@127.0.0.1:{port}/{name}"


async def _postgres_template(port: int) -> str:
    """A PostgreSQL database migrated to the shipped schema, the template of the tests' ones."""
    key = f"postgresql:{port}"
    if key not in _TEMPLATES:
        await _migrated(await _create_database(port, "migrated_template"))
        _TEMPLATES[key] = "migrated_template"
    return _TEMPLATES[key]


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A fresh database of each kind, already migrated to the shipped schema (a copy of one
    migrated once per session: what every start-up after the first finds), or empty for the
    tests of migrating, marked ``empty_database``."""
    empty = request.node.get_closest_marker("empty_database") is not None
    if request.param == "sqlite":
        path = tmp_path / "control.sqlite3"
        if not empty:
            shutil.copyfile(await _sqlite_template(tmp_path_factory.getbasetemp()), path)
        return f"sqlite:///{path}"
    port = request.getfixturevalue("postgres_port")
    template = "" if empty else await _postgres_template(port)
    return await _create_database(port, "t_" + secrets.token_hex(6), template)


@pytest.fixture
def clock() -> FakeControlClock:
    return FakeControlClock()


def control_config(api_base: str, db_url: str, **overrides: Any) -> dict[str, Any]:
    """``overrides``: top-level tables; a ``database`` table adds to the test database's."""
    database = {"url": db_url, "poll_interval": 0.05, **overrides.pop("database", {})}
    config = gateway_config(api_base, database=database, **overrides)
    config["models"][0]["price"] = PRICE
    config["models"].append(
        {
            "name": "gpt-other",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "api_base": api_base,
            "api_key": "sk-upstream-secret",
            "price": PRICE,
        }
    )
    config["models"].append(
        {
            "name": "embed",
            "provider": "openai",
            "model": "text-embedding-3-small",
            "api_base": api_base,
            "api_key": "sk-upstream-secret",
            "price": {"input": 0.02},
        }
    )
    config["models"][1]["price"] = PRICE  # echo
    return config


class Control:
    """A running proxy with the control plane, and its admin API."""

    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    @property
    def plane(self) -> Any:
        return self.server.app[plane_key]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def admin(
        self, method: str, path: str, body: Any = None, key: str = MASTER_KEY, status: int = 200
    ) -> Any:
        async with self.session.request(
            method, self.url(path), json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            data = await response.json()
            assert response.status == status, data
            return data

    async def new_key(self, **fields: Any) -> dict[str, Any]:
        return await self.admin("POST", "/admin/keys", {"name": "k", **fields}, status=201)

    async def settle(self) -> None:
        """Wait for the request log to be written (rows are written off the request path)."""
        await self.plane.log.flush()


@pytest.fixture
async def start_control(
    aiohttp_server: Any, upstream_base: str, db_url: str, clock: FakeControlClock
) -> AsyncIterator[Any]:
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        plugins: tuple[object, ...] = (),
        plugins_config: dict[str, Any] | None = None,  # the [plugins] section
        **overrides: Any,
    ) -> Control:
        if plugins_config is not None:
            overrides["plugins"] = plugins_config
        app = create_app(
            control_config(upstream_base, db_url, **overrides),
            plugins=[aioproxy_openai, aioproxy_echo, *plugins],
            load_entrypoints=False,
        )
        app[clock_key] = clock
        server = await aiohttp_server(app)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Control(server, session)

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def control(start_control: Any) -> Control:
    return await start_control()


async def gather(*coroutines: Any) -> list[Any]:
    return list(await asyncio.gather(*coroutines, return_exceptions=True))


CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}


async def metric_counts(control: Control, name: str, label: str, **where: str) -> dict[str, float]:
    """The non-zero samples of counter ``name`` on ``control``'s /metrics whose labels include
    ``where``, by ``label``."""
    async with control.session.get(
        control.url("/metrics"), headers={"Authorization": f"Bearer {MASTER_KEY}"}
    ) as response:
        text = await response.text()
    return {
        sample.labels[label]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.value and where.items() <= sample.labels.items()
    }


async def chat(server: TestServer, key: str, **overrides: Any) -> Any:
    """One chat completion through the official SDK with ``key``."""
    async with sdk(server, key) as client:
        return await client.chat.completions.create(**{**CHAT, **overrides})


# --- another PostgreSQL session's locks, and waits with a hang guard ---


async def lock_requests(holder: asyncpg.Connection) -> Any:
    """``holder`` (another session) locks the request log (``LOCK TABLE requests``) until the
    transaction returned is rolled back."""
    locking = holder.transaction()
    await locking.start()
    await holder.execute("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")
    return locking


async def waiting_on(holder: asyncpg.Connection, locktype: str) -> bool:
    """Whether a session waits for a lock of ``locktype`` (``relation``, ``advisory``)."""
    query = "SELECT count(*) FROM pg_locks WHERE locktype = $1 AND NOT granted"
    return bool(await holder.fetchval(query, locktype))


async def ended(coroutine: Coroutine[Any, Any, Any], what: str) -> asyncio.Future[Any]:
    """``coroutine`` run to its end, its future returned (its result or exception to read): a
    hang guard, the test failing with ``what`` if it still runs after 60 s (the bounds under
    test are seconds)."""
    running = asyncio.ensure_future(coroutine)
    await asyncio.wait({running}, timeout=60.0)
    assert running.done(), what
    return running
