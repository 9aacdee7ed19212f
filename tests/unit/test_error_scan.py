"""passthrough._mentions_error: what ``data.find(b'"error"') >= 0`` says, whatever the body."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioproxy.passthrough import _mentions_error

KEY = b'"error"'
VECTOR = json.dumps({"data": [{"embedding": [i / 7 for i in range(1500)]}]}).encode()
TEXT = b'{"content": "' + b"rr error r " * 400 + b'"}'


@pytest.mark.parametrize(
    "data",
    [
        b"",
        KEY,
        b"r" + KEY,
        b"rr" + KEY,
        VECTOR,
        VECTOR + KEY,
        KEY + VECTOR,
        VECTOR[:5000] + KEY + VECTOR[5000:],
        VECTOR.replace(b"]", b'], "error": null', 1),
        TEXT,
        TEXT + KEY,
        TEXT[:3000] + KEY + TEXT[3000:],
        b"r" * 5000 + KEY,
        b"r" * 5000 + b'"erro' + b"r" * 10,
        b'"e' + b"r" * 3000,
    ],
)
def test_it_finds_the_key_as_find_does(data: bytes) -> None:
    assert _mentions_error(data) is (data.find(KEY) >= 0)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from([b"r", b"e", b"o", b'"', b"1", b"2", b",", KEY, b"x" * 700]), max_size=40
    )
)
def test_it_agrees_with_find_on_any_mix(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert _mentions_error(data) is (data.find(KEY) >= 0)
