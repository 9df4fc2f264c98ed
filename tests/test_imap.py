"""IMAP intake against a real Dovecot on loopback: stored exactly once, flagged only after
the commit, surviving a server killed mid-batch, a UIDVALIDITY reset and a server that hangs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.app import App
from gateway.config import ConfigError, ImapAccount
from gateway.imap_intake import (
    ImapError,
    ImapPoller,
    ImapRefused,
    imap_status,
    parse_fetch,
    start_pollers,
    uid_set,
)
from gateway.models import ImapCursor, Message, RawMail, Ticket
from gateway.spool import Spool

from conftest import mail
from dovecot import PASSWORD, Dovecot, dovecot_fixture  # noqa: F401 - the `dovecot` fixture

pytestmark = pytest.mark.dovecot

ENV = {"SG_TEST_IMAP_PASSWORD": PASSWORD}


@pytest.fixture
def config_extra(dovecot: Dovecot) -> str:
    return f"""
[[imap]]
name = "support"
host = "127.0.0.1"
port = {dovecot.port}
security = "plain"
user = "{dovecot.user}"
password_env = "SG_TEST_IMAP_PASSWORD"
queue = "support"
batch = 2
poll_seconds = 60
timeout_seconds = 5
"""


@pytest.fixture
async def spool(app: App) -> AsyncIterator[Spool]:
    writer = Spool(app.sessions, clock=app.clock)
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def account(app: App, **changes: Any) -> ImapAccount:
    return replace(app.config.imap[0], **changes)


@contextlib.asynccontextmanager
async def poller(
    app: App, spool: Spool, acct: ImapAccount | None = None, *, cls: type[ImapPoller] = ImapPoller
) -> AsyncIterator[ImapPoller]:
    instance = cls(app, spool, acct or app.config.imap[0], env=ENV)
    try:
        yield instance
    finally:
        await instance.close()


async def raw_rows(app: App) -> list[RawMail]:
    async with app.sessions() as db:
        query = select(RawMail).where(RawMail.source.like("imap:%")).order_by(RawMail.id)
        return list((await db.execute(query)).scalars())


async def cursor_of(app: App, name: str = "support") -> ImapCursor:
    async with app.sessions() as db:
        cursor = await db.get(ImapCursor, name)
    assert cursor is not None
    return cursor


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 15.0) -> None:
    """Wait, bounded, for something another task does; fails the test when it never happens."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - the state lives in the database
            await asyncio.sleep(0.05)


def messages(count: int) -> list[bytes]:
    return [
        mail(subject=f"Help number {n}", headers={"Return-Path": "<jane@customer.org>"})
        for n in range(count)
    ]


def seen(dovecot: Dovecot, folder: str = "INBOX") -> dict[int, bool]:
    return {uid: "\\Seen" in flags for uid, flags in dovecot.flags(folder).items()}


# -- pure helpers ------------------------------------------------------------------------------
def test_uid_set_compresses_ranges() -> None:
    assert uid_set([7, 1, 2, 3, 9, 10]) == "1:3,7,9:10"
    assert uid_set([5]) == "5"


def test_parse_fetch_takes_the_uid_wherever_the_server_puts_it() -> None:
    lines = [
        b"1 FETCH (UID 41 BODY[] {5}",
        bytearray(b"hello"),
        b")",
        b"2 FETCH (BODY[] {3}",
        bytearray(b"bye"),
        b" UID 42)",
        b"3 FETCH (FLAGS (\\Seen))",  # an unsolicited flag update carries no body
        b"Fetch completed.",
    ]
    assert parse_fetch(lines) == {41: b"hello", 42: b"bye"}


