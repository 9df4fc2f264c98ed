"""Agents by email: who is one, their #commands, public replies and notes, and telling them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from parsing.commands import Command, parse_commands
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import App
from gateway.config import Config
from gateway.models import Message, RawMail, Ticket
from gateway.notices import Reply, send_notice
from gateway.tickets import (
    PRIORITIES,
    STATUSES,
    TicketError,
    add_participants,
    event,
    resolve_agent,
    set_assignee,
    set_priority,
    set_queue,
    set_status,
)
from parsing.model import Address, ParsedMessage
from responders.tokens import verify_reply_token

if TYPE_CHECKING:
    from gateway.pipeline import Work

log = logging.getLogger(__name__)

DnsFunc = Callable[..., bytes]
MARKER = "##- Reply above this line -##"


# -- who is an agent ---------------------------------------------------------------------------


def _aligned(domain: str, sender_domain: str) -> bool:
    domain, sender_domain = domain.lower().rstrip("."), sender_domain.lower()
    return sender_domain == domain or sender_domain.endswith("." + domain)


def token_check(config: Config, raw: RawMail, parsed: ParsedMessage, sender: str) -> bool:
    """A signed reply token for this very agent in the envelope recipient or To/Cc."""
    candidates = [*raw.rcpt_tos, *(a.addr for a in (*parsed.to, *parsed.cc))]
    for address in candidates:
        if not config.is_ours(address):
            continue
        local = address.rpartition("@")[0]
        _, plus, token = local.partition("+")
        found = verify_reply_token(token, secret=config.secret) if plus else None
        if found and found[1] == sender:
            return True
    return False


def authentication_results_check(config: Config, parsed: ParsedMessage, sender: str) -> bool:
    """The topmost Authentication-Results from our own relay says DKIM passed for From's domain."""
    authserv = config.agents.authserv_id
    if not authserv:
        return False
    results = parsed.header_all("authentication-results")
    if not results:
        return False
    top = results[0]  # our relay prepends; anything below may be forged by the sender
    server, _, rest = top.partition(";")
    if server.strip().split()[0:1] != [authserv]:
        return False
    sender_domain = sender.rpartition("@")[2]
    for clause in rest.split(";"):
        words = dict(part.split("=", 1) for part in clause.strip().split() if "=" in part)
        if words.get("dkim") == "pass":
            signer = words.get("header.d", "") or words.get("header.i", "").rpartition("@")[2]
            if signer and _aligned(signer, sender_domain):
                return True
    return False


def dkim_check(raw: bytes, sender: str, *, dnsfunc: DnsFunc | None = None) -> bool:
    """Every DKIM signature is verified; one aligned with From's domain must pass."""
    import dkim

    sender_domain = sender.rpartition("@")[2]
    try:
        verifier = dkim.DKIM(raw)
        for index in range(len(verifier.headers)):
            name, value = verifier.headers[index]
            if name.lower() != b"dkim-signature":
                continue
            tags = dkim.util.parse_tag_value(value) if hasattr(dkim, "util") else {}
            signer = tags.get(b"d", b"").decode("ascii", "replace")
            if not _aligned(signer, sender_domain):
                continue
            ok = (
                verifier.verify(idx=index, dnsfunc=dnsfunc)
                if dnsfunc is not None
                else verifier.verify(idx=index)
            )
            if ok:
                return True
    except Exception as exc:  # dkimpy raises many kinds on hostile input
        log.info("DKIM check failed: %s", type(exc).__name__)
    return False


async def verify_sender(
    session: AsyncSession, app: App, raw: RawMail, parsed: ParsedMessage
) -> str:
    """The agent's address when the sender is staff and a configured check passes, else ""."""
    config = app.config
    sender = parsed.from_addr.addr if parsed.from_addr else ""
    if not sender or config.agent_for(sender) is None or parsed.from_count != 1:
        return ""
    if parsed.sender is not None and parsed.sender.addr != sender:
        return ""  # sent on someone else's behalf: not the agent's own mail
    for check in config.agents.verify:
        if check == "token" and token_check(config, raw, parsed, sender):
            return sender
        if check == "authentication-results" and authentication_results_check(
            config, parsed, sender
        ):
            return sender
        if check == "dkim" and await asyncio.to_thread(
            dkim_check, raw.data, sender, dnsfunc=app.dkim_dns
        ):
            return sender
    return ""


