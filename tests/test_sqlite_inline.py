"""SQLite run on the loop's thread: a held write lock is waited for without blocking the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway import db, sqlite_inline
from gateway.db import make_engine, sessionmaker


def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/inline.db"


@asynccontextmanager
async def inline_sessions(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on an inline engine for a file with table t (id, v BLOB), disposed after."""
    engine = make_engine(url(tmp_path), inline=True)
    sessions = sessionmaker(engine)
    try:
        async with sessions() as session, session.begin():
            await session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"))
        yield sessions
    finally:
        await engine.dispose()


async def test_statements_and_transactions_work_as_with_aiosqlite(tmp_path: Path) -> None:
    async with inline_sessions(tmp_path) as sessions:
        async with sessions() as session, session.begin():
            await session.execute(text("INSERT INTO t (v) VALUES (:v)"), [{"v": b"a"}, {"v": b"b"}])
        with pytest.raises(RuntimeError):
            async with sessions() as session, session.begin():
                await session.execute(text("INSERT INTO t (v) VALUES (x'63')"))
                raise RuntimeError("roll back")
        async with sessions() as session:
            rows = (await session.execute(text("SELECT v FROM t ORDER BY id"))).scalars().all()
        assert rows == [b"a", b"b"]


async def test_a_held_write_lock_is_waited_for_while_the_loop_runs_on(tmp_path: Path) -> None:
    engine = make_engine(url(tmp_path), inline=True)
    sessions = sessionmaker(engine)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    try:
        async with sessions() as session, session.begin():
            await session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        release = asyncio.Event()

        async def holder() -> None:
            async with sessions() as session, session.begin():  # BEGIN IMMEDIATE
                await session.execute(text("INSERT INTO t DEFAULT VALUES"))
                await release.wait()

        async def waiter() -> int:
            async with sessions() as session, session.begin():
                await session.execute(text("INSERT INTO t DEFAULT VALUES"))
            async with sessions() as session:
                return int((await session.execute(text("SELECT count(*) FROM t"))).scalar_one())

        ticking = asyncio.ensure_future(ticker())
        holding = asyncio.ensure_future(holder())
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # still waiting for the lock...
        assert ticks > 20  # ...while the loop kept running (the holder needs it to finish)
        release.set()
        await holding
        assert await waiting == 2
        ticking.cancel()
    finally:
        await engine.dispose()


async def test_without_lock_wait_a_busy_database_fails_at_once(tmp_path: Path) -> None:
    engine = make_engine(url(tmp_path), inline=True)
    impatient = make_engine(url(tmp_path), inline=True, wait_for_lock=False)
    try:
        async with sessionmaker(engine)() as session, session.begin():
            await session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        async with sessionmaker(engine)() as session, session.begin():
            await session.execute(text("INSERT INTO t DEFAULT VALUES"))
            with pytest.raises(OperationalError, match="locked"):
                async with sessionmaker(impatient)() as other, other.begin():
                    await other.execute(text("INSERT INTO t DEFAULT VALUES"))
    finally:
        await engine.dispose()
        await impatient.dispose()


def wal_state(shm: Path) -> tuple[int, int]:
    """The log's frames and how many of them are copied into the database, read from the
    shared-memory index (`mxFrame`, `nBackfill`) so that asking checkpoints nothing."""
    data = shm.read_bytes()
    return struct.unpack_from("=I", data, 16)[0], struct.unpack_from("=I", data, 96)[0]


def checkpointers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sqlite-checkpoint"]


async def test_the_log_is_checkpointed_by_a_thread_not_by_the_commit(tmp_path: Path) -> None:
    async with inline_sessions(tmp_path) as sessions:
        # 2,000 pages: past SQLite's own 1,000, within the backstop, in one commit.
        rows = [{"v": bytes([n % 256]) * 4000} for n in range(2000)]
        async with sessions() as session, session.begin():
            await session.execute(text("INSERT INTO t (v) VALUES (:v)"), rows)
            autocheckpoint = (await session.execute(text("PRAGMA wal_autocheckpoint"))).scalar()
        assert autocheckpoint == sqlite_inline.BACKSTOP_PAGES
        assert len(checkpointers()) == 1  # one for the file, however many connections
        for _ in range(100):
            frames, copied = wal_state(tmp_path / "inline.db-shm")
            if copied == frames:
                break
            await asyncio.sleep(sqlite_inline.CHECKPOINT_SECONDS)
        # Nobody else checkpoints: the commit stayed under the backstop.
        assert frames > 2000 and copied == frames
    assert checkpointers() == []  # the thread stops with the last connection


