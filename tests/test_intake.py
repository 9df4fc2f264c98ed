"""The intake file: on SQLite, mail is stored before its 250 in a file the worker never locks
for long, and moved to raw_mail in order, exactly once, whatever fails in between."""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import sqlite3
from pathlib import Path

import aiosmtplib
import pytest

from gateway import intake
from gateway.app import App, build_app
from gateway.intake import move_received, stored_hashes
from gateway.metrics import render_metrics
from gateway.spool import Spool

from conftest import mail, stored_raw


def db_path(app: App) -> Path:
    return Path(app.config.database_url.partition(":///")[2])


def intake_path(app: App) -> Path:
    return Path(str(app.intake_engine.url.database))


async def store(app: App, count: int, *, tag: str = "m") -> list[bytes]:
    """Store `count` messages through the spool, as the SMTP listener does."""
    spool = Spool(app.intake, clock=app.clock)
    writer = asyncio.create_task(spool.run())
    sent = [mail(message_id=f"{tag}{n}@customer.org") for n in range(count)]
    try:
        await asyncio.gather(
            *(
                spool.store(
                    data,
                    mail_from="jane@customer.org",
                    rcpt_tos=["support@example.com"],
                    source="smtp",
                )
                for data in sent
            )
        )
    finally:
        writer.cancel()
    return sent


async def test_a_250_does_not_wait_for_the_pipelines_write_lock(app: App, listener: int) -> None:
    assert app.intake_file
    holder = sqlite3.connect(db_path(app), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # what a pipeline group holds while it writes tickets
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener)
        await client.connect()
        errors, reply = await client.sendmail("jane@customer.org", ["support@example.com"], mail())
        await client.quit()
        assert errors == {}
        assert reply.startswith("2.0.0 OK queued as")
        assert await intake.waiting(app) == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (row,) = await stored_raw(app)
    assert row.state == "received" and row.source == "smtp"
    assert await intake.waiting(app) == 0


async def test_moved_mail_keeps_its_order_envelope_and_bytes(app: App) -> None:
    sent = await store(app, 30)
    rows = await stored_raw(app)
    assert [r.data for r in rows] == sent
    assert {r.message_id for r in rows} == {f"m{n}@customer.org" for n in range(30)}
    assert all(
        r.rcpt_tos == ["support@example.com"] and r.mail_from == "jane@customer.org" for r in rows
    )
    assert all(r.received_at == app.clock() for r in rows)


async def test_a_move_whose_clearing_failed_is_not_moved_again(app: App) -> None:
    """The crash this guards: rows moved and committed, the intake file not yet cleared."""
    await store(app, 3)
    side = sqlite3.connect(intake_path(app), isolation_level=None)
    side.execute("BEGIN IMMEDIATE")  # intake holds its lock: the clearing must give up
    try:
        assert await move_received(app) == 3
    finally:
        side.execute("ROLLBACK")
    assert side.execute("SELECT count(*) FROM raw_mail").fetchone() == (3,)
    assert await intake.waiting(app) == 0
    await store(app, 1, tag="late")
    assert await move_received(app) == 1  # and the three left over are cleared with it
    assert side.execute("SELECT count(*) FROM raw_mail").fetchone() == (0,)
    side.close()
    assert len(await stored_raw(app)) == 4


async def test_an_intake_file_made_anew_starts_from_its_own_first_id(app: App) -> None:
    await store(app, 2)
    assert len(await stored_raw(app)) == 2
    await app.intake_engine.dispose()
    await app.intake_reader_engine.dispose()
    side = intake_path(app)
    for path in side.parent.glob(side.name + "*"):
        path.unlink()
    await store(app, 2, tag="after")  # ids 1 and 2 again, in a file with a new epoch
    rows = await stored_raw(app)
    assert [r.message_id for r in rows] == [
        "m0@customer.org",
        "m1@customer.org",
        "after0@customer.org",
        "after1@customer.org",
    ]


async def test_two_movers_at_once_move_each_message_once(app: App) -> None:
    """Two apps with their own connections, as two worker processes would have."""
    other = build_app(app.config, clock=app.clock, parse_workers=0)
    try:
        await store(app, 200)
        for _ in range(3):
            await asyncio.gather(move_received(app), move_received(other))
        rows = await stored_raw(app)
    finally:
        await other.close()
    assert sorted(r.message_id for r in rows) == sorted(f"m{n}@customer.org" for n in range(200))


async def test_the_backlog_counts_mail_not_yet_moved(app: App) -> None:
    sent = await store(app, 2)
    text = await render_metrics(app, listeners_up=True)
    assert "supportgate_backlog 2" in text and "supportgate_received_total 2" in text
    digests = {hashlib.sha256(data).hexdigest() for data in sent}
    # An IMAP re-fetch sees the stored copies before they are moved, and after.
    assert await stored_hashes(app, source="smtp", hashes=digests) == digests
    await stored_raw(app)
    assert await stored_hashes(app, source="smtp", hashes=digests) == digests
    assert "supportgate_backlog 2" in await render_metrics(app, listeners_up=True)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgresql_has_no_intake_file(app: App, listener: int, backend: str) -> None:
    assert not app.intake_file

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", listener, timeout=10) as client:
            client.sendmail("jane@customer.org", ["support@example.com"], mail())

    await asyncio.to_thread(send)
    assert await move_received(app) == 0
    assert len(await stored_raw(app)) == 1
