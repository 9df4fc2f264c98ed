"""Changes to tickets, each recorded in the audit log: the one place ticket state moves."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nh3
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import db
from gateway.attachment_store import save_attachments
from gateway.config import Config
from gateway.db import insert_at_commit, insert_object, insert_row, insert_rows, loaded
from gateway.models import AttachmentRow, Event, Message, Participant, ThreadRef, Ticket
from parsing.model import Address, Attachment, ParsedMessage
from parsing.subject import normalise_subject

STATUSES = ("new", "open", "pending", "solved", "closed")
PRIORITIES = ("urgent", "high", "normal", "low")


class TicketError(ValueError):
    """A requested change that is not allowed; the text says why, for a person."""


def urgent_by_rules(patterns: Sequence[str], text: str) -> bool:
    """Whether any of the configured `[priority] urgent_patterns` is found in `text`."""
    patterns = tuple(patterns)
    joined = _joined(patterns)
    if joined is not None:
        return joined.search(text) is not None
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


# What refers to a group by number or name: joined, the numbers would shift.
_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")


@functools.lru_cache(maxsize=8)
def _joined(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """The patterns as one alternation: one scan of the text instead of one a pattern (a
    tenth of processing a message). None when joining could change what they match: a
    numbered or named back-reference or conditional, or a global flag only allowed at a
    pattern's start."""
    if not patterns or any(_BACKREFERENCE.search(p) for p in patterns):
        return None
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    except re.error:
        return None


def event(
    session: AsyncSession,
    ticket: Ticket | None,
    *,
    at: datetime,
    actor: str,
    action: str,
    old: str = "",
    new: str = "",
    message: Message | None = None,
    **detail: Any,
) -> None:
    row = {
        "ticket_id": ticket.id if ticket else None,
        "at": at,
        "actor": actor,
        "action": action,
        "old": old,
        "new": new,
        "message_row": message.id if message else None,
        "detail": detail,
    }
    insert_at_commit(session, Event, row)  # nothing reads the audit log back mid-transaction


async def create_ticket(
    session: AsyncSession,
    config: Config,
    *,
    queue: str,
    mailbox: str,
    requester: Address,
    subject: str,
    now: datetime,
    reply_to: str = "",
    submitter: str = "",
    priority: str = "normal",
    follow_up_of: Ticket | None = None,
    thread_root: str = "",
    actor: str = "",
    last_customer_at: datetime | None = None,
) -> Ticket:
    values = {
        "ref": f"new-{uuid.uuid4().hex[:24]}",  # until its id is known
        "queue": queue,
        "mailbox": mailbox,
        "status": "new",
        "priority": priority,
        "subject": normalise_subject(subject)[:1000] or "(no subject)",
        "requester": requester.addr,
        "requester_name": requester.name,
        "reply_to": reply_to,
        "submitter": submitter,
        "follow_up_of": follow_up_of.id if follow_up_of else None,
        "thread_root": thread_root,
        "created_at": now,
        "updated_at": now,
        "last_customer_at": last_customer_at,
        "escalate_due_at": now + timedelta(minutes=config.timers.escalate_after_minutes),
    }
    # As Core, and the ref in a second statement: the ORM's unit of work for one row cost
    # several times the two statements.
    ticket_id = await insert_row(session, Ticket, **values)
    values["ref"] = f"{config.gateway.ticket_prefix}-{ticket_id}"
    await db.execute(session, _SET_REF, {"row": ticket_id, "new_ref": values["ref"]})
    ticket: Ticket = loaded(session, Ticket, id=ticket_id, **values)
    await add_participants(session, ticket, [requester], role="requester")
    event(
        session,
        ticket,
        at=now,
        actor=actor or requester.addr,
        action="created",
        new=queue,
        follow_up_of=follow_up_of.ref if follow_up_of else "",
    )
    return ticket


_SET_REF = update(Ticket).where(Ticket.id == bindparam("row")).values(ref=bindparam("new_ref"))


async def add_participants(
    session: AsyncSession, ticket: Ticket, people: Iterable[Address], *, role: str
) -> None:
    rows = [
        {"ticket_id": ticket.id, "address": p.addr, "name": p.name, "role": role} for p in people
    ]
    await insert_rows(session, Participant, rows, ignoring_conflicts_on=["ticket_id", "address"])


async def remember_ids(
    session: AsyncSession, ticket: Ticket, *, stored: Sequence[str], referenced: Sequence[str]
) -> None:
    """Record Message-IDs for threading: ours and those stored mail pointed at."""
    rows = [{"message_id": m, "ticket_id": ticket.id, "stored": True} for m in stored if m]
    rows += [
        {"message_id": m, "ticket_id": ticket.id, "stored": False}
        for m in referenced
        if m and m not in stored
    ]
    await insert_rows(session, ThreadRef, rows, ignoring_conflicts_on=["message_id", "ticket_id"])


def sanitise_html(html: str) -> str:
    """Stored HTML is cleaned before anything could show it: no scripts, no handlers."""
    return nh3.clean(html) if html else ""


