"""The router's sliding one-minute counter (rpm/tpm caps) against a brute-force window."""

from __future__ import annotations

import random

import pytest

from aioproxy.router import _MinuteCounter


@pytest.mark.parametrize("seed", range(50))
def test_matches_a_brute_force_sliding_minute(seed: int) -> None:
    rng = random.Random(seed)
    counter = _MinuteCounter()
    events: list[tuple[int, int]] = []  # (second it counts in, amount)
    now, latest = rng.uniform(0, 1000), 0
    for _ in range(300):
        now += rng.choice([0, 0.1, 0.5, 1, 3, 30, 61, 200]) * rng.random()
        reading = now - rng.choice([0, 0, 0, 0.3])  # clocks read just before another call's
        if rng.random() < 0.6:
            amount = rng.randint(1, 5)
            counter.add(amount, reading)
            latest = max(latest, int(reading))
            events.append((latest, amount))
        latest = max(latest, int(now))
        assert counter.total(now) == sum(a for second, a in events if second >= latest - 59)


def test_a_long_silence_empties_it() -> None:
    counter = _MinuteCounter()
    counter.add(5, 100.0)
    counter.add(7, 130.5)
    assert counter.total(159.9) == 12
    assert counter.total(160.0) == 7  # second 100 has left the minute
    assert counter.total(1000.0) == 0
