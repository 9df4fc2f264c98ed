"""Real-world mail from other projects' test suites (tests/corpus, see its MANIFEST.tsv)."""

from __future__ import annotations

import csv
import json
from email.utils import parsedate_to_datetime
from pathlib import Path

from sqlalchemy import select

from gateway.app import App
from gateway.models import Message, RawMail, Ticket
from gateway.pipeline import process_pending

from conftest import receive

CORPUS = Path(__file__).parent / "corpus"
LKML = CORPUS / "notmuch" / "thread" / "lkml-subset"


def messages() -> list[Path]:
    """Every RFC 822 message in the corpus (body-only fixtures and the .msg file excluded)."""
    with open(CORPUS / "MANIFEST.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    out = []
    for row in rows:
        path = CORPUS / row["file"]
        if (
            "body-only" in row["tags"]
            or row["category"] == "outlook-msg-binary"
            or not path.is_file()
        ):
            continue
        out.append(path)
    return sorted(out)


def smtp_form(data: bytes) -> bytes:
    """What an SMTP client would carry: CRLF line ends."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


async def test_every_corpus_message_is_ticketed_recorded_or_quarantined(app: App) -> None:
    files = messages()
    assert len(files) > 100
    for path in files:
        await receive(app, smtp_form(path.read_bytes()))
    async with app.sessions() as session:
        raws = list((await session.execute(select(RawMail).order_by(RawMail.id))).scalars())
        on_tickets = set(
            (
                await session.execute(select(Message.raw_id).where(Message.raw_id.is_not(None)))
            ).scalars()
        )
    states: dict[str, int] = {}
    for raw in raws:
        states[raw.state] = states.get(raw.state, 0) + 1
        assert raw.state in ("processed", "duplicate", "quarantined"), raw.id
        if raw.state == "quarantined":
            assert raw.note, f"quarantined without a reason: {raw.id}"
    print(f"\ncorpus: {len(files)} messages -> {states}")
    assert len(raws) == len(files)
    assert states.get("quarantined", 0) == 0, [r.note for r in raws if r.state == "quarantined"]
    # every processed message that is not a bounce or refused forward sits on a ticket
    for raw in raws:
        if raw.state == "processed" and not raw.note.startswith(("bounce", "blind forward")):
            assert raw.id in on_tickets, (raw.id, raw.note)


def lkml_in_date_order() -> list[Path]:
    files = sorted((LKML / "cur").iterdir())

    def when(path: Path) -> float:
        for line in path.read_bytes().split(b"\n"):
            if line.lower().startswith(b"date:"):
                return parsedate_to_datetime(line[5:].decode().strip()).timestamp()
        return 0.0

    return sorted(files, key=lambda p: (when(p), p.name))


async def test_lkml_threads_group_exactly_as_notmuch_says(app: App) -> None:
    expected = json.loads((LKML / "threads.expected.json").read_text())
    for path in lkml_in_date_order():
        await receive(app, smtp_form(path.read_bytes()), rcpt="hey@example.com")
    assert await process_pending(app) == {}
    async with app.sessions() as session:
        rows = (
            await session.execute(
                select(Message.message_id, Ticket.ref)
                .join(Ticket, Ticket.id == Message.ticket_id)
                .where(Message.direction == "in")
            )
        ).all()
        raw_states = list((await session.execute(select(RawMail.state))).scalars())
    ticket_of: dict[str, set[str]] = {}
    for mid, ref in rows:
        ticket_of.setdefault(mid, set()).add(ref)
    groups = []
    for thread in expected["threads"]:
        refs = set()
        for message in thread["messages"]:
            assert len(ticket_of[message["message_id"]]) == 1, message["message_id"]
            refs |= ticket_of[message["message_id"]]
        assert len(refs) == 1, thread["thread_subject"]
        groups.append(refs.pop())
    assert len(set(groups)) == len(expected["threads"])  # no two threads merged
    # the duplicated files (the same message twice) were stored once
    copies = sum(len(m["files"]) for t in expected["threads"] for m in t["messages"])
    distinct = sum(len(t["messages"]) for t in expected["threads"])
    assert raw_states.count("duplicate") == copies - distinct
    assert len(rows) == distinct
