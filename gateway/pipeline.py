"""The mail flow after the 250, on one screen: parse → classify → thread → apply → respond.

Each stored message goes through `STEPS` in order; a group of messages shares one transaction
(`process_group`). A step may end the message's journey by raising `Done` (recorded: a
duplicate, a bounce, a refused forward); any other error redoes the group one message per
transaction, and the message that fails again goes to quarantine with the reason, to be
retried or reprocessed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import agents, bounces, db, forwards, notices, timers
from gateway.app import CHUNK_MESSAGES, App
from gateway.classify import Classification, classify
from gateway.correlate import Thread, find_duplicate, find_thread
from gateway.intake import move_received
from gateway.models import Message, RawMail, Ticket
from gateway.notices import Reply, send_notice
from gateway.tickets import (
    add_inbound_message,
    add_participants,
    create_ticket,
    set_status,
    urgent_by_rules,
)
from parsing.mime import MessageRejected
from parsing.model import Address, ParsedMessage

log = logging.getLogger(__name__)


class Done(Exception):
    """This message needs nothing more: the state says what became of it."""

    def __init__(self, state: str, note: str = "") -> None:
        super().__init__(note or state)
        self.state = state
        self.note = note


@dataclass
class Work:
    """One message on its way through the steps."""

    raw: RawMail
    parsed: ParsedMessage
    now: datetime
    classification: Classification | None = None
    agent: str = ""  # verified agent address, "" otherwise
    dkim: bool | None = None  # the DKIM verdict found before the transaction, if asked
    forward: forwards.ForwardCheck | None = None
    thread: Thread | None = None
    ticket: Ticket | None = None
    message: Message | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def sender(self) -> str:
        return self.parsed.from_addr.addr if self.parsed.from_addr else ""


Step = Callable[[AsyncSession, App, Work], Awaitable[None]]


async def dedupe(session: AsyncSession, app: App, work: Work) -> None:
    """The same Message-ID with the same content is stored once; its mailboxes are merged."""
    if session.get_bind().dialect.name == "postgresql":
        # Two workers holding two copies of one mail must not both miss the other's row.
        await session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:mid))"), {"mid": work.parsed.message_id}
        )
    duplicate = await find_duplicate(session, work.parsed)
    if duplicate is None:
        return
    merged = sorted({*duplicate.mailboxes, *_our_mailboxes(app, work)})
    if merged != sorted(duplicate.mailboxes):
        duplicate.mailboxes = merged
    raise Done("duplicate", f"duplicate of message {duplicate.id}")


async def classify_step(session: AsyncSession, app: App, work: Work) -> None:
    work.agent = await agents.verify_sender(session, app, work.raw, work.parsed, dkim=work.dkim)
    if app.config.is_staff(work.sender):
        work.forward = forwards.check_forward(app.config, work.parsed)
    work.classification = classify(
        work.parsed,
        app.config,
        mail_from=work.raw.mail_from,
        rcpt_tos=work.raw.rcpt_tos,
        forward=work.forward is not None,
        agent_verified=bool(work.agent),
    )


async def bounce_step(session: AsyncSession, app: App, work: Work) -> None:
    """Delivery reports are recorded against the delivery they are about, never ticketed."""
    assert work.classification is not None
    if work.classification.kind == "bounce":
        note = await bounces.record(session, app, work.raw, work.parsed, now=work.now)
        raise Done("processed", note)


async def forward_step(session: AsyncSession, app: App, work: Work) -> None:
    """A staff forward without its context is refused; a complete one makes the ticket."""
    assert work.classification is not None
    if not app.config.is_staff(work.sender):
        return
    if await forwards.completion(session, app, work):
        state = f"{work.ticket.ref}: forward completed" if work.ticket else "forward refused again"
        raise Done("processed", state)
    if work.classification.kind == "staff-forward" and work.forward is not None:
        await forwards.handle(session, app, work)


async def thread_step(session: AsyncSession, app: App, work: Work) -> None:
    work.thread = await find_thread(session, app.config, work.parsed, rcpt_tos=work.raw.rcpt_tos)
    work.ticket = work.thread.ticket


async def apply_step(session: AsyncSession, app: App, work: Work) -> None:
    """Store the message on its ticket (a new one if it threads nowhere)."""
    assert work.classification is not None and work.thread is not None
    kind = work.classification.kind
    if kind == "agent" and work.agent:
        await agents.handle(session, app, work)
        return
    unverified = kind == "agent"
    customer = not unverified and not work.classification.automatic
    if work.ticket is None:
        work.ticket = await _new_ticket(session, app, work, customer=customer)
    elif customer:  # a customer's mail cancels the nudge and auto-close timers
        work.ticket.last_customer_at = work.now
        work.ticket.nudge_due_at = work.ticket.autoclose_due_at = None
    work.message = await add_inbound_message(
        session,
        work.ticket,
        work.parsed,
        raw_id=work.raw.id,
        kind="note" if unverified else ("auto" if work.classification.automatic else "public"),
        classification=kind,
        threaded_by=work.thread.threaded_by,
        mailboxes=_our_mailboxes(app, work),
        now=work.now,
        attachments_dir=app.attachments_dir,
    )
    if unverified:
        await agents.unverified(session, app, work)
        return
    if work.classification.automatic:
        return
    ticket = work.ticket
    await add_participants(session, ticket, _copied_people(app, work), role="cc")
    if ticket.status in ("pending", "solved"):
        set_status(
            session,
            app.config,
            ticket,
            "open",
            now=work.now,
            actor=work.sender,
            message=work.message,
        )


async def respond_step(session: AsyncSession, app: App, work: Work) -> None:
    """The acknowledgement for a new ticket and the note to the agents."""
    assert work.classification is not None and work.thread is not None
    if work.classification.kind != "customer" or work.ticket is None or work.message is None:
        return
    reply = Reply(
        message_id=work.parsed.message_id,
        references=work.parsed.references,
        new_text=work.parsed.new_text,
        from_addr=work.sender,
        from_name=work.parsed.from_addr.name if work.parsed.from_addr else "",
    )
    if work.thread.ticket is None:
        await send_notice(
            session,
            app,
            work.ticket,
            "acknowledgement",
            to=[_requester(work)],
            now=work.now,
            reply=reply,
        )
        await timers.escalate_now_if_premier(session, app, work.ticket, now=work.now)
    await agents.notify(session, app, work.ticket, work.message, reply=reply, now=work.now)


STEPS: tuple[tuple[str, Step], ...] = (
    ("dedupe", dedupe),
    ("classify", classify_step),
    ("bounce", bounce_step),
    ("forward", forward_step),
    ("thread", thread_step),
    ("apply", apply_step),
    ("respond", respond_step),
)


# -- helpers for the steps ---------------------------------------------------------------------


def _our_mailboxes(app: App, work: Work) -> list[str]:
    boxes = {box.address for r in work.raw.rcpt_tos if (box := app.config.mailbox_for(r))}
    return sorted(boxes)


def _requester(work: Work) -> Address:
    assert work.ticket is not None
    return Address(work.ticket.reply_to or work.ticket.requester, work.ticket.requester_name)


def _copied_people(app: App, work: Work) -> list[Address]:
    sender = work.sender
    people = [*work.parsed.to, *work.parsed.cc]
    return [p for p in people if p.addr != sender and not app.config.is_ours(p.addr)]


async def _new_ticket(
    session: AsyncSession, app: App, work: Work, *, customer: bool = False
) -> Ticket:
    config = app.config
    assert work.thread is not None
    mailbox = next(iter(_our_mailboxes(app, work)), "")
    if not mailbox and work.raw.source.startswith("imap:"):
        account = next((a for a in config.imap if f"imap:{a.name}"[:16] == work.raw.source), None)
        queue = account.queue if account else config.mailbox[0].queue
        box = next((b for b in config.mailbox if b.queue == queue), config.mailbox[0])
        mailbox = box.address
    box = config.mailbox_for(mailbox) or config.mailbox[0]
    requester = work.parsed.from_addr or Address(work.raw.mail_from or "unknown@invalid")
    text = f"{work.parsed.subject}\n{work.parsed.new_text}"
    priority = "urgent" if urgent_by_rules(config.priority.urgent_patterns, text) else "normal"
    reply_to = work.parsed.reply_to[0].addr if work.parsed.reply_to else ""
    return await create_ticket(
        session,
        config,
        queue=box.queue,
        mailbox=box.address,
        requester=requester,
        subject=work.parsed.subject,
        now=work.now,
        reply_to=reply_to if reply_to != requester.addr else "",
        priority=priority,
        follow_up_of=work.thread.follow_up_of,
        thread_root=work.parsed.message_id,
        last_customer_at=work.now if customer else None,
    )


# -- running the steps over stored mail --------------------------------------------------------


async def _run_steps(session: AsyncSession, app: App, work: Work) -> tuple[str, str]:
    """Run the steps; returns the raw mail's new state and the note saying why."""
    state, note = "processed", ""
    for _name, step in STEPS:
        try:
            await step(session, app, work)
        except Done as done:
            state, note = done.state, done.note
            break
    else:
        ticket = work.ticket.ref if work.ticket else "-"
        note = f"{ticket}: {work.thread.threaded_by if work.thread else ''}"
    return state, "; ".join([note, *work.notes])


