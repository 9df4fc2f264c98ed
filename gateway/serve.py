"""`supportgate serve`: listeners, pipeline, outbox and timers under one TaskGroup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from gateway import pipeline, timers
from gateway.app import App
from gateway.imap_intake import start_pollers
from gateway.outbox import OutboxWorker
from gateway.smtp_server import Handler, start_listeners
from gateway.spool import Spool

log = logging.getLogger(__name__)


async def serve(app: App, *, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT; then stop accepting, finish stored commits, and exit."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    spool = Spool(app.sessions, clock=app.clock, on_stored=app.wake_pipeline.set)
    worker = OutboxWorker(app)
    servers: list[asyncio.Server] = []
    try:
        async with asyncio.TaskGroup() as group:
            writer = group.create_task(spool.run(), name="spool")
            # Pollers are built first so a bad [[imap]] stops start-up before SMTP opens.
            imap_tasks = start_pollers(app, spool, group)
            servers = await start_listeners(app.config, Handler(app.config, spool))
            background = [
                *imap_tasks,
                group.create_task(pipeline.run(app), name="pipeline"),
                group.create_task(worker.run(), name="outbox"),
                group.create_task(timers.run(app), name="timers"),
            ]
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
            await asyncio.sleep(0.1)  # let the writer commit the last batch
            for task in [*background, writer]:
                task.cancel()
    finally:
        for server in servers:
            server.close()
        await worker.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
