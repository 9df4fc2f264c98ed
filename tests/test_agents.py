"""Agents by email: notifications, verification, #commands, public replies, forged senders."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
import math
import random
import sqlite3
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import dkim
import pytest
from sqlalchemy import select

from gateway.agents import MARKER, dkim_check, hero_change, hero_rotation
from gateway.app import App
from gateway.config import Config
from gateway.models import Delivery, Event, Message, Participant, Ticket
from gateway.tickets import set_assignee, set_status
from responders.tokens import reply_token

from conftest import deliveries, mail, receive

FIXTURES = Path(__file__).parent / "fixtures" / "agents"
SAM = "sam@example.com"
ALEX = "alex@example.com"
CHANGES = ("status", "priority", "queue", "assign", "cc", "requester", "category")
REPLIES = ("agent_reply", "command_error", "more_info", "solved", "reassigned", "researching")


# -- DKIM keys the tests own, answered by `app.dkim_dns` ---------------------------------------


def _der_length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _der_int(value: int) -> bytes:
    octets = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_length(len(octets)) + octets


def _der_seq(*items: bytes) -> bytes:
    body = b"".join(items)
    return b"\x30" + _der_length(len(body)) + body


def _probably_prime(n: int, rng: random.Random, rounds: int = 20) -> bool:
    """Miller-Rabin."""
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(rng: random.Random, bits: int) -> int:
    """A random prime with the top two bits set, so two of them make a full-size modulus."""
    while True:
        n = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if all(n % p for p in (3, 5, 7, 11, 13)) and _probably_prime(n, rng):
            return n


def _key(seed: int) -> tuple[bytes, bytes]:
    """An RSA key for DKIM (PKCS#1 PEM) and its DNS TXT record, made here: no network, no
    `cryptography` dependency. 1024 bits is the smallest size dkimpy accepts."""
    rng = random.Random(seed)
    while True:
        p, q = _prime(rng, 512), _prime(rng, 512)
        if p != q and math.gcd(65537, (p - 1) * (q - 1)) == 1:
            break
    n, e = p * q, 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    fields = (0, n, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p))
    der = _der_seq(*map(_der_int, fields))
    pem = b"-----BEGIN RSA PRIVATE KEY-----\n" + base64.encodebytes(der)
    pem += b"-----END RSA PRIVATE KEY-----\n"
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(_der_seq(_der_int(n), _der_int(e)))
    return pem, record


KEY, RECORD = _key(1)
OTHER_KEY, OTHER_RECORD = _key(2)  # a key whose public half is published nowhere


def dns_answering(records: dict[str, bytes]) -> Callable[..., bytes]:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes:
        key = (name.decode() if isinstance(name, bytes) else name).rstrip(".").lower()
        return records.get(key, b"")

    return lookup


DNS = {"mail._domainkey.example.com": RECORD, "mail._domainkey.evil.example": OTHER_RECORD}


def sign(
    data: bytes,
    *,
    domain: str = "example.com",
    key: bytes = KEY,
    selector: str = "mail",
    **kw: Any,
) -> bytes:
    headers = [b"from", b"to", b"subject", b"message-id", b"date", b"in-reply-to", b"references"]
    signature = dkim.sign(
        data,
        selector.encode(),
        domain.encode(),
        key,
        include_headers=kw.pop("include_headers", headers),
        **kw,
    )
    return bytes(signature) + data


@pytest.fixture(autouse=True)
def _dkim_dns(app: App) -> None:
    app.dkim_dns = dns_answering(DNS)


# -- helpers -----------------------------------------------------------------------------------


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def fixture(name: str, **values: str) -> bytes:
    text = (FIXTURES / name).read_text()
    values.setdefault("UNIQUE", uuid.uuid4().hex)
    for key, value in values.items():
        text = text.replace(f"%{key}%", value)
    return crlf(text)


def agent_mail(
    body: str,
    *,
    sender: str = f"Sam Agent <{SAM}>",
    to: str = "support@example.com",
    subject: str = "Re: your ticket",
    parent: str = "",
    headers: dict[str, str] | None = None,
) -> bytes:
    extra = dict(headers or {})
    if parent:
        extra.setdefault("In-Reply-To", f"<{parent}>")
        extra.setdefault("References", f"<{parent}>")
    return mail(
        sender=sender,
        to=to,
        subject=subject,
        body=body,
        message_id=f"{uuid.uuid4().hex}@example.com",
        headers=extra,
    )


def token_for(app: App, ref: str, agent: str = SAM) -> str:
    return reply_token(ticket_ref=ref, agent=agent, secret=app.config.secret)


def with_config(app: App, **agents: Any) -> None:
    app.config = dataclasses.replace(
        app.config, agents=dataclasses.replace(app.config.agents, **agents)
    )


async def ticket(app: App, ref: str) -> Ticket:
    async with app.sessions() as session:
        return (await session.execute(select(Ticket).where(Ticket.ref == ref))).scalar_one()


async def events(app: App, ref: str, *actions: str) -> list[Event]:
    async with app.sessions() as session:
        query = (
            select(Event)
            .join(Ticket, Ticket.id == Event.ticket_id)
            .where(Ticket.ref == ref)
            .order_by(Event.id)
        )
        if actions:
            query = query.where(Event.action.in_(actions))
        return list((await session.execute(query)).scalars())


async def message_of(app: App, raw_id: int) -> Message:
    async with app.sessions() as session:
        return (await session.execute(select(Message).where(Message.raw_id == raw_id))).scalar_one()


async def participants(app: App, ref: str) -> list[tuple[str, str]]:
    async with app.sessions() as session:
        rows = await session.execute(
            select(Participant.address, Participant.role)
            .join(Ticket, Ticket.id == Participant.ticket_id)
            .where(Ticket.ref == ref)
            .order_by(Participant.address)
        )
        return [(a, r) for a, r in rows]


def _text_parts(data: bytes) -> str:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    parts = [p for p in parsed.walk() if p.get_content_maintype() == "text"]
    text = "\n".join(str(p.get_content()) for p in parts)  # type: ignore[attr-defined]
    return text.replace("\r\n", "\n")


def readable(data: bytes) -> str:
    """Every header and decoded text part of a delivered mail, as the customer would see it."""
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    parts = [f"{k}: {v}" for k, v in parsed.items()]
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            parts.append(str(part.get_content()))  # type: ignore[attr-defined]
    return "\n".join(parts).replace("\r\n", "\n")


async def open_ticket(
    app: App,
    *,
    rcpt: str = "support@example.com",
    assignee: str = SAM,
    status: str = "open",
    customer: str = "Jane Doe <jane@customer.org>",
) -> tuple[str, Delivery]:
    """A customer's ticket, assigned, with a second customer message so the assignee is told.

    Returns the ticket reference and the agent notification that carries the reply token.
    """
    first = f"{uuid.uuid4().hex}@customer.org"
    await receive(app, mail(sender=customer, message_id=first, to=rcpt), rcpt=rcpt)
    async with app.sessions() as session, session.begin():
        row = (
            await session.execute(select(Ticket).order_by(Ticket.id.desc()).limit(1))
        ).scalar_one()
        ref = row.ref
        if assignee:
            set_assignee(session, row, assignee, now=app.clock(), actor="test")
        set_status(session, app.config, row, status, now=app.clock(), actor="test")
    await receive(
        app,
        mail(
            sender=customer,
            to=rcpt,
            body="Hello,\nI cannot log in since this morning.\n\nJane\n",
            headers={"In-Reply-To": f"<{first}>"},
        ),
        rcpt=rcpt,
    )
    notes = [d for d in await deliveries(app, "agent_notification") if d.ticket_id == row.id]
    return ref, notes[-1]


async def move(app: App, ref: str, status: str) -> None:
    async with app.sessions() as session, session.begin():
        row = (await session.execute(select(Ticket).where(Ticket.ref == ref))).scalar_one()
        set_status(session, app.config, row, status, now=app.clock(), actor="test")


def reply_to_token(delivery: Delivery) -> str:
    parsed = email.message_from_bytes(delivery.data, policy=email.policy.default)
    address = str(parsed["Reply-To"]).rpartition("<")[2].rstrip(">")
    local = address.partition("@")[0]
    return local.partition("+")[2]


async def reply_as_sam(app: App, ref: str, note: Delivery, body: str, **kw: Any) -> int:
    token = reply_to_token(note)
    data = agent_mail(
        body,
        to=f"Example Support <support+{token}@example.com>",
        subject=f"Re: [#{ref}] Help with my account",
        parent=note.message_id,
        **kw,
    )
    return await receive(app, data, rcpt=f"support+{token}@example.com", mail_from=SAM)


# -- the agent notification --------------------------------------------------------------------


async def test_notification_goes_to_assignee_with_a_token_that_verifies_end_to_end(
    app: App, backend: str
) -> None:
    ref, note = await open_ticket(app)
    assert note.recipient == SAM
    text = readable(note.data)
    assert MARKER in text
    assert "I cannot log in since this morning." in text
    assert "Requester: Jane Doe <jane@customer.org>" in text
    assert "Status: open" in text
    token = reply_to_token(note)
    assert token == token_for(app, ref)
    await reply_as_sam(app, ref, note, "#priority urgent\n\nLooking now.\n")
    assert (await ticket(app, ref)).priority == "urgent"
    (reply,) = await deliveries(app, "agent_reply")
    assert reply.recipient == "jane@customer.org"


async def test_notification_goes_to_the_team_then_the_hero(app: App) -> None:
    await open_ticket(app, assignee="")
    await open_ticket(app, assignee="", rcpt="hey@example.com")
    hero, _ = hero_rotation(app.config, app.clock().date())
    told = [d.recipient for d in await deliveries(app, "agent_notification")]
    assert told == ["support-engineering@example.com"] * 2 + [hero] * 2


def test_hero_rotation_names_now_and_next_and_when_it_changes(app: App) -> None:
    config: Config = app.config
    assert hero_rotation(config, date(2026, 1, 5)) == (SAM, ALEX)
    assert hero_rotation(config, date(2026, 1, 18)) == (SAM, ALEX)
    assert hero_rotation(config, date(2026, 1, 19)) == (ALEX, SAM)
    assert hero_rotation(config, date(2026, 2, 2)) == (SAM, ALEX)
    assert hero_change(config, date(2026, 1, 10)) == date(2026, 1, 19)


# -- replies as mail clients write them --------------------------------------------------------

CLIENTS = [
    (
        "gmail-reply-with-commands.eml",
        {"status": "pending", "priority": "high"},
        "Could you send me the exact error message",
    ),
    (
        "outlook-reply-with-commands.eml",
        {"assignee": SAM, "category": "login"},
        "Resetting your session now",
    ),
    ("apple-mail-reply-with-attachment.eml", {"status": "open"}, "Here is the guide"),
    ("thunderbird-reply-with-signature.eml", {"status": "solved"}, "certificate on the login"),
]


@pytest.mark.parametrize(("name", "expected", "words"), CLIENTS, ids=[c[0] for c in CLIENTS])
async def test_replies_from_real_clients_run_commands_and_forward_only_new_words(
    app: App, name: str, expected: dict[str, str], words: str
) -> None:
    ref, note = await open_ticket(app, assignee=ALEX if "outlook" in name else SAM)
    if "outlook" in name:  # Alex's ticket, Sam takes it: the token must then be Sam's
        token = token_for(app, ref)
    else:
        token = reply_to_token(note)
    data = fixture(name, TOKEN=token, REF=ref, PARENT=note.message_id)
    raw_id = await receive(app, data, rcpt=f"support+{token}@example.com", mail_from=SAM)
    stored = await message_of(app, raw_id)
    assert stored.verified and stored.author == SAM and stored.kind == "public"
    row = await ticket(app, ref)
    for field, value in expected.items():
        assert getattr(row, field) == value, field
    (reply,) = await deliveries(app, "agent_reply")
    text = readable(reply.data)
    assert words in text
    for leak in ("wrote:", "Reply above this line", "#status", "#priority", "#assign", "#solve"):
        assert leak not in text
    assert "I cannot log in" not in text  # the quoted history stays behind
    assert SAM not in text and "+1 555" not in text  # no agent address, no signature
    assert "From: Example Support <support@example.com>" in text
    assert "In-Reply-To: <" in text
    if "apple" in name:
        parsed = email.message_from_bytes(reply.data, policy=email.policy.default)
        files = [p.get_filename() for p in parsed.iter_attachments()]  # type: ignore[attr-defined]
        assert files == ["login-guide.pdf"]


# -- each command and macro --------------------------------------------------------------------

COMMANDS = [
    ("#status pending", {"status": "pending"}, "status", []),
    ("#status: solved", {"status": "solved"}, "status", []),
    ("#status closed", {"status": "closed"}, "status", []),
    ("#STATUS Pending", {"status": "pending"}, "status", []),
    ("#assign alex@example.com", {"assignee": ALEX}, "assign", []),
    ("#assign Alex", {"assignee": ALEX}, "assign", []),
    ("#assign me", {"assignee": SAM}, "assign", []),
    ("#priority urgent", {"priority": "urgent"}, "priority", []),
    ("#priority low", {"priority": "low"}, "priority", []),
    ("#queue trial", {"queue": "trial"}, "queue", []),
    ("#category billing", {"category": "billing"}, "category", []),
    ("#requester boss@customer.org", {"requester": "boss@customer.org"}, "requester", []),
    ("#ask", {"status": "pending"}, "status", ["more_info"]),
    ("#solve", {"status": "solved"}, "status", ["solved"]),
    ("#reassign alex", {"assignee": ALEX}, "assign", ["reassigned"]),
    ("#researching", {"status": "open"}, "status", ["researching"]),
]


@pytest.mark.parametrize(
    ("line", "expected", "action", "notices"), COMMANDS, ids=[c[0] for c in COMMANDS]
)
async def test_each_command_changes_the_ticket_with_an_audit_event(
    app: App, line: str, expected: dict[str, str], action: str, notices: list[str]
) -> None:
    ref, _ = await open_ticket(app, assignee="")
    await move(app, ref, "open" if expected.get("status") == "pending" else "pending")
    note = await _note_for_sam(app, ref)
    raw_id = await reply_as_sam(app, ref, note, f"{line}\n\nHi Jane, an update.\n")
    message = await message_of(app, raw_id)
    row = await ticket(app, ref)
    for field, value in expected.items():
        assert getattr(row, field) == value, field
    (changed,) = [e for e in await events(app, ref, action) if e.actor == SAM]
    assert changed.message_row == message.id
    for name in notices:
        (sent,) = await deliveries(app, name)
        assert sent.recipient in ("jane@customer.org", "boss@customer.org")
    if "#assign" in line:
        assert await deliveries(app, "reassigned") == []  # only #reassign tells the customer
    (reply,) = await deliveries(app, "agent_reply")
    assert "an update" in readable(reply.data)


async def _note_for_sam(app: App, ref: str) -> Delivery:
    """The ticket's last notification, as Sam would hold it with his own token."""
    async with app.sessions() as session:
        row = (await session.execute(select(Ticket).where(Ticket.ref == ref))).scalar_one()
        notes = await session.execute(
            select(Delivery).where(
                Delivery.ticket_id == row.id, Delivery.kind == "agent_notification"
            )
        )
        parent = list(notes.scalars())[-1]
    data = parent.data.replace(reply_to_token(parent).encode(), token_for(app, ref).encode())
    return Delivery(message_id=parent.message_id, data=data)


async def test_note_and_cc_commands(app: App, backend: str) -> None:
    ref, note = await open_ticket(app)
    await reply_as_sam(app, ref, note, "#cc +bob@customer.org\n\nBob, you are copied now.\n")
    assert ("bob@customer.org", "cc") in await participants(app, ref)
    copied = sorted(d.recipient for d in await deliveries(app, "agent_reply"))
    assert copied == ["bob@customer.org", "jane@customer.org"]
    raw_id = await reply_as_sam(app, ref, note, "#note\nCustomer is on the legacy plan.\n")
    stored = await message_of(app, raw_id)
    assert stored.kind == "note" and stored.verified
    replies = await deliveries(app, "agent_reply")
    assert all("legacy plan" not in readable(d.data) for d in replies)
    await reply_as_sam(app, ref, note, "#cc -bob@customer.org\n")
    assert ("bob@customer.org", "cc") not in await participants(app, ref)
    assert [e.new for e in await events(app, ref, "cc")] == [
        "+bob@customer.org",
        "-bob@customer.org",
    ]


async def test_commands_only_reply_sends_nothing_to_the_customer(app: App) -> None:
    ref, note = await open_ticket(app)
    await reply_as_sam(app, ref, note, "#priority high\n#status pending\n")
    row = await ticket(app, ref)
    assert (row.priority, row.status) == ("high", "pending")
    assert await deliveries(app, "agent_reply") == []
    assert row.first_response_at is None


BAD = [
    ("#status maybe", "#status open|pending|solved|closed"),
    ("#status new", "#status open|pending|solved|closed"),
    ("#priority soonish", "#priority urgent|high|normal|low"),
    ("#assign nobody", "#assign EMAIL|NAME|me"),
    ("#queue nowhere", "#queue NAME"),
    ("#cc bob@customer.org", "#cc +ADDR or #cc -ADDR"),
    ("#cc +support@example.com", "#cc +ADDR or #cc -ADDR"),
    ("#requester not-an-address", "#requester ADDR"),
    ("#category", "#category NAME"),
    ("#reassign", "#reassign WHO"),
    ("#frobnicate now", "unknown command #frobnicate"),
]


@pytest.mark.parametrize(("bad", "usage"), BAD, ids=[b[0] for b in BAD])
async def test_one_bad_command_applies_none_and_tells_the_agent(
    app: App, bad: str, usage: str
) -> None:
    ref, note = await open_ticket(app)
    before = await ticket(app, ref)
    body = f"#priority urgent\n#assign alex\n#cc +carol@customer.org\n{bad}\n#solve\n\nHi Jane.\n"
    raw_id = await reply_as_sam(app, ref, note, body)
    after = await ticket(app, ref)
    for field in ("status", "priority", "assignee", "queue", "category", "requester"):
        assert getattr(after, field) == getattr(before, field), field
    assert ("carol@customer.org", "cc") not in await participants(app, ref)
    assert [e for e in await events(app, ref, *CHANGES) if e.actor == SAM] == []
    (refused,) = await events(app, ref, "commands-refused")
    assert refused.message_row == (await message_of(app, raw_id)).id
    (error,) = await deliveries(app, "command_error")
    assert error.recipient == SAM
    text = readable(error.data)
    assert "line 4" in text and usage in text
    for kind in REPLIES:
        if kind != "command_error":
            assert await deliveries(app, kind) == [], kind
    assert after.first_response_at is None


async def test_first_agent_reply_sets_first_response_and_opens(app: App, backend: str) -> None:
    ref, note = await open_ticket(app, status="new")
    first = app.clock()
    await reply_as_sam(app, ref, note, "Hi Jane, looking into it.\n")
    app.clock.advance(hours=1)  # type: ignore[attr-defined]
    await reply_as_sam(app, ref, note, "Hi Jane, fixed.\n")
    row = await ticket(app, ref)
    assert row.first_response_at is not None
    assert row.first_response_at.replace(tzinfo=None) == first.replace(tzinfo=None)
    assert row.status == "open"
    assert len(await deliveries(app, "agent_reply")) == 2


async def test_queue_move_tells_the_new_team_and_the_customer_keeps_one_thread(app: App) -> None:
    ref, note = await open_ticket(app, rcpt="trialsupport@example.com", assignee=SAM)
    await reply_as_sam(app, ref, note, "#queue support\n\nHi Jane, passing you on.\n")
    row = await ticket(app, ref)
    assert row.queue == "support"
    told = [d.recipient for d in await deliveries(app, "agent_notification")]
    assert told[-1] == "support-engineering@example.com"
    handover = (await deliveries(app, "agent_notification"))[-1]
    assert "I cannot log in" in readable(handover.data)
    (reply,) = await deliveries(app, "agent_reply")
    parsed = email.message_from_bytes(reply.data, policy=email.policy.default)
    assert "trialsupport@example.com" in str(parsed["From"])
    ack = (await deliveries(app, "acknowledgement"))[0]
    refs = str(parsed["References"]) + str(parsed["In-Reply-To"])
    assert "@customer.org" in refs
    assert ref in str(parsed["Subject"]) and ack.ticket_id == reply.ticket_id


# -- verification that works --------------------------------------------------------------------


def raw_mail(headers: list[tuple[str, str]], body: str) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (head + "\r\n").encode() + crlf(body)


def headers_for(
    *,
    sender: str = f"Sam Agent <{SAM}>",
    to: str = "Example Support <support@example.com>",
    subject: str = "Re: your ticket",
    parent: str = "",
) -> list[tuple[str, str]]:
    found = [
        ("From", sender),
        ("To", to),
        ("Subject", subject),
        ("Message-ID", f"<{uuid.uuid4().hex}@example.com>"),
        ("Date", "Mon, 02 Mar 2026 10:00:00 +0000"),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ]
    if parent:
        found += [("In-Reply-To", f"<{parent}>"), ("References", f"<{parent}>")]
    return found


async def test_dkim_aligned_signature_verifies_the_agent(app: App, backend: str) -> None:
    ref, note = await open_ticket(app)
    data = sign(
        raw_mail(headers_for(parent=note.message_id), "#priority high\n\nHi Jane, on it.\n")
    )
    assert await asyncio.to_thread(dkim_check, data, SAM, dnsfunc=app.dkim_dns)
    raw_id = await receive(app, data, mail_from=SAM)  # no token: plain support@
    assert (await message_of(app, raw_id)).verified
    assert (await ticket(app, ref)).priority == "high"
    assert [d.recipient for d in await deliveries(app, "agent_reply")] == ["jane@customer.org"]


async def test_dkim_asks_dns_while_nobody_holds_the_write_lock(app: App) -> None:
    """A slow DNS answer must not keep SQLite's write lock from intake."""
    ref, note = await open_ticket(app)
    data = sign(raw_mail(headers_for(parent=note.message_id), "#priority high\n\nOn it.\n"))
    database = app.config.database_url.partition(":///")[2]
    lock_free: list[bool] = []
    answer = dns_answering(DNS)

    def lookup(name: bytes | str, timeout: float = 5) -> bytes:
        probe = sqlite3.connect(database, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            lock_free.append(True)
        except sqlite3.OperationalError:
            lock_free.append(False)
        finally:
            probe.close()
        return answer(name, timeout)

    app.dkim_dns = lookup
    await receive(app, data, mail_from=SAM)
    assert lock_free and all(lock_free)
    assert (await ticket(app, ref)).priority == "high"


def test_dkim_verifies_below_the_trace_headers_our_relay_adds(app: App) -> None:
    data = sign(raw_mail(headers_for(), "hello\n"))
    relayed = (
        b"Received: from mail.example.com by mx.example.com; Mon, 2 Mar 2026 10:00:01 +0000\r\n"
        b"Authentication-Results: mx.example.com; dkim=pass header.d=example.com\r\n" + data
    )
    assert dkim_check(relayed, SAM, dnsfunc=app.dkim_dns)


async def test_dkim_on_a_subdomain_of_the_signer_aligns(app: App) -> None:
    data = sign(raw_mail(headers_for(sender="Ops <ops@eu.example.com>"), "hello\n"))
    assert dkim_check(data, "ops@eu.example.com", dnsfunc=app.dkim_dns)
    assert not dkim_check(data, "ops@example.org", dnsfunc=app.dkim_dns)


async def test_our_relays_authentication_results_verifies_the_agent(app: App) -> None:
    with_config(app, verify=["authentication-results"], authserv_id="mx.example.com")
    ref, note = await open_ticket(app)
    results = (
        "mx.example.com 1; spf=pass smtp.mailfrom=example.com;"
        " dkim=pass (2048-bit key; unprotected) header.d=example.com header.s=mail"
    )
    headers = [("Authentication-Results", results), *headers_for(parent=note.message_id)]
    raw_id = await receive(
        app, raw_mail(headers, "#status pending\n\nHi Jane, which browser?\n"), mail_from=SAM
    )
    assert (await message_of(app, raw_id)).verified
    assert (await ticket(app, ref)).status == "pending"


async def test_a_token_that_mta_case_folding_changed_still_verifies(app: App) -> None:
    ref, note = await open_ticket(app)
    token = reply_to_token(note).upper()
    data = agent_mail("#priority low\n\nNoted.\n", to=f"support+{token}@example.com")
    raw_id = await receive(app, data, rcpt=f"support+{token}@example.com", mail_from=SAM)
    assert (await message_of(app, raw_id)).verified
    assert (await ticket(app, ref)).priority == "low"


async def test_customer_never_sees_the_agents_address(app: App, backend: str) -> None:
    ref, note = await open_ticket(app)
    await reply_as_sam(
        app, ref, note, "Hi Jane,\n\nTry again now.\n\nSam\n-- \nSam Agent\nsam@example.com\n"
    )
    (reply,) = await deliveries(app, "agent_reply")
    parsed = email.message_from_bytes(reply.data, policy=email.policy.default)
    assert str(parsed["From"]) == "Example Support <support@example.com>"
    assert "support+" in str(parsed["Reply-To"]) and SAM not in str(parsed["Reply-To"])
    assert str(parsed["Message-ID"]).endswith("@example.com>")
    assert "sam" not in str(parsed["Message-ID"]).lower()
    assert SAM.encode() not in reply.data
    assert parsed["Auto-Submitted"] is None  # a person's reply, not an automatic notice
    text = readable(reply.data)
    assert "auto" not in _text_parts(reply.data).lower()
    assert "Try again now.\n\nSam\n\nExample Support\n" in text  # signed once, not twice
    await reply_as_sam(app, ref, note, "Hi Jane,\n\nOne more thing.\n")
    assert "One more thing.\n\nSam\nExample Support\n" in readable(
        (await deliveries(app, "agent_reply"))[-1].data
    )


# -- forged agents: nothing runs, nothing changes -------------------------------------------------

FORGED_COMMANDS = (
    "#status closed\n#priority low\n#assign alex\n#queue trial\n#category pwned\n"
    "#cc +evil@evil.example\n#requester evil@evil.example\n\n"
    "Refund approved, reply with your card.\n"
)
EVIL = "evil@evil.example"
FORGED_DNS = {
    **DNS,
    "mail._domainkey.com": RECORD,  # a key at a bare TLD: aligns with nothing
    "mail._domainkey.example.com.evil.example": OTHER_RECORD,
    "revoked._domainkey.example.com": b"v=DKIM1; k=rsa; p=",
    "broken._domainkey.example.com": b"v=DKIM1; k=rsa; p=bm90IGEga2V5",
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """Three tickets Sam handles (B is the target, A another, C closed) and their tokens."""

    a: str
    b: str
    c: str
    parent: str  # the notification to Sam on B, which forgeries answer
    secret: bytes

    def token(self, ref: str, agent: str = SAM, secret: bytes | None = None) -> str:
        return reply_token(ticket_ref=ref, agent=agent, secret=secret or self.secret)


def _flip(token: str, at: int = 5) -> str:
    return token[:at] + ("b" if token[at] != "b" else "c") + token[at + 1 :]


def _non_canonical(token: str) -> str:
    """The same bytes spelled with different unused trailing bits: must not be a second token."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    last = alphabet.index(token[-1])
    return token[:-1] + alphabet[last ^ 1]


def _mangle_signature(data: bytes) -> bytes:
    at = data.index(b" b=") + 3
    return data[:at] + (b"B" if data[at : at + 1] != b"B" else b"C") + data[at + 1 :]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


Variant = Callable[[Scene], tuple[bytes, str]]


def _plain(
    sender: str = f"Sam Agent <{SAM}>",
    *,
    token: str = "",
    rcpt_token: str | None = None,
    subject: str = "Re: your ticket",
    extra: list[tuple[str, str]] | None = None,
    replace: dict[str, str] | None = None,
    body: str = FORGED_COMMANDS,
) -> Variant:
    """A reply to Sam's notification on B, with the token (if any) in To and the envelope."""

    def build(scene: Scene) -> tuple[bytes, str]:
        address = f"support+{token}@example.com" if token else "support@example.com"
        headers = headers_for(sender=sender, to=address, subject=subject, parent=scene.parent)
        for name, value in (replace or {}).items():
            headers = [(n, value if n == name else v) for n, v in headers]
        headers = [*(extra or []), *headers]
        envelope = address if rcpt_token is None else f"support+{rcpt_token}@example.com"
        return raw_mail(headers, body.replace("%TOKEN%", token)), envelope

    return build


def _with_token(make: Callable[[Scene], str], **kw: Any) -> Variant:
    def build(scene: Scene) -> tuple[bytes, str]:
        return _plain(token=make(scene), **kw)(scene)

    return build


def _signed(
    *,
    sender: str = f"Sam Agent <{SAM}>",
    after: Callable[[bytes], bytes] = lambda data: data,
    **sign_kw: Any,
) -> Variant:
    """A reply DKIM-signed as given, then changed by `after` (the forger's edit)."""

    def build(scene: Scene) -> tuple[bytes, str]:
        headers = headers_for(sender=sender, parent=scene.parent)
        return after(sign(raw_mail(headers, FORGED_COMMANDS), **sign_kw)), "support@example.com"

    return build


def _auth_results(*results: str, sender: str = f"Sam Agent <{SAM}>") -> Variant:
    def build(scene: Scene) -> tuple[bytes, str]:
        extra = [("Authentication-Results", r) for r in results]
        return _plain(sender, extra=extra)(scene)

    return build


def _prepend(header: str) -> Callable[[bytes], bytes]:
    return lambda data: header.encode() + b"\r\n" + data


OURS = "mx.example.com"
FORGED: dict[str, Variant] = {
    # who is in From, as a person reads it and as the parser does
    "display name is sam's address": _with_token(
        lambda s: s.token(s.b), sender=f'"{SAM}" <{EVIL}>'
    ),
    "unquoted display name is sam's address": _with_token(
        lambda s: s.token(s.b), sender=f"{SAM} <{EVIL}>"
    ),
    "sam's address in a comment": _with_token(
        lambda s: s.token(s.b), sender=f"Sam Agent <{EVIL}> ({SAM})"
    ),
    "display name holds a whole mailbox": _with_token(
        lambda s: s.token(s.b), sender=f'"Sam Agent <{SAM}>" <{EVIL}>'
    ),
    "display name says via": _with_token(
        lambda s: s.token(s.b), sender=f'"{SAM} via Example" <{EVIL}>'
    ),
    "two From headers, sam first": _with_token(
        lambda s: s.token(s.b), extra=[("From", f"Sam Agent <{SAM}>")], sender=EVIL
    ),
    "two From headers, evil first": _with_token(lambda s: s.token(s.b), extra=[("From", EVIL)]),
    "From prepended to a validly signed mail": _signed(after=_prepend(f"From: <{EVIL}>")),
    "sam's From prepended again to a validly signed mail": _signed(
        after=_prepend(f"From: Sam Agent <{SAM}>")
    ),
    "two addresses in one From, sam first": _with_token(
        lambda s: s.token(s.b), sender=f"{SAM}, {EVIL}"
    ),
    "two addresses in one From, evil first": _with_token(
        lambda s: s.token(s.b), sender=f"{EVIL}, {SAM}"
    ),
    "group syntax in From": _with_token(lambda s: s.token(s.b), sender=f"Staff: {SAM}, {EVIL};"),
    "two angle addresses without a comma": _with_token(
        lambda s: s.token(s.b), sender=f"<{SAM}> <{EVIL}>"
    ),
    "base64 encoded word naming sam": _with_token(
        lambda s: s.token(s.b), sender=f"=?utf-8?b?{_b64(SAM)}?= <{EVIL}>"
    ),
    "q encoded word naming sam": _with_token(
        lambda s: s.token(s.b), sender=f"=?utf-8?q?sam=40example=2Ecom?= <{EVIL}>"
    ),
    "whole From is an encoded word": _with_token(
        lambda s: s.token(s.b), sender=f"=?utf-8?b?{_b64(SAM)}?="
    ),
    "encoded word hiding a second mailbox": _with_token(
        lambda s: s.token(s.b), sender=f"=?utf-8?b?{_b64(f'Sam <{SAM}>, ')}?= <{EVIL}>"
    ),
    "encoded word spelling a full mailbox": _with_token(
        lambda s: s.token(s.b), sender=f"=?utf-8?b?{_b64(f'Sam Agent <{SAM}>')}?="
    ),
    "quoted local part holding sam's address": _with_token(
        lambda s: s.token(s.b), sender=f'"{SAM}"@evil.example'
    ),
    "sam's address with a second domain": _with_token(
        lambda s: s.token(s.b), sender=f"{SAM}@evil.example"
    ),
    "homoglyph of sam's address": _with_token(
        lambda s: s.token(s.b), sender="s\u0430m@example.com"
    ),
    "sam's domain with a trailing dot": _plain(sender=f"{SAM}."),
    # Reply-To and Sender
    "Reply-To is sam, From is evil": _with_token(
        lambda s: s.token(s.b), sender=EVIL, extra=[("Reply-To", SAM)]
    ),
    "From is sam, Reply-To is evil": _plain(extra=[("Reply-To", EVIL)]),
    "Sender is someone else": _with_token(lambda s: s.token(s.b), extra=[("Sender", EVIL)]),
    "Sender is another agent": _with_token(lambda s: s.token(s.b), extra=[("Sender", ALEX)]),
    "two Sender headers": _with_token(
        lambda s: s.token(s.b), extra=[("Sender", SAM), ("Sender", EVIL)]
    ),
    "Sender prepended to a validly signed mail": _signed(after=_prepend(f"Sender: {EVIL}")),
    # staff addresses without proof
    "sam with no DKIM and no token": _plain(),
    "alex with no DKIM and no token": _plain(sender=f"Alex <{ALEX}>"),
    "staff who is no agent, with sam's token": _with_token(
        lambda s: s.token(s.b), sender="Bob <bob@example.com>"
    ),
    "sam upper-cased with no proof": _plain(sender="SAM@EXAMPLE.COM"),
    # DKIM that does not vouch for sam
    "body changed after signing": _signed(
        after=lambda d: d.replace(b"Refund approved", b"Refund APPROVED")
    ),
    "subject changed after signing": _signed(
        after=lambda d: d.replace(b"Subject: Re: your ticket", b"Subject: Re: refund")
    ),
    "From changed after signing": _signed(
        sender=f"Alex <{ALEX}>", after=lambda d: d.replace(ALEX.encode(), SAM.encode())
    ),
    "commands added above the signed body": _signed(
        after=lambda d: d.replace(b"#status closed", b"#status closed\r\n#priority urgent")
    ),
    "signed by another domain": _signed(domain="evil.example", key=OTHER_KEY),
    "signed by a domain ending in ours": _signed(domain="example.com.evil.example", key=OTHER_KEY),
    "signed by a bare TLD": _signed(domain="com"),
    "signed with a key not in DNS": _signed(key=OTHER_KEY),
    "signed with a selector DNS does not know": _signed(selector="nokey"),
    "signed with a revoked key": _signed(selector="revoked"),
    "signed with a broken DNS record": _signed(selector="broken"),
    "signature with l= and text appended": _signed(
        length=True, after=lambda d: d + b"\r\n#status closed\r\n"
    ),
    "signature value mangled": _signed(after=lambda d: _mangle_signature(d)),
    # Authentication-Results that are not our relay's word for sam
    "forged pass below ours (none)": _auth_results(
        f"{OURS}; dkim=none", f"{OURS}; dkim=pass header.d=example.com"
    ),
    "forged pass below ours (fail)": _auth_results(
        f"{OURS}; dkim=fail header.d=example.com", f"{OURS}; dkim=pass header.d=example.com"
    ),
    "pass from another authserv-id": _auth_results(
        "mx.evil.example; dkim=pass header.d=example.com"
    ),
    "authserv-id that only starts with ours": _auth_results(
        f"{OURS}.evil.example; dkim=pass header.d=example.com"
    ),
    "ours with dkim=fail": _auth_results(f"{OURS}; dkim=fail header.d=example.com"),
    "ours with dkim=neutral": _auth_results(f"{OURS}; dkim=neutral header.d=example.com"),
    "ours passing another domain": _auth_results(f"{OURS}; dkim=pass header.d=evil.example"),
    "ours passing a bare TLD": _auth_results(f"{OURS}; dkim=pass header.d=com"),
    "ours passing another identity": _auth_results(f"{OURS}; dkim=pass header.i=@evil.example"),
    "pass only inside a comment": _auth_results(
        f"{OURS}; dkim=fail (dkim=pass header.d=example.com ) header.d=evil.example"
    ),
    "pass only inside a quoted reason": _auth_results(
        f'{OURS}; dkim=fail reason="dkim=pass header.d=example.com"'
    ),
    "spf pass but no dkim": _auth_results(f"{OURS}; spf=pass smtp.mailfrom=example.com"),
    "pass for example.com from another relay on top": _auth_results(
        "mx.evil.example; dkim=pass header.d=example.com", f"{OURS}; dkim=none"
    ),
    # reply tokens that do not vouch for sam on this ticket
    "token of another agent": _with_token(lambda s: s.token(s.b, ALEX)),
    "token of sam sent by another agent": _with_token(
        lambda s: s.token(s.b), sender=f"Alex <{ALEX}>"
    ),
    "requester's token": _with_token(lambda s: s.token(s.b, "")),
    "team address's token": _with_token(lambda s: s.token(s.b, "support-engineering@example.com")),
    "tampered token": _with_token(lambda s: _flip(s.token(s.b))),
    "token from another secret": _with_token(
        lambda s: s.token(s.b, secret=b"another-secret-" + b"x" * 40)
    ),
    "token for another ticket behind the requester's": _with_token(
        lambda s: s.token(s.a), rcpt_token=None, extra=[]
    ),
    "token for a closed ticket": _with_token(lambda s: s.token(s.c)),
    "token for a ticket that does not exist": _with_token(lambda s: s.token("SG-999")),
    "upper-cased token of another agent": _with_token(lambda s: s.token(s.b, ALEX).upper()),
    "upper-cased tampered token": _with_token(lambda s: _flip(s.token(s.b)).upper()),
    "token with other unused trailing bits": _with_token(lambda s: _non_canonical(s.token(s.b))),
    "truncated token": _with_token(lambda s: s.token(s.b)[:-2]),
    "token with a character appended": _with_token(lambda s: s.token(s.b) + "a"),
    "token in the subject only": lambda s: _plain(
        subject=f"Re: support+{s.token(s.b)}@example.com"
    )(s),
    "token in Reply-To only": lambda s: _plain(
        extra=[("Reply-To", f"support+{s.token(s.b)}@example.com")]
    )(s),
    "token in the body only": lambda s: _plain(
        body=FORGED_COMMANDS + f"\nsupport+{s.token(s.b)}@example.com\n"
    )(s),
    "token in a display name": lambda s: _plain(
        replace={"To": f'"support+{s.token(s.b)}@example.com" <support@example.com>'}
    )(s),
    "token at another domain": lambda s: _plain(
        replace={"To": f"support+{s.token(s.b)}@evil.example"}
    )(s),
    "token in References only": lambda s: _plain(
        extra=[("References", f"<support+{s.token(s.b)}@example.com>")]
    )(s),
}


def _replayed(scene: Scene) -> tuple[bytes, str]:
    """Sam's real token for ticket A riding in Cc on mail that threads to B by B's requester
    token: it must not vouch for a message that lands on B."""
    headers = headers_for(to=f"support+{scene.token(scene.b, '')}@example.com")
    headers.append(("Cc", f"support+{scene.token(scene.a)}@example.com"))
    return raw_mail(headers, FORGED_COMMANDS), f"support+{scene.token(scene.b, '')}@example.com"


FORGED["token for another ticket behind the requester's"] = _replayed


async def _state(app: App, refs: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The scene's tickets and people, how many changes were ever audited, replies ever sent."""
    async with app.sessions() as session:
        rows = list((await session.execute(select(Ticket).where(Ticket.ref.in_(refs)))).scalars())
        tickets = [
            (t.ref, t.status, t.priority, t.assignee, t.queue, t.category, t.requester)
            for t in sorted(rows, key=lambda t: t.id)
        ]
        people = (
            await session.execute(
                select(Participant.ticket_id, Participant.address, Participant.role).where(
                    Participant.ticket_id.in_([t.id for t in rows])
                )
            )
        ).all()
        changes = (await session.execute(select(Event.id).where(Event.action.in_(CHANGES)))).all()
        sent = (await session.execute(select(Delivery.id).where(Delivery.kind.in_(REPLIES)))).all()
    return [*tickets, tuple(sorted(map(tuple, people))), len(changes), len(sent)]


async def test_forged_agents_run_nothing_and_change_nothing(app: App) -> None:
    with_config(
        app, verify=["token", "dkim", "authentication-results"], authserv_id="mx.example.com"
    )
    app.dkim_dns = dns_answering(FORGED_DNS)
    a, _ = await open_ticket(app)
    b, note = await open_ticket(app)
    c, _ = await open_ticket(app)
    await move(app, c, "closed")
    scene = Scene(a=a, b=b, c=c, parent=note.message_id, secret=app.config.secret)
    print(f"\n{len(FORGED)} forged-agent variants")
    assert len(FORGED) >= 50
    for name, build in FORGED.items():
        before = await _state(app, (a, b, c))
        warned = len(await deliveries(app, "unverified_agent"))
        data, rcpt = build(scene)
        raw_id = await receive(app, data, rcpt=rcpt, mail_from=SAM)
        assert await _state(app, (a, b, c)) == before, name
        message = await message_of(app, raw_id)  # kept, whatever it was
        assert not message.verified, name
        if message.classification == "agent":
            assert message.kind == "note", name
            assert len(await deliveries(app, "unverified_agent")) == warned + 1, name
            async with app.sessions() as session:
                flagged = await session.execute(
                    select(Event.id).where(
                        Event.action == "unverified-agent", Event.message_row == message.id
                    )
                )
                assert len(flagged.all()) == 1, name


async def test_a_replayed_signed_agent_mail_runs_nothing_the_second_time(app: App) -> None:
    ref, note = await open_ticket(app)
    signed = sign(raw_mail(headers_for(parent=note.message_id), "#priority high\n"))
    await receive(app, signed, mail_from=SAM)
    assert (await ticket(app, ref)).priority == "high"
    async with app.sessions() as session, session.begin():
        row = (await session.execute(select(Ticket).where(Ticket.ref == ref))).scalar_one()
        row.priority = "normal"
    replay = b"X-Forwarded-By: mallory\r\n" + signed  # unsigned header: DKIM still passes
    raw_id = await receive(app, replay, mail_from=EVIL)
    assert not (await message_of(app, raw_id)).verified
    assert (await ticket(app, ref)).priority == "normal"