async def add_inbound_message(
    session: AsyncSession,
    ticket: Ticket,
    parsed: ParsedMessage,
    *,
    raw_id: int | None,
    kind: str,
    classification: str,
    threaded_by: str,
    mailboxes: list[str],
    now: datetime,
    attachments_dir: Path,
    author: str = "",
    verified: bool = False,
    new_text: str | None = None,
) -> Message:
    message: Message = await insert_object(
        session,
        Message,
        ticket_id=ticket.id,
        raw_id=raw_id,
        direction="in",
        kind=kind,
        classification=classification,
        message_id=parsed.message_id,
        content_hash=parsed.content_hash,
        from_addr=parsed.from_addr.addr if parsed.from_addr else "",
        from_name=parsed.from_addr.name if parsed.from_addr else "",
        to_addrs=[a.addr for a in parsed.to],
        cc_addrs=[a.addr for a in parsed.cc],
        mailboxes=mailboxes,
        subject=parsed.subject,
        text=parsed.text,
        new_text=parsed.new_text if new_text is None else new_text,
        html=sanitise_html(parsed.html),
        threaded_by=threaded_by[:600],
        author=author,
        verified=verified,
        sent_at=parsed.date if parsed.date and parsed.date.tzinfo else None,
        created_at=now,
    )
    if ticket.updated_at != now:  # a new ticket has it already: no UPDATE to flush
        ticket.updated_at = now
    await store_attachments(session, message, parsed.attachments, attachments_dir)
    await remember_ids(
        session,
        ticket,
        stored=[parsed.message_id],
        referenced=[*parsed.in_reply_to, *parsed.references],
    )
    return message


async def store_attachments(
    session: AsyncSession, message: Message, attachments: Sequence[Attachment], directory: Path
) -> None:
    """The message's attachments on disk (`save_attachments`) and their rows; a blob that
    cannot be stored raises, and the message's transaction with it."""
    if not attachments:
        return
    digests: list[str] = []
    for stored in save_attachments(directory, [item.data for item in attachments]):
        if isinstance(stored, OSError):
            raise stored
        digests.append(stored)
    rows = [
        {
            "message_id": message.id,
            "sha256": digest,
            "size": len(item.data),
            "content_type": item.content_type[:200],
            "filename": item.filename,
            "content_id": item.content_id[:512],
            "inline": item.inline,
        }
        for item, digest in zip(attachments, digests, strict=True)
    ]
    await insert_rows(session, AttachmentRow, rows)


# -- state changes shared by the pipeline, agent commands and `tickets update` ----------------


def set_status(
    session: AsyncSession,
    config: Config,
    ticket: Ticket,
    status: str,
    *,
    now: datetime,
    actor: str,
    message: Message | None = None,
) -> bool:
    """Move a ticket to `status` and set the timers that status implies."""
    if status not in STATUSES:
        raise TicketError(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
    old = ticket.status
    if old == status:
        return False
    ticket.status = status
    ticket.updated_at = now
    ticket.nudge_due_at = ticket.autoclose_due_at = ticket.close_due_at = None
    if status == "pending":
        ticket.nudge_due_at = now + timedelta(hours=config.timers.nudge_after_hours)
    elif status == "solved":
        ticket.solved_at = now
        ticket.close_due_at = now + timedelta(days=config.timers.close_solved_after_days)
    elif status == "closed":
        ticket.closed_at = now
        ticket.escalate_due_at = None
    if status in ("solved", "closed"):
        ticket.escalate_due_at = None
    event(
        session, ticket, at=now, actor=actor, action="status", old=old, new=status, message=message
    )
    return True


def set_priority(
    session: AsyncSession,
    ticket: Ticket,
    priority: str,
    *,
    now: datetime,
    actor: str,
    message: Message | None = None,
) -> bool:
    if priority not in PRIORITIES:
        raise TicketError(f"unknown priority {priority!r}: use one of {', '.join(PRIORITIES)}")
    return _change(session, ticket, "priority", priority, now=now, actor=actor, message=message)


def set_queue(
    session: AsyncSession,
    config: Config,
    ticket: Ticket,
    queue: str,
    *,
    now: datetime,
    actor: str,
    message: Message | None = None,
) -> bool:
    if config.queue_named(queue) is None:
        names = ", ".join(q.name for q in config.queue)
        raise TicketError(f"unknown queue {queue!r}: use one of {names}")
    return _change(session, ticket, "queue", queue, now=now, actor=actor, message=message)


def resolve_agent(config: Config, who: str, *, me: str = "") -> str:
    """An agent's address from an email, a name or `me`."""
    who = who.strip()
    if who.lower() == "me" and me:
        who = me
    found = config.agent_for(who)
    if found is None:
        matches = [a for a in config.agent if a.name.lower() == who.lower()]
        found = matches[0] if len(matches) == 1 else None
    if found is None:
        raise TicketError(f"no agent called {who!r}: use an agent's email or name from the config")
    return found.email


def set_assignee(
    session: AsyncSession,
    ticket: Ticket,
    assignee: str,
    *,
    now: datetime,
    actor: str,
    message: Message | None = None,
) -> bool:
    return _change(
        session,
        ticket,
        "assignee",
        assignee,
        now=now,
        actor=actor,
        message=message,
        action="assign",
    )


def set_category(
    session: AsyncSession,
    ticket: Ticket,
    category: str,
    *,
    now: datetime,
    actor: str,
    message: Message | None = None,
) -> bool:
    return _change(
        session, ticket, "category", category[:64], now=now, actor=actor, message=message
    )


def _change(
    session: AsyncSession,
    ticket: Ticket,
    attr: str,
    value: str,
    *,
    now: datetime,
    actor: str,
    message: Message | None,
    action: str = "",
) -> bool:
    """Set one field and record who changed it from what, in the audit log."""
    old = getattr(ticket, attr)
    if old == value:
        return False
    event(
        session,
        ticket,
        at=now,
        actor=actor,
        action=action or attr,
        old=old,
        new=value,
        message=message,
    )
    setattr(ticket, attr, value)
    ticket.updated_at = now
    return True


async def get_ticket(session: AsyncSession, ref: str) -> Ticket | None:
    return (
        await session.execute(select(Ticket).where(Ticket.ref == ref.strip().upper()))
    ).scalar_one_or_none()