async def process_one(
    app: App, raw: RawMail, parsed: ParsedMessage | Exception, *, dkim: bool | None = None
) -> str:
    """Process one stored message in its own transaction; returns its new state."""
    now = app.clock()
    if isinstance(parsed, MessageRejected):
        # Deterministic: retrying a bomb only burns time, so it waits for a person.
        await _mark(
            app,
            raw.id,
            "quarantined",
            str(parsed),
            now=now,
            attempts=app.config.pipeline.max_attempts,
        )
        return "quarantined"
    if isinstance(parsed, Exception):
        await _mark(app, raw.id, "quarantined", f"parse failed: {parsed!r}"[:2000], now=now)
        return "quarantined"
    try:
        async with app.transaction() as session:
            state = await _process_in(session, app, raw, parsed, now=now, dkim=dkim)
        return state
    except Exception as exc:
        log.exception("message %s failed in the pipeline", raw.id)
        await _mark(app, raw.id, "quarantined", f"{type(exc).__name__}: {exc}"[:2000], now=now)
        return "quarantined"


async def _process_in(
    session: AsyncSession,
    app: App,
    raw: RawMail,
    parsed: ParsedMessage,
    *,
    now: datetime,
    dkim: bool | None = None,
    finished: list[dict[str, object]] | None = None,
) -> str:
    """The steps over `raw` (as claimed: its columns never change but its state), once its
    state is re-read under the lock; the row itself (and its blob) is not loaded again.
    The row's new state is written at once, or added to `finished` for the caller to write
    with its neighbours' (`_DONE`) in the same transaction."""
    # Locked for the transaction: two processes never handle the same message.
    live = await db.scalar(session, _STATE, {"raw": raw.id})
    if live != "received":
        return live or "missing"
    work = Work(raw=raw, parsed=parsed, now=now, dkim=dkim)
    state, note = await _run_steps(session, app, work)
    values: dict[str, object] = {"raw": raw.id, "new_state": state, "at": now, "why": note[:2000]}
    if finished is None:
        await db.execute(session, _DONE, values)
    else:
        finished.append(values)
    return state


