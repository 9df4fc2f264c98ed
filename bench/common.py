"""What both benchmarks share: a temp config, server subprocesses, the SMTP load client, stats."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
EXAMPLE = ROOT / "gateway" / "config.example.toml"
PYTHON = sys.executable
SECRET = "bench-secret-" + "b" * 40
ENV = {**os.environ, "SUPPORTGATE_SECRET": SECRET, "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path, *, port: int, smarthost: str = "", extra: str = "") -> Path:
    """The example config as shipped (SQLite, default parse_workers), on our port."""
    text = EXAMPLE.read_text()
    text = text.replace('listen = ["127.0.0.1:2525"]', f'listen = ["127.0.0.1:{port}"]')
    text = text.replace('smarthost = ""', f'smarthost = "{smarthost}"')
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "supportgate.toml"
    path.write_text(text + "\n" + extra)
    return path


def upgrade(config_path: Path) -> Path:
    """`supportgate db upgrade` on a fresh config; returns the SQLite file."""
    subprocess.run(cli(config_path, "db", "upgrade"), env=ENV, check=True, capture_output=True)
    return config_path.parent / "var" / "supportgate.db"


def cli(config_path: Path, *args: str, profile: Path | None = None) -> list[str]:
    """argv running `supportgate ARGS`, under cProfile when asked."""
    inner = ["--config", str(config_path), *args]
    if profile is not None:
        return [PYTHON, str(BENCH / "servers.py"), "cli", "--profile", str(profile), "--", *inner]
    return [PYTHON, str(BENCH / "servers.py"), "cli", "--", *inner]


@dataclass
class Server:
    """A server subprocess that printed a line containing `ready` on stdout."""

    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, argv: list[str], *, log: Path, ready: str, timeout: float = 60) -> Server:
        out = log.open("wb")
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=out, cwd=ROOT)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{argv} exited: see {log}")
            if ready.encode() in line:
                return cls(proc, log)
        proc.kill()
        raise RuntimeError(f"{argv} not ready after {timeout} s")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (its own, not its children's)."""
        return _cpu_seconds(self.proc.pid)

    def tree_cpu_seconds(self) -> float:
        """User + system CPU so far of the server process and every live process under it
        (a `serve`'s worker, parser and composer processes)."""
        total, todo = 0.0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                total += _cpu_seconds(pid)
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo.extend(int(c) for c in (task / "children").read_text().split())
            except FileNotFoundError:  # gone meanwhile
                continue
        return total

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine has spent busy so far (user, nice, system, irq,
    softirq: kernel threads such as the journal's included; idle, iowait and steal not)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# -- the SMTP load client (runs in its own process) --------------------------------------------


@dataclass
class ClientResult:
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # seconds, MAIL FROM → final reply
    started: float = 0.0  # time.time() when the first MAIL FROM went out
    finished: float = 0.0
    first_accepted: float = 0.0
    accepted_ids: list[str] = field(default_factory=list)  # "queued as" ids, for checks

    @property
    def rate(self) -> float:
        return self.accepted / max(self.finished - self.started, 1e-9)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def _session(
    host: str,
    port: int,
    jobs: list[tuple[bytes, bytes, bytes]],
    result: ClientResult,
    go: asyncio.Event,
    connected: list[int],
    *,
    pace: float = 0.0,
    start_offset: float = 0.0,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    await _reply(reader)
    writer.write(b"EHLO client.bench\r\n")
    await _reply(reader)
    connected[0] += 1
    await go.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time() + start_offset
    for n, (mail_from, rcpt, payload) in enumerate(jobs):
        if pace:
            delay = t0 + n * pace - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        began = time.perf_counter()
        writer.write(b"MAIL FROM:<" + mail_from + b">\r\n")
        reply = await _reply(reader)
        if reply[:1] == b"2":
            writer.write(b"RCPT TO:<" + rcpt + b">\r\n")
            reply = await _reply(reader)
        if reply[:1] == b"2":
            writer.write(b"DATA\r\n")
            reply = await _reply(reader)
            if reply[:3] == b"354":
                writer.write(payload)
                reply = await _reply(reader)
        ended = time.perf_counter()
        if reply[:3] == b"250":
            result.accepted += 1
            result.latencies.append(ended - began)
            result.accepted_ids.append(reply.rsplit(b" ", 1)[-1].strip().decode())
            if not result.first_accepted:
                result.first_accepted = time.time()
        else:
            code = reply[:3].decode("ascii", "replace")
            result.refused[code] = result.refused.get(code, 0) + 1
            writer.write(b"RSET\r\n")
            await _reply(reader)
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()


async def _drive(
    host: str, port: int, sessions: list[list[tuple[bytes, bytes, bytes]]], pace: float
) -> ClientResult:
    result = ClientResult()
    go = asyncio.Event()
    connected = [0]
    tasks = [
        asyncio.create_task(
            _session(
                host,
                port,
                jobs,
                result,
                go,
                connected,
                pace=pace,
                start_offset=pace * i / max(len(sessions), 1),
            )
        )
        for i, jobs in enumerate(sessions)
    ]
    while connected[0] < len(sessions):
        await asyncio.sleep(0.01)
        for task in tasks:
            if task.done() and task.exception():
                raise task.exception()  # type: ignore[misc]
    result.started = time.time()
    go.set()
    await asyncio.gather(*tasks)
    result.finished = time.time()
    return result


def run_client(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    seed: int,
    kinds: tuple[str, ...] | None = None,
    rate: float = 0.0,
    limit: int | None = None,
) -> ClientResult:
    """Generate the mail, then send it over `sessions` reused connections; `rate` paces (msg/s)."""
    sys.path.insert(0, str(BENCH))
    import mailgen

    mails = mailgen.generate(messages, seed=seed)
    if kinds is not None:
        mails = [m for m in mails if m.kind in kinds]
    if limit is not None:
        mails = mails[:limit]
    per: list[list[tuple[bytes, bytes, bytes]]] = [[] for _ in range(sessions)]
    for i, m in enumerate(mails):
        per[i % sessions].append((m.mail_from.encode(), m.rcpt.encode(), mailgen.dot_stuff(m.data)))
    pace = sessions / rate if rate else 0.0
    return asyncio.run(_drive(host, port, per, pace))


def client_in_process(**kw: object) -> ClientResult:
    """`run_client` in a separate process, so the load does not share the server's interpreter."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(run_client, kwds=kw)  # type: ignore[arg-type]


# -- figures ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def sqlite_time(value: str) -> float:
    """A timestamp as SQLAlchemy stores it in SQLite (naive UTC) as epoch seconds."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def connect_ro(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    conn.execute("PRAGMA busy_timeout=60000")
    return conn


def unmoved(db: Path) -> int:
    """Mail committed to the intake file beside `db` (gateway/intake.py) and not yet moved to
    raw_mail."""
    from gateway.intake import SUFFIX

    side = db.with_name(db.name + SUFFIX)
    if not side.exists():
        return 0
    with contextlib.closing(connect_ro(side)) as conn:
        epoch = conn.execute("SELECT epoch FROM intake_epoch").fetchone()
        rows = conn.execute("SELECT id FROM raw_mail").fetchall()
    with contextlib.closing(connect_ro(db)) as conn:
        found = conn.execute(
            "SELECT last_id FROM intake_mark WHERE epoch = ?", (epoch[0] if epoch else "",)
        ).fetchone()
    mark = found[0] if found else 0
    return sum(1 for (raw_id,) in rows if raw_id > mark)
