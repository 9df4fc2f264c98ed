"""Outbound: new ticket → acknowledgement accepted by the relay, and outbox throughput.

    .venv/bin/python bench/outbound.py [--seconds 20] [--rate 100] [--deliveries 2000] [--profile]

The relay is tests/smtp_sink.py's SmtpSink in its own process, noting when each mail arrived.

1. latency  `supportgate serve` (subprocess, shipped config, `[outbound] smarthost` = the sink)
            gets new customer mail at a steady `--rate` per second for `--seconds`; for every
            ticket, the sink's arrival time of its acknowledgement minus the ticket's created_at
            (set when its processing starts, a little before the commit: a slight overstatement).
2. throughput  `--deliveries` rows queued at once in a fresh database, then OutboxWorker.flush()
            in this process, beside a plain aiosmtplib loop over the same number of persistent
            connections (`[outbound] pool_size`) sending the same prebuilt bytes to the same sink.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import pstats
import re
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    ROOT,
    SECRET,
    Server,
    cli,
    client_in_process,
    connect_ro,
    free_port,
    pct,
    sqlite_time,
    upgrade,
    verdict,
    write_config,
)

if TYPE_CHECKING:
    from gateway.app import App

# -- the sink, in its own process ------------------------------------------------------------


_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.I | re.M)


def _message_id(data: bytes) -> str:
    found = _MESSAGE_ID.search(data)
    return found.group(1).decode("ascii", "replace") if found else ""


class _Arrivals(list):  # type: ignore[type-arg]
    """SmtpSink.messages that also notes when each message arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: object) -> None:
        self.times.append(time.time())
        super().append(item)


def _sink_main(port: int, control: Connection) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from smtp_sink import SmtpSink

    async def main() -> None:
        sink = SmtpSink()
        sink.messages = _Arrivals()
        await sink.start(port=port)
        control.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, control.recv)
            arrivals = sink.messages
            if command == "count":
                control.send(len(arrivals))
            elif command == "dump":
                control.send(
                    [
                        (t, _message_id(m.data))
                        for t, m in zip(arrivals.times, arrivals, strict=True)
                    ]
                )
            elif command == "reset":
                sink.messages = _Arrivals()
                control.send("ok")
            elif command == "stop":
                await sink.stop()
                control.send("ok")
                return

    asyncio.run(main())


class SinkProcess:
    def __init__(self) -> None:
        self.port = free_port()
        ctx = multiprocessing.get_context("spawn")
        self.control, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_sink_main, args=(self.port, theirs), daemon=True)
        self.proc.start()
        assert self.control.recv() == "ready"

    def ask(self, command: str) -> object:
        self.control.send(command)
        return self.control.recv()

    def stop(self) -> None:
        self.ask("stop")
        self.proc.join(10)


# -- 1. latency under a steady load ------------------------------------------------------------


