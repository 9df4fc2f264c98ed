"""The parser's and the composer's process pools: work on the second core, and losing a pool
safely."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway import app as app_module
from gateway import notices, pipeline
from gateway.app import App, Composer, ComposerLost, Parser, _chunks
from gateway.db import session_scope
from gateway.models import Event, Message, RawMail, Ticket
from gateway.notices import send_notice
from gateway.pipeline import process_pending
from gateway.spool import insert_raw, raw_row
from parsing.mime import Limits, MessageRejected
from parsing.model import Address
from responders.drafts import Draft

from conftest import deliveries, mail


async def store(app: App, count: int, *, sender: str = "") -> None:
    """`count` new customer mails stored as the SMTP spool stores them, each from its own
    customer unless `sender` is given."""
    async with app.sessions() as session, session.begin():
        rows = [
            raw_row(
                mail(subject=f"printer {n} broken", sender=sender or f"c{n}@customer.org"),
                mail_from=sender or f"c{n}@customer.org",
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


BOMB = (Path(__file__).parent / "fixtures" / "hostile" / "mime-bomb-many-parts.eml").read_bytes()


@pytest.mark.parametrize("workers", [0, 1, 2])
async def test_parse_many_answers_each_message_in_its_place(workers: int) -> None:
    pool = parser(workers)
    raws = [mail(subject=f"n{n}") if n % 7 else BOMB for n in range(60)]
    try:
        results = await pool.parse_many(raws)
    finally:
        pool.close()
    assert len(results) == 60
    for n, result in enumerate(results):
        if n % 7:
            assert not isinstance(result, BaseException) and result.subject == f"n{n}"
        else:
            assert isinstance(result, MessageRejected), result
            assert "more than 500 MIME parts" in str(result)


async def test_a_chunk_lost_with_its_process_is_parsed_again_one_by_one() -> None:
    pool = parser(1)
    raws = [mail(subject=f"n{n}") for n in range(30)]
    try:
        await pool.parse(raws[0])  # the process is up
        jobs = asyncio.ensure_future(pool.parse_many(raws))
        processes = pool._parsing.get()
        # Until the first chunk is in the pool (which has no event to wait on).
        while not getattr(processes, "_pending_work_items", None):  # noqa: ASYNC110
            await asyncio.sleep(0)
        pool._parsing.recycle(processes)  # what a parse deadline does
        results = await jobs
    finally:
        pool.close()
    assert [r.subject for r in results if not isinstance(r, BaseException)] == [
        f"n{n}" for n in range(30)
    ]


async def test_a_chunk_over_its_deadline_refuses_only_the_slow_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_hostile import base64_attachment

    pool = parser(1)
    slow, _ = base64_attachment(20 * 1024 * 1024)  # cannot even reach the process in 0.5 s
    monkeypatch.setattr(app_module, "CHUNK_BYTES", 64 << 20)  # one chunk with the others
    raws = [mail(subject="a"), slow, mail(subject="b")]
    assert len(_chunks(raws)) == 1
    try:
        await pool.parse(raws[0])  # the process is up
        pool.timeout = 0.5
        results = await pool.parse_many(raws)
    finally:
        pool.close()
    assert [getattr(r, "subject", None) for r in results] == ["a", None, "b"]
    assert "parsing took longer than 0.5 s" in str(results[1])


def test_chunks_are_bounded_in_messages_and_bytes() -> None:
    small, big = b"x" * 1000, b"y" * (3 << 20)
    sizes = [len(c) for c in _chunks([small] * 60)]
    assert sizes == [25, 25, 10]
    chunks = _chunks([small, small, big, small, small])
    assert [[len(m) for m in c] for c in chunks] == [[1000, 1000], [3 << 20], [1000, 1000]]
    assert _chunks([]) == []


def composer(app: App, *, timeout: float = 20.0) -> Composer:
    return Composer(workers=1, timeout=timeout, templates=None, renderer=app.renderer)


async def outbound(app: App) -> list[Message]:
    async with app.sessions() as session:
        query = select(Message).where(Message.direction == "out").order_by(Message.id)
        return list((await session.execute(query)).scalars())


async def test_notices_written_in_the_composer_process_are_stored_whole(app: App) -> None:
    """The group's notices are rendered and composed in a process of their own; what the
    ticket shows of each is what its message says."""
    app.composer.close()
    app.composer = composer(app)
    await store(app, 8)
    assert await process_pending(app) == {"processed": 8}
    sent = {row.message_id: row for row in await deliveries(app)}
    acks = [m for m in await outbound(app) if m.classification == "acknowledgement"]
    assert len(acks) == 8
    for message in acks:
        data = sent[message.message_id].data
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert parsed["Subject"] == message.subject
        body = parsed.get_body(("plain",))
        assert body is not None
        assert body.get_content().replace("\r\n", "\n") == message.text
        assert parsed["To"] == message.to_addrs[0]


async def test_a_composer_lost_under_a_group_costs_nothing_but_time(app: App) -> None:
    """Past its deadline the composer is replaced and the group is redone, its notices
    written inline: every message processed, every notice queued once."""
    app.composer.close()
    app.composer = composer(app, timeout=0.0)
    await store(app, 6)
    assert await process_pending(app) == {"processed": 6}
    acks = [m for m in await outbound(app) if m.classification == "acknowledgement"]
    assert len(acks) == 6
    assert len({m.ticket_id for m in acks}) == 6
    kinds = [row.kind for row in await deliveries(app)]
    assert kinds.count("acknowledgement") == 6


async def test_the_hourly_cap_counts_notices_not_written_yet(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's notices are stored when it ends; the loop gate counts those it has
    decided on meanwhile, so one sender's many new tickets in one group get no more
    acknowledgements than the cap."""
    monkeypatch.setattr(pipeline, "GROUP_SECONDS", 600.0)  # every message in one group
    await store(app, 12, sender="flood@customer.org")
    assert await process_pending(app) == {"processed": 12}
    cap = app.config.limits.auto_per_sender_per_hour
    acks = [r for r in await deliveries(app, "acknowledgement") if r.status == "queued"]
    assert len(acks) == cap
    async with app.sessions() as session:
        skipped = (
            await session.execute(select(Event).where(Event.action == "notice-skipped"))
        ).scalars()
        assert [e.detail["reason"] for e in skipped] == [f"hourly cap of {cap} reached"] * (
            12 - cap
        )


