"""Intake and processing throughput of `supportgate`, against a do-nothing aiosmtpd in the same run.

    .venv/bin/python bench/ingest.py [--messages 10000] [--sessions 20] [--quick] [--profile DIR]

Three servers get the same generated mail from the same client (its own process, one reused
connection per session):

1. noop   aiosmtpd with our SMTP options (hostname=, sizes, SMTPUTF8), answering 250 at once;
2. serve  `supportgate serve` as shipped (SQLite, default parse_workers): accept rate with the
          pipeline and outbox competing for the two cores, and the pipeline rate from the first
          stored message until none is left in state "received";
3. spool  our listener + group-commit spool only (no pipeline): the accept path alone; then its
          backlog is timed through `supportgate process`.

After each run of ours, the raw_mail row count must equal the number of 250s the client saw.
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ENV,
    ClientResult,
    Server,
    cli,
    client_in_process,
    connect_ro,
    free_port,
    machine_busy_seconds,
    pct,
    sqlite_time,
    unmoved,
    upgrade,
    verdict,
    write_config,
)

ACCEPT_TARGET = 0.7  # of the no-op rate
PROCESS_TARGET = 400.0  # msgs/s
CORES = os.cpu_count() or 1


def load(port: int, args: argparse.Namespace) -> ClientResult:
    return client_in_process(
        host="127.0.0.1", port=port, messages=args.messages, sessions=args.sessions, seed=args.seed
    )


def describe(name: str, result: ClientResult) -> str:
    lat = result.latencies
    refused = f", refused {result.refused}" if result.refused else ""
    return (
        f"{name:<6} accepted {result.accepted:>6} in {result.finished - result.started:6.2f} s = "
        f"{result.rate:7.0f} msg/s   time to 250 p50 {pct(lat, 50) * 1e3:6.2f} ms "
        f"p99 {pct(lat, 99) * 1e3:7.2f} ms{refused}"
    )


def stored_rows(db: Path) -> int:
    """Every message stored: in raw_mail, or still in the intake file beside it."""
    with connect_ro(db) as conn:
        return int(conn.execute("SELECT count(*) FROM raw_mail").fetchone()[0]) + unmoved(db)


def states(db: Path) -> dict[str, int]:
    with connect_ro(db) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM raw_mail GROUP BY state").fetchall())


def wait_processed(db: Path, expected: int, *, timeout: float) -> tuple[float, dict[str, int]]:
    """Seconds from the first stored message to the last one leaving "received"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = states(db)
        if sum(counts.values()) >= expected and counts.get("received", 0) == 0:
            break
        time.sleep(0.5)
    with connect_ro(db) as conn:
        first, last = conn.execute(
            "SELECT min(received_at), max(processed_at) FROM raw_mail WHERE state != 'received'"
        ).fetchone()
    return sqlite_time(last) - sqlite_time(first), states(db)


