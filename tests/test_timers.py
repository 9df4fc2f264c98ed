"""Timers over simulated days with the injected clock: nudge, auto-close, close, escalation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway import db
from gateway.app import App, build_app
from gateway.models import Delivery, Ticket
from gateway.tickets import set_status
from gateway.timers import fire_due

from conftest import EXAMPLE, Clock, load_config, mail, receive


async def kinds(app: App) -> list[str]:
    async with app.sessions() as session:
        return list((await session.execute(select(Delivery.kind).order_by(Delivery.id))).scalars())


async def the_ticket(app: App) -> Ticket:
    async with app.sessions() as session:
        return (await session.execute(select(Ticket))).scalar_one()


async def make_pending(app: App) -> None:
    async with app.sessions() as session, session.begin():
        ticket = (await session.execute(select(Ticket))).scalar_one()
        ticket.last_agent_at = app.clock()
        set_status(session, app.config, ticket, "pending", now=app.clock(), actor="sam@example.com")


async def test_pending_nudge_then_auto_close_then_close(
    app: App, clock: Clock, backend: str
) -> None:
    await receive(app, mail())
    await make_pending(app)
    clock.advance(hours=23)
    assert (await fire_due(app))["nudge"] == 0
    clock.advance(hours=1, seconds=1)
    assert (await fire_due(app))["nudge"] == 1
    assert (await kinds(app))[-1] == "nudge"
    async with app.sessions() as session:
        nudge = (
            await session.execute(select(Delivery).where(Delivery.kind == "nudge"))
        ).scalar_one()
    assert b"Just checking in to see if this is still an issue." in nudge.data
    assert b"Auto-Submitted: auto-generated" in nudge.data
    clock.advance(hours=24, seconds=1)
    assert (await fire_due(app))["auto-close"] == 1
    assert (await the_ticket(app)).status == "solved"
    assert (await kinds(app))[-1] == "auto_close"
    clock.advance(days=4, seconds=1)
    assert (await fire_due(app))["close"] == 1
    assert (await the_ticket(app)).status == "closed"
    assert (await fire_due(app)) == {"nudge": 0, "auto-close": 0, "close": 0, "escalate": 0}


async def test_a_customer_reply_cancels_the_nudge(app: App, clock: Clock) -> None:
    await receive(app, mail(message_id="a@customer.org"))
    await make_pending(app)
    clock.advance(hours=3)
    await receive(
        app, mail(message_id="b@customer.org", headers={"In-Reply-To": "<a@customer.org>"})
    )
    clock.advance(days=3)
    fired = await fire_due(app)
    assert fired["nudge"] == 0 and fired["auto-close"] == 0
    assert (await the_ticket(app)).status == "open"


async def test_no_agent_action_within_the_hour_escalates_to_the_team(
    app: App, clock: Clock
) -> None:
    await receive(app, mail())
    clock.advance(minutes=59)
    assert (await fire_due(app))["escalate"] == 0
    clock.advance(minutes=2)
    assert (await fire_due(app))["escalate"] == 1
    async with app.sessions() as session:
        row = (
            await session.execute(select(Delivery).where(Delivery.kind == "escalation"))
        ).scalar_one()
    assert row.recipient == "support-engineering@example.com"
    clock.advance(hours=5)
    assert (await fire_due(app))["escalate"] == 0  # once


async def test_timer_mail_is_due_at_once_by_the_real_clock(app: App, clock: Clock) -> None:
    await receive(app, mail())
    await make_pending(app)
    clock.advance(days=1, seconds=1)
    await fire_due(app)
    async with app.sessions() as session:
        nudge = (
            await session.execute(select(Delivery).where(Delivery.kind == "nudge"))
        ).scalar_one()
    assert nudge.status == "queued" and nudge.next_attempt_at == clock.now


class TestPremier:
    @pytest.fixture
    def config_extra(self) -> str:
        return ""

    async def test_urgent_mail_from_a_premier_customer_pages_on_call_at_once(
        self, tmp_path: Path, clock: Clock
    ) -> None:
        text = (
            EXAMPLE.read_text()
            .replace("premier_domains = []", 'premier_domains = ["bigcorp.example"]')
            .replace('oncall_address = ""', 'oncall_address = "oncall@example.com"')
        )
        path = tmp_path / "supportgate.toml"
        path.write_text(text)
        config = load_config(path)
        await asyncio.to_thread(db.upgrade, config.database_url)
        app = build_app(config, clock=clock, parse_workers=0)
        try:
            await receive(app, mail(sender="cto@bigcorp.example", subject="Emails not delivered"))
            await receive(app, mail(sender="cto@bigcorp.example", subject="Invoice question"))
            await receive(app, mail(sender="x@small.example", subject="Emails not delivered"))
            async with app.sessions() as session:
                pages = list(
                    (
                        await session.execute(select(Delivery).where(Delivery.kind == "escalation"))
                    ).scalars()
                )
            assert [p.recipient for p in pages] == ["oncall@example.com"]
        finally:
            await app.close()


async def test_timers_and_the_intake_move_wait_for_their_turn_at_the_write_lock(app: App) -> None:
    """On SQLite every writer of the worker takes its turn (`App.writing`), so none of them
    is starved by the pipeline's groups coming back to back."""
    from gateway.intake import move_received
    from gateway.pipeline import retry_quarantined
    from gateway.spool import insert_raw, raw_row

    assert app.intake_file  # SQLite: the spool writes a file of its own, moved in by turns
    row = raw_row(
        mail(), mail_from="jane@customer.org", rcpt_tos=["support@example.com"], source="smtp",
        now=app.clock(),
    )  # fmt: skip
    async with app.intake() as session, session.begin():
        await insert_raw(session, [row])
    async with app.writing():
        waiting = [
            asyncio.ensure_future(fire_due(app)),
            asyncio.ensure_future(move_received(app)),
            asyncio.ensure_future(retry_quarantined(app)),
        ]
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in waiting)
    assert (await asyncio.gather(*waiting))[1] == 1  # the stored mail moved in