def latency(args: argparse.Namespace, sink: SinkProcess, tmp: Path) -> None:
    port = free_port()
    cfg = write_config(tmp / "serve", port=port, smarthost=f"127.0.0.1:{sink.port}")
    db = upgrade(cfg)
    server = Server.start(cli(cfg, "serve"), log=tmp / "serve.log", ready="listening on")
    wanted = int(args.seconds * args.rate)
    result = client_in_process(
        host="127.0.0.1",
        port=port,
        messages=int(wanted / 0.65) + 100,
        sessions=args.sessions,
        seed=args.seed,
        kinds=("new", "html", "attachment"),
        rate=args.rate,
        limit=wanted,
    )
    sent_for = result.finished - result.started
    print(
        f"load: {result.accepted} new customer mails in {sent_for:.1f} s "
        f"({result.accepted / sent_for:.0f}/s offered at {args.rate:.0f}/s), "
        f"refused {result.refused}"
    )
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline:
        with connect_ro(db) as conn:
            waiting = conn.execute(
                "SELECT (SELECT count(*) FROM raw_mail WHERE state = 'received'), "
                "(SELECT count(*) FROM delivery WHERE status IN ('queued', 'deferred')), "
                "(SELECT count(*) FROM raw_mail)"
            ).fetchone()
        if waiting[0] == 0 and waiting[1] == 0 and waiting[2] >= result.accepted:
            break
        time.sleep(0.5)
    else:
        print(
            f"  not drained after {args.drain:.0f} s: {waiting[0]} unprocessed, {waiting[1]} unsent"
        )
    server.stop()
    arrivals: dict[str, float] = {}
    for at, message_id in sink.ask("dump"):  # type: ignore[union-attr]
        arrivals.setdefault(message_id, at)
    with connect_ro(db) as conn:
        rows = conn.execute(
            "SELECT t.created_at, d.message_id, d.created_at, d.sent_at, r.received_at "
            "FROM delivery d JOIN ticket t ON t.id = d.ticket_id "
            "JOIN message m ON m.ticket_id = t.id AND m.direction = 'in' "
            "JOIN raw_mail r ON r.id = m.raw_id "
            "WHERE d.kind = 'acknowledgement' AND d.status = 'sent' GROUP BY d.id"
        ).fetchall()
        kinds = dict(conn.execute("SELECT kind, count(*) FROM delivery GROUP BY kind").fetchall())
        tickets = conn.execute("SELECT count(*) FROM ticket").fetchone()[0]
        first, last = conn.execute(
            "SELECT min(received_at), max(processed_at) FROM raw_mail"
        ).fetchone()
    commit_to_sink, stored_to_sink, queue_wait = [], [], []
    for created, message_id, _queued, _sent, received in rows:
        at = arrivals.get(message_id.strip("<>"))
        if at is None:
            continue
        commit_to_sink.append(at - sqlite_time(created))
        stored_to_sink.append(at - sqlite_time(received))
        queue_wait.append(sqlite_time(created) - sqlite_time(received))
    processing = result.accepted / max(sqlite_time(last) - sqlite_time(first), 1e-9)
    print(
        f"  {tickets} tickets, deliveries by kind {kinds}; pipeline kept up at {processing:.0f}/s"
    )
    print(
        f"  ticket commit → ack at sink ({len(commit_to_sink)} acks): "
        f"p50 {pct(commit_to_sink, 50) * 1e3:.0f} ms  p99 {pct(commit_to_sink, 99) * 1e3:.0f} ms"
    )
    print(
        f"  for reference, 250 (stored) → ticket work starts: "
        f"p50 {pct(queue_wait, 50) * 1e3:.0f} ms"
        f"  p99 {pct(queue_wait, 99) * 1e3:.0f} ms;  250 → ack at sink: "
        f"p50 {pct(stored_to_sink, 50) * 1e3:.0f} ms  p99 {pct(stored_to_sink, 99) * 1e3:.0f} ms"
    )
    kept_up = processing >= args.rate * 0.95
    print(f"  pipeline sustains {args.rate:.0f} new tickets/s: {verdict(kept_up)}")


# -- 2. outbox throughput beside plain aiosmtplib ------------------------------------------------


async def _outbox(args: argparse.Namespace, sink: SinkProcess, tmp: Path) -> None:
    import aiosmtplib

    data = _sample_ack()
    n = args.deliveries
    app = await _queued(tmp / "outbox", f"127.0.0.1:{sink.port}", data, n)
    size = app.config.outbound.pool_size
    print(f"{n} queued deliveries of {len(data)} bytes, pool_size {size}")

    # plain aiosmtplib: `size` persistent connections, the same bytes
    sink.ask("reset")
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port) for _ in range(size)]
    for c in clients:
        await c.connect()
    todo = iter(range(n))

    async def pump(client: aiosmtplib.SMTP) -> None:
        for i in todo:
            await client.sendmail("bounces@example.com", [f"customer{i}@customer.org"], data)

    began = time.perf_counter()
    await asyncio.gather(*(pump(c) for c in clients))
    plain = n / (time.perf_counter() - began)
    for c in clients:
        await c.quit()
    plain_seen = sink.ask("count")

    sink.ask("reset")
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    ours, cpu_ms = await _timed_flush(app, profiler)
    print(f"  plain aiosmtplib   {plain:6.0f} msg/s   ({plain_seen} at the sink)")
    print(
        f"  OutboxWorker.flush {ours:6.0f} msg/s   ({sink.ask('count')} at the sink) "
        f"= {ours / plain:.2f}× plain; event-loop CPU {cpu_ms:.2f} ms per delivery"
    )
    await _maildir(args, tmp, data)
    if profiler:
        print("\n--- OutboxWorker.flush, CPU profile ---")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


