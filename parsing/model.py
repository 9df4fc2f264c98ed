"""The parsed message: one frozen, typed value the rest of the gateway reads instead of raw MIME."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: the lower-cased address and the display name decoded for humans."""

    addr: str
    name: str = ""

    def __str__(self) -> str:
        return self.addr

    @property
    def domain(self) -> str:
        return self.addr.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str  # sanitised: no path, no control characters; metadata only
    content_type: str
    data: bytes
    content_id: str = ""
    inline: bool = False


@dataclass(frozen=True, slots=True)
class BounceRecipient:
    address: str
    status: str  # enhanced status code, e.g. "5.1.1"; "" when the report gives none
    hard: bool
    diagnostic: str = ""
    action: str = ""  # failed / delayed / delivered / relayed / expanded


@dataclass(frozen=True, slots=True)
class Bounce:
    """What a delivery report says about each recipient, and which mail it was about."""

    recipients: tuple[BounceRecipient, ...]
    original_message_id: str = ""
    original_envelope_from: str = ""
    reporting_mta: str = ""
    standard: bool = True  # RFC 3464 multipart/report, not a heuristic match


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Everything the pipeline needs from one received message, parsed once."""

    message_id: str  # without angle brackets; a synthetic id when the mail has none
    has_message_id: bool
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]  # oldest first, as sent
    from_addr: Address | None
    from_count: int  # how many addresses From: held (several From: headers count too)
    sender: Address | None
    reply_to: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    subject: str  # decoded, one line, as sent (not normalised)
    date: datetime | None
    text: str  # the whole text body (HTML-only mail rendered to text)
    html: str  # the HTML body as sent ("" when none); sanitise before showing it
    new_text: str  # the sender's own words: quoted history and signature removed
    attachments: tuple[Attachment, ...]
    forwarded: tuple[bytes, ...]  # attached message/rfc822 parts, raw
    headers: tuple[tuple[str, str], ...]  # every header, names lower-cased, values decoded
    bounce: Bounce | None
    content_hash: str  # sha256 over the message minus trace headers; equal for retries
    size: int
    defects: tuple[str, ...] = field(default=())
    automatic: str = ""  # why this is automatic mail (auto-reply, bulk, list), "" for a person

    def header(self, name: str) -> str:
        """The first value of a header ("" when absent)."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return ""

    def header_all(self, name: str) -> tuple[str, ...]:
        name = name.lower()
        return tuple(value for key, value in self.headers if key == name)
