"""IMAP intake: one poller per `[[imap]]` account, for teams whose support@ is a hosted mailbox.

Work is done by UID under UIDVALIDITY, never by sequence number. Each batch is fetched with
`BODY.PEEK[]`, stored durably through the spool, and only then flagged `\\Seen` (or moved);
the cursor advances after that. A crash anywhere in between re-reads the batch on the next
poll, and a raw message whose sha256 this account already stored is not stored again, so
every message lands exactly once. A UIDVALIDITY change re-reads the folder the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import email.utils
import hashlib
import ipaddress
import logging
import os
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aioimaplib
from sqlalchemy import select

from gateway.app import App
from gateway.config import ConfigError, ImapAccount, read_secret
from gateway.intake import stored_hashes
from gateway.models import ImapCursor
from gateway.spool import Spool

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_FETCH_UID = re.compile(rb"[( ]UID (\d+)")


class ImapError(ConnectionError):
    """Anything that ends an IMAP session; the poller logs it, records it and reconnects."""


class ImapRefused(ImapError):
    """The server answered NO or BAD."""


class ImapTimeout(ImapError, TimeoutError):
    """The server did not answer within timeout_seconds."""


class ImapConnectionLost(ImapError):
    """The connection closed under a command."""


def source_of(account: ImapAccount) -> str:
    """The raw_mail.source of this account's mail (the column holds 16 characters)."""
    return f"imap:{account.name}"[:16]


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def uid_set(uids: Iterable[int]) -> str:
    """`1:3,7` for UIDs 1, 2, 3 and 7: short command lines for long batches."""
    ranges: list[tuple[int, int]] = []
    for uid in sorted(set(uids)):
        if ranges and uid == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], uid)
        else:
            ranges.append((uid, uid))
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges)


def parse_fetch(lines: Iterable[Any]) -> dict[int, bytes]:
    """UID -> raw bytes from aioimaplib's FETCH lines, where each literal is a bytearray line."""
    found: dict[int, bytes] = {}
    uid: int | None = None
    body: bytes | None = None

    def flush() -> None:
        if uid is not None and body is not None:
            found[uid] = body

    for line in lines:
        if isinstance(line, bytearray):
            body = bytes(line)
            continue
        if _FETCH_START.match(line):
            flush()
            uid, body = None, None
        match = _FETCH_UID.search(line)
        if match and uid is None:
            uid = int(match.group(1))
    flush()
    return found


def envelope_sender(data: bytes) -> str:
    """The envelope sender the delivering MTA recorded in Return-Path ("" for a bounce's <>).

    Without Return-Path the From address stands in, so ordinary mail is not taken for a
    null-sender bounce.
    """
    head = data.split(b"\r\n\r\n", 1)[0]
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return_path = headers.get("Return-Path")
    if return_path is not None:
        return email.utils.parseaddr(str(return_path))[1]
    return email.utils.parseaddr(str(headers.get("From", "")))[1]


def _text(response: Any) -> str:
    """The server's words for a tagged response, for last_error (never a password)."""
    lines = [bytes(x) for x in response.lines if isinstance(x, bytes | bytearray)]
    tail = lines[-1] if lines else b""
    return tail.decode("utf-8", "replace")[:300]


def _check(response: Any, what: str) -> Any:
    """NO and BAD are results, not exceptions: turn them into one."""
    if response.result != "OK":
        raise ImapRefused(f"{what} refused: {response.result} {_text(response)}".strip())
    return response


@dataclass(frozen=True)
class _Settings:
    """What the poller needs from an account, checked once at start."""

    password: str
    recipient: str
    ssl_context: ssl.SSLContext | None


def _settings(app: App, account: ImapAccount, env: Mapping[str, str]) -> _Settings:
    where = f"[[imap]] {account.name!r}"
    if account.security == "plain" and not is_loopback(account.host):
        raise ConfigError(
            f'{where}: security = "plain" would send the password in clear to '
            f'{account.host!r}; it is allowed only for a loopback host: use "tls" or "starttls"'
        )
    if account.after_store == "move" and not account.move_to:
        raise ConfigError(f'{where}: after_store = "move" needs move_to (a folder name)')
    if account.after_store == "move" and account.move_to == account.folder:
        raise ConfigError(f"{where}: move_to must differ from folder {account.folder!r}")
    recipient = account.recipient or next(
        (box.address for box in app.config.mailbox if box.queue == account.queue), ""
    )
    if not recipient:
        raise ConfigError(
            f'{where}: no [[mailbox]] has queue {account.queue!r}; set recipient = "..."'
        )
    password = read_secret(
        env, account.password_env, what=f"password of the IMAP account {account.name!r}"
    )
    context = None
    if account.security != "plain":
        try:
            context = ssl.create_default_context(cafile=account.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}: cannot read ca_file {account.ca_file!r}: {exc}") from None
    return _Settings(password=password, recipient=recipient, ssl_context=context)


