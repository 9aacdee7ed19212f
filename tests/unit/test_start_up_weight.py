"""What a serving process holds: the libraries of features that are off are never imported
(each costs megabytes of RSS in every process), while the features that are on still load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Each feature's heavy library, and the config that turns it on.
HEAVY = ("redis", "jinja2", "aiohttp_jinja2", "sqlalchemy.dialects.postgresql", "opentelemetry")

_SERVE = """
import asyncio, json, sys
from aiohttp import web
from aioproxy import create_app

async def main():
    runner = web.AppRunner(create_app(sys.argv[1]))
    await runner.setup()  # the app's start-up: the database opened, the contexts entered
    try:
        print(json.dumps([name for name in sys.argv[2:] if name in sys.modules]))
    finally:
        await runner.cleanup()

asyncio.run(main())
"""


def _imported(tmp_path: Path, extra: str = "") -> set[str]:
    """The HEAVY modules a started app has imported, on a SQLite database already migrated
    (the usual start; an upgrade of an older one imports Alembic, and every dialect with it)."""
    config = tmp_path / "aioproxy.toml"
    database = (tmp_path / "db.sqlite3").as_posix()
    config.write_text(
        f'[auth]\nmaster_key = "sk-master"\n[database]\nurl = "sqlite:///{database}"\n' + extra
    )
    # The installed plugins load as in any process; the OTel one exports nowhere.
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    for _start in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _SERVE, str(config), *HEAVY],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,  # a safety net only
            env=env,
        )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_features_that_are_off_import_nothing_of_theirs(tmp_path: Path) -> None:
    assert _imported(tmp_path) == set()


def test_the_dashboard_loads_its_templates_when_enabled(tmp_path: Path) -> None:
    assert _imported(tmp_path, "[ui]\nenabled = true\n") == {"jinja2", "aiohttp_jinja2"}
