"""The intake file: on SQLite, mail is committed before its 250 to a database file of its own.

SQLite has one write lock per file. When intake shared it with the worker, every 250 waited
behind the pipeline's groups and the outbox's records (up to 200 ms, traced). In a file of its
own a 250 waits only for its own group commit. The worker moves what came in to `raw_mail`, in
id order, and records in the same transaction how far it got (`intake_mark`, per intake file),
so a crash between moving and clearing the intake file neither skips a message nor moves it
twice. PostgreSQL locks rows, not files: there the spool writes `raw_mail` itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, MetaData, Table, delete, func, insert, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.schema import CreateTable

from gateway.db import is_lock_error, is_sqlite
from gateway.models import IntakeMark, RawMail

if TYPE_CHECKING:
    from gateway.app import App

log = logging.getLogger(__name__)

MOVE_BATCH = 1000  # rows a move reads and writes at most, so it holds the write lock briefly

# raw_mail's columns, ids never reused (AUTOINCREMENT): the mark must outlive deleted rows.
_INTAKE = Table(
    RawMail.__tablename__,
    MetaData(),
    *(
        Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
        for c in RawMail.__table__.columns
    ),
    sqlite_autoincrement=True,
)
# Which intake file this is: a file made anew (restored, deleted) starts its ids from 1 again.
_CREATE = (
    str(CreateTable(_INTAKE, if_not_exists=True).compile(dialect=sqlite.dialect())),
    "CREATE TABLE IF NOT EXISTS intake_epoch"
    " (one INTEGER PRIMARY KEY CHECK (one = 1), epoch TEXT NOT NULL)",
    "INSERT INTO intake_epoch SELECT 1, lower(hex(randomblob(16)))"
    " WHERE NOT EXISTS (SELECT 1 FROM intake_epoch)",
)
_COLUMNS = [c for c in RawMail.__table__.columns if c.name != "id"]


def setup(cursor: Any) -> None:
    """Make the intake file's tables if they are missing. Once they exist this only reads:
    opening a connection must not wait for a write lock that intake or the mover holds."""
    cursor.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'intake_epoch'"
    )
    (made,) = cursor.fetchone()
    if made:
        cursor.execute("SELECT count(*) FROM intake_epoch")
        (made,) = cursor.fetchone()
    if not made:
        for statement in _CREATE:
            cursor.execute(statement)


SUFFIX = "-intake"  # beside x.db as x.db-intake, like SQLite's x.db-wal: `x.db*` is all of it


def intake_url(database_url: str) -> str | None:
    """The intake file beside a SQLite database file, or None
    where the spool writes `raw_mail` itself (PostgreSQL, in-memory or parameterised URLs)."""
    if not is_sqlite(database_url) or "?" in database_url:
        return None
    prefix, _, path = database_url.partition(":///")
    if not path or path == ":memory:":
        return None
    return f"{prefix}:///{path}{SUFFIX}"


async def _position(app: App) -> tuple[str, int]:
    """The intake file's epoch, and the last id of it moved to `raw_mail`."""
    async with app.intake_readers() as session, session.begin():
        epoch = str((await session.execute(text("SELECT epoch FROM intake_epoch"))).scalar_one())
    async with app.readers() as session, session.begin():
        query = select(IntakeMark.last_id).where(IntakeMark.epoch == epoch)
        return epoch, int((await session.execute(query)).scalar() or 0)


async def move_received(app: App) -> int:
    """Move mail from the intake file into `raw_mail`; returns how many messages moved."""
    if not app.intake_file:
        return 0
    epoch, mark = await _position(app)
    async with app.intake_readers() as session, session.begin():
        query = select(RawMail.id, *_COLUMNS).where(RawMail.id > mark).order_by(RawMail.id)
        rows = list((await session.execute(query.limit(MOVE_BATCH))).all())
    if not rows:
        return 0
    async with app.transaction() as session:
        # Read again under the write lock: another process may have moved some meanwhile.
        query = select(IntakeMark.last_id).where(IntakeMark.epoch == epoch)
        known = (await session.execute(query)).scalar()
        fresh = [row for row in rows if row.id > (known or 0)]
        if fresh:
            values = [{c.name: getattr(row, c.name) for c in _COLUMNS} for row in fresh]
            await session.execute(insert(RawMail), values)
            last = fresh[-1].id
            if known is None:
                await session.execute(insert(IntakeMark).values(epoch=epoch, last_id=last))
            else:
                at = IntakeMark.epoch == epoch
                await session.execute(update(IntakeMark).where(at).values(last_id=last))
    # Moved rows leave the intake file, those of a crash after its move included.
    await _clear(app, fresh[-1].id if fresh else (known or 0))
    return len(fresh)


async def _clear(app: App, upto: int) -> None:
    """Drop moved rows from the intake file; if intake holds its lock, a later move will."""
    try:
        async with app.intake() as session, session.begin():
            await session.execute(delete(_INTAKE).where(_INTAKE.c.id <= upto))
    except OperationalError as exc:
        if not is_lock_error(exc):
            raise


async def waiting(app: App) -> int:
    """Messages in the intake file not yet moved to `raw_mail`."""
    if not app.intake_file:
        return 0
    _epoch, mark = await _position(app)
    async with app.intake_readers() as session, session.begin():
        query = select(func.count()).select_from(_INTAKE).where(_INTAKE.c.id > mark)
        return int((await session.execute(query)).scalar_one())


async def stored_hashes(app: App, *, source: str, hashes: set[str]) -> set[str]:
    """Which of these sha256s `source` has stored already, moved or not."""
    found: set[str] = set()
    factories = [app.readers, app.intake_readers] if app.intake_file else [app.readers]
    for factory in factories:
        async with factory() as session, session.begin():
            query = select(RawMail.sha256).where(
                RawMail.source == source, RawMail.sha256.in_(hashes)
            )
            found.update((await session.execute(query)).scalars())
    return found
