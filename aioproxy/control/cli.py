"""``python -m aioproxy keys|teams|spend ...``: the admin API from a shell.

It talks to a running instance (``--url``, else ``AIOPROXY_URL``, else http://127.0.0.1:4000)
with the master key or an admin key (``--master-key``, else ``AIOPROXY_MASTER_KEY``). People get
tables; ``--json`` prints the API's JSON for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

__all__ = ["COMMANDS", "main"]

COMMANDS = frozenset({"keys", "teams", "spend"})
DEFAULT_URL = "http://127.0.0.1:4000"
_KEY_COLUMNS = (
    "id",
    "name",
    "key_prefix",
    "team",
    "rpm",
    "tpm",
    "max_budget",
    "spend",
    "expires_at",
    "disabled",
    "role",
)
_TEAM_COLUMNS = ("id", "name", "models", "rpm", "tpm", "max_budget", "spend")
_SPEND_COLUMNS = ("group", "requests", "input_tokens", "output_tokens", "cost")
_REQUEST_COLUMNS = (
    "time",
    "key_name",
    "model",
    "status",
    "input_tokens",
    "output_tokens",
    "cost",
    "duration",
)


# The fields ``update --unset`` may set back to null (the API's nullable fields).
_TEAM_CLEARABLE = (
    "models",
    "rpm",
    "tpm",
    "max_parallel",
    "max_budget",
    "budget_duration",
    "metadata",
)
_KEY_CLEARABLE = (*_TEAM_CLEARABLE, "team", "expires_at")


class CommandError(Exception):
    pass


def _limits(parser: argparse.ArgumentParser, *, team: bool) -> None:
    """The fields keys and teams share, as options (unset ones are not sent)."""
    parser.add_argument("--name")
    parser.add_argument("--models", help="comma-separated model names ('' for none; omit: all)")
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--max-parallel", type=int)
    parser.add_argument("--max-budget", type=float, help="USD")
    parser.add_argument("--budget-duration", help='the budget period: "1h", "1d", "30d"')
    parser.add_argument("--metadata", help="a JSON object")
    if not team:
        parser.add_argument("--team", help="team id")
        parser.add_argument("--expires-at", help="RFC 3339 timestamp")
        parser.add_argument("--role", choices=["user", "admin"])


def _unset(parser: argparse.ArgumentParser, *, team: bool) -> None:
    """``update --unset FIELD``: the field set back to null (no limit, all models, no team)."""
    parser.add_argument(
        "--unset",
        action="append",
        default=[],
        choices=_TEAM_CLEARABLE if team else _KEY_CLEARABLE,
        metavar="FIELD",
        help="set FIELD back to null (no limit; all models; no team); repeatable: "
        + ", ".join(_TEAM_CLEARABLE if team else _KEY_CLEARABLE),
    )


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in (
        "name",
        "team",
        "rpm",
        "tpm",
        "max_parallel",
        "max_budget",
        "budget_duration",
        "expires_at",
        "role",
    ):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.models is not None:
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.metadata is not None:
        try:
            fields["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--metadata is not JSON: {exc}") from None
    if getattr(args, "disable", None) is not None:
        fields["disabled"] = args.disable
    for name in getattr(args, "unset", ()):
        if name in fields:
            raise CommandError(f"--{name.replace('_', '-')} and --unset {name}: choose one")
        fields[name] = None
    return fields


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aioproxy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("AIOPROXY_URL", DEFAULT_URL),
        help="the running instance (default: $AIOPROXY_URL, else %(default)s)",
    )
    common.add_argument(
        "--master-key",
        default=os.environ.get("AIOPROXY_MASTER_KEY"),
        help="the master key or an admin key (default: $AIOPROXY_MASTER_KEY)",
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    groups = parser.add_subparsers(dest="group", required=True)
    for group, singular in (("keys", "key"), ("teams", "team")):
        commands = groups.add_parser(group, help=f"{singular}s").add_subparsers(
            dest="command", required=True
        )
        create = commands.add_parser("create", parents=[common], help=f"create a {singular}")
        _limits(create, team=group == "teams")
        commands.add_parser("list", parents=[common], help=f"list the {group}")
        commands.add_parser("show", parents=[common]).add_argument("id")
        update = commands.add_parser("update", parents=[common], help=f"change a {singular}")
        update.add_argument("id")
        _limits(update, team=group == "teams")
        _unset(update, team=group == "teams")
        if group == "keys":
            state = update.add_mutually_exclusive_group()
            state.add_argument("--disable", dest="disable", action="store_const", const=True)
            state.add_argument("--enable", dest="disable", action="store_const", const=False)
        removal = "revoke" if group == "keys" else "delete"
        commands.add_parser(removal, parents=[common], help=f"{removal} a {singular}").add_argument(
            "id"
        )
    spend = groups.add_parser("spend", help="spend and the request log").add_subparsers(
        dest="command", required=True
    )
    summary = spend.add_parser("summary", parents=[common], help="spend grouped")
    summary.add_argument("--group-by", default="key", choices=["key", "team", "model", "day"])
    summary.add_argument("--start", help="date or RFC 3339 timestamp")
    summary.add_argument("--end", help="date or RFC 3339 timestamp")
    requests = spend.add_parser("requests", parents=[common], help="the latest requests")
    requests.add_argument("--limit", type=int, default=20)
    requests.add_argument("--key", dest="by_key", help="key id")
    requests.add_argument("--team", dest="by_team", help="team id")
    requests.add_argument("--model")
    requests.add_argument("--status", type=int)
    return parser.parse_args(argv)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if args.master_key:
        request.add_header("Authorization", f"Bearer {args.master_key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except json.JSONDecodeError:  # a 2xx, but not from an aioproxy (a web page, a proxy's)
        raise CommandError(
            f"{args.url} did not answer JSON: is it an aioproxy instance's address?"
        ) from None
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise CommandError(f"{exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise CommandError(f"cannot reach {args.url}: {exc.reason}") from None


def _request(args: argparse.Namespace) -> tuple[str, str, Any, tuple[str, ...] | None]:
    """The admin API call for a command, and the columns of its table (None: one object)."""
    if args.group == "spend":
        if args.command == "summary":
            query = {"group_by": args.group_by, "start": args.start, "end": args.end}
            path = "/admin/spend"
            columns: tuple[str, ...] = _SPEND_COLUMNS
        else:
            query = {
                "limit": args.limit,
                "key": args.by_key,
                "team": args.by_team,
                "model": args.model,
                "status": args.status,
            }
            path = "/admin/requests"
            columns = _REQUEST_COLUMNS
        encoded = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        return "GET", f"{path}?{encoded}", None, columns
    base = f"/admin/{args.group}"
    columns = _KEY_COLUMNS if args.group == "keys" else _TEAM_COLUMNS
    if args.command == "create":
        return "POST", base, _fields(args), None
    if args.command == "list":
        return "GET", base, None, columns
    path = f"{base}/{urllib.parse.quote(args.id, safe='')}"
    if args.command == "show":
        return "GET", path, None, None
    if args.command == "update":
        return "PATCH", path, _fields(args), None
    return "DELETE", path, None, None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def _show(data: dict[str, Any]) -> str:
    width = max(map(len, data), default=0)
    return "\n".join(f"{name.ljust(width)}  {_cell(value)}" for name, value in data.items())


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        method, path, body, columns = _request(args)
        data = _call(args, method, path, body)
    except CommandError as exc:
        print(f"aioproxy: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    elif columns is not None:
        print(table(data["data"], columns))
    else:
        print(_show(data))
        if "key" in data and isinstance(data["key"], str):
            print("\nThe key is shown this once: keep it now.", file=sys.stderr)
    return 0
