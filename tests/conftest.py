"""Shared fixtures: a configured gateway on SQLite or PostgreSQL, a clock, the SMTP sink."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import db
from gateway.app import App, build_app
from gateway.config import Config, load

from services import free_port, fresh_database, postgres_server
from smtp_sink import smtp_sink_fixture  # noqa: F401 - the `smtp_sink` fixture

SECRET = "test-secret-" + "s" * 40
EXAMPLE = Path(__file__).resolve().parent.parent / "gateway" / "config.example.toml"


@dataclass
class Clock:
    """An injected clock the tests move by hand."""

    now: datetime = field(default_factory=lambda: datetime(2026, 3, 2, 9, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


def write_config(
    folder: Path,
    *,
    database_url: str = "",
    extra: str = "",
    smtp_port: int | None = None,
    smarthost: str = "",
) -> Path:
    """The example config with the test's database, port and smarthost, plus extra TOML."""
    text = EXAMPLE.read_text()
    if database_url:
        text = text.replace(
            'url = "sqlite+aiosqlite:///var/supportgate.db"', f'url = "{database_url}"'
        )
    port = smtp_port or free_port()
    text = text.replace('listen = ["127.0.0.1:2525"]', f'listen = ["127.0.0.1:{port}"]')
    text = text.replace('smarthost = ""', f'smarthost = "{smarthost}"')
    text = text.replace("parse_workers = 1 ", "parse_workers = 0 ")
    text = text.replace("tick_seconds = 30.0", "tick_seconds = 0.2")
    path = folder / "supportgate.toml"
    path.write_text(text + "\n" + extra)
    return path


def load_config(path: Path) -> Config:
    return load(path, env={"SUPPORTGATE_SECRET": SECRET})


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite by default; PostgreSQL when the test asks for the `backend` parameter."""
    kind = request.getfixturevalue("backend") if "backend" in request.fixturenames else "sqlite"
    if kind == "postgres":
        server = request.getfixturevalue("pg_server")
        return await fresh_database(server, f"sg_{uuid.uuid4().hex[:12]}")
    return f"sqlite+aiosqlite:///{tmp_path}/var/supportgate.db"


@pytest.fixture
def config_extra() -> str:
    """Override in a test module to add TOML to the config."""
    return ""


@pytest.fixture
def smarthost() -> str:
    return ""


@pytest.fixture
async def app(
    tmp_path: Path, database_url: str, clock: Clock, config_extra: str, smarthost: str
) -> AsyncIterator[App]:
    path = write_config(
        tmp_path, database_url=database_url, extra=config_extra, smarthost=smarthost
    )
    config = load_config(path)
    import asyncio

    await asyncio.to_thread(db.upgrade, config.database_url)
    application = build_app(config, clock=clock, parse_workers=0)
    try:
        yield application
    finally:
        await application.close()


@pytest.fixture
async def listener(app: App) -> AsyncIterator[int]:
    """Our SMTP listener and group-commit spool on a free loopback port, as `serve` runs them."""
    import asyncio

    from gateway.smtp_server import Handler, start_listeners
    from gateway.spool import Spool

    spool = Spool(app.intake, clock=app.clock)
    writer = asyncio.create_task(spool.run())
    servers = await start_listeners(app.config, Handler(app.config, spool))
    yield int(servers[0].sockets[0].getsockname()[1])
    for server in servers:
        server.close()
    writer.cancel()


def mail(
    *,
    sender: str = "Jane Doe <jane@customer.org>",
    to: str = "support@example.com",
    subject: str = "Help with my account",
    body: str = "Hello,\r\nI cannot log in since this morning.\r\n\r\nJane\r\n",
    message_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A small CRLF message for tests that need one made to measure."""
    mid = message_id or f"{uuid.uuid4().hex}@customer.org"
    lines = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Message-ID: <{mid}>",
        "Date: Mon, 02 Mar 2026 09:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body.replace("\r\n", "\n").replace(
        "\n", "\r\n"
    ).encode()


def as_dict(value: Any) -> dict[str, Any]:
    assert isinstance(value, dict)
    return value


async def receive(
    app: App, data: bytes, *, rcpt: str = "support@example.com", mail_from: str | None = None
) -> int:
    """Store one message as the SMTP listener would, then run the pipeline over it."""
    from gateway.pipeline import process_pending
    from gateway.spool import insert_raw, raw_row

    sender = mail_from if mail_from is not None else "jane@customer.org"
    async with app.sessions() as session, session.begin():
        (raw_id,) = await insert_raw(
            session,
            [raw_row(data, mail_from=sender, rcpt_tos=[rcpt], source="smtp", now=app.clock())],
        )
    await process_pending(app)
    return int(raw_id)


async def flush(app: App) -> int:
    """Deliver what is due now, as `supportgate outbox flush` does."""
    from gateway.outbox import OutboxWorker

    worker = OutboxWorker(app)
    try:
        return await worker.flush()
    finally:
        await worker.close()


FAILING_INSERT = {
    "sqlite": [
        "CREATE TRIGGER fail BEFORE INSERT ON raw_mail BEGIN SELECT RAISE(ABORT, 'injected'); END"
    ],
    "postgres": [
        "CREATE FUNCTION fail() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'injected'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fail BEFORE INSERT ON raw_mail FOR EACH ROW EXECUTE FUNCTION fail()",
    ],
}


async def fail_raw_inserts(app: App, backend: str) -> None:
    """A trigger that makes every insert of received mail fail, until `heal_raw_inserts`."""
    from sqlalchemy import text

    async with app.intake_engine.begin() as conn:
        for statement in FAILING_INSERT[backend]:
            await conn.execute(text(statement))


async def heal_raw_inserts(app: App, backend: str) -> None:
    from sqlalchemy import text

    async with app.intake_engine.begin() as conn:
        await conn.execute(
            text("DROP TRIGGER fail" + (" ON raw_mail" if backend != "sqlite" else ""))
        )


async def stored_raw(app: App) -> list[Any]:
    """All received mail in id order, once what waits in the intake file is moved."""
    from sqlalchemy import select

    from gateway.intake import move_received
    from gateway.models import RawMail

    while await move_received(app):
        pass
    async with app.sessions() as session:
        return list((await session.execute(select(RawMail).order_by(RawMail.id))).scalars())


async def deliveries(app: App, kind: str | None = None) -> list[Any]:
    """The delivery log in order, optionally of one kind."""
    from sqlalchemy import select

    from gateway.models import Delivery

    async with app.sessions() as session:
        query = select(Delivery).order_by(Delivery.id)
        if kind:
            query = query.where(Delivery.kind == kind)
        return list((await session.execute(query)).scalars())
