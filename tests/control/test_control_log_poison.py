"""A client's request must not stop the request log: on PostgreSQL, a row the database cannot
store (a NUL in the body's ``user``, a model name longer than the column) failed its whole batch,
which the writer retried for ever, so no row nor spend was written after it.

A client's x-request-id of 65 to 128 characters (request_ids takes them) did the same.

Now the row builder makes such text storable (cut to its column, no NUL), and the request id's
column holds 128 characters (migration 0006)."""

from __future__ import annotations

import pytest

from tests.control.conftest import Control


@pytest.mark.parametrize(
    ("poison", "request_id"),
    [
        ({"user": "end\x00user"}, None),  # PostgreSQL refuses a NUL in text
        ({"model": "m" * 300}, None),  # requests.model is VARCHAR(200); a 404, logged
        # request_ids takes a client's id of up to 128 characters; requests.request_id is
        # VARCHAR(64)
        ({}, "r" * 100),
    ],
    ids=["nul-in-user", "long-model", "long-request-id"],
)
async def test_a_row_the_database_cannot_store_does_not_stop_the_log(
    control: Control,
    db_url: str,
    poison: dict[str, str],
    request_id: str | None,
) -> None:
    created = await control.new_key(name="payer")
    headers = {"Authorization": f"Bearer {created['key']}"}
    poisoned = {**headers, "x-request-id": request_id} if request_id else headers
    for body, sent in (({**_CHAT, **poison}, poisoned), (_CHAT, headers)):
        async with control.session.post(
            control.url("/v1/chat/completions"), json=body, headers=sent
        ) as response:
            assert response.status in (200, 404)
    await control.plane.log.flush()
    rows = (await control.admin("GET", f"/admin/requests?key={created['id']}"))["data"]
    assert len(rows) == 2  # the poisoned request's row too, its text made storable
    assert (await control.admin("GET", f"/admin/keys/{created['id']}"))["total_spend"] > 0


_CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}
