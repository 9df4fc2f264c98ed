"""Blind forwards: staff forwards without context are refused; complete ones become tickets.

A refusal goes to the forwarder only and is kept (`forwards list`); their reply to any refusal
for that forward is merged with what they wrote first and checked again. Once complete, the
ticket's requester is the customer, never a colleague further up a forward chain when a
customer address is known. The forwarder is the submitter and is copied on the customer's
acknowledgement (as Zendesk copies the submitter), or gets that acknowledgement alone when the
customer is not acknowledged, so they always learn the ticket reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import App
from gateway.config import Config, Mailbox
from gateway.models import RawMail, RefusedForward
from gateway.outbox import automatic_gate
from gateway.tickets import add_inbound_message, add_participants, create_ticket, event
from parsing.forward import (
    DEFAULT_FIELDS,
    ContextCheck,
    FieldSpec,
    Forward,
    check_context,
    detect_forward,
    fill_in_block,
    merge_context,
)
from parsing.model import Address, ParsedMessage
from responders.tokens import parse_own_message_id

if TYPE_CHECKING:
    from gateway.pipeline import Work

_REFUSAL_REF = re.compile(r"FWD(?P<id>\d{1,18})")  # our refusals' Message-IDs name their record
_EMAIL = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")
_NAMED = re.compile(  # "Jane Doe <jane@…>" or Outlook's "Jane Doe [mailto:jane@…]"
    r"(?P<name>[^,;<>()\[\]]+?)\s*(?:<\s*(?:mailto:)?|\[\s*mailto:)(?P<addr>[^\s<>\[\]]+)\s*[>\]]",
    re.IGNORECASE,
)
_CHAIN_LIMIT = 8  # forwards of forwards looked into for the customer


@dataclass(frozen=True, slots=True)
class ForwardCheck:
    forward: Forward
    context: ContextCheck


def field_specs(config: Config) -> tuple[FieldSpec, ...]:
    """The configured labels per field, falling back to the defaults for fields not given."""
    configured = {f.name: tuple(f.labels) for f in config.forwards.fields}
    return tuple(
        FieldSpec(name=spec.name, labels=configured.get(spec.kind, spec.labels), kind=spec.kind)
        for spec in DEFAULT_FIELDS
    )


def _check(config: Config, own_text: str) -> ContextCheck:
    return check_context(
        own_text, fields=field_specs(config), summary_min_words=config.forwards.summary_min_words
    )


def check_forward(config: Config, parsed: ParsedMessage) -> ForwardCheck | None:
    """Staff mail that forwards someone else's message, with what context it carries."""
    forward = detect_forward(parsed.text, subject=parsed.subject, attached=parsed.forwarded)
    if forward is None:
        return None
    return ForwardCheck(forward=forward, context=_check(config, forward.own_text))


async def refusal_for(
    session: AsyncSession, config: Config, parsed: ParsedMessage
) -> RefusedForward | None:
    """The open refusal this message answers: any refusal sent for it, not only the latest."""
    ids = [*parsed.in_reply_to, *reversed(parsed.references)]
    if not ids:
        return None
    records: list[int] = []
    for mid in ids:
        ref = parse_own_message_id(mid, domain=config.gateway.domain, secret=config.secret)
        match = _REFUSAL_REF.fullmatch(ref or "")
        if match is not None:
            records.append(int(match.group("id")))
    rows = (
        await session.execute(
            select(RefusedForward).where(
                or_(RefusedForward.id.in_(records), RefusedForward.refusal_message_id.in_(ids)),
                RefusedForward.state == "refused",
            )
        )
    ).scalars()
    by_id = {row.id: row for row in rows}
    for record in records:  # the nearest reference first
        if record in by_id:
            return by_id[record]
    return next(iter(by_id.values()), None)


