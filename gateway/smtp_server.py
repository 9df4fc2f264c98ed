"""The SMTP listener: decide at RCPT, store at DATA, answer 250 only once the mail is durable."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from functools import partial
from typing import Any
from warnings import warn

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from gateway.config import Config
from gateway.spool import Spool, SpoolError

log = logging.getLogger(__name__)


def redact(address: str) -> str:
    """An address for logs: the domain kept, the local part hidden."""
    local, at, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}" if at else "***"


def check_content(data: bytes, *, limit: int) -> str | None:
    """The SMTP reply refusing this DATA, or None when it may be stored."""
    if len(data) > limit:
        return "552 5.3.4 Message size exceeds fixed maximum message size"
    if b"\x00" in data:
        return "554 5.6.0 Message contains NUL characters"
    pairs = data.count(b"\r\n")  # counting is ~5x faster than the look-around regexes
    if data.count(b"\r") != pairs or data.count(b"\n") != pairs:
        return "554 5.6.0 Message contains bare CR or LF; lines must end with CRLF"
    return None


class Handler:
    """aiosmtpd hooks: cheap checks at RCPT, durable store at DATA, nothing else."""

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        if not self.config.is_ours(address):
            log.info("refused recipient %s", redact(address))
            return "550 5.1.1 Mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):
            data = (data or "").encode("utf-8", "surrogateescape")
        refusal = check_content(data, limit=self.config.smtp.max_message_bytes)
        if refusal:
            log.info("refused DATA from %s: %s", redact(envelope.mail_from or ""), refusal[4:])
            return refusal
        try:
            raw_id = await self.spool.store(
                data, mail_from=envelope.mail_from or "", rcpt_tos=envelope.rcpt_tos, source="smtp"
            )
        except SpoolError:
            return "451 4.3.0 Requested action aborted: local error in processing"
        except Exception:
            log.exception("unexpected error storing mail")
            return "451 4.3.0 Requested action aborted: local error in processing"
        return f"250 2.0.0 OK queued as {raw_id}"

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", type(error).__name__)
        return "421 4.3.0 Service not available, closing transmission channel"


END_OF_DATA = b"\r\n.\r\n"
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH_DATA = "552 Error: Too much mail data"


def data_refusal(data: bytes | bytearray, *, line_limit: int, size_limit: int | None) -> str | None:
    """aiosmtpd's refusal of `data` (CRLF, then the DATA lines as sent, unended), or None.

    It refuses at the first line over `line_limit` bytes (CRLF included) or at the line passing
    `size_limit`, whichever comes first; but a line over line_limit + 2 overruns its reader, so
    is too long before it is counted. Past size_limit, a last line still lacking its CRLF is
    judged by what has come.
    """
    if not size_limit or len(data) - 2 <= size_limit:
        return LINE_TOO_LONG if _longest_line(data) > line_limit else None
    start = data.rfind(b"\r\n", 0, size_limit + 2) + 2  # of the line passing size_limit
    end = data.find(b"\r\n", start)
    length = (end + 2 if end >= 0 else len(data) + 1) - start
    if length > line_limit + 2 or _longest_line(data[:start]) > line_limit:
        return LINE_TOO_LONG
    return TOO_MUCH_DATA


def _longest_line(data: bytes | bytearray) -> int:
    """The length of the longest line in CRLF-separated `data`, counting its CRLF."""
    return max(map(len, data.split(b"\r\n"))) + 2


class GatewaySMTP(SMTP):
    """aiosmtpd's server reading DATA in bulk: its line-by-line loop was ~35 % of its time.

    The replies, the bytes handed to the DATA hook and the session state after DATA are those
    of `SMTP.smtp_DATA` (aiosmtpd 1.4); tests/test_smtp_data.py holds the two side by side.
    """

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        lines = await self._read_data()
        if isinstance(lines, str):
            await self.push(lines)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # RFC 5321 4.5.2: a line starting with "." loses that dot; every line follows a CRLF.
        original_content = bytes(lines.replace(b"\r\n.", b"\r\n")[2:])

        # From here on as in aiosmtpd.
        content: str | bytes
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        else:
            content = original_content
        self.envelope.content = content
        self.envelope.original_content = original_content

        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        else:
            status = MISSING
            if hasattr(self.event_handler, "process_message"):
                warn(
                    "Use handler.handle_DATA() instead of .process_message()",
                    DeprecationWarning,
                    stacklevel=1,
                )
                assert self.session is not None
                args = (
                    self.session.peer,
                    self.envelope.mail_from,
                    self.envelope.rcpt_tos,
                    self.envelope.content,
                )
                if asyncio.iscoroutinefunction(self.event_handler.process_message):
                    status = await self.event_handler.process_message(*args)
                else:
                    status = self.event_handler.process_message(*args)
                if status is None:
                    status = MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytearray | str:
        """CRLF, then the DATA lines as sent less the ending ".", or aiosmtpd's refusal of them.

        Reads up to CRLF.CRLF in one call where aiosmtpd reads line by line. When what has come
        ends in the start of a CRLF.CRLF, it reads only the bytes that would finish it, so it
        never reads past the end of data into the next command.
        """
        limit = self.data_size_limit or 0
        judge = partial(data_refusal, line_limit=self.line_length_limit, size_limit=limit)
        spill = limit + self.line_length_limit + 5  # by then the line passing `limit` is judged
        buffer = bytearray(b"\r\n")  # the DATA line's own CRLF: ".CRLF" next is an empty message
        refusal: str | None = None
        while not buffer.endswith(END_OF_DATA):
            if refusal:
                del buffer[:-4]
            elif limit and len(buffer) > spill:
                refusal = judge(buffer) or TOO_MUCH_DATA
                del buffer[:-4]
            begun = next((n for n in (4, 3, 2, 1) if buffer.endswith(END_OF_DATA[:n])), 0)
            try:
                if begun:
                    buffer += await self._reader.readexactly(len(END_OF_DATA) - begun)
                else:
                    buffer += await self._reader.readuntil(END_OF_DATA)
            except asyncio.LimitOverrunError as e:
                buffer += await self._reader.read(e.consumed)
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
        if refusal:
            return refusal
        del buffer[-3:]
        return judge(buffer) or buffer


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not (config.smtp.tls_cert and config.smtp.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(
        config.base_dir / config.smtp.tls_cert, config.base_dir / config.smtp.tls_key
    )
    return context


def smtp_factory(
    config: Config, handler: Handler, *, protocol: type[SMTP] = SMTP
) -> Callable[[], SMTP]:
    """Our SMTP options on `protocol`; plain aiosmtpd unless asked (bench/servers.py's no-op)."""
    tls = _tls_context(config)
    hostname = config.smtp.hostname or config.gateway.domain
    options: dict[str, Any] = {
        "hostname": hostname,
        "ident": "supportgate ESMTP",
        "data_size_limit": config.smtp.max_message_bytes,
        "enable_SMTPUTF8": True,
        "decode_data": False,
    }
    if tls is not None:
        options["tls_context"] = tls
        options["require_starttls"] = config.smtp.require_tls

    def build() -> SMTP:
        return protocol(handler, **options)

    return build


async def start_listeners(config: Config, handler: Handler) -> list[asyncio.Server]:
    """One server per `[smtp] listen` address, in the running loop."""
    loop = asyncio.get_running_loop()
    factory = smtp_factory(config, handler, protocol=GatewaySMTP)
    servers = []
    for spec in config.smtp.listen:
        host, _, port = spec.rpartition(":")
        servers.append(await loop.create_server(factory, host=host.strip("[]"), port=int(port)))
    return servers
