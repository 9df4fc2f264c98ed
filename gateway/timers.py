"""Timers stored on tickets as due times, fired against an injected clock.

nudge (pending 24 h) → auto-close (24 h after the nudge) → close (solved 4 days);
escalation when no agent acted within the hour, and at once for urgent premier mail.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import App
from gateway.models import Ticket
from gateway.notices import send_notice
from gateway.tickets import event, set_status
from parsing.model import Address

log = logging.getLogger(__name__)


def _requester(ticket: Ticket) -> Address:
    return Address(ticket.reply_to or ticket.requester, ticket.requester_name)


async def _nudge(session: AsyncSession, app: App, ticket: Ticket, now: datetime) -> None:
    ticket.nudge_due_at = None
    if ticket.status != "pending":
        return
    await send_notice(session, app, ticket, "nudge", to=[_requester(ticket)], now=now)
    ticket.autoclose_due_at = now + timedelta(hours=app.config.timers.autoclose_after_hours)
    event(session, ticket, at=now, actor="timer", action="nudged")


async def _autoclose(session: AsyncSession, app: App, ticket: Ticket, now: datetime) -> None:
    ticket.autoclose_due_at = None
    if ticket.status != "pending":
        return
    set_status(session, app.config, ticket, "solved", now=now, actor="timer")
    await send_notice(session, app, ticket, "auto_close", to=[_requester(ticket)], now=now)


async def _close(session: AsyncSession, app: App, ticket: Ticket, now: datetime) -> None:
    ticket.close_due_at = None
    if ticket.status != "solved":
        return
    set_status(session, app.config, ticket, "closed", now=now, actor="timer")


async def _escalate(session: AsyncSession, app: App, ticket: Ticket, now: datetime) -> None:
    from gateway.agents import agent_recipients

    ticket.escalate_due_at = None
    if ticket.status not in ("new", "open") or ticket.last_agent_at is not None:
        return
    queue = app.config.queue_named(ticket.queue)
    to = (
        [Address(queue.team_address, queue.display_name or queue.name)]
        if queue and queue.team_address
        else agent_recipients(app, ticket, now=now)
    )
    age = int((now - ticket.created_at).total_seconds() // 60)
    await send_notice(
        session,
        app,
        ticket,
        "escalation",
        to=to,
        now=now,
        capped=False,
        extra={"reason": f"no agent action for {age} minutes", "age_minutes": age},
    )
    event(
        session, ticket, at=now, actor="timer", action="escalated", new=",".join(a.addr for a in to)
    )


TIMERS = (
    ("nudge", Ticket.nudge_due_at, _nudge),
    ("auto-close", Ticket.autoclose_due_at, _autoclose),
    ("close", Ticket.close_due_at, _close),
    ("escalate", Ticket.escalate_due_at, _escalate),
)


async def fire_due(app: App, *, now: datetime | None = None) -> dict[str, int]:
    """Fire every timer due at `now` (the app's clock by default); returns counts per timer."""
    now = now or app.clock()
    fired: dict[str, int] = {}
    for name, column, action in TIMERS:
        while True:
            async with app.transaction() as session:
                query = (
                    select(Ticket)
                    .where(column.is_not(None), column <= now)
                    .order_by(column)
                    .limit(100)
                )
                if session.get_bind().dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                tickets = list((await session.execute(query)).scalars())
                for ticket in tickets:
                    await action(session, app, ticket, now)
            fired[name] = fired.get(name, 0) + len(tickets)
            if len(tickets) < 100:
                break
    return fired


async def escalate_now_if_premier(
    session: AsyncSession, app: App, ticket: Ticket, *, now: datetime
) -> bool:
    """An urgent ticket from a premier customer goes to on-call at once, day or night."""
    priority = app.config.priority
    domain = ticket.requester.rpartition("@")[2]
    if ticket.priority != "urgent" or domain not in priority.premier_domains:
        return False
    if not priority.oncall_address:
        return False
    await send_notice(
        session,
        app,
        ticket,
        "escalation",
        to=[Address(priority.oncall_address)],
        now=now,
        capped=False,
        extra={"reason": "urgent ticket from a premier customer", "age_minutes": 0},
    )
    event(session, ticket, at=now, actor="gateway", action="escalated", new=priority.oncall_address)
    return True


async def run(app: App) -> None:
    while not app.stopping.is_set():
        try:
            fired = await fire_due(app)
            if any(fired.values()):
                log.info("timers fired: %s", fired)
        except Exception:
            log.exception("timer pass failed")
        await app.pause(app.stopping, app.config.timers.tick_seconds)