# -- commands ----------------------------------------------------------------------------------

COMMAND_HELP = {
    "status": f"#status {'|'.join(s for s in STATUSES if s != 'new')}",
    "assign": "#assign EMAIL|NAME|me",
    "priority": f"#priority {'|'.join(PRIORITIES)}",
    "queue": "#queue NAME",
    "note": "#note",
    "cc": "#cc +ADDR or #cc -ADDR",
    "requester": "#requester ADDR",
    "category": "#category NAME",
    "ask": "#ask",
    "solve": "#solve",
    "reassign": "#reassign WHO",
    "researching": "#researching",
}


async def _apply_commands(
    session: AsyncSession,
    app: App,
    ticket: Ticket,
    commands: tuple[Command, ...],
    *,
    agent: str,
    now: datetime,
    message: Message,
) -> tuple[list[str], bool, list[tuple[str, dict[str, object]]]]:
    """Apply every command or raise TicketError; returns (changes, is_note, notices to send)."""
    config = app.config
    changes: list[str] = []
    notices: list[tuple[str, dict[str, object]]] = []
    note = False
    for command in commands:
        name, args = command.name, command.args.strip()
        usage = COMMAND_HELP.get(name)
        if usage is None:
            raise TicketError(f"line {command.line}: unknown command #{name}")
        needs_arg = name in (
            "status",
            "assign",
            "priority",
            "queue",
            "cc",
            "requester",
            "category",
            "reassign",
        )
        if needs_arg and not args:
            raise TicketError(f"line {command.line}: #{name} needs an argument: {usage}")
        try:
            if name == "status":
                if args.lower() not in STATUSES or args.lower() == "new":
                    raise TicketError(f"unknown status {args!r}")
                set_status(
                    session, config, ticket, args.lower(), now=now, actor=agent, message=message
                )
            elif name == "priority":
                set_priority(session, ticket, args.lower(), now=now, actor=agent, message=message)
            elif name == "queue":
                if set_queue(
                    session, config, ticket, args.lower(), now=now, actor=agent, message=message
                ):
                    notices.append(("handover", {}))
            elif name in ("assign", "reassign"):
                who = resolve_agent(config, args, me=agent)
                if set_assignee(session, ticket, who, now=now, actor=agent, message=message):
                    found = config.agent_for(who)
                    notices.append(
                        ("reassigned", {"new_assignee_name": found.name if found else who})
                    )
            elif name == "note":
                note = True
            elif name == "cc":
                sign, address = args[:1], args[1:].strip().lower()
                if sign not in "+-" or "@" not in address or config.is_ours(address):
                    raise TicketError(f"{args!r} is not +ADDR or -ADDR")
                if sign == "+":
                    await add_participants(session, ticket, [Address(address)], role="cc")
                else:
                    from sqlalchemy import delete

                    from gateway.models import Participant

                    await session.execute(
                        delete(Participant).where(
                            Participant.ticket_id == ticket.id,
                            Participant.address == address,
                            Participant.role == "cc",
                        )
                    )
                event(session, ticket, at=now, actor=agent, action="cc", new=args, message=message)
            elif name == "requester":
                address = args.lower()
                if "@" not in address or config.is_ours(address):
                    raise TicketError(f"{args!r} is not an email address")
                event(
                    session,
                    ticket,
                    at=now,
                    actor=agent,
                    action="requester",
                    old=ticket.requester,
                    new=address,
                    message=message,
                )
                ticket.requester, ticket.requester_name, ticket.reply_to = address, "", ""
                await add_participants(session, ticket, [Address(address)], role="requester")
            elif name == "category":
                event(
                    session,
                    ticket,
                    at=now,
                    actor=agent,
                    action="category",
                    old=ticket.category,
                    new=args,
                    message=message,
                )
                ticket.category = args[:64]
            elif name == "ask":
                set_status(
                    session, config, ticket, "pending", now=now, actor=agent, message=message
                )
                notices.append(("more_info", {}))
            elif name == "solve":
                set_status(session, config, ticket, "solved", now=now, actor=agent, message=message)
                notices.append(("solved", {}))
            elif name == "researching":
                set_status(session, config, ticket, "open", now=now, actor=agent, message=message)
                notices.append(("researching", {}))
        except TicketError as exc:
            raise TicketError(f"line {command.line}: {exc} — write it as {usage}") from None
        changes.append(f"#{name} {args}".strip())
    return changes, note, notices