# Built once: building them cost more than running them, twice a message.
_STATE = select(RawMail.state).where(RawMail.id == bindparam("raw")).with_for_update()
_DONE = (
    update(RawMail)
    .where(RawMail.id == bindparam("raw"))
    .values(
        state=bindparam("new_state"),
        processed_at=bindparam("at"),
        note=bindparam("why"),
        claimed_until=None,
    )
)


# A group shares one transaction (one commit instead of one a message) but holds SQLite's
# write lock no longer than this, so the SMTP spool never waits long for its commit; and
# once the spool says it is waiting (`App.intake_waiting`), no longer than the message at hand.
GROUP_SECONDS = 0.05


async def process_group(
    app: App,
    items: list[tuple[RawMail, ParsedMessage]],
    *,
    dkim: Mapping[int, bool] | None = None,
) -> tuple[dict[str, int], list[tuple[RawMail, ParsedMessage]]]:
    """Process parsed messages in order, in one transaction, for up to GROUP_SECONDS.

    Returns the counts and what is left. The group's notices are rendered and composed in
    the composer process meanwhile (`notices.defer`) and stored before the commit. Any error
    rolls the whole group back and its messages are redone one transaction each, notices
    written inline, so one bad message costs its neighbours nothing but time. `dkim` holds
    the verdicts `agents.dkim_verdicts` found, by raw id.
    """
    verdicts = dkim or {}
    counts: dict[str, int] = {}
    done: list[RawMail] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    now = app.clock()
    app.intake_waiting.clear()
    finished: list[dict[str, object]] = []  # the group's raw_mail rows' new states
    try:
        async with app.transaction() as session:
            notices.defer(session, app)  # written in the composer while the group goes on
            for raw, parsed in items:
                verdict = verdicts.get(raw.id)
                state = await _process_in(
                    session, app, raw, parsed, now=now, dkim=verdict, finished=finished
                )
                counts[state] = counts.get(state, 0) + 1
                done.append(raw)
                if loop.time() - started > GROUP_SECONDS or app.intake_waiting.is_set():
                    break
                # SQLite statements run inline and never yield: let the outbox and the
                # timers have the loop between messages.
                await asyncio.sleep(0)
            await db.execute_many(session, _DONE, finished)  # one executemany, not one each
            await notices.flush(session)
    except Exception as exc:
        redo = items[: len(done) + 1]  # its flush may fail after its last message
        log.info("a group of %d failed (%r): one message a transaction", len(redo), exc)
        counts = {}
        for raw, parsed in redo:
            state = await process_one(app, raw, parsed, dkim=verdicts.get(raw.id))
            counts[state] = counts.get(state, 0) + 1
        return counts, items[len(done) + 1 :]
    return counts, items[len(done) :]


