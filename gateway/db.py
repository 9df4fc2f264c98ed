"""Engines and sessions for SQLite (embedded) and PostgreSQL (scale-out), and migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached
from sqlalchemy.orm.instrumentation import manager_of_class

from gateway import sqlite_inline

_INSERTS: dict[tuple[str, str, tuple[str, ...]], Any] = {}


def _insert(session: AsyncSession, model: Any, ignoring: Sequence[str] = ()) -> Any:
    """INSERT into `model`'s table as Core, built once per table (building one cost more than
    running it); columns left out of the parameters get their defaults, as with the ORM.
    With `ignoring`, a row that conflicts on those columns is skipped (ON CONFLICT DO
    NOTHING, spelled per dialect)."""
    dialect = session.get_bind().dialect.name if ignoring else ""
    key = (model.__tablename__, dialect, tuple(ignoring))
    stmt = _INSERTS.get(key)
    if stmt is None:
        if ignoring:
            insert = pg_insert if dialect == "postgresql" else sqlite_insert
            stmt = insert(model.__table__).on_conflict_do_nothing(index_elements=list(ignoring))
        else:
            stmt = model.__table__.insert()
        _INSERTS[key] = stmt
    return stmt


async def insert_row(session: AsyncSession, model: Any, **values: Any) -> int:
    """Insert one row and return its id, for rows nothing in the transaction reads back as
    an object: they skip the ORM's object, its unit of work and a flush for the id. (The id
    comes as the ORM gets it: RETURNING where the database has it, else the last row id.)"""
    result = await _run(session, _insert(session, model), [values])
    if isinstance(result, sqlite3.Cursor):
        assert result.lastrowid is not None  # every table here has an integer rowid key
        return int(result.lastrowid)
    key = result.inserted_primary_key
    assert key is not None  # a single-row INSERT
    return int(key[0])


async def insert_rows(
    session: AsyncSession,
    model: Any,
    rows: list[dict[str, Any]],
    *,
    ignoring_conflicts_on: Sequence[str] = (),
) -> None:
    """Insert rows (executemany) that nothing in the transaction reads back as objects: they
    need only rows that already have ids, so pending ORM changes wait for the next flush
    instead of getting one of their own."""
    if rows:
        await _run(session, _insert(session, model, ignoring_conflicts_on), rows)


def loaded(session: AsyncSession, model: Any, **values: Any) -> Any:
    """An object for a row just written as Core (its id among `values`), held by the session
    as if it had been loaded: later changes to it are flushed as UPDATEs, and no INSERT, unit
    of work or flush is spent on it. Columns `values` leave out get their Python defaults,
    as the insert did (or None), so no attribute is left to load. Unlike a pending object,
    it is expired by a rollback, like anything loaded: do not read it after one."""
    for column in model.__table__.columns:
        if column.key not in values:
            fill = _column_default(column.default)
            values[column.key] = None if fill is None else fill()
    # Filled as the ORM fills an object it loads (straight into its __dict__), not through
    # the constructor's instrumented attributes: ~6 µs, not ~46.
    if not model.__mapper__.configured:  # as the constructor would, on a first use
        configure_mappers()
    obj = manager_of_class(model).new_instance()
    obj.__dict__.update(values)
    make_transient_to_detached(obj)
    session.add(obj)
    return obj


async def insert_object(session: AsyncSession, model: Any, **values: Any) -> Any:
    """`insert_row`, and the row as a `loaded` object."""
    row_id = await insert_row(session, model, **values)
    return loaded(session, model, id=row_id, **values)


# session.info keys whose values last as long as the session's transaction: dropped when it
# ends by a commit, a rollback or a close (a savepoint's end keeps them), each handed first
# to the function registered with it, if any.
_PER_TRANSACTION: dict[str, Callable[[Any], None] | None] = {}


def per_transaction(key: str, forget: Callable[[Any], None] | None = None) -> str:
    """Register `key` (returned) as a session.info key that the transaction's end drops."""
    _PER_TRANSACTION[key] = forget
    return key


