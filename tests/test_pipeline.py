"""Mail in, tickets out: classification, threading, de-duplication, follow-ups, quarantine."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from gateway import db
from gateway.app import App
from gateway.models import Event, Message, RawMail, Ticket
from gateway.pipeline import process_pending
from gateway.tickets import set_status
from gateway.views import ticket_view

from conftest import deliveries, mail, receive


async def tickets(app: App) -> list[dict[str, Any]]:
    async with app.sessions() as session:
        rows = (await session.execute(select(Ticket).order_by(Ticket.id))).scalars()
        return [await ticket_view(session, t) for t in rows]


async def test_new_mail_makes_a_ticket_with_an_acknowledgement(app: App, backend: str) -> None:
    await receive(
        app,
        mail(
            subject="Re: Login broken",
            message_id="first@customer.org",
            headers={"Cc": "Bob <bob@customer.org>, support@example.com"},
        ),
    )
    (ticket,) = await tickets(app)
    assert ticket["queue"] == "support"
    assert ticket["status"] == "new"
    assert ticket["requester"] == "jane@customer.org"
    assert ticket["cc"] == ["bob@customer.org"]
    assert ticket["subject"] == "Login broken"
    assert ticket["messages"][0]["threaded_by"] == "new"
    assert ticket["messages"][0]["direction"] == "in"
    acks = await deliveries(app, "acknowledgement")
    assert [d.recipient for d in acks] == ["jane@customer.org"]
    assert b"In-Reply-To: <first@customer.org>" in acks[0].data
    assert b"Auto-Submitted: auto-replied" in acks[0].data
    assert f"[#{ticket['ref']}]".encode() in acks[0].data


async def test_queue_follows_the_envelope_recipient(app: App) -> None:
    await receive(app, mail(to="support@example.com"), rcpt="trialsupport@example.com")
    await receive(app, mail(), rcpt="hey@example.com")
    assert [t["queue"] for t in await tickets(app)] == ["trial", "hey"]


async def test_replies_thread_by_in_reply_to_references_and_our_ids(app: App, backend: str) -> None:
    await receive(app, mail(message_id="root@customer.org"))
    await receive(
        app, mail(message_id="r1@customer.org", headers={"In-Reply-To": "<root@customer.org>"})
    )
    await receive(
        app,
        mail(
            message_id="r2@customer.org",
            headers={"References": "<unknown@x> <r1@customer.org> <other@x>"},
        ),
    )
    (ack,) = await deliveries(app, "acknowledgement")
    await receive(
        app, mail(message_id="r3@customer.org", headers={"In-Reply-To": f"<{ack.message_id}>"})
    )
    (ticket,) = await tickets(app)
    assert [m["threaded_by"] for m in ticket["messages"] if m["direction"] == "in"] == [
        "new",
        "in-reply-to:<root@customer.org>",
        "references:<r1@customer.org>",
        f"in-reply-to:<{ack.message_id}>",
    ]
    assert len(await deliveries(app, "acknowledgement")) == 1


async def test_a_parent_arriving_after_its_reply_lands_on_the_same_ticket(app: App) -> None:
    await receive(app, mail(message_id="child@x.org", headers={"In-Reply-To": "<parent@x.org>"}))
    await receive(app, mail(message_id="sibling@x.org", headers={"References": "<parent@x.org>"}))
    await receive(app, mail(message_id="parent@x.org"))
    (ticket,) = await tickets(app)
    inbound = [m for m in ticket["messages"] if m["direction"] == "in"]
    assert inbound[-1]["threaded_by"].startswith("references:referenced-by-stored")


async def test_subject_tag_only_from_a_participant(app: App) -> None:
    await receive(app, mail())
    (first,) = await tickets(app)
    tag = f"Re: question [#{first['ref']}]"
    await receive(app, mail(sender="jane@customer.org", subject=tag))
    await receive(app, mail(sender="mallory@evil.example", subject=tag))
    refs = [t["ref"] for t in await tickets(app)]
    assert len(refs) == 2
    (ticket, other) = await tickets(app)
    assert any(m["threaded_by"].startswith("subject-tag") for m in ticket["messages"])
    assert other["requester"] == "mallory@evil.example"


async def test_reply_to_a_closed_ticket_opens_a_linked_follow_up(app: App) -> None:
    await receive(app, mail(message_id="old@customer.org"))
    async with app.sessions() as session, session.begin():
        ticket = (await session.execute(select(Ticket))).scalar_one()
        set_status(session, app.config, ticket, "closed", now=app.clock(), actor="test")
    await receive(
        app, mail(message_id="new@customer.org", headers={"In-Reply-To": "<old@customer.org>"})
    )
    old, new = await tickets(app)
    assert new["follow_up_of"] == old["ref"]
    assert new["messages"][0]["threaded_by"].startswith("follow-up:")


async def test_customer_reply_reopens_pending_and_cancels_timers(app: App) -> None:
    await receive(app, mail(message_id="p@customer.org"))
    async with app.sessions() as session, session.begin():
        ticket = (await session.execute(select(Ticket))).scalar_one()
        set_status(session, app.config, ticket, "pending", now=app.clock(), actor="test")
        assert ticket.nudge_due_at is not None
    await receive(
        app, mail(message_id="p2@customer.org", headers={"In-Reply-To": "<p@customer.org>"})
    )
    async with app.sessions() as session:
        ticket = (await session.execute(select(Ticket))).scalar_one()
        assert ticket.status == "open"
        assert ticket.nudge_due_at is None


async def test_auto_replies_thread_but_never_change_status_or_get_answers(app: App) -> None:
    await receive(app, mail(message_id="q@customer.org"))
    async with app.sessions() as session, session.begin():
        ticket = (await session.execute(select(Ticket))).scalar_one()
        set_status(session, app.config, ticket, "pending", now=app.clock(), actor="test")
    ooo = mail(
        subject="Automatic reply: Help",
        message_id="ooo@customer.org",
        headers={"Auto-Submitted": "auto-replied", "In-Reply-To": "<q@customer.org>"},
    )
    await receive(app, ooo)
    await receive(app, mail(subject="Newsletter", headers={"List-Id": "<news.customer.org>"}))
    first, second = await tickets(app)
    assert first["status"] == "pending"
    assert [m for m in first["messages"] if m["direction"] == "in"][-1]["kind"] == "auto"
    assert len(await deliveries(app, "acknowledgement")) == 1  # only for the first mail
    assert second["messages"][0]["kind"] == "auto"


async def test_duplicates_are_stored_once_with_both_mailboxes(app: App, backend: str) -> None:
    data = mail(message_id="same@customer.org", to="support@example.com, hey@example.com")
    await receive(app, data, rcpt="support@example.com")
    await receive(app, data, rcpt="hey@example.com")
    await receive(app, b"Received: from relay\r\n" + data, rcpt="support@example.com")
    (ticket,) = await tickets(app)
    inbound = [m for m in ticket["messages"] if m["direction"] == "in"]
    assert len(inbound) == 1
    assert inbound[0]["mailboxes"] == ["hey@example.com", "support@example.com"]
    async with app.sessions() as session:
        states = list((await session.execute(select(RawMail.state).order_by(RawMail.id))).scalars())
    assert states == ["processed", "duplicate", "duplicate"]


async def test_a_different_mail_reusing_a_message_id_is_kept(app: App) -> None:
    await receive(app, mail(message_id="reused@x.org", body="first"))
    await receive(app, mail(message_id="reused@x.org", body="second, different"))
    async with app.sessions() as session:
        count = await session.scalar(
            select(func.count(Message.id)).where(Message.direction == "in")
        )
    assert count == 2


async def test_urgent_by_default_when_mail_is_not_delivered(app: App) -> None:
    await receive(app, mail(subject="Our emails are not being delivered"))
    await receive(app, mail(subject="Question about invoices"))
    assert [t["priority"] for t in await tickets(app)] == ["urgent", "normal"]


def nested_bomb(depth: int) -> bytes:
    """A message nested `depth` multiparts deep."""
    head = (
        mail()
        .split(b"\r\n\r\n", 1)[0]
        .replace(
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Type: multipart/mixed; boundary=b0",
        )
    )
    body = b""
    for level in range(1, depth + 1):
        body += (
            f"--b{level - 1}\r\nContent-Type: multipart/mixed; boundary=b{level}\r\n\r\n".encode()
        )
    return head + b"\r\n\r\n" + body + b"--b%d--\r\n" % depth


async def test_mail_that_breaks_a_limit_is_quarantined_with_its_reason(app: App) -> None:
    await receive(app, nested_bomb(60))
    async with app.sessions() as session:
        raw = (await session.execute(select(RawMail))).scalar_one()
    assert raw.state == "quarantined"
    assert "nesting" in raw.note
    assert raw.attempts == app.config.pipeline.max_attempts  # waits for a person
    assert await process_pending(app) == {}


def test_urgent_patterns_joined_match_as_they_match_alone() -> None:
    """The patterns are searched as one alternation when that cannot change what they match;
    a back-reference or a global flag past the start keeps them searched one by one."""
    from gateway.config import PrioritySection
    from gateway.tickets import _joined
    from gateway.tickets import urgent_by_rules as urgent

    defaults = PrioritySection().urgent_patterns
    assert _joined(tuple(defaults)) is not None
    assert urgent(defaults, "Hi\nOur MAILS are not being DELIVERED since noon")
    assert not urgent(defaults, "Hi\nThe invoice page is broken")
    backreference = [r"(a)x", r"(b)\1"]  # \1 is b's own group only when searched alone
    assert _joined(tuple(backreference)) is None
    assert urgent(backreference, "bb") and not urgent(backreference, "ba")
    conditional = [r"(x)", r"^(y)?(?(1)a|b)$"]  # group 1 is y's only when searched alone
    assert _joined(tuple(conditional)) is None
    assert urgent(conditional, "ya") and not urgent(conditional, "yb")
    late_flag = [r"zzz", r"(?s)a.b"]
    assert _joined(tuple(late_flag)) is None
    assert urgent(late_flag, "a\nb")
    assert not urgent([], "anything")


async def test_a_sender_we_cannot_write_in_a_header_still_gets_a_ticket(app: App) -> None:
    """An address the header parser would refuse (a doubled dot) is ticketed; only the
    acknowledgement is skipped, with the reason on the ticket's events."""
    from gateway.models import Event

    raw_id = await receive(app, mail(sender="Jane <jane..doe@customer.org>"))
    async with app.sessions() as session:
        raw = await session.get(RawMail, raw_id)
        assert raw is not None and raw.state == "processed", raw and raw.note
        skipped = (
            await session.execute(select(Event.detail).where(Event.action == "notice-skipped"))
        ).scalars()
        reasons = [
            d.get("reason") for d in skipped if d.get("recipient") == "jane..doe@customer.org"
        ]
    assert [t["requester"] for t in await tickets(app)] == ["jane..doe@customer.org"]
    assert reasons == ["an address we cannot write in a mail header"]
    assert await deliveries(app, "acknowledgement") == []


