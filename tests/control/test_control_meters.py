"""The limits' counters alone: a scope's check and count (and its undoing), and the headers'
names."""

from __future__ import annotations

import random

from multidict import istr

from aioproxy.control.limits import Reservation, SoloReservation
from aioproxy.control.meters import HEADER_NAMES, KeyLimits, Meter
from aioproxy.control.records import KeyEntry, TeamEntry


def key_limits(**limits: object) -> KeyLimits:
    key = KeyEntry(id="k", name="k", digest="d", key_prefix="sk-", team_id="t", **limits)  # type: ignore[arg-type]
    team = TeamEntry(id="t", name="t", rpm=3)
    return KeyLimits(key, Meter(), team, Meter())


def test_a_scope_takes_until_its_limits_then_refuses() -> None:
    limits = key_limits(rpm=5, tpm=100, max_parallel=2)
    key, team = limits.checks
    assert key.take(60, 0, 10, 0.0) and team.take(60, 0, 10, 0.0)
    assert not key.take(41, 0, 10, 0.0)  # 60 + 41 tokens > 100
    assert key.requests.count == 1 and key.tokens.count == 60  # a refusal counts nothing
    assert key.take(40, 0, 10, 0.0)
    assert not key.take(0, 0, 10, 0.0)  # two in flight, its max_parallel
    key.meter.in_flight = 0
    assert key.requests.count == 2 and key.tokens.count == 100
    assert key.take(1, 0, 70, 0.0)  # a minute later the window holds this one alone
    assert key.requests.count == 1 and key.tokens.count == 1


def test_the_team_s_tighter_limit_is_checked_too() -> None:
    limits = key_limits(rpm=100)
    key, team = limits.checks
    for _ in range(3):
        assert key.take(1, 0, 5, 0.0) and team.take(1, 0, 5, 0.0)
    assert key.take(1, 0, 5, 0.0) and not team.take(1, 0, 5, 0.0)
    key.untake(1, 0)  # its team refused it: the key's count is taken back
    assert key.requests.count == 3 and key.tokens.count == 3 and key.meter.in_flight == 3


def test_a_budget_is_checked_in_its_period() -> None:
    limits = key_limits(max_budget=1.0, budget_duration="1h", created_at=0.0)
    key = limits.checks[0]
    key.meter.add_spend(1.0, key.period(10.0))
    assert not key.take(1, 0, 0, 10.0)
    assert key.take(1, 0, 0, 3600.0)  # the next period


def test_header_names_are_istr() -> None:
    """aiohttp keeps response header names as istr: a str is made into one per header and
    response (three times the headers' update)."""
    limits = key_limits(rpm=5, tpm=100)
    names = [name for names, _, _ in limits.rate_headers for name in names]
    assert len(names) == 6 and all(isinstance(name, istr) for name in names)
    assert all(isinstance(name, istr) for names in HEADER_NAMES.values() for name in names)


def test_settle_moves_tokens_and_adds_the_cost_in_its_period() -> None:
    limits = key_limits(tpm=1000, max_budget=5.0, budget_duration="1h", created_at=0.0)
    key = limits.checks[0]
    assert key.take(100, 0, 10, 10.0)
    key.settle(-40, 0.5, 10.5, 10.0)  # used 60 of the 100 reserved
    assert key.tokens.total(10.5) == 60
    assert key.meter.local_spend(3600.0) == 0.5
    key.settle(0, 0.25, 3700.0, 3700.0)  # the next budget period starts from nothing
    assert key.meter.local_spend(7200.0) == 0.25 and key.meter.local_spend(3600.0) == 0.0


def test_a_budget_admits_while_its_spend_and_the_cost_in_flight_are_under_it() -> None:
    """Nano-USD reserved by the requests in flight count toward the budget, a request's own
    not (one is always admitted with nothing in flight); the cost replaces its reservation."""
    limits = key_limits(max_budget=1.0)
    key, team = limits.checks
    assert key.take(1, 600_000_000, 0, 0.0)  # 0.6 USD reserved
    assert team.take(1, 600_000_000, 0, 0.0)
    assert key.take(1, 600_000_000, 0, 0.0)  # 0.6 < 1: admitted, 1.2 reserved
    assert not key.take(1, 600_000_000, 0, 0.0)  # 1.2 reserved
    key.settle(0, 0.1, 0.0, 0.0, 600_000_000)  # one answered: cost 0.1 for its 0.6
    assert key.meter.held == 600_000_000 and key.take(1, 0, 0, 0.0)  # 0.1 + 0.6 < 1
    key.unhold(600_000_000)  # the other failed
    assert key.meter.held == 0
    assert team.meter.held == 0  # the team has no budget: it keeps nothing
    key.untake(1, 0)  # taken back: nothing held moves
    assert key.meter.held == 0 and key.meter.in_flight == 2


def _solo_limits(**limits: object) -> KeyLimits:
    key = KeyEntry(id="k", name="k", digest="d", key_prefix="sk-", **limits)  # type: ignore[arg-type]
    return KeyLimits(key, Meter(), None, None)


def test_a_one_scope_reservation_counts_as_the_general_one() -> None:
    """A key with no team reserves through ``SoloReservation`` (no loop over its one scope):
    any order of settling, failing and releasing leaves its meter as ``Reservation`` leaves an
    identical one (seeded: the same 2,000 sequences each run)."""
    chooser = random.Random(2)
    for _ in range(2000):
        limits = {
            "tpm": 1000,
            "max_parallel": 3,
            "max_budget": chooser.choice((None, 5.0)),
            "budget_duration": "1h",
            "created_at": 0.0,
        }
        general, solo = _solo_limits(**limits), _solo_limits(**limits)
        assert general.solo is not None and solo.solo is not None
        tokens, held = chooser.choice((0, 10, 40)), chooser.choice((0, 7, 1000))
        assert general.solo.take(tokens, held, 5, 10.0) and solo.solo.take(tokens, held, 5, 10.0)
        reservations = (
            Reservation(general.checks, tokens, held),
            SoloReservation(solo.solo, tokens, held),
        )
        steps = chooser.sample(["settle", "fail", "release", "release"], chooser.randint(0, 4))
        for step in steps:
            used, cost = chooser.choice((0, tokens, 55)), chooser.choice((None, 0.0, 1e-6))
            for reservation in reservations:
                if step == "settle":
                    reservation.settle(used, cost, 6.0, 20.0)
                elif step == "fail":
                    reservation.count_tokens(3, 6.0)
                else:
                    reservation.release()
        a, b = general.key_meter, solo.key_meter
        assert (a.in_flight, a.held, a.spend, a.period, a.tokens.count, a.requests.count) == (
            b.in_flight,
            b.held,
            b.spend,
            b.period,
            b.tokens.count,
            b.requests.count,
        ), steps
        first, second = reservations
        assert (first.tokens, first.held, first.released) == (
            second.tokens,
            second.held,
            second.released,
        )
        assert second.checks == (solo.solo,)
