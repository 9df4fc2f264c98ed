"""Durable intake: raw bytes and envelope committed before anyone is told "250".

One writer task owns the inserts and commits whatever is queued in one transaction (group
commit); each caller waits for the commit that holds its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.db import is_lock_error
from gateway.models import RawMail
from parsing.headers import threading_headers

log = logging.getLogger(__name__)

LOCK_WAIT = 30.0  # seconds a commit may wait for SQLite's write lock before the sender gets 451


class SpoolError(RuntimeError):
    """The message could not be stored; the sender should try again later."""


@dataclass
class _Pending:
    row: dict[str, object]
    done: asyncio.Future[int] = field(repr=False)


def raw_row(
    data: bytes, *, mail_from: str, rcpt_tos: list[str], source: str, now: datetime
) -> dict[str, object]:
    msgid, irt, refs = threading_headers(data)
    # aiosmtpd reports MAIL FROM:<> as "<>": the null sender is stored as "" on every path.
    mail_from = "" if mail_from.strip() in ("", "<>") else mail_from
    return {
        "received_at": now,
        "source": source[:16],
        "mail_from": mail_from[:512],
        "rcpt_tos": [r.lower() for r in rcpt_tos],
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "data": data,
        "message_id": msgid[:512],
        "in_reply_to": irt,
        "references": refs,
        "state": "received",
        "attempts": 0,
        "note": "",
    }


async def insert_raw(session: AsyncSession, rows: list[dict[str, object]]) -> list[int]:
    result = await session.execute(
        insert(RawMail).returning(RawMail.id, sort_by_parameter_order=True), rows
    )
    return list(result.scalars())


async def store_rows(
    factory: async_sessionmaker[AsyncSession],
    rows: list[dict[str, object]],
    *,
    on_busy: Callable[[], None] | None = None,
) -> list[int]:
    """Insert and commit, retrying a busy SQLite lock every few ms for up to LOCK_WAIT s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOCK_WAIT
    while True:
        try:
            async with factory() as session, session.begin():
                return await insert_raw(session, rows)
        except OperationalError as exc:
            if not is_lock_error(exc) or loop.time() > deadline:
                raise
            if on_busy is not None:
                on_busy()
        await asyncio.sleep(0.002)


class Spool:
    """Group-commit writer for received mail."""

    def __init__(
        self,
        factory: async_sessionmaker[AsyncSession],
        *,
        clock: Callable[[], datetime],
        max_batch: int = 500,
        max_waiting: int = 5000,
        on_stored: Callable[[], None] | None = None,
        on_busy: Callable[[], None] | None = None,
    ) -> None:
        self._factory = factory
        self._clock = clock
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(max_waiting)
        self._on_stored = on_stored
        self._on_busy = on_busy  # told when a commit finds the write lock held
        self._idle = asyncio.Event()
        self._idle.set()

    async def store(self, data: bytes, *, mail_from: str, rcpt_tos: list[str], source: str) -> int:
        """Store one message durably; returns its id once committed, or raises SpoolError."""
        row = raw_row(
            data, mail_from=mail_from, rcpt_tos=rcpt_tos, source=source, now=self._clock()
        )
        pending = _Pending(row, asyncio.get_running_loop().create_future())
        self._idle.clear()
        await self._queue.put(pending)
        return await pending.done

    async def run(self) -> None:
        """The writer loop; runs until cancelled, failing whatever is still waiting."""
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._commit(batch)
        finally:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.done.done():
                    pending.done.set_exception(SpoolError("spool is shutting down"))

    async def wait_idle(self, grace: float) -> None:
        """Until nothing waits and no commit is under way (at most `grace` s): a safe stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            await self._commit_batch(batch)
        finally:
            if self._queue.empty():
                self._idle.set()

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            ids = await store_rows(self._factory, [p.row for p in batch], on_busy=self._on_busy)
        except asyncio.CancelledError:
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(SpoolError("spool is shutting down"))
            raise
        except Exception as exc:
            if len(batch) > 1:
                # One bad row must not fail its neighbours: retry them one by one.
                for pending in batch:
                    await self._commit_batch([pending])
                return
            log.error("storing received mail failed: %s", type(exc).__name__)
            if not batch[0].done.done():
                batch[0].done.set_exception(SpoolError("storage failed"))
            return
        for pending, raw_id in zip(batch, ids, strict=True):
            if not pending.done.done():
                pending.done.set_result(raw_id)
        if self._on_stored is not None:
            self._on_stored()
