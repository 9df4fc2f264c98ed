"""Agents by email: who is one, their #commands, public replies and notes, and telling them."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import App
from gateway.config import Config
from gateway.models import Message, Participant, RawMail, Ticket
from gateway.notices import Reply, send_notice
from gateway.tickets import (
    PRIORITIES,
    STATUSES,
    TicketError,
    add_inbound_message,
    add_participants,
    event,
    resolve_agent,
    set_assignee,
    set_category,
    set_priority,
    set_queue,
    set_status,
)
from parsing.commands import Command, parse_commands
from parsing.model import Address, ParsedMessage
from responders.tokens import verify_reply_token

if TYPE_CHECKING:
    from gateway.pipeline import Work

log = logging.getLogger(__name__)

DnsFunc = Callable[..., bytes]
MARKER = "##- Reply above this line -##"


# -- who is an agent ---------------------------------------------------------------------------


def _aligned(signer: str, sender_domain: str) -> bool:
    """Relaxed alignment: From's domain is the signer's or below it; a bare TLD aligns nothing."""
    signer, sender_domain = signer.lower().rstrip("."), sender_domain.lower()
    if "." not in signer.strip("."):
        return False
    return sender_domain == signer or sender_domain.endswith("." + signer)


def _token_of(address: str) -> str:
    local = address.rpartition("@")[0]
    _, plus, token = local.partition("+")
    return token if plus else ""


async def token_check(
    session: AsyncSession, config: Config, raw: RawMail, parsed: ParsedMessage, sender: str
) -> bool:
    """The token the message threads by (the first that verifies, read in threading's order)
    names this very agent and an open ticket, and came where a reply to our Reply-To puts it:
    the envelope, To or Cc. A token then vouches for nothing but its own ticket."""
    replied = [*raw.rcpt_tos, *(a.addr for a in (*parsed.to, *parsed.cc))]
    for address in [*replied, *(a.addr for a in parsed.reply_to)]:
        token = _token_of(address) if config.is_ours(address) else ""
        found = verify_reply_token(token, secret=config.secret) if token else None
        if found is None:
            continue
        ref, agent = found
        if agent != sender or address not in replied:
            return False
        ticket = (
            await session.execute(select(Ticket).where(Ticket.ref == ref))
        ).scalar_one_or_none()
        return ticket is not None and ticket.status != "closed"
    return False


def _without_comments(value: str) -> str:
    """RFC 8601 text with (nested) comments removed and quoted strings kept whole."""
    out: list[str] = []
    depth, quoted, escaped = 0, False, False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(char)
            continue
        if char == "\\":
            escaped = True
            if depth == 0:
                out.append(char)
            continue
        if quoted:
            quoted = char != '"'
            out.append(char)
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            quoted = char == '"'
            out.append(char)
    return "".join(out)


def authentication_results_check(config: Config, parsed: ParsedMessage, sender: str) -> bool:
    """The topmost Authentication-Results, added by our own relay, says DKIM passed for a domain
    aligned with From. Anything below it came with the message and may be the sender's forgery.
    """
    authserv = config.agents.authserv_id.lower()
    results = parsed.header_all("authentication-results")
    if not authserv or not results:
        return False
    server, _, rest = _without_comments(results[0]).partition(";")
    if server.strip().lower().split()[0:1] != [authserv]:
        return False
    sender_domain = sender.rpartition("@")[2]
    for clause in rest.split(";"):
        words = clause.split()
        if not words or "=" not in words[0]:
            continue
        method, _, result = words[0].partition("=")
        if method.strip().lower() != "dkim" or result.strip().lower() != "pass":
            continue
        props: dict[str, str] = {}
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if eq:
                props.setdefault(key.lower(), value.strip('"'))
        signer = props.get("header.d", "") or props.get("header.i", "").rpartition("@")[2]
        if signer and _aligned(signer, sender_domain):
            return True
    return False


def dkim_check(raw: bytes, sender: str, *, dnsfunc: DnsFunc | None = None) -> bool:
    """One DKIM signature aligned with From's domain verifies. Blocking: run it off the loop.

    A signature with a body length limit (l=) does not count: text appended after the signed
    part would ride on it.
    """
    import dkim
    from dkim.util import parse_tag_value

    sender_domain = sender.rpartition("@")[2]
    try:
        verifier = dkim.DKIM(raw)
        signatures = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
        for index, value in enumerate(signatures):
            tags = parse_tag_value(value)
            signer = tags.get(b"d", b"").decode("ascii", "replace")
            if b"l" in tags or not _aligned(signer, sender_domain):
                continue
            if dnsfunc is None:
                ok = verifier.verify(idx=index)
            else:
                ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
            if ok:
                return True
    except Exception as exc:  # dkimpy raises many kinds on hostile input
        log.info("DKIM check failed: %s", type(exc).__name__)
    return False


async def _seen(session: AsyncSession, message_id: str) -> bool:
    found = await session.execute(
        select(Message.id)
        .where(Message.message_id == message_id, Message.direction == "in")
        .limit(1)
    )
    return found.first() is not None


def _agent_author(app: App, parsed: ParsedMessage) -> str:
    """The agent this mail's headers say wrote it alone (one From, no one else's Sender), or
    "": what `verify_sender` must see before any check is worth running."""
    sender = parsed.from_addr.addr if parsed.from_addr else ""
    if not sender or app.config.agent_for(sender) is None or parsed.from_count != 1:
        return ""
    if parsed.sender is not None and parsed.sender.addr != sender:
        return ""  # sent on someone else's behalf: not the agent's own mail
    if len(parsed.header_all("from")) != 1 or len(parsed.header_all("sender")) > 1:
        return ""
    return sender


def dkim_sender(app: App, parsed: ParsedMessage) -> str:
    """The agent whose DKIM signature `verify_sender` may check on this mail, or ""."""
    return _agent_author(app, parsed) if "dkim" in app.config.agents.verify else ""


async def dkim_verdicts(
    app: App, items: Sequence[tuple[RawMail, ParsedMessage]]
) -> dict[int, bool]:
    """DKIM for the agents' mail among `items`, by raw id. The pipeline asks before its
    transaction: the DNS lookups must not hold SQLite's write lock while intake waits."""
    verdicts: dict[int, bool] = {}
    for raw, parsed in items:
        if sender := dkim_sender(app, parsed):
            verdicts[raw.id] = await asyncio.to_thread(
                dkim_check, raw.data, sender, dnsfunc=app.dkim_dns
            )
    return verdicts


