"""The SMTP listener: decide at RCPT, store at DATA, answer 250 only once the mail is durable."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

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


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not (config.smtp.tls_cert and config.smtp.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(
        config.base_dir / config.smtp.tls_cert, config.base_dir / config.smtp.tls_key
    )
    return context


def smtp_factory(config: Config, handler: Handler) -> Callable[[], SMTP]:
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
        return SMTP(handler, **options)

    return build


async def start_listeners(config: Config, handler: Handler) -> list[asyncio.Server]:
    """One server per `[smtp] listen` address, in the running loop."""
    loop = asyncio.get_running_loop()
    factory = smtp_factory(config, handler)
    servers = []
    for spec in config.smtp.listen:
        host, _, port = spec.rpartition(":")
        servers.append(await loop.create_server(factory, host=host.strip("[]"), port=int(port)))
    return servers
