"""SQLite for SQLAlchemy's aiosqlite dialect without aiosqlite's thread.

aiosqlite runs every statement on a thread of its own: each one is a queue hand-off, a thread
wake-up and a trip back through the event loop, which costs more than the statement itself
(SQLite answers from its page cache in tens of microseconds). The pipeline runs about twenty
statements a message, so those hops were a fifth of its time.

This is aiosqlite's connection API (what SQLAlchemy's adapter calls) done on the caller's
thread. The one wait that could block the loop, a write lock held by someone else, never
happens in SQLite's busy handler: the connection has no busy timeout, and a statement that
finds the database locked is retried after an `asyncio.sleep`, so the holder, maybe another
task of this very process, can finish meanwhile. A statement refused as busy did nothing, so
running it again is what SQLite's own handler would do.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# A busy lock is tried again after 2 ms, then less and less often, up to every 20 ms: the
# SMTP spool retries every 2 ms on its own connection, so when both wait, intake goes first.
RETRY_SECONDS = 0.002
RETRY_MAX_SECONDS = 0.02


def is_busy(exc: BaseException) -> bool:
    """SQLite's "database is locked"/"busy": worth a retry, not a failure."""
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text


class _Now:
    """Stands in for aiosqlite's queue to its thread: runs the job at once."""

    @staticmethod
    def put_nowait(job: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = job
        try:
            future.set_result(function())
        except Exception as exc:
            future.set_exception(exc)


class Cursor:
    def __init__(self, owner: Connection, cursor: sqlite3.Cursor) -> None:
        self._owner = owner
        self._cursor = cursor

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        await self._owner.retrying(self._cursor.execute, sql, parameters or ())
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Cursor:
        rows = list(parameters)  # a retry must see them again
        await self._owner.retrying(self._cursor.executemany, sql, rows)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _Opening:
    """What `Connection.cursor()` returns: awaitable as a context, like aiosqlite's."""

    def __init__(self, owner: Connection) -> None:
        self._owner = owner

    async def __aenter__(self) -> Cursor:
        return Cursor(self._owner, self._owner._conn.cursor())

    async def __aexit__(self, *exc: object) -> None:
        return None


class Connection:
    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        lock_wait: float,
        checkpointer: _Checkpointer | None = None,
    ) -> None:
        self._connection: sqlite3.Connection | None = conn
        self._checkpointer = checkpointer
        self._tx = _Now()
        self.lock_wait = lock_wait

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("no active connection")
        return self._connection

    async def retrying(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run `function`; while the database is locked, yield to the loop and try again,
        for up to `lock_wait` seconds (0: fail at once, the caller retries itself)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait
        pause = RETRY_SECONDS
        while True:
            try:
                return function(*args)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or loop.time() >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_SECONDS)

    def cursor(self) -> _Opening:
        return _Opening(self)

    def raw_cursor(self) -> sqlite3.Cursor:
        """sqlite3's own cursor, for statements run without SQLAlchemy (`db.insert_rows`)."""
        return self._conn.cursor()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        cursor = Cursor(self, self._conn.cursor())
        return await cursor.execute(sql, parameters)

    async def commit(self) -> None:
        await self.retrying(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
            if self._checkpointer is not None:
                self._checkpointer.leave()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._conn.isolation_level = value

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction


def connector(path: str, *, lock_wait: float) -> Callable[[], Any]:
    """An `async_creator` for `create_async_engine("sqlite+aiosqlite://...")`."""

    async def connect() -> Connection:
        # isolation_level=None: SQLAlchemy issues BEGIN itself. No busy timeout: see above.
        conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        if path == ":memory:":
            return Connection(conn, lock_wait=lock_wait)
        # A commit checkpoints only as a backstop: the checkpointer thread keeps the log short.
        conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        checkpointer = _checkpointer(path)
        checkpointer.join()
        return Connection(conn, lock_wait=lock_wait, checkpointer=checkpointer)

    return connect


# SQLite copies its write-ahead log into the database (a checkpoint, with an fsync of the
# database file) inside the commit that takes the log past 1,000 pages: on the event loop's
# thread here, for 20-300 ms every few seconds of steady writing. Inline connections leave
# that to a thread of their own (sqlite3 lets go of the GIL while SQLite works). A commit
# still checkpoints once the log is past BACKSTOP_PAGES (16 MB). The log starts over from its
# beginning only after a checkpoint that caught up with the last commit: under steady writing
# the thread's seldom do, the writer's (right after its own commit) does, and by then the
# thread has copied nearly all of it. So the file stays about that size, and should the
# thread fail, the backstop still checkpoints.
CHECKPOINT_SECONDS = 0.25
BACKSTOP_PAGES = 4000

_checkpointers: dict[str, _Checkpointer] = {}
_checkpointers_lock = threading.Lock()


def _checkpointer(path: str) -> _Checkpointer:
    with _checkpointers_lock:
        found = _checkpointers.get(path)
        if found is None:
            found = _checkpointers[path] = _Checkpointer(path)
        return found


class _Checkpointer:
    """Checkpoints one database file from a thread, while inline connections to it are open."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._users = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def join(self) -> None:
        with self._lock:
            self._users += 1
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(self._stop,), name="sqlite-checkpoint", daemon=True
                )
                self._thread.start()

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._thread is None:
                return
            thread, self._thread = self._thread, None
            self._stop.set()
        thread.join()

    def _run(self, stop: threading.Event) -> None:
        try:
            conn = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            log.warning("no checkpoint thread for %s (commits checkpoint it): %s", self.path, exc)
            return
        try:
            while not stop.wait(CHECKPOINT_SECONDS):
                try:
                    # PASSIVE: copies what it can without waiting for readers or writers.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy with another checkpoint: next time
                    log.debug("checkpoint of %s skipped: %s", self.path, exc)
        finally:
            conn.close()