class _Session:
    """One logged-in IMAP connection; every command is bounded and races the connection's end."""

    def __init__(self, account: ImapAccount) -> None:
        self.account = account
        self.timeout = account.timeout_seconds
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.client: aioimaplib.IMAP4 | None = None
        self.grew = False  # the server announced EXISTS since the last search

    def _watch_exists(self) -> None:
        """Note every EXISTS the server sends. aioimaplib drops untagged responses no pending
        command asked for, such as an EXISTS that comes with a STORE's answer; mail that
        arrived then waited for the next poll (`poll_seconds`), since IDLE reports only what
        comes after it starts."""
        assert self.client is not None
        protocol = self.client.protocol
        untagged = protocol._untagged_response

        def watched(line: bytes) -> Any:
            if line.rstrip().endswith(b" EXISTS"):
                self.grew = True
            return untagged(line)

        protocol._untagged_response = watched

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    async def call(self, what: str, aw: Awaitable[T], *, limit: float | None = None) -> T:
        """Await one command, or raise ImapTimeout / ImapConnectionLost: nothing hangs."""
        task = asyncio.ensure_future(aw)
        limit = self.timeout if limit is None else limit
        waiters: set[asyncio.Future[Any]] = {task, self.lost}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not task.done():
                task.cancel()
        if task in done:
            try:
                return task.result()
            except ImapError:
                raise
            except (TimeoutError, aioimaplib.CommandTimeout):
                raise ImapTimeout(f"{what}: no answer within {limit:g} s") from None
            except (aioimaplib.AioImapException, OSError) as exc:
                # OSError: refused connections, DNS, TLS handshake and certificate failures.
                raise ImapError(f"{what}: {exc}") from None
        if self.lost.done():
            raise ImapConnectionLost(f"{what}: the server closed the connection")
        raise ImapTimeout(f"{what}: no answer within {limit:g} s")

    async def open(self, settings: _Settings) -> None:
        account = self.account
        tls = settings.ssl_context if account.security == "tls" else None
        self.client = aioimaplib.IMAP4(
            host=account.host,
            port=account.port,
            timeout=self.timeout,
            conn_lost_cb=self._connection_lost,
            ssl_context=tls,
        )
        await self.call("connect", self.client.wait_hello_from_server())
        self._watch_exists()
        if account.security == "starttls":
            assert settings.ssl_context is not None
            await self._starttls(settings.ssl_context)
        await self._login(account.user, settings.password)

    async def _starttls(self, context: ssl.SSLContext) -> None:
        """aioimaplib has no STARTTLS: send it, then upgrade the transport under the protocol."""
        assert self.client is not None
        protocol = self.client.protocol
        if not self.client.has_capability("STARTTLS"):
            raise ImapRefused('the server does not offer STARTTLS; use security = "tls"')
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        _check(await self.call("STARTTLS", protocol.execute(command)), "STARTTLS")
        if protocol.incomplete_line:
            # Bytes sent in clear after the OK would be read as if protected (CVE-2011-0411).
            raise ImapError("STARTTLS: the server sent data before the TLS handshake")
        loop = asyncio.get_running_loop()
        transport = await self.call(
            "TLS handshake",
            loop.start_tls(
                protocol.transport, protocol, context, server_hostname=self.account.host
            ),
        )
        protocol.transport = transport
        # Capabilities learnt in clear are void after STARTTLS (RFC 3501 6.2.1).
        await self.call("CAPABILITY", protocol.capability())

    async def _login(self, user: str, password: str) -> None:
        """LOGIN with both arguments quoted, and the quoted password scrubbed from debug logs."""
        assert self.client is not None
        protocol = self.client.protocol
        secret = aioimaplib.quoted(password)
        command = aioimaplib.Command(
            "LOGIN", protocol.new_tag(), aioimaplib.quoted(user), secret, loop=protocol.loop
        )
        _check(await self.call("LOGIN", protocol.execute(command, scrub=secret)), "LOGIN")
        protocol.state = aioimaplib.AUTH
        # Servers advertise more (MOVE, UIDPLUS, IDLE) once logged in.
        await self.call("CAPABILITY", protocol.capability())

    def has(self, capability: str) -> bool:
        assert self.client is not None
        return bool(self.client.has_capability(capability))

    async def select(self, folder: str) -> int:
        """SELECT the folder; returns its UIDVALIDITY."""
        assert self.client is not None
        response = _check(
            await self.call("SELECT", self.client.select(aioimaplib.quoted(folder))),
            f"SELECT {folder}",
        )
        for line in response.lines:
            match = _UIDVALIDITY.search(bytes(line))
            if match:
                return int(match.group(1))
        raise ImapError(f"SELECT {folder}: the server sent no UIDVALIDITY")

    async def search_after(self, last_uid: int) -> list[int]:
        """UIDs above last_uid; `N:*` also answers the highest UID when it is below N."""
        assert self.client is not None
        self.grew = False  # what arrives from here on is in this search or brings a new poll
        response = _check(
            await self.call(
                "UID SEARCH",
                self.client.uid_search("UID", f"{last_uid + 1}:*", charset=None),
            ),
            "UID SEARCH",
        )
        uids: set[int] = set()
        # aioimaplib hands `* SEARCH 1 2 3` over as b"1 2 3"; the last line is the tagged text.
        for line in response.lines[:-1]:
            words = bytes(line).split()
            if words[:1] == [b"SEARCH"]:
                words = words[1:]
            uids.update(int(w) for w in words if w.isdigit())
        return sorted(uid for uid in uids if uid > last_uid)

    async def fetch(self, uids: list[int]) -> dict[int, bytes]:
        assert self.client is not None
        response = _check(
            await self.call(
                "UID FETCH", self.client.uid("fetch", uid_set(uids), "(UID BODY.PEEK[])")
            ),
            "UID FETCH",
        )
        return parse_fetch(response.lines)

    async def command(self, what: str, *args: str) -> Any:
        """One UID command (STORE, COPY, MOVE, EXPUNGE), checked."""
        assert self.client is not None
        name = f"UID {what.upper()}"
        return _check(await self.call(name, self.client.uid(what, *args)), name)

    async def simple(self, name: str, *args: str) -> Any:
        assert self.client is not None
        response = await self.call(name, self.client.protocol.simple_command(name, *args))
        return response

    async def expunge(self) -> None:
        assert self.client is not None
        _check(await self.call("EXPUNGE", self.client.expunge()), "EXPUNGE")

    async def idle(self, seconds: float) -> bool:
        """IDLE up to `seconds`; True when the server announced new mail (EXISTS)."""
        assert self.client is not None
        client = self.client
        idle = await self.call("IDLE", client.idle_start(timeout=seconds + self.timeout))
        woke = False
        try:
            deadline = asyncio.get_running_loop().time() + seconds
            while not woke:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    push = await self.call(
                        "IDLE", client.wait_server_push(remaining + 1), limit=remaining
                    )
                except ImapTimeout:
                    break
                if push == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    break
                woke = any(bytes(line).endswith(b"EXISTS") for line in push)
        finally:
            if client.has_pending_idle():
                client.idle_done()
        _check(await self.call("DONE", idle), "IDLE")
        return woke

    async def wait(self, seconds: float) -> None:
        """Sleep between polls, but return at once when the connection drops."""
        await asyncio.wait({self.lost}, timeout=seconds)
        if self.lost.done():
            raise ImapConnectionLost("the server closed the connection while we waited")

    async def close(self) -> None:
        """LOGOUT politely when the connection is sound; always drop it and its tasks."""
        client, self.client = self.client, None
        if client is None:
            return
        protocol = client.protocol
        if not self.lost.done() and protocol.transport is not None:
            with contextlib.suppress(Exception):
                await self.call("LOGOUT", client.logout(), limit=min(self.timeout, 5.0))
        if protocol.transport is not None:
            protocol.transport.close()
        if not client._client_task.done():
            client._client_task.cancel()
        if client._idle_waiter is not None:
            client._idle_waiter.cancel()
        for task in [*client.tasks, *protocol.tasks]:
            task.cancel()
        for command in [protocol.pending_sync_command, *protocol.pending_async_commands.values()]:
            if command is not None:
                command._timer.cancel()


