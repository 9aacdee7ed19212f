"""fields.ArrayOf: large arrays are still refused before they are built, and the counters that
do it are made only when such an array comes (a counter costs ~500 bytes a slot)."""

from __future__ import annotations

import msgspec
import pytest

from aioproxy import ArrayOf, BadRequest
from aioproxy.fields import _counter


@pytest.fixture(autouse=True)
def _no_counters() -> None:
    _counter.cache_clear()


def test_making_an_array_of_builds_no_counter() -> None:
    ArrayOf(int, 65536)
    assert _counter.cache_info().currsize == 0


def test_an_array_too_short_to_pass_the_limit_is_not_counted() -> None:
    array = ArrayOf(msgspec.Raw, 40_000)
    body = b"[" + b",".join([b"1"] * 39_000) + b"]"  # above 64 KiB: not decoded before counting
    assert len(array.decode(msgspec.Raw(body), "input") or []) == 39_000
    assert _counter.cache_info().currsize == 0


def test_a_long_array_is_counted_and_refused() -> None:
    array = ArrayOf(int, 40_000)
    body = b"[" + b",".join([b"1"] * 40_001) + b"]"
    with pytest.raises(BadRequest) as caught:
        array.decode(msgspec.Raw(body), "input")
    assert caught.value.code == "array_above_max_length"
    assert _counter.cache_info().currsize == 2  # the short counter, then the full one


def test_a_long_array_within_the_limit_is_counted_and_decoded() -> None:
    array = ArrayOf(int, 40_000)
    body = b"[" + b",".join([b"7"] * 40_000) + b"]"
    assert array.decode(msgspec.Raw(body), "input") == [7] * 40_000
