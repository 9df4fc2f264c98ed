"""Rendering a notice for a ticket and queueing it: acknowledgements, nudges, refusals…"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import App
from gateway.db import insert_row
from gateway.models import Message, RefusedForward, Ticket
from gateway.outbox import automatic_gate, enqueue
from gateway.tickets import event, remember_ids
from parsing.model import Address, Attachment
from responders.compose import compose
from responders.tokens import message_id_for, reply_token

log = logging.getLogger(__name__)

# Notices that go to the requester and are answers to their mail or timers.
CUSTOMER_NOTICES = frozenset(
    {
        "acknowledgement",
        "more_info",
        "nudge",
        "auto_close",
        "solved",
        "reassigned",
        "researching",
        "close",
    }
)
TIMER_NOTICES = frozenset({"nudge", "auto_close", "close", "escalation"})


@dataclass(frozen=True, slots=True)
class Reply:
    """The message a notice answers, for threading headers."""

    message_id: str = ""
    references: tuple[str, ...] = ()
    new_text: str = ""
    from_addr: str = ""
    from_name: str = ""


def ticket_context(app: App, ticket: Ticket) -> dict[str, object]:
    config = app.config
    box = config.mailbox_for(ticket.mailbox)
    agent = config.agent_for(ticket.assignee) if ticket.assignee else None
    return {
        "ref": ticket.ref,
        "subject": ticket.subject,
        "status": ticket.status,
        "priority": ticket.priority,
        "queue": ticket.queue,
        "requester_name": ticket.requester_name,
        "requester": ticket.requester,
        "assignee_name": agent.name if agent else ticket.assignee,
        "created_at": ticket.created_at.strftime("%Y-%m-%d %H:%M UTC"),
        "url": "",
        "_mailbox_name": box.name if box else "",
    }


def context_for(
    app: App,
    ticket: Ticket,
    *,
    reply: Reply | None = None,
    agent: Address | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    tctx = ticket_context(app, ticket)
    mailbox_name = str(tctx.pop("_mailbox_name")) or app.config.gateway.brand
    return {
        "ticket": tctx,
        "mailbox": {"address": ticket.mailbox, "name": mailbox_name},
        "brand": app.config.gateway.brand,
        "message": {
            "new_text": reply.new_text if reply else "",
            "from_name": reply.from_name if reply else "",
            "from": reply.from_addr if reply else "",
        },
        "agent": {"name": agent.name if agent else "", "email": agent.addr if agent else ""},
        "extra": dict(extra or {}),
    }


async def send_notice(
    session: AsyncSession,
    app: App,
    ticket: Ticket,
    name: str,
    *,
    to: Sequence[Address],
    now: datetime,
    reply: Reply | None = None,
    automatic: bool = True,
    agent: Address | None = None,
    reply_token_for: str = "",
    extra: Mapping[str, object] | None = None,
    record: bool = True,
    capped: bool = True,
    cc: Sequence[Address] = (),
    body: str = "",
    attachments: Sequence[Attachment] = (),
) -> str | None:
    """Render, compose and queue a notice; automatic mail passes the loop gate first.

    Returns the notice's Message-ID, or None when nothing was sent to anyone. With `record`
    it is stored on the ticket as an outbound message.
    """
    config = app.config
    recipients: list[Address] = []
    for person in [*to, *cc]:
        gate = await automatic_gate(
            session,
            config,
            recipient=person.addr,
            kind=name,
            ticket=ticket,
            now=now,
            capped=capped and automatic,
        )
        if not gate.allowed:
            event(
                session,
                ticket,
                at=now,
                actor="gateway",
                action="notice-skipped",
                new=name,
                recipient=person.addr,
                reason=gate.reason,
            )
            if gate.suppressed:
                await enqueue(
                    session,
                    config,
                    data=b"",
                    message_id="",
                    recipients=[person.addr],
                    kind=name,
                    automatic=True,
                    now=now,
                    ticket=ticket,
                    status="suppressed",
                    note=gate.reason,
                )
            continue
        recipients.append(person)
    if not recipients:
        return None
    extra = {**(extra or {}), "body": body} if name == "agent_reply" else extra
    notice = app.renderer.render(
        name, context_for(app, ticket, reply=reply, agent=agent, extra=extra)
    )
    cc_recipients = [r for r in recipients if r not in to]
    to_recipients = [r for r in recipients if r in to] or cc_recipients[:1]
    mid = message_id_for(
        ticket_ref=ticket.ref,
        domain=config.gateway.domain,
        secret=config.secret,
        unique=uuid.uuid4().hex[:16],
    )
    box = config.mailbox_for(ticket.mailbox)
    from_addr = Address(ticket.mailbox, box.name if box and box.name else config.gateway.brand)
    local, _, domain = ticket.mailbox.partition("@")
    token = reply_token(ticket_ref=ticket.ref, agent=reply_token_for, secret=config.secret)
    references = (*reply.references, reply.message_id) if reply and reply.message_id else ()
    data = compose(
        notice,
        from_addr=from_addr,
        to=to_recipients,
        cc=[r for r in cc_recipients if r not in to_recipients],
        message_id=mid,
        attachments=[(a.filename, a.content_type, a.data) for a in attachments],
        in_reply_to=reply.message_id if reply and reply.message_id else None,
        references=references,
        reply_to=Address(f"{local}+{token}@{domain}", from_addr.name),
        auto_submitted=("auto-generated" if name in TIMER_NOTICES else "auto-replied")
        if automatic
        else None,
        thread_topic=ticket.subject,
        date=now,
    )
    message_row = None
    if record:
        message_row = await insert_row(
            session,
            Message,
            ticket_id=ticket.id,
            raw_id=None,
            direction="out",
            kind="auto" if automatic else "public",
            classification=name,
            message_id=mid,
            from_addr=ticket.mailbox,
            from_name=from_addr.name,
            to_addrs=[r.addr for r in recipients],
            subject=notice.subject,
            text=notice.text,
            new_text=body or notice.text,
            author=agent.addr if agent else "",
            threaded_by="new" if reply is None else "in-reply-to",
            created_at=now,
        )
        await remember_ids(session, ticket, stored=[mid], referenced=[])
    await enqueue(
        session,
        config,
        data=data,
        message_id=mid,
        recipients=[r.addr for r in recipients],
        kind=name,
        automatic=automatic,
        now=now,
        ticket=ticket,
        message_row=message_row,
    )
    app.wake_outbox.set()
    return mid


async def send_refusal(
    session: AsyncSession,
    app: App,
    record: RefusedForward,
    *,
    to: Address,
    reply_to_id: str,
    references: Sequence[str],
    now: datetime,
    extra: Mapping[str, object],
) -> str:
    """The blind-forward refusal: to the forwarder only, threaded under their forward.

    There is no ticket yet; returns the refusal's Message-ID so a reply can find the record.
    """
    config = app.config
    box = config.mailbox_for(record.mailbox)
    from_addr = Address(record.mailbox, box.name if box and box.name else config.gateway.brand)
    context = {
        "ticket": {
            "ref": "",
            "subject": record.subject,
            "status": "",
            "priority": "",
            "queue": "",
            "requester_name": "",
            "requester": "",
            "assignee_name": "",
            "created_at": now.strftime("%Y-%m-%d %H:%M UTC"),
            "url": "",
        },
        "mailbox": {"address": record.mailbox, "name": from_addr.name},
        "brand": config.gateway.brand,
        "message": {"new_text": record.own_text, "from_name": to.name, "from": to.addr},
        "agent": {"name": "", "email": ""},
        "extra": dict(extra),
    }
    notice = app.renderer.render("blind_forward_refusal", context)
    mid = message_id_for(
        ticket_ref=f"FWD{record.id}",
        domain=config.gateway.domain,
        secret=config.secret,
        unique=uuid.uuid4().hex[:16],
    )
    data = compose(
        notice,
        from_addr=from_addr,
        to=[to],
        message_id=mid,
        in_reply_to=reply_to_id,
        references=(*references, reply_to_id),
        auto_submitted="auto-replied",
        date=now,
    )
    await enqueue(
        session,
        config,
        data=data,
        message_id=mid,
        recipients=[to.addr],
        kind="blind_forward_refusal",
        automatic=True,
        now=now,
    )
    app.wake_outbox.set()
    return mid