async def test_inserts_on_sqlites_own_cursor_store_what_sqlalchemy_stores(tmp_path: Path) -> None:
    """`insert_row(s)` skip SQLAlchemy's execution on an inline connection: rows written that
    way and SQLAlchemy's way (an aiosqlite engine) are the same, byte for byte, defaults
    included; and a constraint error comes out as SQLAlchemy's."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from sqlalchemy.exc import IntegrityError

    from gateway.db import insert_row, insert_rows, upgrade
    from gateway.models import (
        Delivery,
        DeliveryAttempt,
        Message,
        Participant,
        Suppression,
        ThreadRef,
        Ticket,
    )
    from gateway.outbox import Gate, automatic_gate

    from conftest import load_config, write_config

    config = load_config(write_config(tmp_path))

    now = datetime(2026, 11, 23, 3, 4, 5, 678901, tzinfo=UTC)
    when = bindparam("at")
    RESCHEDULE = (
        update(Delivery).where(Delivery.id == bindparam("row")).values(next_attempt_at=when)
    )
    DELIVERY_TO = (
        select(Delivery.id).where(Delivery.recipient == bindparam("who")).order_by(Delivery.id)
    ).limit(1)

    async def write(name: str, *, inline: bool) -> Path:
        path = tmp_path / f"{name}.db"
        await asyncio.to_thread(upgrade, f"sqlite+aiosqlite:///{path}")
        engine = make_engine(f"sqlite+aiosqlite:///{path}", inline=inline)
        try:
            async with sessionmaker(engine)() as session, session.begin():
                ticket = Ticket(
                    ref="SG-1", queue="support", mailbox="support@example.com", status="new",
                    priority="normal", subject="s", requester="j@c.org", created_at=now,
                    updated_at=now,
                )  # fmt: skip
                session.add(ticket)
                await session.flush()
                out = await insert_row(
                    session, Message, ticket_id=ticket.id, raw_id=None, direction="out",
                    kind="auto", classification="acknowledgement", message_id="sg.1@x",
                    from_addr="support@example.com", from_name="Sü Pport", to_addrs=["a@b.c"],
                    subject="Re: ü", text="t\r\n", new_text="n", author="", threaded_by="new",
                    created_at=now,
                )  # fmt: skip
                assert out == 1
                refs = [
                    {"message_id": m, "ticket_id": ticket.id, "stored": s}
                    for m, s in (("a@x", True), ("b@x", False), ("a@x", False))
                ]
                on = ["message_id", "ticket_id"]
                await insert_rows(session, ThreadRef, refs, ignoring_conflicts_on=on)
                await insert_rows(session, ThreadRef, refs[:1], ignoring_conflicts_on=on)
                people = [{"ticket_id": ticket.id, "address": "j@c.org", "role": "requester"}]
                on = ["ticket_id", "address"]
                await insert_rows(session, Participant, people * 2, ignoring_conflicts_on=on)
                rows = [
                    {
                        "ticket_id": ticket.id, "message_row": out, "kind": "acknowledgement",
                        "automatic": automatic, "message_id": "sg.1@x", "mail_from": "",
                        "data": b"\x00\xffmail", "status": "queued", "attempts": 0,
                        "last_error": "", "created_at": now, "next_attempt_at": due,
                        "deadline_at": now + timedelta(days=2), "recipient": recipient,
                    }
                    for automatic, due, recipient in ((True, now, "a@b.c"), (False, None, "d@e.f"))
                ]  # fmt: skip
                await insert_rows(session, Delivery, rows)
                attempt = {"delivery_id": 1, "at": now, "outcome": "sent"}
                await insert_rows(session, DeliveryAttempt, [attempt])  # defaults for the rest
                with pytest.raises(IntegrityError):
                    await insert_rows(session, DeliveryAttempt, [{**attempt, "delivery_id": 99}])
                # A prebuilt UPDATE with a timestamp, and a SELECT with its own LIMIT.
                await db.execute(session, RESCHEDULE, {"row": 2, "at": now + timedelta(hours=1)})
                found = {"who": "d@e.f"}
                assert await db.scalar(session, DELIVERY_TO, found) == 2
                assert await db.scalar(session, DELIVERY_TO, {"who": "nobody@e.f"}) is None
                # The loop gate: pending suppressions are flushed first, expiry compared in SQL.
                for who, until in (("gone@b.c", now + timedelta(seconds=1)), ("was@b.c", now)):
                    session.add(
                        Suppression(address=who, reason="5.1.1", created_at=now, expires_at=until)
                    )
                gates = [
                    await automatic_gate(
                        session, config, recipient=who, kind="acknowledgement", ticket=ticket,
                        now=now,
                    )
                    for who in ("gone@b.c", "was@b.c", "a@b.c")
                ]  # fmt: skip
                assert gates == [
                    Gate(False, "suppressed: 5.1.1", suppressed=True),
                    Gate(True),
                    Gate(False, "already acknowledged today"),  # the delivery above
                ]
                capped = replace(config, limits=replace(config.limits, auto_per_sender_per_hour=1))
                gate = await automatic_gate(
                    session, capped, recipient="a@b.c", kind="nudge", ticket=ticket, now=now
                )
                assert gate == Gate(False, "hourly cap of 1 reached")
        finally:
            await engine.dispose()
        return path

    ours, theirs = await write("inline", inline=True), await write("aiosqlite", inline=False)
    tables = ["message", "thread_ref", "participant", "delivery", "delivery_attempt"]
    ran_raw = {stmt.table.name for stmt, raw in db._RAW.values() if stmt.is_insert and raw}
    assert ran_raw >= set(tables)  # the inline writes went SQLite's own way
    for table in tables:
        with sqlite3.connect(ours) as a, sqlite3.connect(theirs) as b:
            query = f"SELECT * FROM {table} ORDER BY id"
            mine, reference = a.execute(query).fetchall(), b.execute(query).fetchall()
        assert mine == reference, table
        assert mine, table


async def test_what_the_raw_path_cannot_do_goes_sqlalchemys_way(tmp_path: Path) -> None:
    """A result type that converts, an IN list, an onupdate made in Python, a value computed
    when run: `db.scalar` and `db.execute` answer as SQLAlchemy does."""
    from datetime import datetime

    from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func

    table = Table(
        "t",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("at", DateTime),
        Column("v", String),
        Column("changed", String, onupdate=lambda: "by onupdate"),
    )
    at = datetime(2026, 11, 23, 4, 5, 6)
    engine = make_engine(url(tmp_path), inline=True)
    try:
        async with sessionmaker(engine)() as session, session.begin():
            await (await session.connection()).run_sync(table.metadata.create_all)
            rows = [{"id": n, "at": at, "v": "a", "changed": ""} for n in (1, 2, 3)]
            await session.execute(table.insert(), rows)
            by_id = select(table.c.at).where(table.c.id == bindparam("id"))
            assert await db.scalar(session, by_id, {"id": 1}) == at  # a datetime, not text
            among = table.c.id.in_(bindparam("ids", expanding=True))
            counted = select(func.count()).select_from(table).where(among)
            assert await db.scalar(session, counted, {"ids": [1, 3]}) == 2
            now_value = bindparam("v", callable_=lambda: "computed")
            touch = update(table).where(table.c.id == bindparam("row")).values(v=now_value)
            await db.execute(session, touch, {"row": 2})
            changed = select(table.c.v, table.c.changed).where(table.c.id == 2)
            assert (await session.execute(changed)).one() == ("computed", "by onupdate")
    finally:
        await engine.dispose()
