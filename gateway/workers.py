"""A child process fed over a pipe that the event loop reads itself.

`concurrent.futures.ProcessPoolExecutor` moves every job through two helper threads of the
calling process. When the event loop keeps the GIL busy, as the pipeline does, each hand-off
waits for the interpreter's switch interval (5 ms), so a 1 ms job took 20-30 ms to come back
and the pipeline sat waiting for it. Here the loop writes the job to the pipe and learns of
the answer from its own selector: no thread in between.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import multiprocessing.connection
from collections.abc import Callable
from typing import Any


class WorkerLost(Exception):
    """The child process died, or was stopped, before it answered."""


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """The child: answer jobs in order until the parent closes the pipe."""
    while True:
        try:
            job_id, function, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer = (job_id, True, function(*args))
        except Exception as exc:
            answer = (job_id, False, exc)
        try:
            conn.send(answer)
        except Exception as exc:  # an answer that does not pickle
            conn.send((job_id, False, RuntimeError(f"{type(exc).__name__}: {exc}")))


class ProcessWorker:
    """One child process; `call` runs a picklable function there and awaits its result."""

    def __init__(self) -> None:
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: Any = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()

    def _start(self) -> multiprocessing.connection.Connection:
        context = multiprocessing.get_context("forkserver")
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        child.close()
        asyncio.get_running_loop().add_reader(parent.fileno(), self._answers, parent)
        self._conn = parent
        return parent

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        conn = self._conn or self._start()
        job_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[job_id] = future
        try:
            conn.send((job_id, function, args))
        except OSError as exc:
            self._pending.pop(job_id, None)
            self.stop()
            raise WorkerLost(str(exc)) from None
        try:
            return await future
        finally:
            self._pending.pop(job_id, None)

    def _answers(self, conn: multiprocessing.connection.Connection) -> None:
        try:
            while conn.poll():
                job_id, ok, value = conn.recv()
                future = self._pending.pop(job_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except (EOFError, OSError):
            self.stop()

    def stop(self) -> None:
        """Kill the child (a hung job) and fail what is waiting on it; the next call starts
        another."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                asyncio.get_running_loop().remove_reader(conn.fileno())
            except RuntimeError:
                pass
            conn.close()
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=5)
            self._process = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(WorkerLost("the worker process stopped"))
