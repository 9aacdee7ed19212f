"""aioproxy_azure.tokens: a token command's output, and when its token is read again (a fake
clock; the command itself a real subprocess where it matters)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence

import pytest
from aioproxy_azure.tokens import TokenError, TokenSource, parse_token, run_command


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Command:
    """A token command that prints token-1, token-2, ...; ``gate`` holds each run until set."""

    def __init__(self) -> None:
        self.runs = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail = False

    async def __call__(self, command: Sequence[str], timeout: float) -> bytes:
        self.runs += 1
        self.started.set()
        await self.gate.wait()
        if self.fail:
            raise TokenError("token command 'az' failed (exit 1): please run az login")
        return f"token-{self.runs}\n".encode()


def source(clock: Clock, command: Command) -> TokenSource:
    return TokenSource(["az"], margin=300, lifetime=3600, clock=clock, run=command)


def test_parse_az_json() -> None:
    printed = {"accessToken": "eyJ0", "expires_on": 1_700_003_600, "tokenType": "Bearer"}
    assert parse_token(json.dumps(printed).encode(), 1_700_000_000, 60) == ("eyJ0", 1_700_003_600)


def test_parse_oauth_json_and_a_bare_token() -> None:
    assert parse_token(b'{"access_token": "t", "expires_in": "120"}', 100, 60) == ("t", 220)
    assert parse_token(b"  eyJ0.abc \n", 100, 60) == ("eyJ0.abc", 160)


@pytest.mark.parametrize("output", [b"", b"\n", b'{"expires_on": 5}', b"two words", b"{broken"])
def test_parse_refuses_output_without_a_token(output: bytes) -> None:
    with pytest.raises(TokenError):
        parse_token(output, 100, 60)


async def test_the_token_is_read_once_until_the_margin() -> None:
    clock, command = Clock(), Command()
    tokens = source(clock, command)
    assert await tokens.token() == "token-1"
    clock.now += 3600 - 300 - 1  # just before the margin
    assert await tokens.token() == "token-1"
    assert command.runs == 1


async def test_within_the_margin_the_refresh_runs_behind_the_current_token() -> None:
    clock, command = Clock(), Command()
    tokens = source(clock, command)
    await tokens.token()
    command.gate.clear()  # the next run holds until the test lets it finish
    command.started.clear()
    clock.now += 3600 - 100
    assert await tokens.token() == "token-1"  # not waiting for the held run
    await command.started.wait()
    assert await tokens.token() == "token-1"  # one run at a time
    command.gate.set()
    await tokens.refresh()  # waits for the run under way, starts no other
    assert command.runs == 2
    assert await tokens.token() == "token-2"


async def test_an_expired_token_is_waited_for_by_every_caller_once() -> None:
    clock, command = Clock(), Command()
    tokens = source(clock, command)
    await tokens.token()
    clock.now += 3600
    assert await asyncio.gather(*(tokens.token() for _ in range(5))) == ["token-2"] * 5
    assert command.runs == 2


async def test_a_failed_refresh_keeps_the_valid_token_and_retries_later() -> None:
    clock, command = Clock(), Command()
    tokens = source(clock, command)
    await tokens.token()
    command.fail = True
    clock.now += 3600 - 100
    assert await tokens.token() == "token-1"
    await _settled(tokens)
    assert await tokens.token() == "token-1"  # within RETRY_INTERVAL: no new run
    assert command.runs == 2
    clock.now += 100  # expired, and the command still fails
    with pytest.raises(TokenError, match="az login"):
        await tokens.token()
    command.fail = False
    assert await tokens.token() == "token-4"


async def _settled(tokens: TokenSource) -> None:
    """Wait for the refresh under way to end (refresh() would start one when none is)."""
    task = tokens._refreshing  # private: the test watches the source itself
    assert task is not None
    await task


async def test_a_short_lived_token_is_refreshed_halfway() -> None:
    clock, command = Clock(), Command()
    tokens = TokenSource(["az"], margin=300, lifetime=60, clock=clock, run=command)
    await tokens.token()
    clock.now += 29
    await tokens.token()
    assert command.runs == 1
    clock.now += 2
    await tokens.token()
    await _settled(tokens)
    assert command.runs == 2


async def test_run_command_reads_what_a_real_command_prints() -> None:
    script = 'print(\'{"accessToken": "eyJ0", "expires_on": 42}\')'
    assert (
        await run_command([sys.executable, "-c", script], 30)
        == b'{"accessToken": "eyJ0", "expires_on": 42}\n'
    )


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            [sys.executable, "-c", "import sys; sys.exit('please run az login')"],
            "please run az login",
        ),
        (["/nonexistent/az"], "could not start"),
    ],
)
async def test_run_command_failures_are_token_errors(command: list[str], message: str) -> None:
    with pytest.raises(TokenError, match=message):
        await run_command(command, 30)
