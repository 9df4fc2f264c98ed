"""Outbound mail against a real aiosmtpd sink: headers, retries, failures, restarts, loops."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from gateway.app import App, build_app
from gateway.models import DeliveryAttempt
from gateway.outbox import OutboxWorker, delivery_from_verp

from conftest import Clock, deliveries, flush, mail, receive
from smtp_sink import SmtpSink


@pytest.fixture
def smarthost(smtp_sink: SmtpSink) -> str:
    return f"127.0.0.1:{smtp_sink.port}"


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def test_acknowledgement_reaches_the_sink_threaded_and_marked(
    app: App, smtp_sink: SmtpSink, backend: str
) -> None:
    await receive(
        app,
        mail(
            message_id="hello@customer.org",
            subject="Cannot log in",
            headers={"References": "<older@customer.org>"},
        ),
    )
    await flush(app)
    acks = [m for m in smtp_sink.messages if m.rcpt_tos == ("jane@customer.org",)]
    assert len(acks) == 1
    sent = parse(acks[0].data)
    assert sent["From"] == "Example Support <support@example.com>"
    assert sent["To"] == "Jane Doe <jane@customer.org>"
    assert sent["In-Reply-To"] == "<hello@customer.org>"
    assert sent["References"] == "<older@customer.org> <hello@customer.org>"
    assert sent["Auto-Submitted"] == "auto-replied"
    assert sent["X-Auto-Response-Suppress"] == "All"
    assert sent["Message-ID"].endswith("@example.com>")
    assert "[#SG-1]" in sent["Subject"]
    assert sent["Reply-To"].addresses[0].addr_spec.startswith("support+")
    assert sent["Thread-Index"]
    (row, *_) = await deliveries(app)
    assert row.status == "sent" and row.attempts == 1
    assert delivery_from_verp(app.config, acks[0].mail_from) == row.id
    # the team hears about it too, from the support address
    team = [m for m in smtp_sink.messages if m.rcpt_tos == ("support-engineering@example.com",)]
    assert len(team) == 1


async def test_a_4xx_is_retried_with_backoff_then_delivered(
    app: App, smtp_sink: SmtpSink, clock: Clock
) -> None:
    await receive(app, mail())
    smtp_sink.fail_next(451, "4.3.0 try later", count=2)
    await flush(app)
    rows = await deliveries(app)
    assert {r.status for r in rows} == {"deferred"}
    assert all(r.next_attempt_at and r.next_attempt_at > clock.now for r in rows)
    assert await flush(app) == 0  # nothing due yet
    clock.advance(minutes=5)
    await flush(app)
    rows = await deliveries(app)
    assert {r.status for r in rows} == {"sent"}
    assert all(r.attempts == 2 for r in rows)
    async with app.sessions() as session:
        attempts = list((await session.execute(select(DeliveryAttempt))).scalars())
    assert sorted(a.outcome for a in attempts) == ["sent", "sent", "temporary", "temporary"]


async def test_a_5xx_fails_at_once_with_the_reply(app: App, smtp_sink: SmtpSink) -> None:
    await receive(app, mail())
    smtp_sink.fail_next(550, "5.1.1 no such user", count=2, stage="rcpt")
    await flush(app)
    rows = await deliveries(app)
    assert {r.status for r in rows} == {"failed"}
    assert "550" in rows[0].last_error and "no such user" in rows[0].last_error


async def test_dropped_connections_and_a_down_relay_defer(
    app: App, smtp_sink: SmtpSink, clock: Clock
) -> None:
    await receive(app, mail())
    await smtp_sink.down()
    await flush(app)
    assert {r.status for r in await deliveries(app)} == {"deferred"}
    await smtp_sink.up()
    smtp_sink.drop_next_connection(count=2)
    clock.advance(minutes=5)
    await flush(app)
    assert {r.status for r in await deliveries(app)} == {"deferred"}
    clock.advance(minutes=30)
    await flush(app)
    assert {r.status for r in await deliveries(app)} == {"sent"}


async def test_past_the_deadline_a_delivery_fails_with_a_reason(
    app: App, smtp_sink: SmtpSink, clock: Clock
) -> None:
    await receive(app, mail())
    await smtp_sink.down()
    for _ in range(40):
        await flush(app)
        clock.advance(hours=4.5)
    rows = await deliveries(app)
    assert {r.status for r in rows} == {"failed"}
    assert rows[0].last_error.startswith("gave up after")


async def test_queued_mail_survives_a_restart(app: App, smtp_sink: SmtpSink, clock: Clock) -> None:
    await receive(app, mail())
    assert {r.status for r in await deliveries(app)} == {"queued"}
    await app.engine.dispose()  # the process that queued it is gone
    second = build_app(app.config, clock=clock, parse_workers=0)
    try:
        await flush(second)
    finally:
        await second.close()
    assert len(smtp_sink.messages) == 2


async def test_no_mail_to_auto_replies_or_our_own_addresses(app: App, smtp_sink: SmtpSink) -> None:
    await receive(app, mail(headers={"Auto-Submitted": "auto-replied"}))
    await receive(app, mail(sender="hey@example.com"))
    await receive(app, mail(sender="MAILER-DAEMON@relay.example.net"))
    await receive(app, mail(), mail_from="")
    await flush(app)
    assert [
        m for m in smtp_sink.messages if m.rcpt_tos != ("support-engineering@example.com",)
    ] == []


async def test_an_echoing_autoresponder_gets_one_ack_per_ticket_per_day(
    app: App, smtp_sink: SmtpSink, clock: Clock
) -> None:
    """A responder that marks nothing and keeps our threading headers: one ticket, one ack."""
    await receive(app, mail(sender="bot@loop.example", message_id="m0@loop.example"))
    await flush(app)
    for n in range(1, 97):  # every 15 minutes for a day
        clock.advance(minutes=15)
        last = [m for m in smtp_sink.messages if m.rcpt_tos == ("bot@loop.example",)]
        parent = parse(last[-1].data)["Message-ID"] if last else "<m0@loop.example>"
        await receive(
            app,
            mail(
                sender="bot@loop.example",
                subject="Re: your mail",
                message_id=f"m{n}@loop.example",
                headers={"In-Reply-To": parent},
            ),
        )
        await flush(app)
    to_bot = [m for m in smtp_sink.messages if m.rcpt_tos == ("bot@loop.example",)]
    assert len(to_bot) == 1


async def test_a_responder_that_drops_threading_is_held_by_the_hourly_cap(
    app: App, smtp_sink: SmtpSink, clock: Clock
) -> None:
    for n in range(30):
        clock.advance(minutes=2)
        await receive(app, mail(sender="bot@loop.example", subject=f"Auto {n}"))
        await flush(app)
    to_bot = [m for m in smtp_sink.messages if m.rcpt_tos == ("bot@loop.example",)]
    assert len(to_bot) == app.config.limits.auto_per_sender_per_hour


async def test_two_workers_never_send_the_same_delivery(
    app: App, smtp_sink: SmtpSink, clock: Clock, backend: str
) -> None:
    """Scale-out: workers in several processes claim rows (FOR UPDATE SKIP LOCKED on PostgreSQL)."""
    for n in range(15):
        await receive(app, mail(sender=f"c{n}@customer.org"))
    second = build_app(app.config, clock=clock, parse_workers=0)
    try:
        first_worker, second_worker = OutboxWorker(app), OutboxWorker(second)
        import asyncio

        await asyncio.gather(first_worker.flush(limit=4), second_worker.flush(limit=4))
        await first_worker.close()
        await second_worker.close()
    finally:
        await second.close()
    ids = [parse(m.data)["Message-ID"] + m.rcpt_tos[0] for m in smtp_sink.messages]
    assert len(ids) == len(set(ids)) == 30
    assert {r.status for r in await deliveries(app)} == {"sent"}


async def test_a_delivery_whose_record_fails_costs_its_neighbours_nothing(
    app: App, smtp_sink: SmtpSink
) -> None:
    """Results are recorded in groups; a group that fails is recorded one by one, and the one
    that cannot be recorded keeps its claim, to be sent again when it lapses (as after a crash)."""
    from sqlalchemy import text

    for n in range(3):
        await receive(app, mail(message_id=f"group{n}@customer.org"))
    rows = await deliveries(app)
    assert len(rows) == 6
    bad = rows[2].id
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TRIGGER fail BEFORE INSERT ON delivery_attempt "
                f"WHEN NEW.delivery_id = {bad} BEGIN SELECT RAISE(ABORT, 'injected'); END"
            )
        )
    assert await flush(app) == 6
    after = {row.id: row for row in await deliveries(app)}
    assert after.pop(bad).status == "queued"
    assert {row.status for row in after.values()} == {"sent"}
    assert len(smtp_sink.messages) == 6
    async with app.sessions() as session:
        attempts = (await session.execute(select(DeliveryAttempt))).scalars().all()
    assert sorted(a.delivery_id for a in attempts) == sorted(after)
