"""Blind forwards: staff forwards without context are refused; complete ones become tickets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import App
from gateway.config import Config
from gateway.models import RefusedForward
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

if TYPE_CHECKING:
    from gateway.pipeline import Work


@dataclass(frozen=True, slots=True)
class ForwardCheck:
    forward: Forward
    context: ContextCheck
    refused: RefusedForward | None = None  # the earlier refusal this message completes


def field_specs(config: Config) -> tuple[FieldSpec, ...]:
    """The configured labels per field, falling back to the defaults for fields not given."""
    configured = {f.name: tuple(f.labels) for f in config.forwards.fields}
    return tuple(
        FieldSpec(name=spec.name, labels=configured.get(spec.kind, spec.labels), kind=spec.kind)
        for spec in DEFAULT_FIELDS
    )


def check_forward(config: Config, parsed: ParsedMessage) -> ForwardCheck | None:
    """Staff mail that forwards someone else's message, with what context it carries."""
    forward = detect_forward(parsed.text, subject=parsed.subject, attached=parsed.forwarded)
    if forward is None:
        return None
    context = check_context(
        forward.own_text,
        fields=field_specs(config),
        summary_min_words=config.forwards.summary_min_words,
    )
    return ForwardCheck(forward=forward, context=context)


async def refusal_for(session: AsyncSession, parsed: ParsedMessage) -> RefusedForward | None:
    """The refusal this message replies to, if any (its In-Reply-To/References)."""
    ids = [*parsed.in_reply_to, *reversed(parsed.references)]
    if not ids:
        return None
    return (
        await session.execute(
            select(RefusedForward)
            .where(RefusedForward.refusal_message_id.in_(ids), RefusedForward.state == "refused")
            .limit(1)
        )
    ).scalar_one_or_none()


async def completion(session: AsyncSession, app: App, work: Work) -> bool:
    """A forwarder's reply to a refusal: re-check the combined context; complete → ticket."""
    refused = await refusal_for(session, work.parsed)
    if refused is None or refused.from_addr != work.sender:
        return False
    from gateway.models import RawMail
    from parsing.mime import parse_message

    original_raw = await session.get(RawMail, refused.raw_id)
    assert original_raw is not None
    original = parse_message(original_raw.data)
    merged = merge_context(refused.own_text, work.parsed.new_text, fields=field_specs(app.config))
    context = check_context(
        merged,
        fields=field_specs(app.config),
        summary_min_words=app.config.forwards.summary_min_words,
    )
    first = check_forward(app.config, original)
    if first is None:
        return False
    if context.missing:
        refused.own_text = merged
        refused.missing, refused.present = list(context.missing), list(context.present)
        await _refuse(session, app, work, first.forward, context, record=refused)
        return True
    await _create(
        session, app, work, original, first.forward, context, merged, raw_id=original_raw.id
    )
    refused.state = "completed"
    refused.ticket_id = work.ticket.id if work.ticket else None
    return True


async def handle(session: AsyncSession, app: App, work: Work) -> None:
    """The forward step: refuse what lacks context, create the ticket for what has it."""
    from gateway.pipeline import Done

    check = work.forward
    assert check is not None
    if check.context.missing:
        await _refuse(session, app, work, check.forward, check.context, record=None)
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
        check.forward.own_text,
        raw_id=work.raw.id,
    )
    raise Done("processed", f"{work.ticket.ref if work.ticket else ''}: forward accepted")


def _customer(forward: Forward, context: ContextCheck) -> Address | None:
    values = dict(context.values)
    for word in values.get("customer", "").replace("<", " ").replace(">", " ").split():
        if "@" in word and "." in word.rpartition("@")[2]:
            return Address(word.strip(".,;()").lower(), "")
    return forward.original_from


async def _create(
    session: AsyncSession,
    app: App,
    work: Work,
    parsed: ParsedMessage,
    forward: Forward,
    context: ContextCheck,
    own_text: str,
    *,
    raw_id: int,
) -> None:
    from gateway.notices import Reply, send_notice

    config = app.config
    mailbox = next(
        (b for r in work.raw.rcpt_tos if (b := config.mailbox_for(r))), config.mailbox[0]
    )
    customer = _customer(forward, context) or Address(work.sender)
    forwarder = parsed.from_addr or Address(work.sender)
    ticket = await create_ticket(
        session,
        config,
        queue=mailbox.queue,
        mailbox=mailbox.address,
        requester=customer,
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
    if config.forwards.acknowledge_customer and customer.addr != forwarder.addr:
        await send_notice(session, app, ticket, "acknowledgement", to=[customer], now=work.now)
    from gateway.agents import tell_agents

    await tell_agents(
        session, app, ticket, "agent_notification", now=work.now, message=work.message
    )
    _ = Reply


async def _refuse(
    session: AsyncSession,
    app: App,
    work: Work,
    forward: Forward,
    context: ContextCheck,
    *,
    record: RefusedForward | None,
) -> None:
    """The refusal goes to the forwarder only; no ticket, nothing to the customer."""
    from gateway.notices import send_refusal

    config = app.config
    if record is None:
        mailbox = next(
            (b for r in work.raw.rcpt_tos if (b := config.mailbox_for(r))), config.mailbox[0]
        )
        record = RefusedForward(
            raw_id=work.raw.id,
            message_id=work.parsed.message_id,
            from_addr=work.sender,
            subject=work.parsed.subject,
            mailbox=mailbox.address,
            own_text=forward.own_text,
            missing=list(context.missing),
            present=list(context.present),
            created_at=work.now,
        )
        session.add(record)
        await session.flush()
    record.refusal_message_id = await send_refusal(
        session,
        app,
        record,
        to=work.parsed.from_addr or Address(work.sender),
        reply_to_id=work.parsed.message_id,
        references=work.parsed.references,
        now=work.now,
        extra={
            "present": list(context.present),
            "missing": list(context.missing),
            "fill_in": fill_in_block(context, field_specs(config)),
        },
    )