async def _maildir(args: argparse.Namespace, tmp: Path, data: bytes) -> None:
    """The embedded default (no smarthost): the same deliveries into the local Maildir,
    beside a baseline loop writing the same bytes one file at a time (write, fsync, rename,
    fsync of new/), as a sender without the outbox's records would."""
    app = await _queued(tmp / "maildir", "", data, args.deliveries)
    plain = _plain_maildir(tmp / "plain-maildir", data, args.deliveries)
    new = app.maildir / "new"
    ours, cpu_ms = await _timed_flush(app)
    print(f"  plain file writes  {plain:6.0f} msg/s   (Maildir, one fsync'd file at a time)")
    print(
        f"  OutboxWorker.flush {ours:6.0f} msg/s   ({len(list(new.iterdir()))} in the Maildir) "
        f"= {ours / plain:.2f}× plain; event-loop CPU {cpu_ms:.2f} ms per delivery"
    )


async def _queued(folder: Path, smarthost: str, data: bytes, n: int) -> App:
    """A gateway on a fresh database (`smarthost` "" for the Maildir) with `n` deliveries of
    `data` queued, each to its own recipient."""
    from gateway.app import build_app
    from gateway.config import load
    from gateway.outbox import enqueue

    cfg = write_config(folder, port=free_port(), smarthost=smarthost)
    upgrade(cfg)
    config = load(cfg, env={"SUPPORTGATE_SECRET": SECRET})
    app = build_app(config, parse_workers=0)
    async with app.sessions() as session, session.begin():
        for i in range(n):
            await enqueue(
                session,
                config,
                data=data,
                message_id=f"bench-{i}@example.com",
                recipients=[f"customer{i}@customer.org"],
                kind="acknowledgement",
                automatic=True,
                now=app.clock(),
            )
    return app


async def _timed_flush(app: App, profiler: cProfile.Profile | None = None) -> tuple[float, float]:
    """One OutboxWorker.flush of what `app` has queued, then the app closed: deliveries a
    second, and the event loop's CPU in ms per delivery."""
    from gateway.outbox import OutboxWorker

    worker = OutboxWorker(app)
    cpu = time.thread_time()
    began = time.perf_counter()
    if profiler:
        profiler.enable()
    attempts = await worker.flush()
    if profiler:
        profiler.disable()
    took = time.perf_counter() - began
    cpu = time.thread_time() - cpu
    await worker.close()
    await app.close()
    return attempts / took, cpu / max(attempts, 1) * 1e3


def _plain_maildir(folder: Path, data: bytes, n: int) -> float:
    """Messages a second, writing `data` as `n` Maildir files one at a time, each durable."""
    import os

    for sub in ("tmp", "new"):
        (folder / sub).mkdir(parents=True)
    began = time.perf_counter()
    for i in range(n):
        path = folder / "tmp" / f"m{i}"
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        path.rename(folder / "new" / f"m{i}")
        new = os.open(folder / "new", os.O_RDONLY)
        os.fsync(new)
        os.close(new)
    return n / (time.perf_counter() - began)


def _sample_ack() -> bytes:
    """An acknowledgement as the gateway composes one (~2 KB, text + HTML)."""
    from datetime import UTC, datetime

    from parsing.model import Address
    from responders.compose import compose
    from responders.render import Renderer

    notice = Renderer().render(
        "acknowledgement",
        {
            "ticket": {
                "ref": "SG-1",
                "subject": "Cannot log in",
                "status": "new",
                "priority": "normal",
                "queue": "support",
                "requester_name": "Jane Doe",
                "requester": "jane@customer.org",
                "assignee_name": "",
                "created_at": "2026-03-02 09:00 UTC",
                "url": "",
            },
            "mailbox": {"address": "support@example.com", "name": "Example Support"},
            "brand": "Example Support",
            "message": {"new_text": "I cannot log in.", "from_name": "Jane", "from": "j@c.org"},
            "agent": {"name": "", "email": ""},
            "extra": {},
        },
    )
    return compose(
        notice,
        from_addr=Address("support@example.com", "Example Support"),
        to=[Address("jane@customer.org", "Jane")],
        message_id="SG-1.bench@example.com",
        date=datetime.now(UTC),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=100.0, help="new tickets per second")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--drain", type=float, default=600.0, help="longest wait for the backlog")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="CPU profile of the outbox flush")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-outbound-"))
    print(f"work folder {tmp}")
    sink = SinkProcess()
    try:
        if not args.skip_latency:
            print(f"\n== commit → acknowledgement at the sink, {args.rate:.0f} tickets/s ==")
            latency(args, sink, tmp)
            sink.ask("reset")
        print("\n== outbox throughput ==")
        asyncio.run(_outbox(args, sink, tmp))
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