# -- against Dovecot ---------------------------------------------------------------------------
async def test_stored_byte_for_byte_then_seen_only_after_the_commit(
    app: App, spool: Spool, dovecot: Dovecot
) -> None:
    sent = [*messages(2), mail(headers={"Return-Path": "<>"}, subject="Delivery failure")]
    for data in sent:
        dovecot.append(data)
    observed: list[tuple[int, dict[int, bool]]] = []

    class Watching(ImapPoller):
        async def _store(self, batch: dict[int, bytes]) -> int:
            stored = await super()._store(batch)
            # Committed and not yet flagged: what a crash at this instant would leave.
            observed.append((len(await raw_rows(app)), await asyncio.to_thread(seen, dovecot)))
            return stored

    async with poller(app, spool, cls=Watching) as imap:
        assert await imap.poll_once() == 3
        assert await imap.poll_once() == 0  # `4:*` answers UID 3 again: filtered

    assert observed[0] == (2, {1: False, 2: False, 3: False})
    assert observed[1] == (3, {1: True, 2: True, 3: False})
    rows = await raw_rows(app)
    assert [r.data for r in rows] == sent
    assert {r.source for r in rows} == {"imap:support"}
    assert all(r.rcpt_tos == ["support@example.com"] for r in rows)
    assert [r.mail_from for r in rows] == ["jane@customer.org", "jane@customer.org", ""]
    assert seen(dovecot) == {1: True, 2: True, 3: True}
    cursor = await cursor_of(app)
    assert (cursor.last_uid, cursor.last_error) == (3, "")
    assert cursor.uidvalidity > 0 and cursor.last_poll_at is not None
    (status,) = await imap_status(app)
    assert status["account"] == "support" and status["last_uid"] == 3
    assert status["last_error"] == "" and status["last_poll_at"] is not None


@pytest.mark.parametrize(
    "capabilities",
    [
        "",  # Dovecot's own: MOVE
        "imap_capability = IMAP4rev1 IDLE UIDPLUS",  # COPY, \Deleted, UID EXPUNGE
        "imap_capability = IMAP4rev1",  # COPY, \Deleted, EXPUNGE; no IDLE either
    ],
    ids=["move", "copy-uid-expunge", "copy-expunge"],
)
async def test_moved_after_store(
    app: App, spool: Spool, dovecot: Dovecot, capabilities: str
) -> None:
    if capabilities:
        dovecot.reconfigure(capabilities)
    sent = messages(3)
    for data in sent:
        dovecot.append(data)
    moving = account(app, after_store="move", move_to="Imported")
    async with poller(app, spool, moving) as imap:
        assert await imap.poll_once() == 3  # the folder is created on TRYCREATE
        dovecot.append(sent[0] + b"again\r\n")
        assert await imap.poll_once() == 1
    assert dovecot.flags("INBOX") == {}
    assert sorted(dovecot.bodies("Imported")) == sorted([*sent, sent[0] + b"again\r\n"])
    assert len(await raw_rows(app)) == 4


@pytest.mark.parametrize("kill_after", ["_store", "_after_store"])
async def test_server_killed_mid_batch_loses_and_duplicates_nothing(
    app: App, spool: Spool, dovecot: Dovecot, kill_after: str
) -> None:
    sent = messages(7)
    for data in sent:
        dovecot.append(data)
    killed: list[bool] = []

    class Crashing(ImapPoller):
        async def _store(self, batch: dict[int, bytes]) -> int:
            stored = await super()._store(batch)
            await crash("_store")
            return stored

        async def _after_store(self, session: Any, uids: list[int]) -> None:
            await super()._after_store(session, uids)
            await crash("_after_store")

    async def crash(point: str) -> None:
        if point == kill_after and not killed:
            killed.append(True)
            await asyncio.to_thread(dovecot.stop)

    async with poller(app, spool, cls=Crashing) as imap:
        with pytest.raises(ImapError):
            await imap.poll_once()
        assert len(await raw_rows(app)) == 2  # the first batch of two was committed
        assert "closed the connection" in (await cursor_of(app)).last_error
        with pytest.raises(ImapError):  # still down: refused, recorded, raised
            await imap.poll_once()
        await asyncio.to_thread(dovecot.start)
        assert await imap.poll_once() == 5

    rows = await raw_rows(app)
    assert sorted(r.data for r in rows) == sorted(sent)  # 0 lost, 0 duplicated
    assert seen(dovecot) == dict.fromkeys(range(1, 8), True)
    assert (await cursor_of(app)).last_error == ""


