"""A bounce to a real outbound delivery: linked by VERP, the address suppressed, the agent told."""

from __future__ import annotations

import email
import email.policy

import pytest
from sqlalchemy import select

from gateway.app import App
from gateway.models import Delivery, Event, Message, RawMail, Suppression

from conftest import Clock, flush, mail, receive
from smtp_sink import SmtpSink


@pytest.fixture
def smarthost(smtp_sink: SmtpSink) -> str:
    return f"127.0.0.1:{smtp_sink.port}"


def dsn(
    *, verp: str, recipient: str, status: str, original_id: str, action: str = "failed"
) -> bytes:
    """An RFC 3464 report as Postfix writes it."""
    diagnostic = f"smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown"
    if status.startswith("4"):
        diagnostic = "smtp; 452 4.2.2 Mailbox full"
    return (
        "From: MAILER-DAEMON@mx.customer.org (Mail Delivery System)\r\n"
        f"To: {verp}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <bounce.1@mx.customer.org>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you that your message "
        "could not be delivered.\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.org\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: {diagnostic}\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@example.com\r\nTo: {recipient}\r\nMessage-ID: <{original_id}>\r\n\r\n"
        "--B--\r\n"
    ).encode()


async def the_ack(app: App) -> Delivery:
    async with app.sessions() as session:
        return (
            (
                await session.execute(
                    select(Delivery).where(Delivery.kind == "acknowledgement").order_by(Delivery.id)
                )
            )
            .scalars()
            .first()
        )  # type: ignore[return-value]


async def test_hard_bounce_marks_suppresses_notes_and_skips_the_next_ack(
    app: App, smtp_sink: SmtpSink, clock: Clock, backend: str
) -> None:
    await receive(app, mail(sender="jane@customer.org"))
    await flush(app)
    ack = await the_ack(app)
    sent = next(m for m in smtp_sink.messages if m.rcpt_tos == ("jane@customer.org",))
    assert sent.mail_from == ack.mail_from  # the VERP address went out as the envelope sender
    smtp_sink.messages.clear()
    clock.advance(minutes=10)
    report = dsn(
        verp=sent.mail_from,
        recipient="jane@customer.org",
        status="5.1.1",
        original_id=ack.message_id,
    )
    await receive(app, report, rcpt=sent.mail_from, mail_from="")
    async with app.sessions() as session:
        delivery = await session.get(Delivery, ack.id)
        assert delivery is not None and delivery.status == "bounced"
        assert "5.1.1" in delivery.last_error
        suppressed = await session.get(Suppression, "jane@customer.org")
        assert suppressed is not None and suppressed.delivery_id == ack.id
        note = (
            await session.execute(
                select(Message).where(Message.kind == "note", Message.classification == "bounce")
            )
        ).scalar_one()
        assert note.ticket_id == delivery.ticket_id
        raw = (await session.execute(select(RawMail).order_by(RawMail.id.desc()))).scalars().first()
        assert raw is not None and raw.note.startswith("bounce:")
        failure = (
            await session.execute(select(Delivery).where(Delivery.kind == "delivery_failure"))
        ).scalar_one()
        assert failure.recipient == "support-engineering@example.com"
    # the bounce made no ticket and got no answer
    await flush(app)
    assert all(m.rcpt_tos != ("mailer-daemon@mx.customer.org",) for m in smtp_sink.messages)
    # the next acknowledgement to that address is skipped and logged as suppressed
    smtp_sink.messages.clear()
    await receive(app, mail(sender="jane@customer.org", subject="another question"))
    await flush(app)
    assert all("jane@customer.org" not in m.rcpt_tos for m in smtp_sink.messages)
    async with app.sessions() as session:
        skipped = (
            await session.execute(select(Delivery).where(Delivery.status == "suppressed"))
        ).scalar_one()
        assert skipped.recipient == "jane@customer.org" and skipped.kind == "acknowledgement"


async def test_soft_bounce_is_recorded_only(app: App, smtp_sink: SmtpSink) -> None:
    await receive(app, mail(sender="jane@customer.org"))
    await flush(app)
    ack = await the_ack(app)
    report = dsn(
        verp=ack.mail_from,
        recipient="jane@customer.org",
        status="4.2.2",
        original_id=ack.message_id,
        action="delayed",
    )
    await receive(app, report, rcpt=ack.mail_from, mail_from="")
    async with app.sessions() as session:
        delivery = await session.get(Delivery, ack.id)
        assert delivery is not None and delivery.status == "sent"
        assert await session.get(Suppression, "jane@customer.org") is None
        actions = list((await session.execute(select(Event.action))).scalars())
        assert "bounce-soft" in actions


async def test_bounce_without_verp_matches_the_original_message_id(
    app: App, smtp_sink: SmtpSink
) -> None:
    await receive(app, mail(sender="jane@customer.org"))
    await flush(app)
    ack = await the_ack(app)
    report = dsn(
        verp="support@example.com",
        recipient="jane@customer.org",
        status="5.1.1",
        original_id=ack.message_id,
    )
    await receive(app, report, rcpt="support@example.com", mail_from="")
    async with app.sessions() as session:
        delivery = await session.get(Delivery, ack.id)
        assert delivery is not None and delivery.status == "bounced"
        # anyone can name a Message-ID in a report: without VERP nothing is suppressed
        assert await session.get(Suppression, "jane@customer.org") is None


async def test_a_tampered_verp_address_links_nothing(app: App, smtp_sink: SmtpSink) -> None:
    await receive(app, mail(sender="jane@customer.org"))
    await flush(app)
    ack = await the_ack(app)
    forged = ack.mail_from.replace("-", "-0", 1)
    report = dsn(
        verp=forged, recipient="jane@customer.org", status="5.1.1", original_id="nothing@x"
    )
    await receive(app, report, rcpt=forged, mail_from="")
    async with app.sessions() as session:
        delivery = await session.get(Delivery, ack.id)
        assert delivery is not None and delivery.status == "sent"
        assert await session.get(Suppression, "jane@customer.org") is None


def test_dsn_fixture_parses_as_a_report() -> None:
    message = email.message_from_bytes(
        dsn(verp="b@example.com", recipient="x@y.org", status="5.1.1", original_id="a@b"),
        policy=email.policy.compat32,
    )
    assert message.get_content_type() == "multipart/report"
