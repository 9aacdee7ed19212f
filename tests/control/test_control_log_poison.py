"""A client's request must not stop the request log: on PostgreSQL, a row the database cannot
store (a NUL in the body's ``user``, a model name longer than the column) failed its whole batch,
which the writer retried for ever, so no row nor spend was written after it.

Left to the lead (aioproxy/control/rows.py, requestlog.py are not this branch's): the test is a
strict xfail on PostgreSQL until they are fixed, then it passes (and the mark must go)."""

from __future__ import annotations

import pytest

from tests.control.conftest import Control


@pytest.mark.parametrize(
    "poison",
    [
        {"user": "end\x00user"},  # PostgreSQL refuses a NUL in text
        {"model": "m" * 300},  # requests.model is VARCHAR(200); a 404, logged with its name
    ],
    ids=["nul-in-user", "long-model"],
)
async def test_a_row_the_database_cannot_store_does_not_stop_the_log(
    control: Control, db_url: str, poison: dict[str, str], request: pytest.FixtureRequest
) -> None:
    if db_url.startswith("postgresql"):
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="rows.py keeps client text as sent: the batch fails whole, for ever",
            )
        )
    created = await control.new_key(name="payer")
    headers = {"Authorization": f"Bearer {created['key']}"}
    for body in ({**_CHAT, **poison}, _CHAT):
        async with control.session.post(
            control.url("/v1/chat/completions"), json=body, headers=headers
        ) as response:
            assert response.status in (200, 404)
    await control.plane.log.flush()
    rows = (await control.admin("GET", f"/admin/requests?key={created['id']}"))["data"]
    assert len(rows) == 2  # the poisoned request's row too, its text made storable
    assert (await control.admin("GET", f"/admin/keys/{created['id']}"))["total_spend"] > 0


_CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}
