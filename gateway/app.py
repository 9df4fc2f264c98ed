"""What every part of the running gateway shares: config, store, clock, renderer, parser pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.config import Config
from gateway.db import make_engine, sessionmaker
from parsing.mime import Limits, MessageRejected, parse_message
from parsing.model import ParsedMessage
from responders.render import Renderer


def utcnow() -> datetime:
    return datetime.now(UTC)


class ParseTimeout(MessageRejected):
    pass


class Parser:
    """Parses in worker processes (the second core) with a deadline per message."""

    def __init__(self, *, workers: int, timeout: float, limits: Limits) -> None:
        self.workers = workers
        self.timeout = timeout
        self.limits = limits
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context)
        return self._pool

    async def parse(self, raw: bytes) -> ParsedMessage:
        loop = asyncio.get_running_loop()
        pool = self._executor()
        future = loop.run_in_executor(pool, _parse, raw, self.limits)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self._recycle()
            raise ParseTimeout(f"parsing took longer than {self.timeout:g} s") from None
        except concurrent.futures.process.BrokenProcessPool:
            self._recycle()
            raise MessageRejected("the parser process died on this message") from None

    def _recycle(self) -> None:
        """Kill a pool whose worker is stuck on a hostile message; the next parse makes one."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _parse(raw: bytes, limits: Limits) -> ParsedMessage:
    return parse_message(raw, limits=limits)


@dataclass
class App:
    config: Config
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # read-write transactions
    reader_engine: AsyncEngine
    intake_engine: AsyncEngine
    intake: async_sessionmaker[AsyncSession]  # the spool's: retries a busy lock itself
    readers: async_sessionmaker[AsyncSession]  # listings and views: never hold the write lock
    renderer: Renderer
    parser: Parser
    clock: Callable[[], datetime] = utcnow
    wake_pipeline: asyncio.Event = field(default_factory=asyncio.Event)
    wake_outbox: asyncio.Event = field(default_factory=asyncio.Event)
    # Set to stop the background loops at their next safe point (between transactions).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # DKIM key lookups; None asks DNS. Tests give a function answering from their own keys.
    dkim_dns: Callable[..., bytes] | None = None

    async def pause(self, event: asyncio.Event, seconds: float) -> None:
        """Wait for `event`, `seconds`, or a stop, whichever comes first."""
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    @property
    def attachments_dir(self) -> Path:
        return self.config.data_dir / "attachments"

    @property
    def maildir(self) -> Path:
        return self.config.data_dir / "outbox-maildir"

    async def close(self) -> None:
        self.parser.close()
        await self.engine.dispose()
        await self.reader_engine.dispose()
        await self.intake_engine.dispose()


def build_app(
    config: Config, *, clock: Callable[[], datetime] = utcnow, parse_workers: int | None = None
) -> App:
    engine = make_engine(config.database_url)
    reader = make_engine(config.database_url, reader=True)
    intake = make_engine(config.database_url, wait_for_lock=False)
    templates = (
        config.base_dir / config.gateway.templates_dir if config.gateway.templates_dir else None
    )
    limits = Limits(
        max_bytes=max(config.smtp.max_message_bytes * 2, 1 << 20),
        max_parts=config.pipeline.max_parts,
        max_depth=config.pipeline.max_depth,
    )
    workers = config.pipeline.parse_workers if parse_workers is None else parse_workers
    return App(
        config=config,
        engine=engine,
        sessions=sessionmaker(engine),
        reader_engine=reader,
        intake_engine=intake,
        intake=sessionmaker(intake),
        readers=sessionmaker(reader),
        renderer=Renderer(templates),
        parser=Parser(
            workers=workers, timeout=config.pipeline.parse_timeout_seconds, limits=limits
        ),
        clock=clock,
    )
