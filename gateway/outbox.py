"""Queueing outbound mail in the caller's transaction, and the worker that delivers it.

A delivery row is written in the same transaction as the ticket change that caused it, so a
mail is never lost; a crash between the relay's 250 and our commit can at worst send the same
Message-ID twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, String, bindparam, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import db
from gateway.app import App
from gateway.classify import is_mailer_daemon
from gateway.config import Config
from gateway.db import insert_rows
from gateway.models import Delivery, DeliveryAttempt, Suppression, Ticket
from responders.compose import is_safe_address
from responders.transport import (
    Relay,
    SendResult,
    SmtpPool,
    deliver_maildir,
    deliver_maildir_many,
    everyone,
)

log = logging.getLogger(__name__)


def verp_address(config: Config, delivery_id: int) -> str:
    """bounces+<id>-<mac>@domain: a bounce names the exact delivery it is about."""
    mac = hmac.new(config.secret, f"delivery:{delivery_id}".encode(), hashlib.sha256)
    local = f"{config.gateway.bounce_local}+{delivery_id}-{mac.hexdigest()[:10]}"
    return f"{local}@{config.gateway.domain}"


def delivery_from_verp(config: Config, address: str) -> int | None:
    local, _, domain = address.lower().rpartition("@")
    base, plus, tag = local.partition("+")
    if domain != config.gateway.domain or base != config.gateway.bounce_local or not plus:
        return None
    ident, _, mac = tag.partition("-")
    if not ident.isdigit():
        return None
    expected = verp_address(config, int(ident)).rpartition("@")[0].rpartition("-")[2]
    return int(ident) if hmac.compare_digest(mac, expected) else None


@dataclass(frozen=True, slots=True)
class Gate:
    allowed: bool
    reason: str = ""
    suppressed: bool = False


def _gate_statement(*, counted: bool, acked: bool) -> Select[Any]:
    """The suppression and both counts in one statement: this runs for every automatic mail.
    Built once per variant (see `_GATE_*`), since building one costs more than running it."""
    recipient = bindparam("recipient", type_=String())
    suppression = select(Suppression).where(Suppression.address == recipient)
    hour = select(func.count(Delivery.id)).where(
        Delivery.recipient == recipient,
        Delivery.automatic.is_(True),
        Delivery.status != "suppressed",
        Delivery.created_at > bindparam("hour_since"),
    )
    day = select(func.count(Delivery.id)).where(
        Delivery.recipient == recipient,
        Delivery.ticket_id == bindparam("ticket"),
        Delivery.kind == "acknowledgement",
        Delivery.created_at > bindparam("day_since"),
    )
    # Compared in SQL, so no column needs converting and the gate can run on SQLite's own
    # cursor (`db.first`): the reason of a suppression still in force, else NULL.
    in_force = suppression.where(Suppression.expires_at > bindparam("now"))
    return select(
        in_force.with_only_columns(Suppression.reason).scalar_subquery(),
        hour.scalar_subquery() if counted else literal(0),
        day.scalar_subquery() if acked else literal(0),
    )


_GATE_SUPPRESSION = _gate_statement(counted=False, acked=False)
_GATE_CAPPED = _gate_statement(counted=True, acked=False)
_GATE_ACK = _gate_statement(counted=True, acked=True)


@dataclass
class Promised:
    """Deliveries a transaction has decided on but not written yet (their notices are being
    composed elsewhere, `notices.defer`): the gate counts them as the rows they will be."""

    automatic: Counter[str] = field(default_factory=Counter)  # by recipient
    acks: Counter[tuple[str, int]] = field(default_factory=Counter)  # by recipient, ticket

    def add(self, recipients: Sequence[str], *, kind: str, automatic: bool, ticket_id: int) -> None:
        for recipient in recipients:
            if automatic:
                self.automatic[recipient] += 1
            if kind == "acknowledgement":
                self.acks[recipient, ticket_id] += 1

    def clear(self) -> None:
        self.automatic.clear()
        self.acks.clear()


async def automatic_gate(
    session: AsyncSession,
    config: Config,
    *,
    recipient: str,
    kind: str,
    ticket: Ticket | None,
    now: datetime,
    capped: bool = True,
    promised: Promised | None = None,
) -> Gate:
    """Whether mail may go to `recipient`: the loop rules of DESIGN.md.

    Suppression applies to all mail; the caps only to automatic mail to outsiders, counting
    the deliveries `promised` in this transaction but not written yet.
    """
    if not recipient or config.is_ours(recipient) or is_mailer_daemon(recipient):
        return Gate(False, "not to our own or a daemon address")
    if not is_safe_address(recipient):
        return Gate(False, "an address we cannot write in a mail header")
    counted = capped
    acked = capped and kind == "acknowledgement" and ticket is not None
    statement = _GATE_ACK if acked else _GATE_CAPPED if counted else _GATE_SUPPRESSION
    params = {
        "recipient": recipient,
        "now": now,
        "hour_since": now - timedelta(hours=1),
        "ticket": ticket.id if ticket is not None else 0,
        "day_since": now - timedelta(days=1),
    }
    row = await db.first(session, statement, params)
    assert row is not None  # a SELECT of scalar subqueries has one row
    why, in_hour, in_day = row
    if promised is not None:
        in_hour += promised.automatic[recipient]
        in_day += promised.acks[recipient, ticket.id] if ticket is not None else 0
    if why is not None:
        return Gate(False, f"suppressed: {why}", suppressed=True)
    if counted and in_hour >= config.limits.auto_per_sender_per_hour:
        return Gate(False, f"hourly cap of {config.limits.auto_per_sender_per_hour} reached")
    if acked and in_day >= config.limits.acks_per_ticket_per_day:
        return Gate(False, "already acknowledged today")
    return Gate(True)


async def enqueue(
    session: AsyncSession,
    config: Config,
    *,
    data: bytes,
    message_id: str,
    recipients: Sequence[str],
    kind: str,
    automatic: bool,
    now: datetime,
    ticket: Ticket | None = None,
    message_row: int | None = None,
    status: str = "queued",
    note: str = "",
) -> None:
    """One delivery row per recipient, in the caller's transaction.

    The VERP sender names the row's id; the worker fills it in when it claims the row, in the
    same UPDATE as the claim.
    """
    deadline = now + timedelta(hours=config.outbound.retry_deadline_hours)
    # Due at once by the real clock too, even when a timer ran at a simulated time.
    due = min(now, datetime.now(UTC)) if status == "queued" else None
    common = {
        "ticket_id": ticket.id if ticket else None,
        "message_row": message_row,
        "kind": kind,
        "automatic": automatic,
        "message_id": message_id,
        "mail_from": "",
        "data": data,
        "status": status,
        "attempts": 0,
        "last_error": note,
        "created_at": now,
        "next_attempt_at": due,
        "deadline_at": deadline,
    }
    await insert_rows(session, Delivery, [{**common, "recipient": r} for r in recipients])


def _outcome(result: SendResult | str) -> tuple[str, int, str]:
    """An attempt's outcome, reply code and reply; a string is a Maildir delivery's name."""
    if isinstance(result, str):
        return "sent", 250, result
    (first,) = result.per_recipient
    return first.outcome, first.code, first.reply


# A claimed row not tried (a stop, a lapsed lease): claimable again at once, unless another
# worker's claim has replaced ours.
_RELEASE = (
    update(Delivery)
    .where(Delivery.id == bindparam("row"), Delivery.claimed_until == bindparam("ours"))
    .values(claimed_until=None)
)
# A sent delivery, recorded for a whole group in one executemany.
_SENT = (
    update(Delivery)
    .where(Delivery.id == bindparam("row"))
    .values(
        attempts=Delivery.attempts + 1,
        claimed_until=None,
        status="sent",
        sent_at=bindparam("at"),
        next_attempt_at=None,
        last_error="",
    )
)


def backoff(attempts: int, *, base: float) -> timedelta:
    """Exponential backoff with jitter, capped at four hours."""
    delay = min(base * (2 ** max(attempts - 1, 0)), 4 * 3600)
    return timedelta(seconds=delay * random.uniform(0.8, 1.2))


_Result = tuple[Delivery, SendResult | str | None]  # None: not tried, handed back
CLAIM_ROUNDS = 8  # rounds of the pool's connections one claim holds
RECORD_WINDOW = 0.01  # seconds results wait to share a commit
# Maildir messages written per thread call, one folder fsync each: a crash before their
# record writes them again, so no more than this many at once.
MAILDIR_SLICE = 16


class OutboxWorker:
    """Delivers what is due; a row is claimed for a while so two workers never send it twice."""

    def __init__(self, app: App) -> None:
        self.app = app
        out = app.config.outbound
        self.relay: Relay | None = None
        if out.smarthost:
            host, _, port = out.smarthost.rpartition(":")
            password = ""
            if out.password_env:
                from gateway.config import read_secret

                password = read_secret(
                    __import__("os").environ, out.password_env, what="smarthost password"
                )
            self.relay = Relay(
                host=host,
                port=int(port),
                starttls=out.starttls,
                username=out.username,
                password=password,
                timeout=out.timeout_seconds,
                tls_verify=out.tls_verify,
                ca_file=out.ca_file,
                helo_name=app.config.smtp.hostname or app.config.gateway.domain,
            )
        self.pool = SmtpPool(self.relay, size=out.pool_size) if self.relay else None
        # The pool's connections in turn: a row checks `_may_send` once its turn comes.
        self._turns = asyncio.Semaphore(out.pool_size)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()

    async def _claim(self, limit: int, *, per_round: int) -> list[Delivery]:
        """Claim up to `limit` due rows. They go out `per_round` at a time (the pool's
        connections), so each row's lease covers the rounds before its own: a row never
        lapses while it waits for a connection, and after a crash the first round's rows
        wait no longer than before for another worker to take them."""
        now = self.app.clock()
        lease = self.app.config.outbound.timeout_seconds * 4  # one send, a retry included
        async with self.app.transaction() as session:
            query = (
                select(Delivery)
                .where(
                    Delivery.status.in_(("queued", "deferred")),
                    Delivery.next_attempt_at <= now,
                    or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = list((await session.execute(query)).scalars())
            for position, row in enumerate(rows):
                rounds = 1 + position // per_round
                row.claimed_until = now + timedelta(seconds=lease * rounds)
                row.mail_from = row.mail_from or verp_address(self.app.config, row.id)
        return rows

    async def _send(self, row: Delivery) -> SendResult | str:
        if self.pool is None:
            name = await asyncio.to_thread(deliver_maildir, self.app.maildir, row.data)
            return f"maildir:{name}"
        return await self.pool.send(
            mail_from=row.mail_from, recipients=[row.recipient], data=row.data
        )

    async def _record(self, results: list[_Result]) -> None:
        """Record attempts in one transaction: results that finish together share a commit.

        Sent mail (nearly all of it) is two statements for the whole group; a failure needs
        its row's attempts and deadline, so it is loaded and worked out one by one."""
        now = self.app.clock()
        told = [(row, *_outcome(result)) for row, result in results if result is not None]
        untried = [
            {"row": row.id, "ours": row.claimed_until} for row, result in results if result is None
        ]
        async with self.app.transaction() as session:
            if untried:  # handed back at once, unless another worker holds it by now
                await (await session.connection()).execute(_RELEASE, untried)
            attempts = [
                {"delivery_id": row.id, "at": now, "outcome": o, "code": c, "reply": r[:2000]}
                for row, o, c, r in told
            ]
            if attempts:
                await insert_rows(session, DeliveryAttempt, attempts)
            sent = [{"row": row.id, "at": now} for row, outcome, _, _ in told if outcome == "sent"]
            if sent:
                await (await session.connection()).execute(_SENT, sent)
            failed = {row.id: (o, c, r) for row, o, c, r in told if o != "sent"}
            if failed:
                query = select(Delivery).where(Delivery.id.in_(list(failed)))
                for live in (await session.execute(query)).scalars():
                    self._failed(live, *failed[live.id], now=now)
        for row, outcome, _, _ in told:
            log.info("delivery %s to %s: %s", row.id, row.kind, outcome)

    def _failed(
        self, live: Delivery, outcome: str, code: int, reply: str, *, now: datetime
    ) -> None:
        """An attempt that did not deliver, on its row: retried later, or given up."""
        live.attempts += 1
        live.claimed_until = None
        if outcome == "permanent":
            live.status = "failed"
            live.next_attempt_at = None
            live.last_error = f"{code} {reply}"[:2000]
        else:
            live.last_error = f"{code} {reply}".strip()[:2000]
            retry_at = now + backoff(
                live.attempts, base=self.app.config.outbound.retry_base_seconds
            )
            if retry_at > live.deadline_at:
                live.status = "failed"
                live.next_attempt_at = None
                live.last_error = f"gave up after {live.attempts} attempts: {live.last_error}"
            else:
                live.status = "deferred"
                live.next_attempt_at = retry_at

    def _may_send(self, row: Delivery) -> bool:
        """Whether to start sending a claimed row now: not once a stop is asked for (a
        claim holds several rounds), nor once its lease has run out (another worker may
        have claimed it since)."""
        lapsed = row.claimed_until is not None and self.app.clock() >= row.claimed_until
        return not (self.app.stopping.is_set() or lapsed)

    async def _deliver(self, row: Delivery, done: asyncio.Queue[_Result]) -> None:
        """Send one row when a connection is free and hand its result to the recorder at
        once; None for a row it did not start (see `_may_send`)."""
        result: SendResult | str | None = None
        async with self._turns:
            try:
                if self._may_send(row):
                    result = await self._send(row)
            except Exception as exc:
                log.error("delivery %s raised %s", row.id, type(exc).__name__)
                reply = f"internal error: {type(exc).__name__}"
                result = everyone([row.recipient], "temporary", 0, reply)
        done.put_nowait((row, result))

    async def _deliver_all(self, rows: list[Delivery], done: asyncio.Queue[_Result]) -> None:
        """Send the claimed rows: over the pool's connections, or into the Maildir in one
        thread call a slice with one fsync of its folder (a thread hop and two fsyncs a
        message were most of a Maildir delivery)."""
        if self.pool is not None:
            await asyncio.gather(*(self._deliver(row, done) for row in rows))
            return
        for start in range(0, len(rows), MAILDIR_SLICE):  # recorded slice by slice
            part = rows[start : start + MAILDIR_SLICE]
            if not all(self._may_send(row) for row in part):
                for row in part:
                    done.put_nowait((row, None))
                continue
            written: list[str | Exception]
            try:
                written = list(
                    await asyncio.to_thread(
                        deliver_maildir_many, self.app.maildir, [row.data for row in part]
                    )
                )
            except Exception as exc:  # the folder itself: every row of the slice failed
                log.error("Maildir delivery of %d raised %s", len(part), type(exc).__name__)
                written = [exc] * len(part)
            for row, name in zip(part, written, strict=True):
                if isinstance(name, str):
                    done.put_nowait((row, f"maildir:{name}"))
                    continue
                log.error("delivery %s to the Maildir failed: %s", row.id, name)
                why = (isinstance(name, OSError) and name.strerror) or str(name)
                reply = f"maildir: {why or type(name).__name__}"
                done.put_nowait((row, everyone([row.recipient], "temporary", 0, reply)))

    async def _recorder(self, done: asyncio.Queue[_Result], expected: int) -> int:
        """Record results as they come, all that wait in one commit (a group commit): a stop
        re-sends only what was in flight or waiting for that commit. A group that fails is
        recorded one by one, so one bad row never costs its neighbours their record.
        Returns how many rows were tried (not handed back untried)."""
        recorded = tried = 0
        while recorded < expected:
            group = [await done.get()]
            if recorded + 1 < expected:
                # What finishes within a few ms shares the commit: a commit a result was
                # most of the loop's time per delivery. A crash in this window re-sends
                # these few, at most once more, as for a crash before any commit.
                await asyncio.sleep(RECORD_WINDOW)
            while not done.empty():
                group.append(done.get_nowait())
            recorded += len(group)
            tried += sum(result is not None for _row, result in group)
            try:
                await self._record(group)
            except Exception:
                for one in group:
                    try:
                        await self._record([one])
                    except Exception:
                        # Unrecorded, its claim lapses and it is sent again, as after a crash.
                        log.exception("recording delivery %s failed", one[0].id)
        return tried

    async def flush(self, *, limit: int = 200) -> int:
        """Deliver everything due now; returns how many attempts were made."""
        total = 0
        per_round = limit
        if self.pool is not None:
            # A claim is a transaction and a commit: one for every few rows was most of the
            # loop's time per delivery. So a claim holds several rounds of the pool's sends.
            per_round = self.app.config.outbound.pool_size
            limit = min(limit, per_round * CLAIM_ROUNDS)
        while not self.app.stopping.is_set():
            rows = await self._claim(limit, per_round=per_round)
            if not rows:
                return total
            done: asyncio.Queue[_Result] = asyncio.Queue()
            recorder = asyncio.ensure_future(self._recorder(done, len(rows)))
            try:
                await self._deliver_all(rows, done)
            except BaseException:
                recorder.cancel()  # what it never recorded is sent again when its claim lapses
                raise
            total += await recorder
        return total

    async def run(self) -> None:
        while not self.app.stopping.is_set():
            self.app.wake_outbox.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("outbox pass failed")
            await self.app.pause(self.app.wake_outbox, self.app.config.outbound.poll_seconds)