async def test_deferred_notices_must_be_stored_before_the_commit(app: App) -> None:
    await store(app, 1)
    await process_pending(app)
    before = len(await deliveries(app))
    with pytest.raises(RuntimeError, match="not flushed"):
        async with session_scope(app.sessions) as session:
            ticket = (await session.execute(select(Ticket))).scalar_one()
            notices.defer(session, app)
            await send_notice(
                session, app, ticket, "solved", to=[Address(ticket.requester)], now=app.clock()
            )
    assert len(await deliveries(app)) == before


async def test_a_composer_process_killed_between_groups_is_replaced(app: App) -> None:
    """A pool whose process died (the OOM killer, say) takes no more work: the group that
    finds it so is redone inline and the next one gets a new process."""
    app.composer.close()
    app.composer = composer(app)
    await store(app, 2)
    assert await process_pending(app) == {"processed": 2}
    pool = app.composer._writing._pool
    assert pool is not None
    for process in list(pool._processes.values()):
        os.kill(process.pid, signal.SIGKILL)
    for _ in range(100):  # until the pool's manager thread has seen it
        if pool._broken:
            break
        await asyncio.sleep(0.05)
    for _ in range(3):
        await store(app, 3)
        assert await process_pending(app) == {"processed": 3}
    assert app.composer._writing._pool not in (None, pool)
    kinds = [row.kind for row in await deliveries(app)]
    assert kinds.count("acknowledgement") == 11


async def test_a_groups_notices_keep_their_place_among_the_tickets_messages(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticket's messages read in the order they happened, though a group's notices are
    written at its end: a ticket opened and answered within one group shows the
    acknowledgement before the answer."""
    monkeypatch.setattr(pipeline, "GROUP_SECONDS", 600.0)
    first = mail(message_id="m1@customer.org", subject="printer broken")
    second = mail(
        message_id="m2@customer.org",
        subject="Re: printer broken",
        headers={"In-Reply-To": "<m1@customer.org>"},
        body="Also the scanner.\r\n",
    )
    async with app.sessions() as session, session.begin():
        rows = [
            raw_row(
                data,
                mail_from="jane@customer.org",
                rcpt_tos=["support@example.com"],
                source="smtp",
                now=app.clock(),
            )
            for data in (first, second)
        ]
        await insert_raw(session, rows)
    assert await process_pending(app) == {"processed": 2}
    async with app.sessions() as session:
        timeline = (await session.execute(select(Message).order_by(Message.id))).scalars()
        assert [(m.direction, m.classification or m.message_id) for m in timeline] == [
            ("in", "customer"),
            ("out", "acknowledgement"),
            ("out", "agent_notification"),
            ("in", "customer"),
            ("out", "agent_notification"),
        ]


async def test_a_composer_job_cancelled_under_the_collector_is_a_lost_composer(app: App) -> None:
    """A job cancelled by its pool (replaced under it) is not the pipeline's cancellation:
    collecting it raises ComposerLost, which redoes the group, not CancelledError."""
    writer = composer(app)
    try:
        handed = writer.hand_over([Draft("acknowledgement", {}, {})])
        handed.future.cancel()
        with pytest.raises(ComposerLost):
            await writer.collect([handed])
    finally:
        writer.close()


async def test_a_notice_in_a_savepoint_is_written_in_it(app: App) -> None:
    """A notice sent within a savepoint is written there, so the savepoint's rollback takes
    it back; deferred, it would have been stored at the flush regardless."""
    await store(app, 1)
    await process_pending(app)
    before = len(await deliveries(app))
    async with session_scope(app.sessions) as session:
        ticket = (await session.execute(select(Ticket))).scalar_one()
        notices.defer(session, app)
        savepoint = await session.begin_nested()
        await send_notice(
            session, app, ticket, "solved", to=[Address(ticket.requester)], now=app.clock()
        )
        await savepoint.rollback()
        await notices.flush(session)
    assert len(await deliveries(app)) == before
