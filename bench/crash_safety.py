"""Crash safety of `supportgate serve`: SIGKILL it again and again under load, then count.

    .venv/bin/python bench/crash_safety.py [--messages 10000] [--sessions 20] [--kills 10]
                                           [--quick] [--seed N] [--keep DIR]

One run:

1. a temp config on SQLite whose smarthost is an aiosmtpd sink in this process, recording every
   message it is handed with its Message-ID, In-Reply-To and recipient;
2. `supportgate serve` as a subprocess (its own process group, so the parser worker dies too);
3. a client process sending N distinct customer mails (unique sender, subject and Message-ID)
   over `--sessions` SMTP sessions, retrying a message on connection errors and 4xx like a real
   MTA, and recording every 250 with the Message-ID it was for;
4. meanwhile the gateway is killed with SIGKILL at random points of the load (`--kills` times)
   and restarted after a random pause;
5. after the load: a clean stop, a restart, and a wait until the backlog is processed and the
   outbox is empty.

Then the checks, each printed with its counts; the exit status is 1 if any fails:

- every message that got a 250 is on a ticket or in quarantine (by Message-ID in the database);
- no message is on two tickets and no ticket holds two of our mails (a retry after a kill is
  stored again, then deduplicated);
- every ticket's acknowledgement reached the sink at least once, at most twice, and always with
  the same Message-ID; the same for the notification to the team;
- the client never saw a 5xx; nothing is left in the backlog or the outbox, nothing failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.parser
import email.policy
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import unmoved

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "gateway" / "config.example.toml"
SECRET = "crash-secret-" + "c" * 40
ENV = {**os.environ, "SUPPORTGATE_SECRET": SECRET, "PYTHONPATH": str(ROOT)}
TEAM = "support-engineering@example.com"
HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path, *, port: int, smarthost: str) -> Path:
    """The shipped example (SQLite, default parse workers) on our port and the sink.

    Retries start after 2 s instead of 60 s so a send cut by a kill is retried within the run.
    """
    text = EXAMPLE.read_text()
    for old, new in (
        ('listen = ["127.0.0.1:2525"]', f'listen = ["127.0.0.1:{port}"]'),
        ('smarthost = ""', f'smarthost = "{smarthost}"'),
        ("retry_base_seconds = 60.0", "retry_base_seconds = 2.0"),
    ):
        assert old in text, f"the example config no longer has {old!r}"
        text = text.replace(old, new)
    path = folder / "supportgate.toml"
    path.write_text(text)
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# -- the mail ------------------------------------------------------------------------------------


def message_id(run: str, n: int) -> str:
    return f"crash-{run}-{n}@clients.test"


def customer(n: int) -> str:
    return f"customer{n}@client{n % 97}.test"


def customer_mail(run: str, n: int) -> bytes:
    """One distinct customer mail: its own sender, subject and Message-ID; CRLF, dot-safe."""
    lines = [
        f"From: Customer {n} <{customer(n)}>",
        "To: support@example.com",
        f"Subject: Export {run}-{n} fails with a timeout",
        f"Message-ID: <{message_id(run, n)}>",
        "Date: Mon, 02 Mar 2026 09:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Hello,",
        f"the nightly export number {n} stops after ten minutes with a timeout.",
        "Could you have a look?",
        "",
        f"Customer {n}",
        "",
    ]
    return "\r\n".join(lines).encode()


# -- the client (its own process) ----------------------------------------------------------------


@dataclass
class ClientStats:
    accepted: int = 0
    temporary: Counter[int] = field(default_factory=Counter)  # 4xx replies by code
    permanent: Counter[int] = field(default_factory=Counter)  # 5xx replies by code
    connection_errors: int = 0
    resent: int = 0  # messages sent again after a connection error or a 4xx


async def client_session(
    port: int, run: str, numbers: list[int], out: Any, stats: ClientStats, deadline: float
) -> None:
    """Send `numbers` in order over one connection, reconnecting and retrying like an MTA."""
    import aiosmtplib

    smtp: aiosmtplib.SMTP | None = None
    loop = asyncio.get_running_loop()
    for n in numbers:
        data = customer_mail(run, n)
        tries = 0
        while loop.time() < deadline:
            tries += 1
            if tries > 1:
                stats.resent += 1
            try:
                if smtp is None:
                    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
                    await smtp.connect()
                _, reply = await smtp.sendmail(customer(n), ["support@example.com"], data)
                stats.accepted += 1
                out.write(f"{message_id(run, n)}\t{reply}\n")
                out.flush()
                break
            except aiosmtplib.SMTPResponseException as exc:
                code = exc.code
                if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
                    code = exc.recipients[0].code
                if 500 <= code < 600:
                    stats.permanent[code] += 1
                    out.write(f"{message_id(run, n)}\t!{code} {exc.message}\n")
                    out.flush()
                    break
                stats.temporary[code] += 1
                if code == 421 or not smtp or not smtp.is_connected:
                    smtp = None
                else:
                    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                        await smtp.rset()
                await asyncio.sleep(random.uniform(0.1, 0.3))
            except (aiosmtplib.SMTPException, OSError):
                stats.connection_errors += 1
                if smtp is not None:
                    smtp.close()
                smtp = None
                await asyncio.sleep(random.uniform(0.1, 0.3))
    if smtp is not None:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()


async def client_main(args: argparse.Namespace, out: Any) -> int:
    stats = ClientStats()
    per: list[list[int]] = [[] for _ in range(args.sessions)]
    for n in range(args.messages):
        per[n % args.sessions].append(n)
    deadline = asyncio.get_running_loop().time() + args.deadline
    await asyncio.gather(
        *(client_session(args.port, args.run, ns, out, stats, deadline) for ns in per)
    )
    print(
        json.dumps(
            {
                "accepted": stats.accepted,
                "temporary": dict(stats.temporary),
                "permanent": dict(stats.permanent),
                "connection_errors": stats.connection_errors,
                "resent": stats.resent,
            }
        ),
        flush=True,
    )
    return 0


# -- the smarthost sink --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sunk:
    recipient: str
    message_id: str
    in_reply_to: str
    auto_submitted: str


class Sink:
    """An aiosmtpd smarthost in this process that records every message it accepts."""

    def __init__(self) -> None:
        self.received: list[Sunk] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = HEADERS.parsebytes(envelope.original_content or b"", headersonly=True)
        for rcpt in envelope.rcpt_tos:
            self.received.append(
                Sunk(
                    recipient=rcpt.lower(),
                    message_id=str(headers.get("Message-ID", "")).strip().strip("<>"),
                    in_reply_to=str(headers.get("In-Reply-To", "")).strip().strip("<>"),
                    auto_submitted=str(headers.get("Auto-Submitted", "")),
                )
            )
        return "250 2.0.0 OK"

    async def start(self) -> None:
        from aiosmtpd.smtp import SMTP

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(self, hostname="sink.test", decode_data=False), "127.0.0.1", 0
        )
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


# -- the gateway under test ----------------------------------------------------------------------


class Gateway:
    """`supportgate serve` in its own process group, killed and restarted on demand."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.start_seconds: list[float] = []

    async def start(self, limit: float = 60) -> None:
        began = time.monotonic()
        with self.log.open("ab") as log:
            log.write(f"\n==== start {self.starts + 1} ====\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "gateway.cli", "--config", str(self.config), "serve"],
                env=ENV,
                cwd=ROOT,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.starts += 1
        while time.monotonic() - began < limit:
            if self.proc.returncode is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: see {self.log}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self.start_seconds.append(time.monotonic() - began)
            return
        raise RuntimeError(f"serve did not listen within {limit} s: see {self.log}")

    async def kill(self) -> None:
        """SIGKILL the whole process group: the gateway and its parser worker die at once."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, limit: float = 60) -> int:
        """SIGTERM and wait: the clean stop's exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), limit)
        except TimeoutError:
            await self.kill()
            return -9


# -- reading the database ------------------------------------------------------------------------


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60)
    conn.execute("PRAGMA busy_timeout=60000")
    return conn