def top(profile: Path, *, limit: int = 25) -> None:
    print(f"\n--- {profile.name}: top {limit} by own time (tottime) ---")
    stats = pstats.Stats(str(profile))
    stats.sort_stats("tottime").print_stats(limit)
    print(f"--- {profile.name}: top {limit} by cumulative time ---")
    stats.sort_stats("cumulative").print_stats(limit)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1,000 messages")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="run our servers under cProfile, into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    if args.quick:
        args.messages = 1_000
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        print("NOTE: cProfile roughly halves our rates; read the profiles, not the figures.")

    def prof(name: str) -> Path | None:
        return args.profile / f"{name}.prof" if args.profile else None

    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-ingest-"))
    print(f"{args.messages} messages over {args.sessions} sessions; work folder {tmp}")
    ok = True

    # 1. the do-nothing baseline
    port = free_port()
    cfg = write_config(tmp / "noop", port=port)
    server = Server.start(
        [sys.executable, "bench/servers.py", "noop", "--config", str(cfg)],
        log=tmp / "noop.log",
        ready="ready",
    )
    cpu = server.cpu_seconds()
    noop = load(port, args)
    noop_cpu = (server.cpu_seconds() - cpu) / max(noop.accepted, 1)
    server.stop()
    print(describe("noop", noop))

    # 2. `supportgate serve`: intake with the pipeline running behind it
    port = free_port()
    cfg = write_config(tmp / "serve", port=port)
    db = upgrade(cfg)
    server = Server.start(
        cli(cfg, "serve", profile=prof("serve")), log=tmp / "serve.log", ready="listening on"
    )
    cpu, tree_cpu, busy = server.cpu_seconds(), server.tree_cpu_seconds(), machine_busy_seconds()
    served = load(port, args)
    serve_cpu = (server.cpu_seconds() - cpu) / max(served.accepted, 1)
    print(describe("serve", served))
    took, counts = wait_processed(db, served.accepted, timeout=max(300.0, args.messages / 20))
    serve_all_cpu = (server.tree_cpu_seconds() - tree_cpu) / max(served.accepted, 1)
    serve_busy = (machine_busy_seconds() - busy) / max(served.accepted, 1)
    server.stop()
    serve_rows = stored_rows(db)
    pipeline_rate = sum(v for k, v in counts.items() if k != "received") / max(took, 1e-9)
    print(
        f"       pipeline in serve: {pipeline_rate:.0f} msg/s ({took:.1f} s, states {counts}); "
        f"CPU a message: serve's processes {serve_all_cpu * 1e3:.2f} ms, "
        f"the whole machine {serve_busy * 1e3:.2f} ms"
    )

    # 3. listener + spool only, then `supportgate process` on the stored backlog
    port = free_port()
    cfg = write_config(tmp / "spool", port=port)
    db = upgrade(cfg)
    cmd = [sys.executable, "bench/servers.py", "spool", "--config", str(cfg)]
    if args.profile:
        cmd += ["--profile", str(prof("spool"))]
    server = Server.start(cmd, log=tmp / "spool.log", ready="ready")
    cpu = server.cpu_seconds()
    spooled = load(port, args)
    spool_cpu = (server.cpu_seconds() - cpu) / max(spooled.accepted, 1)
    server.stop()
    spool_rows = stored_rows(db)
    print(describe("spool", spooled))
    began = time.perf_counter()
    done = subprocess.run(
        cli(cfg, "process", profile=prof("process")), env=ENV, capture_output=True
    )
    process_wall = time.perf_counter() - began
    began = time.perf_counter()
    subprocess.run(cli(cfg, "process"), env=ENV, capture_output=True)  # nothing left: start-up cost
    startup = time.perf_counter() - began
    process_counts = states(db)
    processed = sum(v for k, v in process_counts.items() if k != "received")
    process_rate = processed / max(process_wall - startup, 1e-9)
    print(
        f"       `supportgate process`: {processed} in {process_wall:.1f} s wall "
        f"(start-up {startup:.1f} s) = {process_rate:.0f} msg/s; {done.stdout.decode().strip()}"
    )

    # verdicts
    print("\n== summary (ratios and medians; absolute rates drift with machine load) ==")
    for name, result, rows in (("serve", served, serve_rows), ("spool", spooled, spool_rows)):
        ratio = result.rate / noop.rate
        durable = rows == result.accepted
        ok &= durable
        print(
            f"accept {name:<5} {result.rate:7.0f} msg/s = {ratio:.2f}× no-op ({noop.rate:.0f})"
            f"   target ≥ {ACCEPT_TARGET}×: {verdict(ratio >= ACCEPT_TARGET and durable)}"
            f"   durable: {rows} rows for {result.accepted} 250s {verdict(durable)}"
        )
        print(
            f"time to 250 {name:<5} p50 {pct(result.latencies, 50) * 1e3:.2f} ms "
            f"(no-op {pct(noop.latencies, 50) * 1e3:.2f}), "
            f"p99 {pct(result.latencies, 99) * 1e3:.2f} ms "
            f"(no-op {pct(noop.latencies, 99) * 1e3:.2f})"
        )
    print(
        f"server CPU per accepted message while accepting (the load-independent figure): "
        f"no-op {noop_cpu * 1e6:.0f} µs, spool {spool_cpu * 1e6:.0f} µs "
        f"({spool_cpu / noop_cpu:.2f}×), serve {serve_cpu * 1e6:.0f} µs (pipeline included)"
    )
    print(
        f"CPU a message in serve, from the load until all are processed: serve's processes "
        f"{serve_all_cpu * 1e3:.2f} ms; the whole machine (the load client and the kernel's "
        f"threads too) {serve_busy * 1e3:.2f} ms, so {CORES} cores allow at most "
        f"{CORES / serve_busy:.0f} msg/s"
    )
    print(
        f"processing in serve        {pipeline_rate:7.0f} msg/s   target ≥ {PROCESS_TARGET:.0f}: "
        f"{verdict(pipeline_rate >= PROCESS_TARGET)}"
    )
    print(
        f"processing alone (process) {process_rate:7.0f} msg/s   target ≥ {PROCESS_TARGET:.0f}: "
        f"{verdict(process_rate >= PROCESS_TARGET)}"
    )
    if args.profile:
        for name in ("spool", "serve", "process"):
            path = prof(name)
            if path and path.exists():
                top(path)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