async def completion(session: AsyncSession, app: App, work: Work) -> bool:
    """A forwarder's reply to a refusal: re-check the combined context; complete → ticket.

    False when the message answers no open refusal of this sender. An auto-reply to a refusal
    is recorded and goes no further: it neither completes the forward nor earns a refusal.
    """
    from gateway.pipeline import Done

    refused = await refusal_for(session, app.config, work.parsed)
    if refused is None or refused.from_addr.lower() != work.sender.lower():
        return False
    if work.classification is not None and work.classification.automatic:
        raise Done("processed", f"automatic reply to the refusal of forward {refused.id}")
    original_raw = await session.get(RawMail, refused.raw_id)
    assert original_raw is not None
    original = await app.parser.parse(original_raw.data)
    merged = merge_context(refused.own_text, work.parsed.new_text, fields=field_specs(app.config))
    context = _check(app.config, merged)
    refused.own_text = merged
    if context.missing:
        refused.missing, refused.present = list(context.missing), list(context.present)
        await _refuse(session, app, work, context, record=refused)
        return True
    # A completed row keeps what it lacked at its last refusal: `forwards list` shows that.
    first = check_forward(app.config, original)
    forward = first.forward if first else Forward(merged, None, "", "", "", original.text, "")
    mailbox = app.config.mailbox_for(refused.mailbox) or _mailbox(app.config, work)
    await _create(
        session,
        app,
        work,
        original,
        forward,
        context,
        own_text=merged,
        raw_id=original_raw.id,
        mailbox=mailbox,
    )
    assert work.ticket is not None
    refused.state = "completed"
    refused.ticket_id = work.ticket.id
    # The reply itself stays on the ticket (internal): it threads later mail in this exchange.
    await add_inbound_message(
        session,
        work.ticket,
        work.parsed,
        raw_id=work.raw.id,
        kind="note",
        classification="staff-forward",
        threaded_by=f"in-reply-to:refusal of forward {refused.id}",
        mailboxes=[mailbox.address],
        now=work.now,
        attachments_dir=app.attachments_dir,
    )
    return True


async def handle(session: AsyncSession, app: App, work: Work) -> None:
    """The forward step: refuse what lacks context, create the ticket for what has it."""
    from gateway.pipeline import Done

    check = work.forward
    assert check is not None
    if check.context.missing:
        earlier = await _refused_before(session, work)
        if earlier is not None:  # an SMTP retry, or the same forward sent to two mailboxes
            raise Done("duplicate", f"duplicate of refused forward {earlier.id}")
        await _refuse(session, app, work, check.context, record=None, forward=check.forward)
        raise Done(
            "processed", "blind forward refused: missing " + ", ".join(check.context.missing)
        )
    await _create(
        session,
        app,
        work,
        work.parsed,
        check.forward,
        check.context,
        own_text=check.forward.own_text,
        raw_id=work.raw.id,
        mailbox=_mailbox(app.config, work),
    )
    raise Done("processed", f"{work.ticket.ref if work.ticket else ''}: forward accepted")


async def _refused_before(session: AsyncSession, work: Work) -> RefusedForward | None:
    return (
        await session.execute(
            select(RefusedForward)
            .where(
                RefusedForward.message_id == work.parsed.message_id,
                RefusedForward.from_addr == work.sender,
            )
            .limit(1)
        )
    ).scalar_one_or_none()


def _mailbox(config: Config, work: Work) -> Mailbox:
    """The mailbox the mail was sent to (the envelope decides), which sets the queue."""
    return next((b for r in work.raw.rcpt_tos if (b := config.mailbox_for(r))), config.mailbox[0])


def _forward_chain(forward: Forward) -> list[Address]:
    """The From of each forwarded block, outermost first, through forwards of forwards."""
    senders: list[Address] = []
    current: Forward | None = forward
    for _ in range(_CHAIN_LIMIT):
        if current is None:
            break
        if current.original_from is not None:
            senders.append(current.original_from)
        if not current.original_text:
            break
        current = detect_forward(current.original_text, subject=current.original_subject)
    return senders


