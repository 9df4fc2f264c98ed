"""The JSON shapes DESIGN.md promises, read from the store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.models import Delivery, Message, Participant, RawMail, RefusedForward, Ticket


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def message_view(message: Message) -> dict[str, Any]:
    return {
        "message_id": message.message_id,
        "direction": message.direction,
        "kind": message.kind,
        "from": message.from_addr,
        "subject": message.subject,
        "threaded_by": message.threaded_by,
        "created_at": iso(message.created_at),
        "classification": message.classification,
        "verified": message.verified,
        "new_text": message.new_text,
        "mailboxes": message.mailboxes,
    }


async def ticket_view(
    session: AsyncSession, ticket: Ticket, *, messages: bool = True
) -> dict[str, Any]:
    ccs = (
        await session.execute(
            select(Participant.address)
            .where(Participant.ticket_id == ticket.id, Participant.role == "cc")
            .order_by(Participant.id)
        )
    ).scalars()
    view: dict[str, Any] = {
        "ref": ticket.ref,
        "queue": ticket.queue,
        "status": ticket.status,
        "priority": ticket.priority,
        "requester": ticket.requester,
        "cc": list(ccs),
        "assignee": ticket.assignee or None,
        "subject": ticket.subject,
        "created_at": iso(ticket.created_at),
        "updated_at": iso(ticket.updated_at),
        "mailbox": ticket.mailbox,
        "category": ticket.category or None,
        "submitter": ticket.submitter or None,
        "first_response_at": iso(ticket.first_response_at),
        "follow_up_of": None,
    }
    if ticket.follow_up_of:
        parent = await session.get(Ticket, ticket.follow_up_of)
        view["follow_up_of"] = parent.ref if parent else None
    if messages:
        rows = (
            await session.execute(
                select(Message).where(Message.ticket_id == ticket.id).order_by(Message.id)
            )
        ).scalars()
        view["messages"] = [message_view(m) for m in rows]
    return view


def delivery_view(delivery: Delivery, ticket_ref: str | None) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "message_id": delivery.message_id,
        "ticket": ticket_ref,
        "kind": delivery.kind,
        "recipient": delivery.recipient,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "created_at": iso(delivery.created_at),
        "sent_at": iso(delivery.sent_at),
        "next_attempt_at": iso(delivery.next_attempt_at),
    }


def quarantine_view(raw: RawMail) -> dict[str, Any]:
    return {
        "id": raw.id,
        "message_id": raw.message_id,
        "mail_from": raw.mail_from,
        "rcpt_tos": raw.rcpt_tos,
        "size": raw.size,
        "reason": raw.note,
        "attempts": raw.attempts,
        "received_at": iso(raw.received_at),
    }


def forward_view(row: RefusedForward) -> dict[str, Any]:
    return {
        "id": row.id,
        "message_id": row.message_id,
        "from": row.from_addr,
        "subject": row.subject,
        "missing": row.missing,
        "present": row.present,
        "state": row.state,
        "created_at": iso(row.created_at),
    }
