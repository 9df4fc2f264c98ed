"""Rendering a notice for a ticket and queueing it: acknowledgements, nudges, refusals…"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import bindparam, event, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from gateway import db
from gateway.app import App, HandedOver
from gateway.db import insert_row
from gateway.models import Message, RefusedForward, Ticket
from gateway.outbox import Promised, automatic_gate, enqueue
from gateway.tickets import event as audit
from gateway.tickets import remember_ids
from parsing.model import Address, Attachment
from responders.compose import compose
from responders.drafts import Draft, Written, write
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
    it is stored on the ticket as an outbound message. In a transaction that `defer`s its
    notices, it is rendered and composed beside the transaction and stored by `flush`.
    """
    config = app.config
    deferred: _Deferred | None = session.sync_session.info.get(_DEFERRED)
    if session.sync_session.in_nested_transaction():
        deferred = None  # written now, so that the savepoint's rollback takes it back
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
            promised=deferred.promised if deferred else None,
        )
        if not gate.allowed:
            audit(
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
    context = context_for(app, ticket, reply=reply, agent=agent, extra=extra)
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
    headers = {
        "from_addr": from_addr,
        "to": to_recipients,
        "cc": [r for r in cc_recipients if r not in to_recipients],
        "message_id": mid,
        "attachments": [(a.filename, a.content_type, a.data) for a in attachments],
        "in_reply_to": reply.message_id if reply and reply.message_id else None,
        "references": references,
        "reply_to": Address(f"{local}+{token}@{domain}", from_addr.name),
        "auto_submitted": ("auto-generated" if name in TIMER_NOTICES else "auto-replied")
        if automatic
        else None,
        "thread_topic": ticket.subject,
        "date": now,
    }
    stored = _Stored(
        ticket=ticket,
        name=name,
        message_id=mid,
        recipients=[r.addr for r in recipients],
        automatic=automatic,
        record=record,
        from_addr=ticket.mailbox,
        from_name=from_addr.name,
        author=agent.addr if agent else "",
        body=body,
        threaded_by="new" if reply is None else "in-reply-to",
        now=now,
    )
    draft = Draft(name, context, headers)
    written = write(app.renderer, draft) if deferred is None else None
    if record:
        await remember_ids(session, ticket, stored=[mid], referenced=[])
    if written is not None:
        await _store(session, app, stored, written)
        app.wake_outbox.set()
        return mid
    assert deferred is not None
    if record:  # its place among the ticket's messages now; its words once written
        stored = replace(stored, message_row=await _insert_message(session, stored, "", ""))
    deferred.add(draft, stored)
    return mid


# -- notices written beside the transaction ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Stored:
    """What is stored of a notice once it is written."""

    ticket: Ticket
    name: str
    message_id: str
    recipients: list[str]
    automatic: bool
    record: bool
    from_addr: str
    from_name: str
    author: str
    body: str
    threaded_by: str
    now: datetime
    message_row: int | None = None  # inserted before the notice was written


async def _insert_message(session: AsyncSession, stored: _Stored, subject: str, text: str) -> int:
    return await insert_row(
        session,
        Message,
        ticket_id=stored.ticket.id,
        raw_id=None,
        direction="out",
        kind="auto" if stored.automatic else "public",
        classification=stored.name,
        message_id=stored.message_id,
        from_addr=stored.from_addr,
        from_name=stored.from_name,
        to_addrs=stored.recipients,
        subject=subject,
        text=text,
        new_text=stored.body or text,
        author=stored.author,
        threaded_by=stored.threaded_by,
        created_at=stored.now,
    )


# Built once: it runs for every pipeline group (`flush`).
_WRITTEN = (
    update(Message)
    .where(Message.id == bindparam("row"))
    .values(
        subject=bindparam("new_subject"), text=bindparam("new_text_"), new_text=bindparam("shown")
    )
)


async def _store(session: AsyncSession, app: App, stored: _Stored, written: Written) -> None:
    """The notice on its ticket (with `record`) and its deliveries in the outbox."""
    message_row = stored.message_row
    if stored.record and message_row is None:
        message_row = await _insert_message(session, stored, written.subject, written.text)
    await enqueue(
        session,
        app.config,
        data=written.data,
        message_id=stored.message_id,
        recipients=stored.recipients,
        kind=stored.name,
        automatic=stored.automatic,
        now=stored.now,
        ticket=stored.ticket,
        message_row=message_row,
    )


# Drafts go to the composer this many at a time: each hand-over wakes its pool's threads,
# which share the GIL with the loop (4 at a time was slower than 16), and the last ones are
# waited for before the commit.
HAND_OVER = 16


@dataclass
class _Deferred:
    """A transaction's notices: decided, handed to the composer, stored by `flush`."""

    app: App
    drafts: list[Draft] = field(default_factory=list)  # not handed over yet
    handed: list[HandedOver] = field(default_factory=list)
    stored: list[_Stored] = field(default_factory=list)  # one per draft, in order
    promised: Promised = field(default_factory=Promised)

    def add(self, draft: Draft, stored: _Stored) -> None:
        self.drafts.append(draft)
        self.stored.append(stored)
        self.promised.add(
            stored.recipients,
            kind=stored.name,
            automatic=stored.automatic,
            ticket_id=stored.ticket.id,
        )
        if len(self.drafts) >= HAND_OVER:
            self.hand_over()

    def hand_over(self) -> None:
        if self.drafts:
            self.handed.append(self.app.composer.hand_over(self.drafts))
            self.drafts = []

    def drop(self) -> None:
        for item in self.handed:
            item.future.cancel()


# session.info key; a transaction that ends unflushed drops its composer jobs
_DEFERRED = db.per_transaction("notices.deferred", _Deferred.drop)


def defer(session: AsyncSession, app: App) -> None:
    """Write this transaction's notices in the composer (`App.composer`) while it goes on;
    `flush` must store them before it commits. The pipeline's groups do this."""
    session.sync_session.info[_DEFERRED] = _Deferred(app)


async def flush(session: AsyncSession) -> None:
    """Store the notices `defer` sent off: on their tickets and in the outbox.

    Raises what writing one raised (a broken template, say), or ComposerLost."""
    deferred: _Deferred | None = session.sync_session.info.get(_DEFERRED)
    if deferred is None or not deferred.stored:
        return
    deferred.hand_over()
    results = await deferred.app.composer.collect(deferred.handed)
    filled: list[dict[str, object]] = []  # the words of Message rows inserted beforehand
    for item, result in zip(deferred.stored, results, strict=True):
        if isinstance(result, Exception):
            raise result  # and the notices stay unflushed: this transaction cannot commit
        await _store(session, deferred.app, item, result)
        if item.message_row is not None:
            words = {"new_subject": result.subject, "new_text_": result.text}
            filled.append({"row": item.message_row, **words, "shown": item.body or result.text})
    await db.execute_many(session, _WRITTEN, filled)
    deferred.handed, deferred.stored = [], []
    deferred.promised.clear()
    deferred.app.wake_outbox.set()


@event.listens_for(Session, "before_commit")
def _unflushed(session: Session) -> None:
    deferred: _Deferred | None = session.info.get(_DEFERRED)
    if deferred is not None and deferred.stored:
        raise RuntimeError("notices were deferred but not flushed before the commit")


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
