"""Threading: which ticket a message belongs to, and why, in the order DESIGN.md gives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import db
from gateway.config import Config
from gateway.models import Message, Participant, ThreadRef, Ticket
from parsing.model import ParsedMessage
from parsing.subject import find_ticket_refs
from responders.tokens import parse_own_message_id, verify_reply_token


@dataclass(frozen=True, slots=True)
class Thread:
    """Where a message goes: an existing ticket, or a new one (maybe a follow-up)."""

    ticket: Ticket | None
    threaded_by: str
    follow_up_of: Ticket | None = None
    token_agent: str = ""  # the agent a verified reply token names ("" for none)


def _token_of(address: str) -> str:
    local = address.rpartition("@")[0]
    _, plus, token = local.partition("+")
    return token if plus else ""


# Built once: these run for every message, and building a statement (and its cache key)
# costs more than SQLite takes to answer it.
_BY_REF = select(Ticket).where(Ticket.ref == bindparam("ref"))
# The misses (most lookups: new mail) are asked as Core on the connection, which costs half
# the ORM's way; a hit is then loaded by id, from the session's identity map when it can.
# Both read rows that are written as Core or flushed on creation, so no autoflush is missed.
_BY_THREAD_ID = (
    select(ThreadRef.ticket_id)
    .where(ThreadRef.message_id == bindparam("mid"))
    .order_by(ThreadRef.stored.desc(), ThreadRef.id)
    .limit(1)
)
_PARTICIPANT = select(Participant.id).where(
    Participant.ticket_id == bindparam("ticket"), Participant.address == bindparam("address")
)
_DUPLICATE = (
    select(Message.id)
    .where(
        Message.message_id == bindparam("mid"),
        Message.content_hash == bindparam("hash"),
        Message.direction == "in",
    )
    .limit(1)
)


async def _ticket_by_ref(session: AsyncSession, ref: str) -> Ticket | None:
    return (await session.execute(_BY_REF, {"ref": ref})).scalar_one_or_none()


async def _ticket_by_message_id(session: AsyncSession, config: Config, mid: str) -> Ticket | None:
    ref = parse_own_message_id(mid, domain=config.gateway.domain, secret=config.secret)
    if ref:
        ticket = await _ticket_by_ref(session, ref)
        if ticket is not None:
            return ticket
    ticket_id = await db.scalar(session, _BY_THREAD_ID, {"mid": mid})
    return None if ticket_id is None else await session.get(Ticket, ticket_id)


async def _is_participant(session: AsyncSession, ticket: Ticket, address: str) -> bool:
    if address in (ticket.requester, ticket.assignee, ticket.submitter):
        return True
    found = await session.execute(_PARTICIPANT, {"ticket": ticket.id, "address": address})
    return found.first() is not None


def _verified_token(config: Config, addresses: Sequence[str]) -> tuple[str, str, str] | None:
    for address in addresses:
        if not config.is_ours(address):
            continue
        token = _token_of(address)
        if not token:
            continue
        found = verify_reply_token(token, secret=config.secret)
        if found:
            return found[0], found[1], token
    return None


async def find_thread(
    session: AsyncSession, config: Config, parsed: ParsedMessage, *, rcpt_tos: Sequence[str]
) -> Thread:
    """The ticket for a message. A match on a closed ticket opens a follow-up instead."""
    thread = await _match(session, config, parsed, rcpt_tos=rcpt_tos)
    if thread.ticket is not None and thread.ticket.status == "closed":
        return Thread(
            ticket=None,
            threaded_by=f"follow-up:{thread.ticket.ref}:{thread.threaded_by}",
            follow_up_of=thread.ticket,
            token_agent=thread.token_agent,
        )
    return thread


async def _match(
    session: AsyncSession, config: Config, parsed: ParsedMessage, *, rcpt_tos: Sequence[str]
) -> Thread:
    header_addrs = [a.addr for a in (*parsed.to, *parsed.cc, *parsed.reply_to)]
    token = _verified_token(config, [*rcpt_tos, *header_addrs])
    if token is not None:
        ref, agent, _ = token
        ticket = await _ticket_by_ref(session, ref)
        if ticket is not None:
            return Thread(ticket, "token", token_agent=agent)

    for mid in parsed.in_reply_to:
        ticket = await _ticket_by_message_id(session, config, mid)
        if ticket is not None:
            return Thread(ticket, f"in-reply-to:<{mid}>")
    for mid in reversed(parsed.references):
        ticket = await _ticket_by_message_id(session, config, mid)
        if ticket is not None:
            return Thread(ticket, f"references:<{mid}>")
    if parsed.has_message_id:
        # A parent arriving after its reply: stored mail already referenced this id.
        ticket = await _ticket_by_message_id(session, config, parsed.message_id)
        if ticket is not None:
            return Thread(ticket, f"references:referenced-by-stored <{parsed.message_id}>")

    sender = parsed.from_addr.addr if parsed.from_addr else ""
    for ref in find_ticket_refs(parsed.subject):
        ticket = await _ticket_by_ref(session, ref)
        if ticket is not None and sender and await _is_participant(session, ticket, sender):
            return Thread(ticket, f"subject-tag:[#{ref}]")
    return Thread(None, "new")


async def find_duplicate(session: AsyncSession, parsed: ParsedMessage) -> Message | None:
    """A stored inbound message with the same Message-ID and the same content."""
    params = {"mid": parsed.message_id, "hash": parsed.content_hash}
    found = await db.scalar(session, _DUPLICATE, params)
    return None if found is None else await session.get(Message, found)
