"""Which Redis errors say a call itself was refused (dropped, logged: sent again it would fail
the same way) and which say only that Redis is not itself now (the call is carried, sent
again when Redis is back: its settles must not be dropped)."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from aioproxy.state.batch import script_failed


@pytest.mark.parametrize(
    "error",
    [
        ResponseError("aioproxy counters: arguments"),
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ],
)
def test_the_calls_own_refusals(error: Exception) -> None:
    assert script_failed(error)


@pytest.mark.parametrize(
    "error",
    [
        ResponseError(
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk"
        ),
        ResponseError(
            "ERR Error running script (call to f_0123): @user_script:1: -MISCONF Redis is "
            "configured to save RDB snapshots, but it's currently unable to persist to disk"
        ),  # Redis 6's form
        ResponseError("BUSY Redis is busy running a script"),
        ResponseError("NOREPLICAS Not enough good replicas to write"),
        BusyLoadingError("Redis is loading the dataset in memory"),
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
        ReadOnlyError("You can't write against a read only replica"),
        NoScriptError("No matching script"),
        TimeoutError(),
        ConnectionResetError(),
    ],
)
def test_redis_not_itself_now(error: Exception) -> None:
    assert not script_failed(error)