async def _mark(
    app: App, raw_id: int, state: str, error: str, *, now: datetime, attempts: int | None = None
) -> None:
    async with app.transaction() as session:
        values: dict[str, object] = {
            "state": state,
            "note": error,
            "claimed_until": None,
            "processed_at": now,
            "attempts": RawMail.attempts + 1 if attempts is None else attempts,
        }
        await session.execute(update(RawMail).where(RawMail.id == raw_id).values(**values))


CLAIM = timedelta(minutes=2)


async def _claim(app: App, limit: int, *, after: int = 0) -> list[RawMail]:
    """The oldest received mail (with ids above `after`). On PostgreSQL rows are leased
    (SKIP LOCKED) so processes share the work; a lease left by a crash lapses after CLAIM.
    SQLite has one writer and `process_one` re-checks the state under it, so it needs no
    lease to outlive a crash."""
    now = app.clock()
    query = (
        select(RawMail)
        .where(RawMail.state == "received", RawMail.id > after)
        .order_by(RawMail.id)
        .limit(limit)
    )
    if app.engine.dialect.name != "postgresql":
        # A plain read, off the write lock (and off the loop's thread: it reads the blobs).
        async with app.readers() as session, session.begin():
            return list((await session.execute(query)).scalars())
    async with app.sessions() as session, session.begin():
        query = query.where(
            or_(RawMail.claimed_until.is_(None), RawMail.claimed_until < now)
        ).with_for_update(skip_locked=True)
        rows = list((await session.execute(query)).scalars())
        for row in rows:
            row.claimed_until = now + CLAIM
    return rows


