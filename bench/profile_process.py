"""Where processing time goes: SQL statements by total time, and cProfile of the event loop.

    .venv/bin/python bench/profile_process.py [--messages 500] [--no-cprofile]

Stores a generated backlog straight into a fresh SQLite database (no SMTP), then runs
`process_pending` in this process with the shipped config, timing every SQL statement
(before/after cursor execute: the wait includes aiosqlite's thread hop) and every commit.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mailgen
from common import SECRET, free_port, upgrade, write_config
from sqlalchemy import event

from gateway import db as gateway_db
from gateway.app import build_app
from gateway.config import load
from gateway.pipeline import process_pending
from gateway.spool import insert_raw, raw_row


def _instrument() -> dict[str, list[float]]:
    """Wrap the pipeline steps and the notice helpers to add up their CPU time."""
    import functools
    import inspect

    from gateway import notices, pipeline

    spent: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def wrap(name: str, fn: Any, clock: Any = time.thread_time) -> Any:
        """`fn` adding up its time by `clock`: the thread's CPU, or perf_counter for wall."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*a: Any, **kw: Any) -> Any:
                t = clock()
                try:
                    return await fn(*a, **kw)
                finally:
                    spent[name][0] += 1
                    spent[name][1] += clock() - t

            return awrapper

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = clock()
            try:
                return fn(*a, **kw)
            finally:
                spent[name][0] += 1
                spent[name][1] += clock() - t

        return wrapper

    pipeline.STEPS = tuple((n, wrap(f"step {n}", f)) for n, f in pipeline.STEPS)
    notices.compose = wrap("  compose", notices.compose)
    pipeline.process_group = wrap("process_group (wall)", pipeline.process_group, time.perf_counter)
    notices.automatic_gate = wrap("  automatic_gate", notices.automatic_gate)
    notices.enqueue = wrap("  outbox.enqueue", notices.enqueue)
    pipeline.process_one = wrap("process_one (all)", pipeline.process_one)
    pipeline._claim = wrap("_claim", pipeline._claim)
    return spent


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-profile-"))
    cfg = write_config(tmp, port=free_port())
    upgrade(cfg)
    config = load(cfg, env={"SUPPORTGATE_SECRET": SECRET})
    app = build_app(config, parse_workers=args.parse_workers)
    mails = mailgen.generate(args.messages, seed=args.seed)
    async with app.sessions() as session, session.begin():
        await insert_raw(
            session,
            [
                raw_row(
                    m.data, mail_from=m.mail_from, rcpt_tos=[m.rcpt], source="smtp", now=app.clock()
                )
                for m in mails
            ],
        )
    sql: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    started: dict[int, float] = {}

    @event.listens_for(app.engine.sync_engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        started[id(cursor)] = time.perf_counter()

    @event.listens_for(app.engine.sync_engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        entry = sql[" ".join(statement.split())[:150]]
        entry[0] += 1
        entry[1] += time.perf_counter() - started.pop(id(cursor), time.perf_counter())

    # Statements that `gateway.db` runs on SQLite's own cursor skip SQLAlchemy's events.
    raw_run = gateway_db._Raw.run

    async def timed_run(self: Any, inline: Any, rows: Any) -> Any:
        began = time.perf_counter()
        try:
            return await raw_run(self, inline, rows)
        finally:
            entry = sql["(sqlite3) " + " ".join(self.sql.split())[:140]]
            entry[0] += 1
            entry[1] += time.perf_counter() - began

    gateway_db._Raw.run = timed_run  # type: ignore[method-assign]

    commits = [0, 0.0]
    commit_started: list[float] = [0.0]

    @event.listens_for(app.engine.sync_engine, "commit")
    def _commit(conn: Any) -> None:
        commits[0] += 1
        commit_started[0] = time.perf_counter()

    spent = _instrument()
    # Warm the parser pool so its start-up is not counted.
    await app.parser.parse(mails[0].data)
    profiler = cProfile.Profile(time.thread_time) if args.cprofile else None  # CPU, not waits
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    cpu = time.process_time()
    main_cpu = time.thread_time()
    began = time.perf_counter()
    if profiler:
        profiler.enable()
    counts = await process_pending(app)
    if profiler:
        profiler.disable()
    took = time.perf_counter() - began
    cpu = time.process_time() - cpu
    main_cpu = time.thread_time() - main_cpu
    print(
        f"{sum(counts.values())} messages in {took:.2f} s = {sum(counts.values()) / took:.0f} "
        f"msg/s ({took / len(mails) * 1e3:.1f} ms each); {counts}; {commits[0]} commits"
    )
    print(
        f"CPU of this process {cpu:.2f} s ({cpu / took:.0%} of wall), of the event-loop thread "
        f"{main_cpu:.2f} s; parsing runs in the pool's own process"
    )
    print("CPU by stage (thread time, unprofiled when --no-cprofile; steps run one at a time):")
    for name, (n, secs) in sorted(spent.items(), key=lambda kv: -kv[1][1]):
        print(
            f"  {name:<28} {n:6d} calls {secs:7.2f} s  {secs / n * 1e3:7.2f} ms/call  "
            f"{secs / len(mails) * 1e3:6.2f} ms/message"
        )
    total_sql = sum(v[1] for v in sql.values())
    print(
        f"SQL wait (incl. thread hop) {total_sql:.2f} s = {total_sql / took:.0%} of wall; "
        f"{sum(v[0] for v in sql.values())} statements "
        f"({sum(v[0] for v in sql.values()) / len(mails):.1f} per message)"
    )
    print("\n  calls   total s  per call ms  statement")
    for text, (n, secs) in sorted(sql.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{n:7d} {secs:9.3f} {secs / n * 1e3:11.3f}  {text}")
    if profiler:
        if args.dump:
            profiler.dump_stats(str(args.dump))
        print()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top * 2)
    await app.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dump", type=Path, help="write the cProfile stats here")
    parser.add_argument("--switch-interval", type=float, default=0.0)
    parser.add_argument(
        "--parse-workers", type=int, default=None, help="default: the shipped config's"
    )
    parser.add_argument("--no-cprofile", dest="cprofile", action="store_false")
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
