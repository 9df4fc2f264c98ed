"""`supportgate stats`: volume, response and solve times, and the per-agent leaderboard."""

from __future__ import annotations

import statistics
from datetime import datetime
from typing import Any

from sqlalchemy import select

from gateway.app import App
from gateway.models import Event, Message, Ticket


def _minutes(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None, "count": 0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "median": round(statistics.median(ordered), 1),
        "p90": round(p90, 1),
        "count": len(ordered),
    }


async def compute(app: App, *, since: datetime) -> dict[str, Any]:
    async with app.readers() as session:
        tickets = list(
            (await session.execute(select(Ticket).where(Ticket.created_at >= since))).scalars()
        )
        waiting = list(
            (
                await session.execute(
                    select(Ticket.queue).where(Ticket.status.in_(("new", "open")))
                )
            ).scalars()
        )
        replies = list(
            await session.execute(
                select(Message.author, Message.ticket_id, Message.created_at).where(
                    Message.direction == "in",
                    Message.classification == "agent",
                    Message.kind == "public",
                    Message.verified.is_(True),
                    Message.created_at >= since,
                )
            )
        )
        solved = list(
            (
                await session.execute(
                    select(Event.actor).where(
                        Event.action == "status", Event.new == "solved", Event.at >= since
                    )
                )
            ).scalars()
        )
    by_queue: dict[str, int] = {}
    first_response, to_solve = [], []
    created = {t.id: t.created_at for t in tickets}
    for t in tickets:
        by_queue[t.queue] = by_queue.get(t.queue, 0) + 1
        if t.first_response_at:
            first_response.append((t.first_response_at - t.created_at).total_seconds() / 60)
        if t.solved_at:
            to_solve.append((t.solved_at - t.created_at).total_seconds() / 60)
    waiting_by_queue: dict[str, int] = {}
    for queue in waiting:
        waiting_by_queue[queue] = waiting_by_queue.get(queue, 0) + 1
    agents: dict[str, dict[str, Any]] = {}
    first_by_ticket: dict[int, tuple[str, datetime]] = {}
    for author, ticket_id, at in replies:
        row = agents.setdefault(author, {"replies": 0, "solved": 0, "first_responses": []})
        row["replies"] += 1
        if ticket_id not in first_by_ticket or at < first_by_ticket[ticket_id][1]:
            first_by_ticket[ticket_id] = (author, at)
    for ticket_id, (author, at) in first_by_ticket.items():
        if ticket_id in created:
            agents[author]["first_responses"].append((at - created[ticket_id]).total_seconds() / 60)
    for actor in solved:
        if app.config.agent_for(actor) is not None:
            agents.setdefault(actor, {"replies": 0, "solved": 0, "first_responses": []})
            agents[actor]["solved"] += 1
    leaderboard = sorted(
        (
            {
                "agent": a,
                "replies": r["replies"],
                "solved": r["solved"],
                "median_first_response_minutes": _minutes(r["first_responses"])["median"],
            }
            for a, r in agents.items()
        ),
        key=lambda row: (-row["solved"], -row["replies"], row["agent"]),
    )
    return {
        "since": since.isoformat().replace("+00:00", "Z"),
        "new_tickets": {"total": len(tickets), "by_queue": dict(sorted(by_queue.items()))},
        "first_response_minutes": _minutes(first_response),
        "solve_minutes": _minutes(to_solve),
        "waiting_on_us": {
            "total": len(waiting),
            "by_queue": dict(sorted(waiting_by_queue.items())),
        },
        "agents": leaderboard,
    }