async def reset_uidvalidity(dovecot: Dovecot) -> None:
    """A new UIDVALIDITY for INBOX, as a restored backup or a rebuilt mailbox gives.

    Deleting the UID list is not enough: Dovecot derives the new value from the clock, which
    may not have moved to the next second yet.
    """
    await asyncio.to_thread(dovecot.stop)
    uidlist = dovecot.maildir / "dovecot-uidlist"
    header, _, rest = uidlist.read_text().partition("\n")
    fields = [f"V{int(f[1:]) - 1000}" if f.startswith("V") else f for f in header.split()]
    uidlist.write_text(" ".join(fields) + "\n" + rest)
    for pattern in ("dovecot.index*", "dovecot.list.index*"):
        for path in dovecot.maildir.glob(pattern):
            path.unlink()
    await asyncio.to_thread(dovecot.start)


async def test_uidvalidity_reset_rereads_without_duplicates(
    app: App, spool: Spool, dovecot: Dovecot
) -> None:
    sent = messages(3)
    for data in sent:
        dovecot.append(data)
    async with poller(app, spool) as imap:
        assert await imap.poll_once() == 3
        before = (await cursor_of(app)).uidvalidity
        await reset_uidvalidity(dovecot)
        late = mail(subject="Arrived after the reset")
        dovecot.append(late)
        assert await imap.poll_once() == 1  # the three known ones are re-read, not re-stored
        assert await imap.poll_once() == 0
    cursor = await cursor_of(app)
    assert cursor.uidvalidity != before
    assert cursor.last_uid == 4
    assert sorted(r.data for r in await raw_rows(app)) == sorted([*sent, late])


async def test_end_to_end_tickets_once_across_a_uidvalidity_reset(
    app: App, spool: Spool, dovecot: Dovecot
) -> None:
    from gateway.pipeline import process_pending

    for data in messages(2):
        dovecot.append(data)
    async with poller(app, spool) as imap:
        await imap.poll_once()
        await process_pending(app)
        await reset_uidvalidity(dovecot)
        await imap.poll_once()
        await process_pending(app)
    async with app.sessions() as db:
        tickets = await db.scalar(select(func.count()).select_from(Ticket))
        inbound = await db.scalar(
            select(func.count()).select_from(Message).where(Message.direction == "in")
        )
        queues = set((await db.execute(select(Ticket.queue))).scalars())
    assert (tickets, inbound, queues) == (2, 2, {"support"})


async def test_idle_wakes_the_poller_on_new_mail(app: App, spool: Spool, dovecot: Dovecot) -> None:
    """poll_seconds is 60: only IDLE's EXISTS can bring the second message in within the wait."""
    dovecot.append(messages(1)[0])
    imap = ImapPoller(app, spool, app.config.imap[0], env=ENV)
    task = asyncio.create_task(imap.run())
    try:
        await eventually(lambda: _count_is(app, 1))
        dovecot.append(mail(subject="While idling"))
        await eventually(lambda: _count_is(app, 2))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_exists_during_a_poll_skips_one_wait_only(
    app: App, spool: Spool, dovecot: Dovecot
) -> None:
    """An EXISTS seen while polling brings one poll at once; a server that sends EXISTS in
    every poll still gets its IDLE between polls, never a tight loop."""

    class Grown:
        grew = True
        idles = 0

        def has(self, capability: str) -> bool:
            return capability == "IDLE"

        async def idle(self, seconds: float) -> bool:
            self.idles += 1
            return False

    imap = ImapPoller(app, spool, app.config.imap[0], env=ENV)
    session = Grown()
    imap._session = session  # type: ignore[assignment]
    for _ in range(3):
        await imap._wait_for_mail()  # skipped, then idles, then skipped again
        await imap._wait_for_mail()
    assert session.idles == 3