async def handle(session: AsyncSession, app: App, work: Work) -> None:
    """A verified agent's mail: commands (all or none), then a public reply or an internal note."""
    from gateway.pipeline import _new_ticket  # the pipeline owns new-ticket defaults

    assert work.thread is not None
    config = app.config
    agent_addr = work.agent
    agent = config.agent_for(agent_addr)
    assert agent is not None
    if work.ticket is None:
        work.ticket = await _new_ticket(session, app, work)
    ticket = work.ticket
    block = parse_commands(work.parsed.new_text)
    body = block.body.split(MARKER)[0].strip()
    from gateway.tickets import add_inbound_message

    message = await add_inbound_message(
        session,
        ticket,
        work.parsed,
        raw_id=work.raw.id,
        kind="note",
        classification="agent",
        threaded_by=work.thread.threaded_by,
        mailboxes=[],
        now=work.now,
        attachments_dir=app.attachments_dir,
        author=agent_addr,
        verified=True,
        new_text=body,
    )
    work.message = message
    try:
        async with session.begin_nested():
            changes, is_note, notices = await _apply_commands(
                session,
                app,
                ticket,
                block.commands,
                agent=agent_addr,
                now=work.now,
                message=message,
            )
    except TicketError as exc:
        event(
            session,
            ticket,
            at=work.now,
            actor=agent_addr,
            action="commands-refused",
            new=str(exc),
            message=message,
        )
        await send_notice(
            session,
            app,
            ticket,
            "command_error",
            to=[Address(agent.email, agent.name)],
            now=work.now,
            automatic=True,
            capped=False,
            extra={"errors": [str(exc)], "commands": list(COMMAND_HELP.values())},
        )
        return
    ticket.last_agent_at = work.now
    ticket.escalate_due_at = None
    requester = Address(ticket.reply_to or ticket.requester, ticket.requester_name)
    for name, extra in notices:
        if name == "handover":
            await tell_agents(
                session,
                app,
                ticket,
                "agent_notification",
                now=work.now,
                message=message,
                skip=agent_addr,
            )
            continue
        await send_notice(
            session, app, ticket, name, to=[requester], now=work.now, automatic=False, extra=extra
        )
    if is_note or not body:
        return
    message.kind = "public"
    if ticket.first_response_at is None:
        ticket.first_response_at = work.now
    if ticket.status == "new":
        set_status(session, config, ticket, "open", now=work.now, actor=agent_addr, message=message)
    from sqlalchemy import select

    from gateway.models import Participant

    ccs = [
        Address(p.address, p.name)
        for p in (
            await session.execute(
                select(Participant).where(
                    Participant.ticket_id == ticket.id, Participant.role == "cc"
                )
            )
        ).scalars()
        if p.address != agent_addr and not config.is_staff(p.address)
    ]
    await send_notice(
        session,
        app,
        ticket,
        "agent_reply",
        to=[requester],
        cc=ccs,
        now=work.now,
        automatic=False,
        agent=Address(agent.email, agent.name),
        body=body,
        attachments=work.parsed.attachments,
        reply=await _last_customer_reply(session, ticket),
    )
    log.info("agent reply on %s with %d command(s)", ticket.ref, len(changes))