async def verify_sender(
    session: AsyncSession,
    app: App,
    raw: RawMail,
    parsed: ParsedMessage,
    *,
    dkim: bool | None = None,
) -> str:
    """The agent's address when the sender is staff and a configured check passes, else "".

    `dkim` is the verdict `dkim_verdicts` found already; None checks here.
    """
    config = app.config
    sender = _agent_author(app, parsed)
    if not sender:
        return ""
    if parsed.has_message_id and await _seen(session, parsed.message_id):
        return ""  # exact copies stop at dedupe: this is an old agent mail, altered and replayed
    for check in config.agents.verify:
        if check == "token" and await token_check(session, config, raw, parsed, sender):
            return sender
        if check == "authentication-results" and authentication_results_check(
            config, parsed, sender
        ):
            return sender
        if check == "dkim" and (
            dkim
            if dkim is not None
            else await asyncio.to_thread(dkim_check, raw.data, sender, dnsfunc=app.dkim_dns)
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
_NEEDS_ARGUMENT = frozenset({"status", "assign", "priority", "queue", "cc", "requester"})
_NEEDS_ARGUMENT |= {"category", "reassign"}
_ADDRESS = re.compile(r"[^@\s<>(),;:\"]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


class CommandError(TicketError):
    """One or more command lines are wrong; nothing was applied."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Change:
    """A checked command: its name and the normalised value it applies."""

    name: str
    value: str


def _checked(config: Config, command: Command, *, agent: str) -> Change:
    """One command line checked against the config; TicketError says what is wrong."""
    name, args = command.name, command.args.strip()
    if name not in COMMAND_HELP:
        raise TicketError(f"unknown command #{name}")
    if name in _NEEDS_ARGUMENT and not args:
        raise TicketError(f"#{name} needs an argument")
    value = args.lower()
    if name == "status" and (value not in STATUSES or value == "new"):
        raise TicketError(f"unknown status {args!r}")
    if name == "priority" and value not in PRIORITIES:
        raise TicketError(f"unknown priority {args!r}")
    if name == "queue" and config.queue_named(value) is None:
        known = ", ".join(q.name for q in config.queue)
        raise TicketError(f"unknown queue {args!r} (queues: {known})")
    if name in ("assign", "reassign"):
        value = resolve_agent(config, args, me=agent)
    if name == "cc":
        sign, address = args[:1], args[1:].strip().lower()
        if sign not in ("+", "-") or not _ADDRESS.fullmatch(address):
            raise TicketError(f"{args!r} is not +ADDR or -ADDR")
        if config.is_ours(address):
            raise TicketError(f"{address} is one of our own addresses")
        value = sign + address
    if name == "requester":
        if not _ADDRESS.fullmatch(value):
            raise TicketError(f"{args!r} is not an email address")
        if config.is_ours(value):
            raise TicketError(f"{value} is one of our own addresses")
    if name == "category":
        if len(args) > 64:
            raise TicketError("a category is at most 64 characters")
        value = args
    if name == "note":
        value = args  # "#note text": the text is part of the note
    return Change(name, value)


def check_commands(config: Config, commands: tuple[Command, ...], *, agent: str) -> list[Change]:
    """Every command checked before any applies; CommandError lists each bad line."""
    changes: list[Change] = []
    errors: list[str] = []
    for command in commands:
        try:
            changes.append(_checked(config, command, agent=agent))
        except TicketError as exc:
            usage = COMMAND_HELP.get(command.name)
            how = f"write it as {usage}" if usage else "the commands are listed below"
            errors.append(f"line {command.line}: {exc} — {how}")
    if errors:
        raise CommandError(errors)
    return changes


async def _apply(
    session: AsyncSession,
    app: App,
    ticket: Ticket,
    changes: list[Change],
    *,
    agent: str,
    now: datetime,
    message: Message,
) -> list[tuple[str, dict[str, object]]]:
    """Apply checked changes, each audited against `message`; returns the notices they imply."""
    config = app.config
    notices: list[tuple[str, dict[str, object]]] = []
    for change in changes:
        name, value = change.name, change.value
        if name == "status":
            set_status(session, config, ticket, value, now=now, actor=agent, message=message)
        elif name == "priority":
            set_priority(session, ticket, value, now=now, actor=agent, message=message)
        elif name == "queue":
            if set_queue(session, config, ticket, value, now=now, actor=agent, message=message):
                notices.append(("handover", {}))
        elif name in ("assign", "reassign"):
            changed = set_assignee(session, ticket, value, now=now, actor=agent, message=message)
            if name == "reassign" and changed:
                found = config.agent_for(value)
                notices.append(("reassigned", {"new_assignee_name": found.name if found else ""}))
        elif name == "cc":
            address = value[1:]
            if value.startswith("+"):
                await add_participants(session, ticket, [Address(address)], role="cc")
            else:
                await session.execute(
                    delete(Participant).where(
                        Participant.ticket_id == ticket.id,
                        Participant.address == address,
                        Participant.role == "cc",
                    )
                )
            event(session, ticket, at=now, actor=agent, action="cc", new=value, message=message)
        elif name == "requester":
            old = ticket.requester
            event(
                session,
                ticket,
                at=now,
                actor=agent,
                action="requester",
                old=old,
                new=value,
                message=message,
            )
            ticket.requester, ticket.requester_name, ticket.reply_to = value, "", ""
            await session.execute(
                delete(Participant).where(
                    Participant.ticket_id == ticket.id,
                    or_(
                        Participant.address == value,
                        (Participant.address == old) & (Participant.role == "requester"),
                    ),
                )
            )
            await add_participants(session, ticket, [Address(value)], role="requester")
        elif name == "category":
            set_category(session, ticket, value, now=now, actor=agent, message=message)
        elif name == "ask":
            set_status(session, config, ticket, "pending", now=now, actor=agent, message=message)
            notices.append(("more_info", {}))
        elif name == "solve":
            set_status(session, config, ticket, "solved", now=now, actor=agent, message=message)
            notices.append(("solved", {}))
        elif name == "researching":
            set_status(session, config, ticket, "open", now=now, actor=agent, message=message)
            notices.append(("researching", {}))
    ticket.updated_at = now
    return notices


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
    note_words = [c.args.strip() for c in block.commands if c.name == "note" and c.args.strip()]
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
        new_text="\n\n".join([*note_words, body]).strip(),
    )
    work.message = message
    try:
        changes = check_commands(config, block.commands, agent=agent_addr)
    except CommandError as exc:
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
            extra={"errors": exc.errors, "commands": list(COMMAND_HELP.values())},
        )
        return
    notices = await _apply(
        session, app, ticket, changes, agent=agent_addr, now=work.now, message=message
    )
    ticket.last_agent_at = work.now
    ticket.escalate_due_at = None
    is_note = any(c.name == "note" for c in changes)
    requester = Address(ticket.reply_to or ticket.requester, ticket.requester_name)
    last = await _last_customer_reply(session, ticket)
    for name, extra in notices:
        if name == "handover":
            await tell_agents(
                session,
                app,
                ticket,
                "agent_notification",
                now=work.now,
                reply=last,
                skip=agent_addr,
                team_only=True,
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
        reply=last,
    )
    log.info("agent reply on %s with %d command(s)", ticket.ref, len(changes))


async def _last_customer_reply(session: AsyncSession, ticket: Ticket) -> Reply | None:
    """The requester's newest message: the agent's reply threads under it in their client."""
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


def agent_recipients(
    app: App, ticket: Ticket, *, now: datetime, team_only: bool = False
) -> list[Address]:
    """The assignee, else the queue's team address, else the current support hero."""
    config = app.config
    if ticket.assignee and not team_only:
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
    reply: Reply | None = None,
    team_only: bool = False,
) -> None:
    """Tell whoever handles the ticket; `team_only` skips the assignee (a queue handover)."""
    people = agent_recipients(app, ticket, now=now, team_only=team_only)
    to = [a for a in people if a.addr != skip]
    if to:
        await send_notice(
            session,
            app,
            ticket,
            name,
            to=to,
            now=now,
            reply=reply,
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
