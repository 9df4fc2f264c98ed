"""A real aiosmtpd server on loopback, in the test's own event loop, with faults on demand.

Tests assert on what the sink received instead of mocking the SMTP client. The fixture is
named ``smtp_sink``; share it from a conftest with
``from smtp_sink import smtp_sink_fixture  # noqa: F401`` (a distinct Python name, so test
parameters called ``smtp_sink`` do not trip ruff's F811).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["ReceivedMail", "SmtpSink", "smtp_sink_fixture"]


@dataclass(frozen=True, slots=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass(slots=True)
class _Fault:
    code: int
    text: str
    count: int


class _Dropper(asyncio.Protocol):
    """Accepts a connection and closes it before any greeting."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self._sink._take_fault("rcpt")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._sink._delay:
            await asyncio.sleep(self._sink._delay)
        if self._sink._drop_at_data > 0:
            self._sink._drop_at_data -= 1
            transport = server.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            return "421 4.3.0 dropped"  # never reaches the client
        reply = self._sink._take_fault("data")
        if reply:
            return reply
        content = envelope.original_content or b""
        self._sink.messages.append(
            ReceivedMail(envelope.mail_from or "", tuple(envelope.rcpt_tos), content)
        )
        return "250 2.0.0 OK queued"


class SmtpSink:
    """An SMTP sink that records every message and fails, drops or stalls when told to."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMail] = []
        self.connections = 0  # connections accepted (dropped ones included)
        self._host = "127.0.0.1"
        self._port = 0
        self._server: asyncio.Server | None = None
        self._faults: dict[str, list[_Fault]] = {"rcpt": [], "data": []}
        self._drop_at_connect = 0
        self._drop_at_data = 0
        self._delay = 0.0
        self._live: set[asyncio.BaseProtocol] = set()
        self._handler = _Handler(self)

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return self._host

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port or self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    def _protocol(self) -> asyncio.BaseProtocol:
        self.connections += 1
        if self._drop_at_connect > 0:
            self._drop_at_connect -= 1
            return _Dropper()
        proto = SMTP(self._handler, hostname="sink.test", ident="sink", timeout=30)
        self._live.add(proto)
        return proto

    def _take_fault(self, stage: str) -> str | None:
        queue = self._faults[stage]
        if not queue:
            return None
        fault = queue[0]
        fault.count -= 1
        if fault.count <= 0:
            queue.pop(0)
        return f"{fault.code} {fault.text}"

    def fail_next(
        self,
        code: int,
        text: str,
        *,
        count: int = 1,
        stage: Literal["rcpt", "data"] = "data",
    ) -> None:
        """Answer the next ``count`` RCPT or DATA commands with ``code text``."""
        self._faults[stage].append(_Fault(code, text, count))

    def drop_next_connection(
        self, count: int = 1, *, stage: Literal["connect", "data"] = "connect"
    ) -> None:
        """Close the next ``count`` connections without a reply (at connect, or after DATA)."""
        if stage == "connect":
            self._drop_at_connect += count
        else:
            self._drop_at_data += count

    def delay(self, seconds: float) -> None:
        """Wait this long before answering every DATA from now on (0 to stop)."""
        self._delay = seconds

    async def down(self) -> None:
        """Stop listening and cut every open connection; `up` listens on the same port again."""
        if self._server is not None:
            self._server.close()
            for proto in self._live:
                transport = getattr(proto, "transport", None)
                if isinstance(transport, asyncio.Transport):
                    transport.abort()
            self._live.clear()
            await self._server.wait_closed()
            self._server = None

    async def up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self.start(self._host, self._port)

    async def stop(self) -> None:
        await self.down()


@pytest.fixture(name="smtp_sink")
async def smtp_sink_fixture() -> AsyncIterator[SmtpSink]:
    """A started sink on a free loopback port, stopped after the test."""
    sink = SmtpSink()
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()