async def test_rows_written_as_core_behave_as_loaded_objects(app: App, backend: str) -> None:
    """`db.insert_object` rows are objects the session holds as if loaded (a change is an
    UPDATE, nothing is left to load); `db.insert_at_commit` rows reach the table at commit,
    in order, and a rollback forgets them."""
    now = app.clock()
    async with app.sessions() as session, session.begin():
        ticket = await db.insert_object(
            session, Ticket, ref="T-1", queue="support", mailbox="support@example.com",
            requester="j@c.org", created_at=now, updated_at=now,
        )  # fmt: skip
        assert ticket in session and ticket not in session.dirty
        assert (ticket.status, ticket.assignee, ticket.closed_at) == ("new", "", None)  # defaults
        assert await session.get(Ticket, ticket.id) is ticket
        ticket.status = "open"

        def audit(action: str) -> dict[str, Any]:
            return {"ticket_id": ticket.id, "at": now, "actor": "t", "action": action}

        for action in ("first", "second"):
            db.insert_at_commit(session, Event, audit(action))
    with pytest.raises(RuntimeError):
        async with app.sessions() as session, session.begin():
            db.insert_at_commit(session, Event, audit("rolled back"))
            raise RuntimeError("roll back")
    session = app.sessions()
    with pytest.raises(RuntimeError):
        db.insert_at_commit(session, Event, audit("outside a transaction"))
    await session.get(Ticket, ticket.id)  # begins one
    db.insert_at_commit(session, Event, audit("closed, not committed"))
    await session.close()  # ends the transaction without a rollback of its own
    async with session.begin():  # the same session, used again
        with pytest.raises(RuntimeError):
            async with session.begin_nested():
                db.insert_at_commit(session, Event, audit("in a savepoint"))
    await session.close()
    async with app.sessions() as session:
        stored = await session.get(Ticket, ticket.id)
        assert stored is not None and stored.status == "open"
        query = select(Event.action).where(Event.ticket_id == ticket.id).order_by(Event.id)
        assert list((await session.execute(query)).scalars()) == ["first", "second"]
