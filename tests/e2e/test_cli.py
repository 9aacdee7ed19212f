"""``python run.py`` as a user starts it: a real process on a free port."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import openai
import pytest

from aioproxy.testing import FakeOpenAI
from tests.support import ROOT, clean_env, running

# Subprocesses, signals or load: one xdist worker, not starved by parallel hypothesis tests.
pytestmark = pytest.mark.xdist_group("wallclock")

MESSAGES = [{"role": "user", "content": "hello from the cli test"}]


async def test_default_config_serves_echo_without_keys_or_network() -> None:
    async with running() as (port, lines):
        assert f"http://127.0.0.1:{port}" in lines[0]
        assert "echo" in lines[1]
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        ) as client:
            models = {m.id for m in (await client.models.list()).data}
            assert "echo" in models and not any(m.startswith("gpt") for m in models)
            done = await client.chat.completions.create(model="echo", messages=MESSAGES)
            assert "hello from the cli test" in (done.choices[0].message.content or "")


async def test_default_config_adds_openai_models_when_key_set(aiohttp_server: object) -> None:
    fake = FakeOpenAI()
    upstream = await aiohttp_server(fake.app())  # type: ignore[operator]
    env = clean_env(OPENAI_API_KEY="sk-from-env", OPENAI_BASE_URL=str(upstream.make_url("/v1")))
    async with running(env=env) as (port, lines):
        assert "gpt-4o-mini" in lines[1]
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        ) as client:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert fake.last.headers["authorization"] == "Bearer sk-from-env"


async def test_config_file_with_env_var(tmp_path: Path, aiohttp_server: object) -> None:
    fake = FakeOpenAI()
    upstream = await aiohttp_server(fake.app())  # type: ignore[operator]
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[auth]
master_key = "${{TEST_MASTER_KEY}}"

[[models]]
name = "gpt-test"
provider = "openai"
model = "gpt-4o-mini"
api_base = "{upstream.make_url("/v1")}"
api_key = "sk-upstream"
""",
        encoding="utf-8",
    )
    env = clean_env(TEST_MASTER_KEY="sk-env-master")
    async with running("--config", str(config), "--log-level", "warning", env=env) as (port, _):
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-env-master", max_retries=0
        ) as client:
            done = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert done.model == "gpt-4o-mini"
    assert fake.last.headers["authorization"] == "Bearer sk-upstream"


async def run_to_exit(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "run.py",
        *args,
        cwd=ROOT,
        env=env or clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # Safety net only: eight of these start side by side, and a loaded 2-core machine
        # takes a while to import them all.
        _, err = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:  # timed out: no process (nor its pipes) outlives the test
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_bad_configs_do_not_start(tmp_path: Path) -> None:
    cases = {
        "typo.toml": (
            '[[models]]\nname = "a"\nprovider = "echo"\napi_bas = "x"\n',
            "api_bas",
            "$.models[0]",
        ),
        "type.toml": (
            '[[models]]\nname = "a"\nprovider = "echo"\nweight = "heavy"\n',
            "Expected `float`",
            "$.models[0].weight",
        ),
        "env.toml": (
            '[auth]\nmaster_key = "${AIOPROXY_TEST_UNSET_VAR}"\n',
            "AIOPROXY_TEST_UNSET_VAR",
            "$.auth.master_key",
        ),
        "provider.toml": (
            '[[models]]\nname = "a"\nprovider = "nonesuch"\n',
            "nonesuch",
            "$.models[0].provider",
        ),
        "syntax.toml": ("[[models]\n", "invalid TOML", ""),
        "settings.toml": (
            '[[models]]\nname = "a"\nprovider = "echo"\nsettings = { delay = "soon" }\n',
            "invalid echo settings",
            "$.models[0].settings.delay",
        ),
        # Refused by the provider itself as the app starts (the example plugin needs api_base).
        "start.toml": ('[[models]]\nname = "t"\nprovider = "example"\n', "needs api_base", ""),
    }
    for filename, (text, _, _) in cases.items():
        (tmp_path / filename).write_text(text, encoding="utf-8")
    # The processes run side by side: each spends most of its life importing, on its own core.
    exits = await asyncio.gather(
        *(run_to_exit("--config", str(tmp_path / name)) for name in (*cases, "missing.toml"))
    )
    for (filename, (_, problem, where)), (code, err) in zip(cases.items(), exits, strict=False):
        assert code == 2, (filename, err)
        assert str(tmp_path / filename) in err, err
        assert problem in err and where in err, err
    code, err = exits[-1]
    assert code == 2 and "missing.toml" in err
