"""The parser's process pool: parsing on the second core, and losing the pool safely."""

from __future__ import annotations

import asyncio
import email
import email.policy

from sqlalchemy import select

from gateway.app import App, Parser
from gateway.models import RawMail
from gateway.pipeline import process_pending
from gateway.spool import insert_raw, raw_row
from parsing.mime import Limits

from conftest import deliveries, mail


async def store(app: App, count: int) -> None:
    """`count` new customer mails stored as the SMTP spool stores them."""
    async with app.sessions() as session, session.begin():
        rows = [
            raw_row(
                mail(subject=f"printer {n} broken", sender=f"c{n}@customer.org"),
                mail_from=f"c{n}@customer.org",
                rcpt_tos=["support@example.com"],
                source="smtp",
                now=app.clock(),
            )
            for n in range(count)
        ]
        await insert_raw(session, rows)


def parser(workers: int) -> Parser:
    return Parser(workers=workers, timeout=20.0, limits=Limits())


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


async def test_the_pipeline_with_a_parser_process_stores_every_mail_whole(app: App) -> None:
    app.parser = parser(1)
    await store(app, 12)
    assert await process_pending(app) == {"processed": 12}
    sent = await deliveries(app)
    assert len(sent) >= 12
    for row in sent:
        parsed = email.message_from_bytes(row.data, policy=email.policy.default)
        assert parsed["Message-ID"] == f"<{row.message_id}>"
    async with app.sessions() as session:
        states = (await session.execute(select(RawMail.state))).scalars()
        assert set(states) == {"processed"}


async def test_a_group_commits_early_once_intake_waits_for_the_lock(app: App) -> None:
    from gateway.pipeline import process_group

    await store(app, 6)
    async with app.sessions() as session:
        raws = list((await session.execute(select(RawMail).order_by(RawMail.id))).scalars())
    items = [(raw, await app.parser.parse(raw.data)) for raw in raws]
    # The spool says it waits as soon as the group has started.
    asyncio.get_running_loop().call_soon(app.intake_waiting.set)
    counts, rest = await process_group(app, items)
    assert counts == {"processed": 6 - len(rest)}
    assert 0 < len(rest) < 6  # committed early, the rest left for the next group
    assert await process_pending(app) == {"processed": len(rest)}


async def test_the_spool_says_when_it_waits_for_the_write_lock(app: App) -> None:
    from gateway.spool import Spool

    told: list[int] = []
    spool = Spool(app.intake, clock=app.clock, on_busy=lambda: told.append(1))
    writer = asyncio.ensure_future(spool.run())
    try:
        # Holds the lock the spool writes under (the intake file's, on SQLite).
        async with app.intake() as session, session.begin():
            await session.execute(select(RawMail.id).limit(1))
            storing = asyncio.ensure_future(
                spool.store(
                    mail(),
                    mail_from="j@customer.org",
                    rcpt_tos=["support@example.com"],
                    source="smtp",
                )
            )
            await asyncio.sleep(0.05)
            assert told and not storing.done()
        assert await storing > 0
    finally:
        writer.cancel()