def pending(db: Path) -> tuple[int, int]:
    """(received mail not yet processed, outbound mail not yet sent)."""
    with contextlib.closing(connect(db)) as conn:
        backlog = conn.execute("SELECT count(*) FROM raw_mail WHERE state='received'").fetchone()
        outbox = conn.execute(
            "SELECT count(*) FROM delivery WHERE status IN ('queued','deferred')"
        ).fetchone()
    return int(backlog[0]) + unmoved(db), int(outbox[0])


def release_stale_claims(db: Path) -> tuple[int, int]:
    """Clear claims left by killed processes (run only while no gateway runs)."""
    with contextlib.closing(connect(db)) as conn, conn:
        raw = conn.execute(
            "UPDATE raw_mail SET claimed_until=NULL "
            "WHERE state='received' AND claimed_until IS NOT NULL"
        ).rowcount
        out = conn.execute(
            "UPDATE delivery SET claimed_until=NULL "
            "WHERE status IN ('queued','deferred') AND claimed_until IS NOT NULL"
        ).rowcount
    return int(raw), int(out)


async def wait_drained(db: Path, sink: Sink, *, stall: float, limit: float) -> bool:
    """Wait until backlog and outbox are empty and the sink is quiet; False on a stall."""
    began = time.monotonic()
    last: tuple[int, int, int] | None = None
    changed = time.monotonic()
    while time.monotonic() - began < limit:
        now = (*pending(db), len(sink.received))
        if now[:2] == (0, 0) and last == now:
            return True
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed > stall:
            return False
        await asyncio.sleep(0.5)
    return False


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def figure(self, label: str, value: object) -> None:
        self.lines.append(f"  {label:<58} {value}")

    def check(self, label: str, ok: bool, detail: str = "") -> None:
        self.lines.append(f"  {'PASS' if ok else 'FAIL'}  {label}{': ' + detail if detail else ''}")
        if not ok:
            self.failures.append(label)