class ImapPoller:
    """Brings one account's new mail into the raw store, forever, surviving any failure."""

    def __init__(
        self,
        app: App,
        spool: Spool,
        account: ImapAccount,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.spool = spool
        self.account = account
        self.source = source_of(account)
        self._settings = _settings(app, account, os.environ if env is None else env)
        self._session: _Session | None = None
        self._failures = 0
        self._repolled = False  # the last wait was skipped for an EXISTS seen while polling

    # -- the loop serve runs -------------------------------------------------------------
    async def run(self) -> None:
        """Poll, then IDLE (or sleep) until new mail; on any failure back off and reconnect."""
        while True:
            try:
                while True:
                    await self.poll_once()
                    await self._wait_for_mail()
            except asyncio.CancelledError:
                await self.close()
                raise
            except Exception as exc:
                # poll_once records its own failures and drops the session; this one came
                # while waiting for mail.
                if self._session is not None:
                    await self._fail(exc)
            await asyncio.sleep(self.backoff())

    def backoff(self) -> float:
        """Seconds before the next attempt: doubling per failure, capped, with some jitter."""
        if self._failures == 0:
            return 0.0
        delay = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** (self._failures - 1))
        return delay * random.uniform(0.8, 1.0)

    async def _wait_for_mail(self) -> None:
        session = self._session
        assert session is not None
        if session.grew and not self._repolled:  # mail came in during the poll: poll again
            self._repolled = True  # once: a server announcing EXISTS every time never spins
            return
        self._repolled = False
        if session.has("IDLE"):
            await session.idle(self.account.poll_seconds)
        else:
            await session.wait(self.account.poll_seconds)

    # -- one poll ------------------------------------------------------------------------
    async def poll_once(self) -> int:
        """Store what is new in the folder; returns how many messages were stored.

        Failures are recorded on the cursor and raised; the connection is dropped with them.
        """
        if self._session is not None and self._session.lost.done():
            await self.close()  # dropped between polls (a server restart): just reconnect
        try:
            if self._session is None:
                session = _Session(self.account)
                self._session = session
                await session.open(self._settings)
            stored = await self._sync(self._session)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(exc)
            raise
        self._failures = 0
        return stored

    async def _fail(self, exc: Exception) -> None:
        """Log and record one failure, and drop the connection it happened on."""
        self._failures += 1
        message = _describe(exc)
        log.warning("IMAP account %s: %s", self.account.name, message)
        await self._record_error(message)
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _sync(self, session: _Session) -> int:
        account = self.account
        uidvalidity = await session.select(account.folder)
        cursor = await self._cursor()
        last_uid = cursor.last_uid
        if cursor.uidvalidity != uidvalidity:
            if cursor.uidvalidity:
                log.warning(
                    "IMAP account %s: UIDVALIDITY of %s changed from %d to %d; re-reading it",
                    account.name,
                    account.folder,
                    cursor.uidvalidity,
                    uidvalidity,
                )
            last_uid = 0
            await self._advance(uidvalidity, 0)
        uids = await session.search_after(last_uid)
        stored = 0
        for start in range(0, len(uids), account.batch):
            chunk = uids[start : start + account.batch]
            messages = await session.fetch(chunk)
            stored += await self._store(messages)
            if messages:
                await self._after_store(session, sorted(messages))
            await self._advance(uidvalidity, chunk[-1])
        await self._advance(uidvalidity, uids[-1] if uids else last_uid, polled=True)
        return stored

    async def _store(self, messages: dict[int, bytes]) -> int:
        """Commit the batch through the spool; raw bytes this account already stored are skipped."""
        if not messages:
            return 0
        hashes = {uid: hashlib.sha256(data).hexdigest() for uid, data in messages.items()}
        known = await stored_hashes(self.app, source=self.source, hashes=set(hashes.values()))
        fresh: dict[str, bytes] = {}
        for uid in sorted(messages):
            if hashes[uid] not in known:
                fresh.setdefault(hashes[uid], messages[uid])
        rcpt = [self._settings.recipient]
        await asyncio.gather(
            *(
                self.spool.store(
                    data, mail_from=envelope_sender(data), rcpt_tos=rcpt, source=self.source
                )
                for data in fresh.values()
            )
        )
        if len(fresh) < len(messages):
            log.info(
                "IMAP account %s: %d message(s) were already stored; not storing them again",
                self.account.name,
                len(messages) - len(fresh),
            )
        return len(fresh)

    async def _after_store(self, session: _Session, uids: list[int]) -> None:
        """Only after the commit: mark the messages read, or move them out of the folder."""
        await _AFTER_STORE[self.account.after_store](self, session, uid_set(uids))

    async def _mark_seen(self, session: _Session, uids: str) -> None:
        await session.command("store", uids, "+FLAGS.SILENT", "(\\Seen)")

    async def _move(self, session: _Session, uids: str) -> None:
        target = aioimaplib.quoted(self.account.move_to)
        for attempt in (1, 2):
            try:
                if session.has("MOVE"):
                    await session.command("move", uids, target)
                else:
                    await self._copy_delete(session, uids, target)
                return
            except ImapRefused as exc:
                if attempt == 2 or "TRYCREATE" not in str(exc):
                    raise
            _check(await session.simple("CREATE", target), f"CREATE {self.account.move_to}")

    async def _copy_delete(self, session: _Session, uids: str, target: str) -> None:
        """MOVE for servers without it: COPY, flag \\Deleted, then expunge just those UIDs."""
        await session.command("copy", uids, target)
        await session.command("store", uids, "+FLAGS.SILENT", "(\\Deleted)")
        if session.has("UIDPLUS"):
            await session.command("expunge", uids)
        else:
            await session.expunge()

    # -- the cursor ----------------------------------------------------------------------
    async def _cursor(self) -> ImapCursor:
        async with self.app.sessions() as db, db.begin():
            cursor = await db.get(ImapCursor, self.account.name)
            if cursor is None:
                cursor = ImapCursor(
                    account=self.account.name, uidvalidity=0, last_uid=0, last_error=""
                )
                db.add(cursor)
        return cursor

    async def _advance(self, uidvalidity: int, last_uid: int, *, polled: bool = False) -> None:
        async with self.app.sessions() as db, db.begin():
            cursor = await db.get(ImapCursor, self.account.name)
            assert cursor is not None
            cursor.uidvalidity = uidvalidity
            cursor.last_uid = last_uid
            if polled:
                cursor.last_poll_at = self.app.clock()
                cursor.last_error = ""

    async def _record_error(self, message: str) -> None:
        """Best effort: the database may be what failed."""
        try:
            async with self.app.sessions() as db, db.begin():
                cursor = await db.get(ImapCursor, self.account.name)
                if cursor is None:
                    cursor = ImapCursor(account=self.account.name, uidvalidity=0, last_uid=0)
                    db.add(cursor)
                cursor.last_error = message[:1000]
                cursor.last_error_at = self.app.clock()
        except Exception as exc:
            log.error(
                "IMAP account %s: cannot record the error: %s", self.account.name, _describe(exc)
            )


