"""Checking admin API bodies field by field: every error names its field, never its value."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from ..errors import BadRequest
from .records import parse_duration
from .schema import MOST_INTEGER

__all__ = ["KEY_FIELDS", "TEAM_FIELDS", "read_fields"]

Check = Callable[[Any], Any]
_MAX_NAME = 200
# The rpm, tpm and max_parallel columns are INTEGERs: more would fail on PostgreSQL at the
# INSERT (a 500), and a limit of two billion a minute is no limit anyway.
_MAX_COUNT = MOST_INTEGER
# What the key objects show: an RFC 3339 date in years 1970 to 9999 (``records.rfc3339``);
# an ``expires_at`` outside cannot be shown, and would break every listing of the keys.
_FIRST_MOMENT = 0.0
_LAST_MOMENT = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
# C0 control characters and DEL: PostgreSQL refuses a NUL in text (a 500, not a 400), and the
# others would break the CLI's tables and log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_METADATA = 16 * 1024  # bytes of JSON


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


class _Invalid(Exception):
    pass


def _name(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > _MAX_NAME
        or _CONTROL.search(value)
    ):
        raise _Invalid(
            f"must be a non-empty string of at most {_MAX_NAME} characters, "
            "without control characters"
        )
    return value


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_COUNT:
        raise _Invalid(f"must be a whole number from 1 to {_MAX_COUNT}, or null")
    return value


def _money(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise _Invalid("must be a number of USD from 0, or null")
    return float(value)


def _duration(value: Any) -> str:
    if not isinstance(value, str) or parse_duration(value) is None:
        raise _Invalid('must be "<n>h" or "<n>d" (e.g. "1h", "7d", "30d"), or null')
    return value


def _models(value: Any) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > 10_000
        or not all(
            isinstance(item, str) and item and len(item) <= _MAX_NAME and not _CONTROL.search(item)
            for item in value
        )
    ):
        raise _Invalid("must be a list of model names, or null (all models)")
    return list(dict.fromkeys(value))


def _timestamp(value: Any) -> float:
    if not isinstance(value, str):
        raise _Invalid("must be an RFC 3339 timestamp (e.g. 2030-01-31T12:00:00Z), or null")
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z"))  # 3.11 reads "Z"
    except ValueError:
        raise _Invalid(
            "must be an RFC 3339 timestamp (e.g. 2030-01-31T12:00:00Z), or null"
        ) from None
    if moment.tzinfo is None:
        raise _Invalid("must give its time zone (e.g. a trailing Z)")
    epoch = moment.timestamp()
    if not _FIRST_MOMENT <= epoch <= _LAST_MOMENT:
        raise _Invalid("must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z")
    return epoch


def _role(value: Any) -> str:
    if value not in ("user", "admin"):
        raise _Invalid('must be "user" or "admin"')
    return str(value)


def _metadata(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or len(msgspec.json.encode(value)) > _MAX_METADATA:
        raise _Invalid(f"must be a JSON object of at most {_MAX_METADATA} bytes, or null")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _team(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("must be a team id, or null")
    return value


_LIMITS: dict[str, Check] = {
    "models": _optional(_models),
    "rpm": _optional(_count),
    "tpm": _optional(_count),
    "max_parallel": _optional(_count),
    "max_budget": _optional(_money),
    "budget_duration": _optional(_duration),
    "metadata": _optional(_metadata),
}
KEY_FIELDS: dict[str, Check] = {
    "name": _name,
    "team": _optional(_team),
    **_LIMITS,
    "expires_at": _optional(_timestamp),
    "role": _role,
    "disabled": _flag,
}
TEAM_FIELDS: dict[str, Check] = {"name": _name, **_LIMITS}


def read_fields(
    body: bytes,
    fields: Mapping[str, Check],
    *,
    required: tuple[str, ...] = (),
    refused: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The checked fields of a JSON object body; 400 naming the first bad or unknown one."""
    try:
        raw = msgspec.json.decode(body) if body else {}
    except msgspec.DecodeError:
        raise BadRequest("The body is not valid JSON", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise BadRequest("The body must be a JSON object", code="invalid_type")
    for name in required:
        if name not in raw:
            raise BadRequest(f"'{name}' is required", param=name, code="missing_required_parameter")
    checked = {}
    for name, value in raw.items():
        check = fields.get(name)
        if check is None or name in refused:
            # Named only if it looks like a field name: a pasted secret is never echoed.
            shown = name if _FIELD_NAME.fullmatch(name) else None
            raise BadRequest(
                f"Unknown field '{shown}'" if shown else "Unknown field",
                param=shown,
                code="unknown_parameter",
            )
        try:
            checked[name] = check(value)
        except _Invalid as exc:
            raise BadRequest(f"'{name}' {exc}", param=name, code="invalid_value") from None
    return checked
