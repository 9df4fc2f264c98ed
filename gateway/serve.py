"""`supportgate serve` and `supportgate worker`.

`serve` is the front: SMTP listeners, the spool, IMAP pollers and the metrics port. The mail
work behind the 250 — pipeline, outbox, timers — runs in a `worker` process that `serve`
starts and restarts, so it uses the second core and never delays an SMTP reply on the
front's event loop. The front wakes the worker through a pipe whenever mail is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

from gateway import pipeline, timers
from gateway.app import App
from gateway.imap_intake import start_pollers
from gateway.outbox import OutboxWorker
from gateway.smtp_server import Handler, start_listeners
from gateway.spool import Spool

log = logging.getLogger(__name__)

STOP_GRACE = 30.0  # seconds the loops get to reach a safe point before they are cancelled


def _stop_event(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def _release_signals(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)


async def work(app: App, *, wake_fd: int | None = None, stop: asyncio.Event | None = None) -> None:
    """Pipeline, outbox and timers until SIGTERM/SIGINT (the `worker` process), or until
    `stop` is set when they run inside `serve`."""
    loop = asyncio.get_running_loop()
    own_signals = stop is None
    stop = _stop_event(loop) if stop is None else stop
    if wake_fd is not None:
        os.set_blocking(wake_fd, False)

        def woken() -> None:
            try:
                data = os.read(wake_fd, 4096)
            except (BlockingIOError, InterruptedError):
                return
            if not data:  # the front is gone: an orphan must not spin or outlive it
                log.error("the serve process is gone; the worker stops")
                loop.remove_reader(wake_fd)
                stop.set()
                return
            if INTAKE_WAITING in data:
                app.intake_waiting.set()
            if WAKE in data:
                app.wake_pipeline.set()

        loop.add_reader(wake_fd, woken)
    worker = OutboxWorker(app)
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(pipeline.run(app), name="pipeline"),
                group.create_task(worker.run(), name="outbox"),
                group.create_task(timers.run(app), name="timers"),
            ]
            await stop.wait()
            # Let each loop finish its transaction and leave; cancelling mid-transaction can
            # leave SQLite's write lock to a connection nobody will roll back.
            app.stopping.set()
            app.wake_pipeline.set()
            app.wake_outbox.set()
            _done, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
    finally:
        if wake_fd is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(wake_fd)
        await worker.close()
        if own_signals:
            _release_signals(loop)


# Bytes on the pipe from serve to its worker: mail was stored; intake waits for the lock.
WAKE = b"!"
INTAKE_WAITING = b"?"


class _Worker:
    """The worker process, restarted if it dies; woken by a byte on a pipe."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.process: asyncio.subprocess.Process | None = None
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        self._send(WAKE)

    def intake_waiting(self) -> None:
        self._send(INTAKE_WAITING)

    def _send(self, signal_byte: bytes) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError, InterruptedError):
            os.write(self.write_fd, signal_byte)

    async def supervise(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, "--wake-fd", str(self.read_fd), pass_fds=(self.read_fd,)
            )
            code = await self.process.wait()
            if not stopping.is_set():
                log.error("worker process exited with %s; starting it again", code)
                await asyncio.sleep(1.0)

    async def stop(self, grace: float = 60.0) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                log.error("worker did not stop within %.0f s; killing it", grace)
                self.process.kill()
                await self.process.wait()
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def worker_argv(config_path: str, *, verbose: bool) -> list[str]:
    argv = [sys.executable, "-m", "gateway.cli", "--config", config_path]
    return [*argv, "-v", "worker"] if verbose else [*argv, "worker"]


async def serve(
    app: App,
    *,
    ready: asyncio.Event | None = None,
    worker_command: list[str] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; then stop accepting, finish stored commits, and exit.

    With `worker_command` the mail work runs in that process; without it, in this loop.
    """
    loop = asyncio.get_running_loop()
    stop = _stop_event(loop)
    helper = _Worker(worker_command) if worker_command else None
    wake: Callable[[], None] = helper.wake if helper else app.wake_pipeline.set
    busy: Callable[[], None] = helper.intake_waiting if helper else app.intake_waiting.set
    spool = Spool(app.intake, clock=app.clock, on_stored=wake, on_busy=busy)
    servers: list[asyncio.Server] = []
    try:
        async with asyncio.TaskGroup() as group:
            writer = group.create_task(spool.run(), name="spool")
            # Pollers are built first so a bad [[imap]] stops start-up before SMTP opens.
            background = start_pollers(app, spool, group)
            servers = await start_listeners(app.config, Handler(app.config, spool))
            if helper is not None:
                background.append(group.create_task(helper.supervise(stop), name="worker"))
            else:
                background.append(group.create_task(work(app, stop=stop), name="work"))
            if app.config.metrics.listen:
                from gateway.metrics import start_http

                servers.append(
                    await start_http(app, app.config.metrics.listen, listeners=list(servers))
                )
            addresses = ", ".join(app.config.smtp.listen)
            log.info("supportgate serving SMTP on %s", addresses)
            print(f"supportgate: listening on {addresses}; Ctrl-C or SIGTERM stops", flush=True)
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("stopping: no new connections; finishing what was accepted")
            for server in servers:
                server.close()
            for server in servers:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 10)
            await spool.wait_idle(10.0)  # the sessions still in DATA get their commit
            if helper is not None:
                await helper.stop()
            for task in [*background, writer]:
                task.cancel()
    finally:
        for server in servers:
            server.close()
        _release_signals(loop)