def read_acks(path: Path) -> tuple[dict[str, str], list[str]]:
    """Message-IDs the client got a 250 for (with the reply), and those that got a 5xx."""
    accepted: dict[str, str] = {}
    refused: list[str] = []
    if path.exists():
        for line in path.read_text().splitlines():
            mid, _, reply = line.partition("\t")
            if reply.startswith("!"):
                refused.append(mid)
            else:
                accepted[mid] = reply
    return accepted, refused


def verify(
    db: Path, sink: Sink, *, run: str, messages: int, acks_file: Path, report: Report
) -> None:
    accepted, refused = read_acks(acks_file)
    ours = {message_id(run, n) for n in range(messages)}
    with contextlib.closing(connect(db)) as conn:
        inbound = conn.execute(
            "SELECT message_id, ticket_id FROM message WHERE direction='in'"
        ).fetchall()
        quarantined = {
            r[0] for r in conn.execute("SELECT message_id FROM raw_mail WHERE state='quarantined'")
        }
        raw_copies = Counter(r[0] for r in conn.execute("SELECT message_id FROM raw_mail"))
        raw_states = Counter(r[0] for r in conn.execute("SELECT state FROM raw_mail"))
        tickets = {r[0]: r[1] for r in conn.execute("SELECT id, ref FROM ticket")}  # id -> ref
        delivery_status = Counter(r[0] for r in conn.execute("SELECT status FROM delivery"))
        ack_rows = conn.execute(
            "SELECT ticket_id, message_id, recipient FROM delivery WHERE kind='acknowledgement'"
        ).fetchall()
        stale = conn.execute("SELECT count(*) FROM raw_mail WHERE state='received'").fetchone()[0]

    on_ticket: defaultdict[str, set[int]] = defaultdict(set)
    per_ticket: Counter[int] = Counter()
    for mid, ticket_id in inbound:
        on_ticket[mid].add(ticket_id)
        per_ticket[ticket_id] += 1
    copies = Counter(mid for mid, _ in inbound)

    report.figure("messages sent by the client", messages)
    report.figure("250s recorded by the client", len(accepted))
    report.figure("5xx seen by the client", len(refused))
    report.figure("raw_mail rows (one per stored copy)", sum(raw_copies.values()))
    report.figure(
        "messages stored twice (retried after a kill), deduplicated",
        sum(1 for mid, c in raw_copies.items() if c > 1 and mid in ours),
    )
    report.figure("raw_mail by state", dict(sorted(raw_states.items())))
    report.figure("tickets", len(tickets))
    report.figure("deliveries by status", dict(sorted(delivery_status.items())))

    report.check("every message was accepted (250) in the end", len(accepted) == messages)
    report.check("no 5xx for a well-formed message", not refused, ", ".join(refused[:5]))
    lost = sorted(set(accepted) - set(on_ticket) - quarantined)
    report.check(
        "every 250 is on a ticket or in quarantine",
        not lost,
        f"{len(lost)} lost, e.g. {lost[:5]}" if lost else f"{len(accepted)} found",
    )
    report.check("nothing left unprocessed (backlog)", stale == 0, f"{stale} in state received")
    twice = sorted(mid for mid, ids in on_ticket.items() if len(ids) > 1 or copies[mid] > 1)
    report.check("no message stored twice on tickets", not twice, ", ".join(twice[:5]))
    crowded = [tickets[t] for t, c in per_ticket.items() if c > 1]
    report.check("no ticket holds two of our mails", not crowded, ", ".join(crowded[:5]))
    report.check(
        "one ticket per distinct customer mail",
        len(tickets) == len(set(on_ticket) & ours) == len(accepted),
        f"{len(tickets)} tickets for {len(accepted)} accepted mails",
    )
    unsent = delivery_status["queued"] + delivery_status["deferred"]
    report.check("the outbox is empty", unsent == 0, f"{unsent} queued or deferred")
    report.check("no delivery failed", delivery_status["failed"] == 0)

    # What reached the smarthost, grouped by the ticket the outbound Message-ID names.
    ack_ids = {mid: (tid, rcpt) for tid, mid, rcpt in ack_rows}
    acks: defaultdict[int, list[str]] = defaultdict(list)
    notes: defaultdict[str, list[str]] = defaultdict(list)
    strays = 0
    for got in sink.received:
        if got.message_id in ack_ids:
            tid, rcpt = ack_ids[got.message_id]
            if rcpt != got.recipient:
                strays += 1
            acks[tid].append(got.message_id)
        elif got.recipient == TEAM:
            notes[got.in_reply_to].append(got.message_id)
        else:
            strays += 1
    sent_twice = sum(1 for mids in acks.values() if len(mids) == 2)
    report.figure("messages received by the smarthost sink", len(sink.received))
    report.figure("acknowledgements received by the sink", sum(len(m) for m in acks.values()))
    report.figure("acknowledgements received twice (same Message-ID)", sent_twice)
    report.figure(
        "team notifications received twice", sum(1 for m in notes.values() if len(m) == 2)
    )
    report.check("every ticket's acknowledgement reached the sink", len(acks) == len(tickets))
    over = [tickets[t] for t, mids in acks.items() if len(mids) > 2 or len(set(mids)) != 1]
    report.check(
        "each acknowledgement sent at most twice, with one Message-ID",
        not over,
        ", ".join(over[:5]),
    )
    over_notes = [m for m, mids in notes.items() if len(mids) > 2 or len(set(mids)) != 1]
    report.check(
        "each team notification sent at most twice, with one Message-ID",
        not over_notes and len(notes) == len(tickets),
        f"{len(notes)} notified, {len(over_notes)} over",
    )
    report.check("nothing unexpected reached the sink", strays == 0, f"{strays} strays")


