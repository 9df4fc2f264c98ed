"""What every part of the running gateway shares: config, store, clock, renderer, parser pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import contextlib
import logging
import multiprocessing
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.config import Config
from gateway.db import make_engine, session_scope, sessionmaker
from gateway.intake import intake_url
from gateway.intake import setup as intake_setup
from parsing.mime import Limits, MessageRejected, parse_message
from parsing.model import ParsedMessage
from responders.drafts import Draft, Written, write_all, write_each
from responders.render import Renderer

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class ParseTimeout(MessageRejected):
    pass


class _PoolLost(Exception):
    """The pool went down under a job that did nothing wrong."""


def _cancelled_by_caller() -> bool:
    """Whether a CancelledError is meant for this task, rather than for a pool job that a
    recycled pool cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


PARSE_NICE = 10


class _Processes:
    """A process pool made on first use, and killed (to be made anew) when a job hangs.

    Its processes may run at a lower CPU priority (`nice`): parsing runs a batch ahead of the
    pipeline, so it can wait while intake and the pipeline have the CPU.
    """

    def __init__(self, workers: int, *, nice: int = 0) -> None:
        self.workers = workers
        self.nice = nice
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def get(self) -> concurrent.futures.ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            # Processes fork from a server that has the parser imported already, so a pool
            # recycled under a bomb is back in milliseconds, not after half a second of imports.
            context.set_forkserver_preload([__name__])
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=os.nice, initargs=(self.nice,)
            )
        return self._pool

    def recycle(self, pool: concurrent.futures.ProcessPoolExecutor | None) -> None:
        """Kill `pool` if it is still the current one: a job failing late on a pool already
        replaced must not take down the new one its neighbours are retrying on."""
        if pool is None or pool is not self._pool:
            return
        self._pool = None
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class Parser:
    """Parses in worker processes (the second core) with a deadline per message."""

    def __init__(self, *, workers: int, timeout: float, limits: Limits) -> None:
        self.workers = workers
        self.timeout = timeout
        self.limits = limits
        self._parsing = _Processes(workers, nice=PARSE_NICE)
        # No more parses in flight than processes: the deadline then times the parse, not
        # its wait in the pool's queue, and a recycle loses only messages being parsed.
        self._slots = asyncio.Semaphore(max(workers, 1))

    async def parse(self, raw: bytes) -> ParsedMessage:
        async with self._slots:
            try:
                return await self._parse_once(raw)
            except _PoolLost:
                # Another message's deadline or crash took the pool down under this one.
                return await self._parse_once(raw, last_try=True)

    async def _parse_once(self, raw: bytes, *, last_try: bool = False) -> ParsedMessage:
        loop = asyncio.get_running_loop()
        pool = self._parsing.get()
        future = loop.run_in_executor(pool, _parse, raw, self.limits)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self._parsing.recycle(pool)
            raise ParseTimeout(f"parsing took longer than {self.timeout:g} s") from None
        except concurrent.futures.process.BrokenProcessPool:
            self._parsing.recycle(pool)
            if last_try:
                raise MessageRejected("the parser process died on this message") from None
            raise _PoolLost from None
        except asyncio.CancelledError:
            if _cancelled_by_caller() or last_try:
                raise
            raise _PoolLost from None

    async def parse_many(self, raws: Sequence[bytes]) -> list[ParsedMessage | BaseException]:
        """Each message parsed, or the error that refused it, in order.

        The messages go to the processes in chunks: one job per message made the pool's
        hand-offs, not the parsing, set the pace (each result waits for its feeder threads and
        then the event loop, both busy with the pipeline). A chunk that fails as a whole (over
        the deadline, the process lost) is parsed again a message at a time, each with its
        own deadline, so only the message at fault is refused.
        """
        if self.workers <= 0:
            return await asyncio.gather(*(self.parse(r) for r in raws), return_exceptions=True)
        chunks = await asyncio.gather(*(self._parse_chunk(c) for c in _chunks(raws)))
        return [result for chunk in chunks for result in chunk]

    async def _parse_chunk(self, chunk: list[bytes]) -> list[ParsedMessage | BaseException]:
        if len(chunk) > 1:
            async with self._slots:
                loop = asyncio.get_running_loop()
                pool = self._parsing.get()
                future = loop.run_in_executor(pool, _parse_all, chunk, self.limits)
                try:
                    return await asyncio.wait_for(future, self.timeout)
                except (TimeoutError, concurrent.futures.process.BrokenProcessPool):
                    self._parsing.recycle(pool)
                except asyncio.CancelledError:
                    if _cancelled_by_caller():
                        raise
                except Exception:  # a result that would not pickle, say: one at a time
                    log.warning("a chunk of %d messages failed to parse whole", len(chunk))
        return await asyncio.gather(*(self.parse(r) for r in chunk), return_exceptions=True)

    def close(self) -> None:
        self._parsing.close()


