"""Bounces matched to the exact delivery they are about: suppression, notes, the agent told."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import App
from gateway.models import Delivery, DeliveryAttempt, Message, RawMail, Suppression, Ticket
from gateway.outbox import delivery_from_verp
from gateway.tickets import event
from parsing.model import BounceRecipient, ParsedMessage


async def _deliveries(
    session: AsyncSession, app: App, raw: RawMail, parsed: ParsedMessage
) -> tuple[list[Delivery], bool]:
    """By VERP envelope recipient first; the original Message-ID in the report as fallback.

    The second value says whether the VERP address vouched for the match: only such a
    report may suppress an address, since anyone can write a report naming a Message-ID.
    """
    for rcpt in raw.rcpt_tos:
        ident = delivery_from_verp(app.config, rcpt)
        if ident is not None:
            found = await session.get(Delivery, ident)
            if found is not None:
                return [found], True
    original = parsed.bounce.original_message_id if parsed.bounce else ""
    if original:
        query = select(Delivery).where(Delivery.message_id == original)
        return list((await session.execute(query)).scalars()), False
    return [], False


def _match(deliveries: list[Delivery], recipient: BounceRecipient) -> Delivery | None:
    for delivery in deliveries:
        if delivery.recipient == recipient.address.lower():
            return delivery
    return deliveries[0] if len(deliveries) == 1 else None


async def suppress(
    session: AsyncSession,
    app: App,
    address: str,
    *,
    reason: str,
    now: datetime,
    delivery: Delivery | None,
) -> None:
    until = now + timedelta(days=app.config.outbound.suppress_days)
    row = await session.get(Suppression, address)
    if row is None:
        session.add(
            Suppression(
                address=address,
                reason=reason[:2000],
                created_at=now,
                expires_at=until,
                delivery_id=delivery.id if delivery else None,
            )
        )
    else:
        row.reason, row.expires_at = reason[:2000], until
        row.delivery_id = delivery.id if delivery else row.delivery_id


async def record(
    session: AsyncSession, app: App, raw: RawMail, parsed: ParsedMessage, *, now: datetime
) -> str:
    """Apply a delivery report; returns a one-line summary for the raw mail's record."""
    from gateway.agents import tell_agents  # agents imports the pipeline's neighbours

    bounce = parsed.bounce
    recipients = bounce.recipients if bounce else ()
    deliveries, vouched = await _deliveries(session, app, raw, parsed)
    summary: list[str] = []
    for recipient in recipients:
        if recipient.action == "delivered":
            continue
        delivery = _match(deliveries, recipient)
        code = recipient.status or "?"
        summary.append(f"{recipient.address} {code} {'hard' if recipient.hard else 'soft'}")
        if delivery is None:
            event(
                session,
                None,
                at=now,
                actor="gateway",
                action="bounce-unmatched",
                new=recipient.address,
                status=code,
                hard=recipient.hard,
                raw=raw.id,
            )
            continue
        session.add(
            DeliveryAttempt(
                delivery_id=delivery.id,
                at=now,
                outcome="bounce",
                code=0,
                reply=f"{code} {recipient.diagnostic}"[:2000],
            )
        )
        ticket = await session.get(Ticket, delivery.ticket_id) if delivery.ticket_id else None
        if not recipient.hard:
            event(
                session,
                ticket,
                at=now,
                actor="gateway",
                action="bounce-soft",
                new=recipient.address,
                status=code,
                delivery=delivery.id,
            )
            continue
        delivery.status = "bounced"
        delivery.next_attempt_at = None
        delivery.last_error = f"bounced: {code} {recipient.diagnostic}"[:2000]
        if vouched:
            await suppress(
                session,
                app,
                recipient.address.lower(),
                now=now,
                delivery=delivery,
                reason=f"hard bounce {code} {recipient.diagnostic}",
            )
        if ticket is not None:
            note = (
                f"Our mail to {recipient.address} bounced ({code}). {recipient.diagnostic}".strip()
            )
            session.add(
                Message(
                    ticket_id=ticket.id,
                    raw_id=raw.id,
                    direction="in",
                    kind="note",
                    classification="bounce",
                    message_id=parsed.message_id,
                    content_hash="",
                    from_addr="",
                    subject=parsed.subject,
                    text=note,
                    new_text=note,
                    threaded_by=f"in-reply-to:<{delivery.message_id}>",
                    created_at=now,
                )
            )
            event(
                session,
                ticket,
                at=now,
                actor="gateway",
                action="bounce-hard",
                new=recipient.address,
                status=code,
                delivery=delivery.id,
            )
            await tell_agents(
                session,
                app,
                ticket,
                "delivery_failure",
                now=now,
                extra={
                    "recipient": recipient.address,
                    "status": code,
                    "diagnostic": recipient.diagnostic,
                },
            )
    return "bounce: " + ("; ".join(summary) if summary else "no failing recipient")