async def _last_customer_reply(session: AsyncSession, ticket: Ticket) -> Reply | None:
    """The requester's newest message: the agent's reply threads under it in their client."""
    from sqlalchemy import select

    last = (
        await session.execute(
            select(Message)
            .where(
                Message.ticket_id == ticket.id, Message.direction == "in", Message.kind == "public"
            )
            .order_by(Message.id.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if last is None:
        return None
    return Reply(
        message_id=last.message_id,
        new_text=last.new_text,
        from_addr=last.from_addr,
        from_name=last.from_name,
    )


async def unverified(session: AsyncSession, app: App, work: Work) -> None:
    """Mail claiming to be an agent's that no check vouched for: kept, inert, and reported."""
    assert work.ticket is not None and work.message is not None
    agent = app.config.agent_for(work.sender)
    assert agent is not None
    work.message.verified = False
    event(
        session,
        work.ticket,
        at=work.now,
        actor=work.sender,
        action="unverified-agent",
        message=work.message,
    )
    await send_notice(
        session,
        app,
        work.ticket,
        "unverified_agent",
        to=[Address(agent.email, agent.name)],
        now=work.now,
        capped=False,
        extra={
            "reason": "no configured check ("
            + ", ".join(app.config.agents.verify)
            + ") passed for this message"
        },
    )


# -- telling agents ----------------------------------------------------------------------------


def hero_rotation(config: Config, today: date) -> tuple[str, str]:
    """Who triages unassigned hey@ mail now, and who is next."""
    agents = config.hero.agents or [a.email for a in config.agent]
    if not agents:
        return "", ""
    start = date.fromisoformat(config.hero.start)
    period = (today - start).days // config.hero.period_days
    return agents[period % len(agents)], agents[(period + 1) % len(agents)]


def hero_change(config: Config, today: date) -> date:
    start = date.fromisoformat(config.hero.start)
    periods = (today - start).days // config.hero.period_days + 1
    return start + timedelta(days=periods * config.hero.period_days)


def agent_recipients(app: App, ticket: Ticket, *, now: datetime) -> list[Address]:
    config = app.config
    if ticket.assignee:
        agent = config.agent_for(ticket.assignee)
        return [Address(ticket.assignee, agent.name if agent else "")]
    queue = config.queue_named(ticket.queue)
    if queue is not None and queue.team_address:
        return [Address(queue.team_address, queue.display_name or queue.name)]
    hero, _ = hero_rotation(config, now.date())
    agent = config.agent_for(hero) if hero else None
    return [Address(agent.email, agent.name)] if agent else []


async def tell_agents(
    session: AsyncSession,
    app: App,
    ticket: Ticket,
    name: str,
    *,
    now: datetime,
    extra: Mapping[str, object] | None = None,
    message: Message | None = None,
    skip: str = "",
) -> None:
    to = [a for a in agent_recipients(app, ticket, now=now) if a.addr != skip]
    if to:
        await send_notice(
            session,
            app,
            ticket,
            name,
            to=to,
            now=now,
            capped=False,
            extra=_notification_extra(ticket, extra),
            reply_token_for=to[0].addr,
        )


def _notification_extra(ticket: Ticket, extra: Mapping[str, object] | None) -> dict[str, Any]:
    summary = [
        f"Requester: {ticket.requester_name} <{ticket.requester}>".replace(" <", " <", 1),
        f"Status: {ticket.status}   Priority: {ticket.priority}   Queue: {ticket.queue}",
        f"Assignee: {ticket.assignee or 'nobody yet'}",
    ]
    return {"marker": MARKER, "summary_lines": summary, **(extra or {})}


async def notify(
    session: AsyncSession,
    app: App,
    ticket: Ticket,
    message: Message,
    *,
    reply: Reply,
    now: datetime,
) -> None:
    """Each new public customer message goes to the assignee, the team, or the hero."""
    to = agent_recipients(app, ticket, now=now)
    for person in to:
        await send_notice(
            session,
            app,
            ticket,
            "agent_notification",
            to=[person],
            now=now,
            reply=reply,
            capped=False,
            reply_token_for=person.addr,
            extra=_notification_extra(ticket, None),
        )