# A chunk is at most this many messages and, past its first, bytes: enough that hand-offs
# cost little, small enough that a chunk redone one by one costs little.
CHUNK_MESSAGES = 25
CHUNK_BYTES = 2 << 20


def _chunks(raws: Sequence[bytes]) -> list[list[bytes]]:
    chunks: list[list[bytes]] = []
    size = 0
    for raw in raws:
        if not chunks or len(chunks[-1]) >= CHUNK_MESSAGES or size + len(raw) > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(raw)
        size += len(raw)
    return chunks


def _parse(raw: bytes, limits: Limits) -> ParsedMessage:
    return parse_message(raw, limits=limits)


def _parse_all(raws: list[bytes], limits: Limits) -> list[ParsedMessage | BaseException]:
    """In a parser process: each message's result, its error kept in its place."""
    results: list[ParsedMessage | BaseException] = []
    for raw in raws:
        try:
            results.append(parse_message(raw, limits=limits))
        except Exception as exc:
            results.append(exc)
    return results


class ComposerLost(Exception):
    """The composer process died or ran past its deadline; the notices are written again."""


@dataclass(frozen=True, slots=True)
class HandedOver:
    """Drafts on their way through a composer process (or, with none, already written)."""

    future: asyncio.Future[list[Written | Exception]]
    pool: concurrent.futures.ProcessPoolExecutor | None


class Composer:
    """Writes notices (`responders.drafts`) in a process of its own.

    Rendering and composing took a fifth of the pipeline's loop, and need nothing from its
    transaction: the pipeline hands drafts over as it decides them, goes on with the next
    message, and collects them before it commits. With no workers (the parser's setting) it
    writes them when they are handed over.
    """

    def __init__(
        self, *, workers: int, timeout: float, templates: Path | None, renderer: Renderer
    ) -> None:
        self.timeout = timeout
        self._templates = templates
        self._renderer = renderer
        self._writing = _Processes(workers)

    def hand_over(self, drafts: list[Draft]) -> HandedOver:
        loop = asyncio.get_running_loop()
        pool = self._writing.get()
        if pool is None:
            future: asyncio.Future[list[Written | Exception]] = loop.create_future()
            future.set_result(write_each(self._renderer, drafts))
            return HandedOver(future, None)
        try:
            return HandedOver(loop.run_in_executor(pool, write_all, self._templates, drafts), pool)
        except (concurrent.futures.process.BrokenProcessPool, RuntimeError) as exc:
            # Its process died since the last hand-over (killed, say): a pool never takes
            # work again once broken, so it is replaced, and these go to `collect` failed.
            self._writing.recycle(pool)
            future = loop.create_future()
            future.set_exception(concurrent.futures.process.BrokenProcessPool(str(exc)))
            return HandedOver(future, None)

    async def collect(self, handed: Sequence[HandedOver]) -> list[Written | Exception]:
        """What was handed over, in order, within `timeout` of asking. A lost or late process
        is replaced, and ComposerLost raised: the caller writes them again its own way."""
        results: list[Written | Exception] = []
        try:
            async with asyncio.timeout(self.timeout):
                for item in handed:
                    results.extend(await item.future)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            lost: BaseException = concurrent.futures.process.BrokenProcessPool("cancelled")
        except (TimeoutError, concurrent.futures.process.BrokenProcessPool) as exc:
            lost = exc
        else:
            return results
        # A job cancelled by a pool replaced under it, the pool broken, or over the deadline.
        for item in handed:
            item.future.cancel()
            self._writing.recycle(item.pool)
        raise ComposerLost(f"the composer process was lost: {lost!r}")

    def close(self) -> None:
        self._writing.close()


