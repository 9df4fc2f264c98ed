"""The parser's process pool: parsing and composing on the second core, and losing it safely."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from gateway.app import App, Parser
from gateway.models import RawMail
from gateway.notices import DRAFTS
from gateway.pipeline import process_pending
from gateway.spool import insert_raw, raw_row
from parsing.mime import Limits
from parsing.model import Address
from responders.compose import compose
from responders.render import Notice

from conftest import deliveries, mail

NOTICE = Notice(subject="We got your mail [#SG-1]", text="Thanks.\n", html="<p>Thanks.</p>")
OPTIONS = {
    "from_addr": Address("support@example.com", "Support"),
    "to": [Address("jane@customer.org", "Jane")],
    "message_id": "SG-1.abc@example.com",
    "date": datetime(2026, 11, 22, 12, 0, tzinfo=UTC),
}


def unbounded(data: bytes) -> bytes:
    """The message with its random MIME boundary made constant."""
    return re.sub(rb"={15}\d+==", b"=BOUNDARY=", data)


def parser(workers: int) -> Parser:
    return Parser(workers=workers, timeout=20.0, limits=Limits())


async def test_composing_in_a_worker_process_gives_the_same_bytes() -> None:
    pool = parser(1)
    try:
        assert unbounded(await pool.compose(NOTICE, OPTIONS)) == unbounded(
            compose(NOTICE, **OPTIONS)
        )
    finally:
        pool.close()


async def test_a_pool_lost_under_a_compose_falls_back_to_composing_here() -> None:
    pool = parser(1)
    try:
        await pool.compose(NOTICE, OPTIONS)  # the pool is up
        jobs = [asyncio.ensure_future(pool.compose(NOTICE, OPTIONS)) for _ in range(20)]
        await asyncio.sleep(0)
        assert pool._composer is not None
        pool._composer.stop()  # as if the process died
        expected = unbounded(compose(NOTICE, **OPTIONS))
        assert [unbounded(d) for d in await asyncio.gather(*jobs)] == [expected] * 20
    finally:
        pool.close()


async def test_a_pool_recycled_under_parses_loses_none_of_them() -> None:
    pool = parser(2)
    data = mail(subject="hello")
    try:
        jobs = [asyncio.ensure_future(pool.parse(data)) for _ in range(10)]
        await asyncio.sleep(0.05)
        pool._parsing.recycle(pool._parsing.get())  # what a parse deadline does
        results = await asyncio.gather(*jobs)
        assert {r.subject for r in results} == {"hello"}
    finally:
        pool.close()


async def test_the_pipeline_composes_in_the_pool_and_stores_every_mail_whole(app: App) -> None:
    app.parser = parser(1)
    async with app.sessions() as session, session.begin():
        rows = [
            raw_row(
                mail(subject=f"printer {n} broken", sender=f"c{n}@customer.org"),
                mail_from=f"c{n}@customer.org",
                rcpt_tos=["support@example.com"],
                source="smtp",
                now=app.clock(),
            )
            for n in range(12)
        ]
        await insert_raw(session, rows)
    assert await process_pending(app) == {"processed": 12}
    sent = await deliveries(app)
    assert len(sent) >= 12
    for row in sent:
        parsed = email.message_from_bytes(row.data, policy=email.policy.default)
        assert parsed["Message-ID"] == f"<{row.message_id}>"
    async with app.sessions() as session:
        states = (await session.execute(select(RawMail.state))).scalars()
        assert set(states) == {"processed"}


async def test_a_commit_with_notices_still_being_composed_is_refused(app: App) -> None:
    pending: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    with pytest.raises(RuntimeError, match="settle_drafts"):
        async with app.sessions() as session, session.begin():
            session.info[DRAFTS] = [(pending, [])]
    pending.cancel()
