"""The x-ratelimit-* headers of a request counted in Redis, made from the script's answer: a
key whose every kind of limit is set in one scope copies the texts that do not move; the same
headers, in the same order, as the search for the scope with the least room."""

from __future__ import annotations

from typing import Any

import pytest

from aioproxy.control.meters import KeyLimits, Meter
from aioproxy.control.records import KeyEntry, TeamEntry
from aioproxy.state.counters import _headers, _Prepared


def _limits(team: dict[str, Any] | None, **limits: Any) -> KeyLimits:
    key = KeyEntry(
        id="k", name="k", digest="d", key_prefix="sk-", team_id="t" if team else None, **limits
    )
    if team is None:
        return KeyLimits(key, Meter(), None, None)
    return KeyLimits(key, Meter(), TeamEntry(id="t", name="t", **team), Meter())


def _searched(prepared: _Prepared, answer: list[Any]) -> dict[str, str]:
    """The headers by the search for the scope with the least room (its copy not used)."""
    unmoving, prepared.unmoving = prepared.unmoving, None
    try:
        return _headers(prepared, answer)
    finally:
        prepared.unmoving = unmoving


# (answer's reset, per scope its requests and tokens in the window)
ANSWERS = [
    [1, 59.999, 1, 100],
    [1, 60.0, 5, 5000],
    [1, 59.0001, 7, 0],
    [1, 59.0, 1, 100],  # Redis's clock jumped: the reset is not a minute's
    [1, 0.5, 10, 99999],
    [0, 30.2, 11, 1, 1, "rpm", 30.2],
]


@pytest.mark.parametrize(
    ("team", "limits", "unmoving"),
    [
        (None, {"rpm": 10, "tpm": 5000}, True),
        (None, {"rpm": 10}, True),
        (None, {"tpm": 5000, "max_budget": 1.0}, True),
        ({"max_budget": 5.0}, {"rpm": 10, "tpm": 5000}, True),
        ({"rpm": 3}, {"tpm": 5000}, True),
        ({"rpm": 3}, {"rpm": 10, "tpm": 5000}, False),
        ({"rpm": 3, "tpm": 100}, {"rpm": 10, "tpm": 5000}, False),
    ],
)
def test_copied_headers_are_the_searched_ones(
    team: dict[str, Any] | None, limits: dict[str, Any], unmoving: bool
) -> None:
    prepared = _Prepared("aioproxy", _limits(team, **limits))
    assert (prepared.unmoving is not None) is unmoving
    scopes = len(prepared.scopes)
    for answer in ANSWERS:
        full = [*answer[:2], *answer[2:4] * scopes, *answer[4:]]  # the team's counts: the key's
        headers = _headers(prepared, full)
        assert list(headers.items()) == list(_searched(prepared, full).items())


def test_reset_a_minute_away_unless_redis_clock_jumped() -> None:
    prepared = _Prepared("aioproxy", _limits(None, rpm=10, tpm=5000))
    assert _headers(prepared, [1, 59.2, 3, 120]) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "5000",
        "x-ratelimit-remaining-tokens": "4880",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    jumped = _headers(prepared, [1, 58.5, 11, 6000])
    assert jumped["x-ratelimit-reset-requests"] == jumped["x-ratelimit-reset-tokens"] == "59s"
    assert jumped["x-ratelimit-remaining-requests"] == jumped["x-ratelimit-remaining-tokens"] == "0"