_AFTER_STORE: dict[str, Callable[[ImapPoller, _Session, str], Awaitable[None]]] = {
    "seen": ImapPoller._mark_seen,
    "move": ImapPoller._move,
}


def _describe(exc: BaseException) -> str:
    """One line for logs and last_error: the error's own words, or its type when it has none."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ImapError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def start_pollers(app: App, spool: Spool, group: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
    """One task per `[[imap]]` account; every account is checked before any task starts."""
    pollers = [ImapPoller(app, spool, account) for account in app.config.imap]
    sources = [p.source for p in pollers]
    for poller in pollers:
        if sources.count(poller.source) > 1:
            raise ConfigError(
                f"[[imap]] names must differ in their first 11 characters ({poller.source!r} "
                "is shared): raw_mail.source holds 16"
            )
    return [group.create_task(p.run(), name=f"imap:{p.account.name}") for p in pollers]


async def imap_status(app: App) -> list[dict[str, Any]]:
    """Each configured account's cursor, for `supportgate status` (times as ISO 8601 UTC)."""
    async with app.readers() as db:
        rows = {c.account: c for c in (await db.execute(select(ImapCursor))).scalars()}
    result: list[dict[str, Any]] = []
    for account in app.config.imap:
        cursor = rows.get(account.name)
        result.append(
            {
                "account": account.name,
                "folder": account.folder,
                "uidvalidity": cursor.uidvalidity if cursor else 0,
                "last_uid": cursor.last_uid if cursor else 0,
                "last_poll_at": _iso(cursor.last_poll_at if cursor else None),
                "last_error": cursor.last_error if cursor else "",
                "last_error_at": _iso(cursor.last_error_at if cursor else None),
            }
        )
    return result


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