@event.listens_for(Session, "after_transaction_end")
def _forget_per_transaction(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the transaction, not a savepoint
        for key, forget in _PER_TRANSACTION.items():
            value = session.info.pop(key, None)
            if value is not None and forget is not None:
                forget(value)


_AT_COMMIT = per_transaction("db.at_commit")  # rows written when the transaction commits


def insert_at_commit(session: AsyncSession, model: Any, row: dict[str, Any]) -> None:
    """Insert `row` when the session's transaction commits (one executemany for all the
    transaction's rows of a table, in the order given), for rows nothing reads back within
    the transaction: the audit log's. When the transaction ends any other way (a rollback,
    a close) they are forgotten, as pending objects are. Not inside a savepoint, whose
    rollback could not take them back."""
    sync = session.sync_session
    if not sync.in_transaction() or sync.in_nested_transaction():
        raise RuntimeError("insert_at_commit needs a transaction, and not a savepoint")
    sync.info.setdefault(_AT_COMMIT, {}).setdefault(model, []).append(row)


@event.listens_for(Session, "before_commit")
def _write_at_commit(session: Session) -> None:
    pending = session.info.pop(_AT_COMMIT, None)
    for model, rows in (pending or {}).items():
        session.connection().execute(model.__table__.insert(), rows)


# -- statements run on SQLite's own cursor -----------------------------------------------------
#
# SQLAlchemy's execution path (execution context, parameter processing, result object, the
# greenlet hops of its asyncio layer) costs more than SQLite takes to run the statements the
# pipeline runs most: a thread_ref row took 43 µs that way and takes 21 µs this way (timed by
# bench/profile_process.py, around the statement alone). On an inline connection (the
# pipeline's, on the event loop's thread) `insert_row`, `insert_rows`, `scalar` and `execute`
# run the SQL SQLAlchemy compiles for the same statement and keys, with the same bind
# processors and Python-side defaults, on the cursor of the connection the session's
# transaction holds. A test writes rows both ways and compares them.


@dataclass(frozen=True, slots=True)
class _Raw:
    sql: str
    # Per positional parameter: the key it reads, its type's bind processor, and what fills
    # it when the parameters leave it out (a column default, a LIMIT's number); None: given.
    binds: tuple[tuple[str, Callable[[Any], Any] | None, Callable[[], Any] | None], ...]

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for key, process, fill in self.binds:
            value = row[key] if fill is None else fill()
            out.append(value if process is None else process(value))
        return tuple(out)

    async def run(self, inline: sqlite_inline.Connection, rows: Sequence[Mapping[str, Any]]) -> Any:
        params = [self.values(row) for row in rows]
        cursor = inline.raw_cursor()
        try:
            if len(params) == 1:
                await inline.retrying(cursor.execute, self.sql, params[0])
            else:
                await inline.retrying(cursor.executemany, self.sql, params)
        except sqlite3.Error as exc:  # as SQLAlchemy would have raised it
            raise DBAPIError.instance(self.sql, params, exc, sqlite3.Error) from exc
        return cursor


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _column_default(default: Any) -> Callable[[], Any] | None:
    """A Python-side column default as a function of nothing; None for any other kind."""
    if default is None:
        return None
    if default.is_callable:
        return lambda: default.arg(None)
    if default.is_scalar:
        return _constant(default.arg)
    return None


# By statement (kept with it, so its id is never another's) and parameter keys.
_RAW: dict[tuple[int, tuple[str, ...]], tuple[Any, _Raw | None]] = {}


def _compile_raw(session: AsyncSession, statement: Any, keys: tuple[str, ...]) -> _Raw | None:
    """`statement` for parameters with `keys` as SQLite SQL, compiled once per statement and
    keys; None where it cannot be run outside SQLAlchemy (a default made by the database's
    own SQL, a result that needs converting), and the caller goes SQLAlchemy's way."""
    cached = _RAW.get((id(statement), keys))
    if cached is not None and cached[0] is statement:
        return cached[1]
    dialect = session.get_bind().dialect
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    raw = _raw_of(compiled, statement, keys, dialect)
    _RAW[id(statement), keys] = (statement, raw)
    return raw


def _raw_of(compiled: Any, statement: Any, keys: tuple[str, ...], dialect: Any) -> _Raw | None:
    processors = getattr(compiled, "_bind_processors", None)
    positions = getattr(compiled, "positiontup", None)
    params = getattr(compiled, "binds", None)
    if processors is None or positions is None or params is None:
        return None
    # Left to SQLAlchemy: a value the database makes, to read back; an onupdate made in
    # Python; an IN list or a value rendered when run; a result that needs converting.
    for later in ("postfetch", "update_prefetch", "post_compile_params", "literal_execute_params"):
        if getattr(compiled, later, None):
            return None
    selected = getattr(statement, "selected_columns", ())
    if any(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in selected):
        return None
    defaults = {c.key: c.default for c in getattr(compiled, "insert_prefetch", ())}
    binds = []
    for name in positions:
        fill: Callable[[], Any] | None = None
        if name in defaults:  # a column the keys leave out, with a default made in Python
            fill = _column_default(defaults[name])
            if fill is None:
                return None
        elif name not in keys:  # the statement's own value (a LIMIT's, say), if it has one
            bind = params.get(name)
            if bind is None or bind.required or bind.callable is not None:
                return None
            fill = _constant(bind.effective_value)
        binds.append((name, processors.get(name), fill))
    return _Raw(compiled.string, tuple(binds))


async def scalar(session: AsyncSession, statement: Any, params: Mapping[str, Any]) -> Any:
    """The first column of the first row `statement` (built once, kept) returns, or None;
    it reads rows as they are in the database, with no autoflush of pending ORM changes."""
    row = await _first_row(session, statement, params)
    return None if row is None else row[0]


async def first(
    session: AsyncSession, statement: Any, params: Mapping[str, Any]
) -> tuple[Any, ...] | None:
    """The first row `statement` (built once, kept) returns, or None; pending ORM changes
    are flushed first, as the session's own queries would (autoflush)."""
    sync = session.sync_session
    if sync.autoflush and (sync.new or sync.dirty or sync.deleted):
        await session.flush()
    return await _first_row(session, statement, params)


async def _first_row(
    session: AsyncSession, statement: Any, params: Mapping[str, Any]
) -> tuple[Any, ...] | None:
    result = await _run(session, statement, [params])
    row = result.fetchone() if isinstance(result, sqlite3.Cursor) else result.first()
    return None if row is None else tuple(row)


async def execute(session: AsyncSession, statement: Any, params: Mapping[str, Any]) -> None:
    """Run `statement` (built once, kept: an UPDATE, say) with no autoflush."""
    await _run(session, statement, [params])


async def execute_many(
    session: AsyncSession, statement: Any, rows: Sequence[Mapping[str, Any]]
) -> None:
    """`execute` for each of `rows`, in one executemany."""
    if rows:
        await _run(session, statement, rows)


async def _run(session: AsyncSession, statement: Any, rows: Sequence[Mapping[str, Any]]) -> Any:
    """Run `statement` for `rows` (executemany for more than one) on the session's
    connection: on an inline one, sqlite3's cursor after it ran there; else SQLAlchemy's
    result."""
    inline = await _inline(session)
    if inline is not None and all(row.keys() == rows[0].keys() for row in rows):
        raw = _compile_raw(session, statement, tuple(rows[0]))
        if raw is not None:
            return await raw.run(inline, rows)
    connection = await session.connection()
    return await connection.execute(statement, rows[0] if len(rows) == 1 else list(rows))


async def _inline(session: AsyncSession) -> sqlite_inline.Connection | None:
    """The inline SQLite connection the session's transaction holds, if that is what it
    holds. Found once per transaction (asking the session for its connection is a greenlet
    hop a statement); kept in the pooled connection's `info` too, which SQLAlchemy empties
    whenever it connects anew."""
    sync = session.sync_session
    transaction = sync.get_transaction()
    kept = sync.info.get("sqlite_inline")
    if transaction is not None and kept is not None and kept[0] is transaction:
        if transaction.is_active:
            found: sqlite_inline.Connection | None = kept[1]
            return found
    connection = await session.connection()  # begins the transaction if none has begun
    inline = None
    if connection.dialect.name == "sqlite":
        info = connection.info
        if "sqlite_inline" not in info:
            driver = (await connection.get_raw_connection()).driver_connection
            info["sqlite_inline"] = driver if isinstance(driver, sqlite_inline.Connection) else None
        inline = info["sqlite_inline"]
    sync.info["sqlite_inline"] = (sync.get_transaction(), inline)
    return inline


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(
    url: str,
    *,
    reader: bool = False,
    wait_for_lock: bool = True,
    inline: bool = False,
    setup: Callable[[Any], None] | None = None,
) -> AsyncEngine:
    """An engine with SQLite in WAL mode and synchronous=FULL, so a commit survives power loss.

    Writers begin IMMEDIATE (no read-then-write upgrade can fail mid-transaction); a `reader`
    engine begins deferred and is query-only, so listings never hold the write lock. Without
    `wait_for_lock` a busy database fails at once and the caller retries: SQLite's own busy
    handler sleeps up to 100 ms a try and loses the lock to a busy writer again and again.
    An `inline` engine runs statements on the event loop's thread (`sqlite_inline`): for the
    many short statements of the pipeline; a commit's fsync then holds the loop too.
    `setup` runs on each new SQLite connection's cursor first (a file without migrations).
    """
    if is_sqlite(url):
        path = url.partition(":///")[2].split("?")[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock_wait = 60.0 if wait_for_lock else 0.0
        if inline and path and "?" not in url:
            creator = sqlite_inline.connector(path, lock_wait=lock_wait)
            engine = create_async_engine(url, async_creator=creator)
            busy_ms = 0  # the inline connection waits for a lock itself, yielding the loop
        else:
            busy_ms = int(lock_wait * 1000)
            engine = create_async_engine(url, connect_args={"timeout": lock_wait})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy issue BEGIN itself (pysqlite's implicit transactions are off).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            if setup is not None:
                setup(cursor)
            if reader:
                cursor.execute("PRAGMA query_only=ON")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front: no deadlock between two writers.
            conn.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")

        return engine
    return create_async_engine(
        url, pool_size=5 if reader else 10, max_overflow=10, pool_pre_ping=True
    )


def is_lock_error(exc: BaseException) -> bool:
    """SQLite's "database is locked"/"busy", also behind SQLAlchemy's wrapper."""
    return sqlite_inline.is_busy(getattr(exc, "orig", exc))


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def session_scope(
    factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One transaction: commit on success, roll back on any error."""
    async with factory() as session, session.begin():
        yield session


def _alembic_config(url: str) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("gateway") / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations up to `revision` (blocking: call it off the event loop)."""
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


async def schema_revision(engine: AsyncEngine) -> tuple[str | None, str]:
    """The database's migration revision and the newest one this code knows."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    def read(conn: Any) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        current = await conn.run_sync(read)
    head = ScriptDirectory.from_config(_alembic_config(str(engine.url))).get_current_head()
    return current, head or ""