def _customer(config: Config, forward: Forward, context: ContextCheck) -> Address | None:
    """The requester: a non-staff address from the customer field, else the first non-staff
    sender in the forwarded chain. None when only staff addresses are known."""
    chain = [a for a in _forward_chain(forward) if not config.is_staff(a.addr)]
    names = {a.addr: a.name for a in chain}
    value = dict(context.values).get("customer", "")
    named = {
        m.group("addr").lower(): " ".join(m.group("name").split()) for m in _NAMED.finditer(value)
    }
    for found in _EMAIL.finditer(value):
        addr = found.group(0).lower()
        if not config.is_staff(addr) and not config.is_ours(addr):
            return Address(addr, names.get(addr) or named.get(addr, ""))
    return chain[0] if chain else None


async def _create(
    session: AsyncSession,
    app: App,
    work: Work,
    parsed: ParsedMessage,
    forward: Forward,
    context: ContextCheck,
    *,
    own_text: str,
    raw_id: int,
    mailbox: Mailbox,
) -> None:
    """The ticket for a complete forward: the customer as requester, the forwarder as submitter."""
    from gateway.agents import tell_agents
    from gateway.notices import send_notice

    config = app.config
    forwarder = parsed.from_addr or Address(work.sender)
    customer = _customer(config, forward, context)
    ticket = await create_ticket(
        session,
        config,
        queue=mailbox.queue,
        mailbox=mailbox.address,
        requester=customer or forwarder,
        subject=forward.original_subject or parsed.subject,
        now=work.now,
        submitter=forwarder.addr,
        actor=forwarder.addr,
        thread_root=parsed.message_id,
    )
    await add_participants(session, ticket, [forwarder], role="submitter")
    work.ticket = ticket
    text = f"{own_text}\n\n---- forwarded message ----\n{forward.original_text}".strip()
    work.message = await add_inbound_message(
        session,
        ticket,
        parsed,
        raw_id=raw_id,
        kind="public",
        classification="staff-forward",
        threaded_by="new:forward",
        mailboxes=[mailbox.address],
        now=work.now,
        attachments_dir=app.attachments_dir,
        new_text=text,
    )
    event(
        session,
        ticket,
        at=work.now,
        actor=forwarder.addr,
        action="forward-accepted",
        present=list(context.present),
    )
    if customer is not None and config.forwards.acknowledge_customer:
        await send_notice(
            session, app, ticket, "acknowledgement", to=[customer], cc=[forwarder], now=work.now
        )
    else:
        await send_notice(session, app, ticket, "acknowledgement", to=[forwarder], now=work.now)
    await tell_agents(
        session, app, ticket, "agent_notification", now=work.now, message=work.message
    )


async def _refuse(
    session: AsyncSession,
    app: App,
    work: Work,
    context: ContextCheck,
    *,
    record: RefusedForward | None,
    forward: Forward | None = None,
) -> None:
    """The refusal goes to the forwarder only; no ticket, nothing to the customer.

    The record is kept even when the refusal may not be sent (a suppressed address), so
    `forwards list` still shows the forward.
    """
    from gateway.notices import send_refusal

    config = app.config
    if record is None:
        assert forward is not None
        record = RefusedForward(
            raw_id=work.raw.id,
            message_id=work.parsed.message_id,
            from_addr=work.sender,
            subject=work.parsed.subject,
            mailbox=_mailbox(config, work).address,
            own_text=forward.own_text,
            missing=list(context.missing),
            present=list(context.present),
            created_at=work.now,
        )
        session.add(record)
        await session.flush()
    forwarder = work.parsed.from_addr or Address(work.sender)
    gate = await automatic_gate(
        session,
        config,
        recipient=forwarder.addr,
        kind="blind_forward_refusal",
        ticket=None,
        now=work.now,
        capped=False,  # a refusal nobody sees loses the customer's mail: never rate-capped
    )
    if not gate.allowed:
        work.notes.append(f"refusal not sent: {gate.reason}")
        return
    record.refusal_message_id = await send_refusal(
        session,
        app,
        record,
        to=forwarder,
        reply_to_id=work.parsed.message_id,
        references=work.parsed.references,
        now=work.now,
        extra={
            "present": list(context.present),
            "missing": list(context.missing),
            "fill_in": fill_in_block(context, field_specs(config)),
        },
    )