async def _count_is(app: App, count: int) -> bool:
    return len(await raw_rows(app)) >= count


class StalledServer:
    """Accepts IMAP connections and then says nothing (or only its greeting) ever again."""

    def __init__(self, *, greet: bool) -> None:
        self.greet = greet
        self.connections = 0
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.greet:
            writer.write(b"* OK [CAPABILITY IMAP4rev1] stalling\r\n")
            await writer.drain()
        await reader.read()  # until the client gives up

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in self._writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("greet", [False, True], ids=["silent", "greets-then-stalls"])
async def test_hanging_server_times_out_without_blocking_another_account(
    app: App, spool: Spool, dovecot: Dovecot, greet: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SG_TEST_IMAP_PASSWORD", PASSWORD)
    hanging = StalledServer(greet=greet)
    async with hanging as port:
        stalled = account(app, name="stalled", port=port, timeout_seconds=0.5)
        app.config = replace(app.config, imap=[stalled, app.config.imap[0]])
        dovecot.append(messages(1)[0])
        async with asyncio.TaskGroup() as group:
            tasks = start_pollers(app, spool, group)
            try:
                await eventually(lambda: _count_is(app, 1))
                await eventually(lambda: _true(hanging.connections >= 2))  # it reconnected
                error = (await cursor_of(app, "stalled")).last_error
                assert "no answer within 0.5 s" in error
                assert (await cursor_of(app, "support")).last_error == ""
            finally:
                for task in tasks:
                    task.cancel()
    statuses = {s["account"]: s for s in await imap_status(app)}
    assert statuses["stalled"]["last_error"] and statuses["stalled"]["last_poll_at"] is None
    assert statuses["support"]["last_uid"] == 1


async def _true(value: bool) -> bool:
    return value


async def test_wrong_password_is_recorded_and_never_logged(
    app: App, spool: Spool, dovecot: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-password-" + "x" * 8
    caplog.set_level("DEBUG")
    imap = ImapPoller(app, spool, app.config.imap[0], env={"SG_TEST_IMAP_PASSWORD": wrong})
    try:
        with pytest.raises(ImapRefused, match="LOGIN refused: NO"):
            await imap.poll_once()
    finally:
        await imap.close()
    cursor = await cursor_of(app)
    assert cursor.last_error.startswith("LOGIN refused: NO")
    assert cursor.last_error_at is not None and cursor.last_poll_at is None
    assert wrong not in caplog.text and wrong not in cursor.last_error


async def test_plain_refused_unless_loopback_and_password_env_named(app: App, spool: Spool) -> None:
    remote = account(app, host="imap.example.net")
    with pytest.raises(ConfigError, match=r'"plain".*loopback'):
        ImapPoller(app, spool, remote, env=ENV)
    ImapPoller(app, spool, account(app, host="localhost"), env=ENV)
    ImapPoller(app, spool, account(app, host="::1"), env=ENV)
    with pytest.raises(ConfigError, match="SG_TEST_IMAP_PASSWORD is not set"):
        ImapPoller(app, spool, app.config.imap[0], env={})


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_tls_and_starttls_verify_the_certificate(
    app: App, spool: Spool, dovecot: Dovecot, security: str
) -> None:
    dovecot.append(messages(1)[0])
    port = dovecot.tls_port if security == "tls" else dovecot.port
    untrusted = account(app, security=security, port=port)
    async with poller(app, spool, untrusted) as imap:
        with pytest.raises(ImapError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await imap.poll_once()
    trusted = account(app, security=security, port=port, ca_file=str(dovecot.cert))
    async with poller(app, spool, trusted) as imap:
        assert await imap.poll_once() == 1