@dataclass
class App:
    config: Config
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # read-write transactions
    reader_engine: AsyncEngine
    intake_engine: AsyncEngine
    intake: async_sessionmaker[AsyncSession]  # the spool's: retries a busy lock itself
    readers: async_sessionmaker[AsyncSession]  # listings and views: never hold the write lock
    # On SQLite the spool writes a file of its own (gateway/intake.py); else these are the
    # main database's, and `intake_file` is False.
    intake_reader_engine: AsyncEngine
    intake_readers: async_sessionmaker[AsyncSession]
    intake_file: bool
    renderer: Renderer
    parser: Parser
    composer: Composer
    clock: Callable[[], datetime] = utcnow
    wake_pipeline: asyncio.Event = field(default_factory=asyncio.Event)
    wake_outbox: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when intake waits for SQLite's write lock: a pipeline group commits at its next
    # message boundary instead of holding the lock for its full GROUP_SECONDS.
    intake_waiting: asyncio.Event = field(default_factory=asyncio.Event)
    # Set to stop the background loops at their next safe point (between transactions).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # DKIM key lookups; None asks DNS. Tests give a function answering from their own keys.
    dkim_dns: Callable[..., bytes] | None = None
    _write_turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    def writing(self) -> contextlib.AbstractAsyncContextManager[object]:
        """A turn at SQLite's one write lock, taken in arrival order within this process.

        A busy lock is tried again after a pause, by which time the pipeline's next group
        has taken it: the outbox's short transactions waited for the pipeline's whole
        backlog (acknowledgements seconds late at 100 new tickets a second). With turns, a
        waiting writer goes next. The pipeline, the outbox, the timers and the move from the
        intake file all take turns. PostgreSQL locks rows, so there writers need no turns."""
        if self.engine.dialect.name != "sqlite":
            return contextlib.nullcontext()
        return self._write_turn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A read-write transaction of the worker's, taken at its turn (`writing`)."""
        async with self.writing(), session_scope(self.sessions) as session:
            yield session

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
        self.composer.close()
        await self.engine.dispose()
        await self.reader_engine.dispose()
        await self.intake_engine.dispose()
        if self.intake_file:
            await self.intake_reader_engine.dispose()


def build_app(
    config: Config, *, clock: Callable[[], datetime] = utcnow, parse_workers: int | None = None
) -> App:
    engine = make_engine(config.database_url, inline=True)
    reader = make_engine(config.database_url, reader=True)
    side_file = intake_url(config.database_url)
    if side_file:
        intake = make_engine(side_file, wait_for_lock=False, inline=True, setup=intake_setup)
        intake_reader = make_engine(side_file, reader=True, setup=intake_setup)
    else:
        intake = make_engine(config.database_url, wait_for_lock=False)
        intake_reader = reader
    templates = (
        config.base_dir / config.gateway.templates_dir if config.gateway.templates_dir else None
    )
    limits = Limits(
        max_bytes=max(config.smtp.max_message_bytes * 2, 1 << 20),
        max_parts=config.pipeline.max_parts,
        max_depth=config.pipeline.max_depth,
    )
    workers = config.pipeline.parse_workers if parse_workers is None else parse_workers
    renderer = Renderer(templates)
    return App(
        config=config,
        engine=engine,
        sessions=sessionmaker(engine),
        reader_engine=reader,
        intake_engine=intake,
        intake=sessionmaker(intake),
        readers=sessionmaker(reader),
        intake_reader_engine=intake_reader,
        intake_readers=sessionmaker(intake_reader),
        intake_file=side_file is not None,
        renderer=renderer,
        parser=Parser(
            workers=workers, timeout=config.pipeline.parse_timeout_seconds, limits=limits
        ),
        # One process: a notice takes it about half a millisecond.
        composer=Composer(
            workers=min(workers, 1),
            timeout=config.pipeline.parse_timeout_seconds,
            templates=templates,
            renderer=renderer,
        ),
        clock=clock,
    )
