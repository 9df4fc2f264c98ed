"""Header helpers that are safe on hostile input: ids, addresses and encoded words."""

from __future__ import annotations

import hashlib
import re
from email.errors import MessageError
from email.header import decode_header, make_header
from email.utils import getaddresses

from parsing.model import Address

_MSGID = re.compile(r"<([^<>\s]{1,500})>")
# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators, and the bidi marks,
# embeddings, overrides and isolates that can make a value read differently from its bytes.
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]+"
)
# Trace headers differ between an SMTP retry, an IMAP re-fetch and a second copy of one mail.
TRACE_HEADERS = frozenset(
    {b"received", b"return-path", b"delivered-to", b"x-original-to", b"x-envelope-to"}
)


def message_ids(value: str) -> tuple[str, ...]:
    """Every `<id>` in a header value, without brackets, in order, de-duplicated."""
    seen: dict[str, None] = {}
    for found in _MSGID.findall(value):
        seen.setdefault(found, None)
    return tuple(seen)


def first_message_id(value: str) -> str:
    """The id of a Message-ID header, tolerating a missing pair of brackets."""
    ids = message_ids(value)
    if ids:
        return ids[0]
    bare = value.strip().strip("<>").strip()
    return bare if bare and " " not in bare and len(bare) <= 500 else ""


# The stdlib decoder is quadratic in adjacent encoded words; no header we show needs more.
MAX_DECODED = 16 * 1024


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; undecodable words fall back to the raw text."""
    if "=?" not in value:
        return value
    value = value[:MAX_DECODED]
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError, AssertionError, MessageError):
        # MessageError: HeaderParseError, and CharsetError for a charset name that is not
        # ASCII (`=?\xff\xfeiso-8859-15?Q?…?=`, found by the fuzz test).
        return value


def one_line(value: str, *, limit: int | None = 998) -> str:
    """The one place that decides what may reach a header line or a log: every control
    character becomes a space, whitespace collapses, and the text is cut to `limit`."""
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
    flat = " ".join(_CONTROL.sub(" ", value).split())
    return flat if limit is None else flat[:limit].rstrip()


def addresses(values: list[str]) -> tuple[Address, ...]:
    """Mailboxes from raw header values.

    Splitting happens on the raw text and only then are display names decoded, so an encoded
    word can never smuggle in a second address.
    """
    out: list[Address] = []
    for name, addr in getaddresses(values):
        addr = one_line(addr).lower()
        if "@" not in addr or " " in addr:
            continue
        out.append(Address(addr=addr, name=one_line(decode_words(name), limit=200)))
    return tuple(out)


def content_hash(raw: bytes) -> str:
    """sha256 of the message without trace headers, so copies of one mail hash alike."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    newline = b"\r\n"
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
        newline = b"\n"
    digest = hashlib.sha256()
    keep = True
    for line in head.split(newline):
        if line[:1] in (b" ", b"\t"):
            if keep:
                digest.update(line.rstrip() + b"\n")
            continue
        name = line.partition(b":")[0].strip().lower()
        keep = name not in TRACE_HEADERS
        if keep:
            digest.update(line.rstrip() + b"\n")
    digest.update(b"\n")
    digest.update(body.replace(b"\r\n", b"\n"))
    return digest.hexdigest()


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_THREAD_HEADER = re.compile(
    rb"^(message-id|in-reply-to|references)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.M
)


def threading_headers(raw: bytes) -> tuple[str, str, str]:
    """Message-ID, In-Reply-To and References read by regex from the header block.

    Cheap enough for the SMTP path (~5 µs), where a full parse is not.
    """
    end = _HEADER_END.search(raw)
    head = raw[: end.start()] if end else raw[:65536]
    found: dict[bytes, str] = {}
    for match in _THREAD_HEADER.finditer(head):
        key = match.group(1).lower()
        if key not in found:
            found[key] = match.group(2).decode("ascii", "replace")
    msgid = first_message_id(found.get(b"message-id", ""))
    irt = " ".join(f"<{i}>" for i in message_ids(found.get(b"in-reply-to", "")))
    refs = " ".join(f"<{i}>" for i in message_ids(found.get(b"references", "")))
    return msgid, irt, refs
