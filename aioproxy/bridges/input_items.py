"""``GET /v1/responses/{id}/input_items`` for a bridged response: its stored conversation, as
Responses items, one page of OpenAI's item list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import BadRequest
from .common import text_of

__all__ = ["input_items", "item_page"]

_MAX_LIMIT = 100


def input_items(conversation: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    """The items used to generate the response, oldest first: every message of its stored
    conversation (earlier turns included) but its own answer, the last one.

    Ids are made from the response's id and the message's place, so that paging by ``after``
    finds the same item on every call.
    """
    stem = response_id.removeprefix("resp_")
    items: list[dict[str, Any]] = []
    for i, message in enumerate(conversation[:-1]):
        role = message.get("role")
        content = message.get("content")
        if role == "tool":
            items.append(
                {
                    "id": f"fco_{stem}_{i}",
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id"),
                    "output": text_of(content),
                    "status": "completed",
                }
            )
            continue
        if content not in (None, "", []):
            items.append(
                {
                    "id": f"msg_{stem}_{i}",
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": _parts(content, role),
                }
            )
        for j, tool_call in enumerate(message.get("tool_calls") or ()):
            function = tool_call.get("function") or {}
            items.append(
                {
                    "id": f"fc_{stem}_{i}_{j}",
                    "type": "function_call",
                    "call_id": tool_call.get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments") or "",
                    "status": "completed",
                }
            )
    return items


def _parts(content: Any, role: Any) -> list[dict[str, Any]]:
    if role == "assistant":
        return [{"type": "output_text", "text": text_of(content), "annotations": []}]
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    return [_part(part) for part in content if isinstance(part, dict)]


def _part(part: dict[str, Any]) -> dict[str, Any]:
    """A chat content part back as the Responses input part it came from."""
    kind = part.get("type")
    if kind == "text":
        return {"type": "input_text", "text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url") or {}
        return {
            "type": "input_image",
            "image_url": image.get("url"),
            "detail": image.get("detail") or "auto",
        }
    if kind == "file":
        return {"type": "input_file", **(part.get("file") or {})}
    return part  # input_audio: the same shape both ways


def item_page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of ``items`` as OpenAI's list object, by the ``limit``, ``order`` (default
    ``desc``) and ``after`` query parameters."""
    limit_text = query.get("limit", "20")
    # isascii: str.isdigit() takes "²" and other digits int() refuses.
    if (
        not (limit_text.isascii() and limit_text.isdigit())
        or not 1 <= int(limit_text) <= _MAX_LIMIT
    ):
        raise BadRequest(
            f"'limit' must be an integer from 1 to {_MAX_LIMIT}",
            param="limit",
            code="invalid_value",
        )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("'order' must be 'asc' or 'desc'", param="order", code="invalid_value")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise BadRequest(
                f"No item with id '{after}' in this response's input",
                param="after",
                code="invalid_value",
            )
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[: int(limit_text)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > len(page),
    }