Parsed = list[tuple[RawMail, ParsedMessage | BaseException]]


async def _claim_and_parse(app: App, limit: int, *, after: int) -> Parsed:
    rows = await _claim(app, limit, after=after)
    results = await app.parser.parse_many([r.data for r in rows])
    return list(zip(rows, results, strict=True))


async def process_pending(app: App, *, limit: int | None = None) -> dict[str, int]:
    """Process received mail until none is left; returns counts by resulting state.

    The next batch is claimed and parsed (in the parser's processes) while this one is
    being processed, so neither core waits for the other.
    """
    counts: dict[str, int] = {}
    batch = app.config.pipeline.batch
    # A pass starts on one parse chunk, not a whole batch: a backlog's first tickets wait
    # for 25 messages to be parsed, not 200 (0.4 s), and the next batch is parsed behind it.
    first = min(batch, CHUNK_MESSAGES)
    ahead: asyncio.Task[Parsed] | None = None
    try:
        await move_received(app)
        batch_rows = await _claim_and_parse(app, first, after=0)
        while batch_rows and not app.stopping.is_set():
            # SQLite has no leases, so the next batch starts past this one; PostgreSQL's
            # leases keep this batch out already, and its ids may commit out of order.
            after = 0 if app.engine.dialect.name == "postgresql" else batch_rows[-1][0].id
            await move_received(app)  # before the batch's transactions, not beside them
            ahead = asyncio.ensure_future(_claim_and_parse(app, batch, after=after))
            await _process_batch(app, batch_rows, counts)
            if limit is not None and sum(counts.values()) >= limit:
                return counts
            batch_rows, ahead = await ahead, None
            if not batch_rows:  # mail that came in behind the last one claimed
                await move_received(app)
                batch_rows = await _claim_and_parse(app, first, after=0)
    finally:
        if ahead is not None:
            ahead.cancel()
            await asyncio.gather(ahead, return_exceptions=True)  # its transaction closed
    return counts


async def _process_batch(app: App, batch_rows: Parsed, counts: dict[str, int]) -> None:
    ready: list[tuple[RawMail, ParsedMessage]] = []
    for raw, result in batch_rows:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result
        if isinstance(result, Exception):
            state = await process_one(app, raw, result)
            counts[state] = counts.get(state, 0) + 1
        else:
            ready.append((raw, result))
    verdicts = await agents.dkim_verdicts(app, ready)  # its DNS before any transaction
    while ready and not app.stopping.is_set():
        group_counts, ready = await process_group(app, ready, dkim=verdicts)
        for state, count in group_counts.items():
            counts[state] = counts.get(state, 0) + count


async def retry_quarantined(app: App) -> int:
    """Put mail that failed fewer than `max_attempts` times back in line."""
    async with app.transaction() as session:
        result = await session.execute(
            update(RawMail)
            .where(
                RawMail.state == "quarantined", RawMail.attempts < app.config.pipeline.max_attempts
            )
            .values(state="received")
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


RETRY_EVERY = timedelta(minutes=5)


async def run(app: App) -> None:
    """The pipeline task in `serve`: woken by the spool, and by a slow tick as a safety net.

    Every few minutes quarantined mail with attempts left is put back in line, so a passing
    fault (a database hiccup) heals by itself while a message that keeps failing stops.
    """
    last_retry = datetime.now(UTC)
    while not app.stopping.is_set():
        try:
            if datetime.now(UTC) - last_retry >= RETRY_EVERY:
                last_retry = datetime.now(UTC)
                if await retry_quarantined(app):
                    log.info("retrying quarantined mail with attempts left")
            app.wake_pipeline.clear()  # before the pass: a wake during it is kept
            await process_pending(app)
        except Exception:
            log.exception("pipeline pass failed")
        await app.pause(app.wake_pipeline, 5.0)
