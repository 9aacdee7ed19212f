"""A plugin outside this repository: its tests run with nothing but aioproxy's pytest plugin.

Each test runs pytest in a child process, from a folder in a temporary directory, so that this
repository's pyproject.toml (asyncio_mode, pythonpath, ...) cannot apply.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "plugins" / "aioproxy-example"


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest with this venv in ``folder``, importing the folder's own package first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(folder)  # what installing the copy would give: its package, not ours
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(folder)]
    return subprocess.run(
        [*command, "-W", "error", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,  # a safety net only
    )


def test_the_example_plugin_passes_from_a_copy_outside_the_repository(tmp_path: Path) -> None:
    copy = tmp_path / "aioproxy-example"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))

    done = run_pytest(copy)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"rootdir: {copy}" in output, output
    configs = [line for line in output.splitlines() if line.startswith("configfile:")]
    assert configs in ([], ["configfile: pyproject.toml"]), output  # the copy's own, if any
    assert "mode=Mode.AUTO" in output and "fixture_loop_scope=function" in output, output
    assert " passed" in output and "warning" not in output.lower(), output
    assert not list(copy.rglob("*.sqlite3")), "the kit wrote a store into the plugin's folder"


KIT_TEST = """
from aioproxy.testing import start_proxy

async def test_a_proxy(aiohttp_server):
    proxy = await start_proxy(aiohttp_server, {})
    async with proxy.http() as http, http.get("/v1/models") as response:
        assert response.status == 200
"""


def test_a_project_that_chose_strict_mode_keeps_it_and_is_told_the_fix(tmp_path: Path) -> None:
    (tmp_path / "test_kit.py").write_text(KIT_TEST)
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\nasyncio_mode = "strict"\n')

    done = run_pytest(tmp_path)

    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "asyncio_mode is 'strict' here" in output, output
    assert "@pytest.mark.asyncio" in output and "@pytest_asyncio.fixture" in output, output

    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")  # no mode chosen
    assert run_pytest(tmp_path).returncode == 0
