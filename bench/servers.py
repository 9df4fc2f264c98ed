"""Server processes for the benchmarks, each optionally under cProfile.

    servers.py cli [--profile OUT] -- ARGS     `supportgate ARGS` (serve, process, db upgrade)
    servers.py noop --config PATH [--profile]  aiosmtpd with our SMTP options, 250 at once
    servers.py spool --config PATH [--profile] our listener and group-commit spool, no pipeline

The noop and spool servers print "ready" once listening and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.config import load
from gateway.smtp_server import Handler, smtp_factory, start_listeners


class NoopHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def _until_term() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def noop(config_path: Path) -> None:
    config = load(config_path)
    loop = asyncio.get_running_loop()
    factory = smtp_factory(config, NoopHandler())  # type: ignore[arg-type]
    servers = []
    for spec in config.smtp.listen:
        host, _, port = spec.rpartition(":")
        servers.append(await loop.create_server(factory, host=host, port=int(port)))
    print("ready", flush=True)
    await _until_term()
    for server in servers:
        server.close()


async def spool(config_path: Path) -> None:
    from gateway.app import build_app
    from gateway.spool import Spool

    config = load(config_path)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(config, parse_workers=0)
    store = Spool(app.intake, clock=app.clock)
    writer = asyncio.create_task(store.run())
    servers = await start_listeners(config, Handler(config, store))
    print("ready", flush=True)
    await _until_term()
    for server in servers:
        server.close()
    for server in servers:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 10)
    await asyncio.sleep(0.2)
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    await app.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("cli", "noop", "spool"))
    parser.add_argument("--config", type=Path)
    parser.add_argument("--profile", type=Path)
    parser.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval: tests the GIL hand-off cost"
    )
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.rest = rest
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    profiler = cProfile.Profile() if args.profile else None
    run: Any
    if args.mode == "cli":
        from gateway.cli import main as cli_main

        def run() -> int:
            return cli_main(args.rest)
    elif args.mode == "noop":

        def run() -> int:
            asyncio.run(noop(args.config))
            return 0
    else:

        def run() -> int:
            asyncio.run(spool(args.config))
            return 0

    if profiler is None:
        return int(run())
    profiler.enable()
    try:
        return int(run())
    finally:
        profiler.disable()
        profiler.dump_stats(str(args.profile))


if __name__ == "__main__":
    sys.exit(main())
