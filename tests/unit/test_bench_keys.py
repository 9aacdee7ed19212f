"""The aioproxy-keys bench target's database (bench/harness/keys.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_callers_key_holds_its_limits_and_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's key is the last of one many-row INSERT, whose columns are the first row's:
    its budget was dropped when the other keys had none named."""
    monkeypatch.syspath_prepend(str(BENCH))
    from harness import keys

    database = tmp_path / "keys.sqlite3"
    secret = keys.seed(database, count=3)
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT key_prefix, rpm, tpm, max_budget, budget_duration FROM keys"
        ).fetchall()
    assert len(rows) == 3
    assert [row for row in rows if row[0] == secret[:7]] == [
        (secret[:7], 10**9, 10**12, 1e6, "30d")
    ]