async def progressed(client: asyncio.subprocess.Process, acks_file: Path, mark: int) -> bool:
    """Wait until the client has `mark` 250s; False if it finished short of them.

    The count comes first: a client that reached the mark and finished between two looks
    still gets its kill, which then lands while the backlog is processed."""
    while True:
        if len(read_acks(acks_file)[0]) >= mark:
            return True
        if client.returncode is not None:
            return False
        await asyncio.sleep(0.05)


async def main_run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    run = f"{args.seed}"
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sg-crash-"))
    folder.mkdir(parents=True, exist_ok=True)
    sink = Sink()
    await sink.start()
    port = free_port()
    config = write_config(folder, port=port, smarthost=f"127.0.0.1:{sink.port}")
    upgraded = cli(config, "db", "upgrade")
    if upgraded.returncode != 0:
        print(upgraded.stderr, file=sys.stderr)
        return 2
    db = folder / "var" / "supportgate.db"
    acks_file = folder / "acks.tsv"
    gateway = Gateway(config, port, folder / "serve.log")
    report = Report()
    started = time.monotonic()
    print(
        f"crash safety: {args.messages} messages over {args.sessions} sessions, "
        f"{args.kills} kills (SIGKILL), seed {args.seed}, in {folder}",
        flush=True,
    )

    await gateway.start()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "client",
        "--port",
        str(port),
        "--run",
        run,
        "--messages",
        str(args.messages),
        "--sessions",
        str(args.sessions),
        "--out",
        str(acks_file),
        "--deadline",
        str(args.deadline),
        stdout=asyncio.subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    low, high = int(args.messages * 0.05), max(int(args.messages * 0.95), 1)
    marks = sorted(rng.randint(low, high) for _ in range(args.kills))
    kills = 0
    down: list[float] = []
    for mark in marks:
        if not await progressed(client, acks_file, mark):
            break
        await asyncio.sleep(rng.uniform(0.0, 0.5))  # a random moment, not a round number
        killed_at = time.monotonic()
        await gateway.kill()
        kills += 1
        await asyncio.sleep(rng.uniform(0.1, 1.0))  # clients meet refused connections
        await gateway.start()
        down.append(time.monotonic() - killed_at)
        print(f"  kill {kills}: after {mark} 250s, back after {down[-1]:.1f} s", flush=True)
    out, _ = await client.communicate()
    client_stats = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
    load_seconds = time.monotonic() - started

    # The last restart, then let it finish the work.
    status = await gateway.stop()
    stranded = release_stale_claims(db)
    await gateway.start()
    drained = await wait_drained(db, sink, stall=20, limit=args.deadline)
    stopped = await gateway.stop()
    fallback = ""
    if not drained:
        # Whatever the daemon did not finish, the one-shot commands must.
        fallback = cli(config, "process").stdout.strip()
        fallback += " / " + cli(config, "outbox", "flush").stdout.strip()
    await sink.stop()

    report.figure("kills (SIGKILL of serve and its parser worker)", kills)
    report.figure(
        "restart to listening, median / max (s)",
        f"{sorted(gateway.start_seconds)[len(gateway.start_seconds) // 2]:.2f} / "
        f"{max(gateway.start_seconds):.2f}",
    )
    report.figure("client: connection errors / 4xx / resent", _client_line(client_stats))
    report.figure("load phase (s)", f"{load_seconds:.1f}")
    report.figure(
        "claims stranded by kills and clean stop (raw_mail, delivery)",
        f"{stranded[0]}, {stranded[1]} (released by hand before the last start)",
    )
    report.figure("clean stops: exit status", f"{status}, {stopped}")
    report.figure("drained by the restarted daemon", "yes" if drained else f"no: {fallback}")
    verify(db, sink, run=run, messages=args.messages, acks_file=acks_file, report=report)
    report.check("the clean stops exited 0", status == 0 and stopped == 0, f"{status}, {stopped}")
    report.check("kills made", kills >= args.kills, f"{kills} of {args.kills}")
    report.figure("total time (s)", f"{time.monotonic() - started:.1f}")
    print("\n".join(report.lines))
    if report.failures:
        print(f"FAIL: {len(report.failures)} check(s) failed; files kept in {folder}")
        return 1
    print("PASS")
    return 0


def _client_line(stats: dict[str, Any]) -> str:
    temporary = sum(stats.get("temporary", {}).values())
    return f"{stats.get('connection_errors', '?')} / {temporary} / {stats.get('resent', '?')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    client = sub.add_parser("client", help="(internal) the SMTP client process")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--run", required=True)
    client.add_argument("--messages", type=int, required=True)
    client.add_argument("--sessions", type=int, required=True)
    client.add_argument("--out", required=True)
    client.add_argument("--deadline", type=float, required=True)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1,000 messages, 3 kills")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--keep", help="run in this folder and keep it")
    parser.add_argument("--deadline", type=float, default=0, help="seconds for each phase")
    args = parser.parse_args()
    if args.mode == "client":
        with open(args.out, "a", buffering=1) as out:
            return asyncio.run(client_main(args, out))
    if args.quick:
        args.messages, args.kills = 1_000, 3
    if args.kills < 1 or args.messages < 20:
        parser.error("--kills must be at least 1 and --messages at least 20")
    args.deadline = args.deadline or (180 if args.quick else 1800)
    return asyncio.run(main_run(args))


if __name__ == "__main__":
    sys.exit(main())
