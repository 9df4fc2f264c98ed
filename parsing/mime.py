"""Parsing raw bytes once into a `ParsedMessage`, within limits so a MIME bomb cannot stall us."""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import PurePosixPath, PureWindowsPath

from parsing.autoreply import auto_reply_reason
from parsing.bounce import parse_bounce
from parsing.headers import (
    addresses,
    content_hash,
    decode_words,
    first_message_id,
    message_ids,
    one_line,
)
from parsing.model import Address, Attachment, ParsedMessage
from parsing.quoted import extract_new_text, html_to_text


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 40 * 1024 * 1024
    max_parts: int = 500
    max_depth: int = 20
    max_header_bytes: int = 1024 * 1024
    max_text_chars: int = 2 * 1024 * 1024


class MessageRejected(ValueError):
    """The message breaks a parse limit; the reason is safe to show to ops."""


def _decoded_payload(part: Message) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except (ValueError, TypeError, AssertionError):
        payload = None
    if isinstance(payload, bytes):
        return payload
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def _flattened(inner: Message) -> bytes | None:
    """An attached message's bytes, for reading it as a forward; None if it cannot be made.

    The bytes generator refuses text it cannot write back as ASCII: a multipart whose
    Content-Type is mangled (``multipart/\\xff\\xfealternative``, found by the fuzzer) has
    its body kept as decoded text. The text generator writes it, encoded as UTF-8."""
    try:
        return inner.as_bytes()
    except (UnicodeError, LookupError, ValueError, TypeError):
        pass
    try:
        return inner.as_string().encode("utf-8", "surrogateescape")
    except (UnicodeError, LookupError, ValueError, TypeError):
        return None


def _text_of(part: Message) -> str:
    data = _decoded_payload(part)
    charset = part.get_content_charset() or "utf-8"
    for candidate in (charset, "utf-8", "windows-1252"):
        try:
            return data.decode(candidate)
        except (LookupError, ValueError):  # a NUL in the name is a ValueError
            continue
    return data.decode("latin-1")


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f<>:\"|?*\\/]+")


def safe_filename(name: str) -> str:
    """A display name for an attachment: no path, no control characters, never empty."""
    name = decode_words(name)
    name = PureWindowsPath(PurePosixPath(name).name).name
    name = one_line(_UNSAFE_NAME.sub("_", name), limit=200).lstrip(".")
    return name or "attachment"


def _walk(msg: Message, limits: Limits) -> list[tuple[Message, int]]:
    """Every leaf part with its depth; raises MessageRejected past the part or depth limit."""
    leaves: list[tuple[Message, int]] = []
    stack: list[tuple[Message, int]] = [(msg, 0)]
    count = 0
    while stack:
        part, depth = stack.pop()
        count += 1
        if count > limits.max_parts:
            raise MessageRejected(f"more than {limits.max_parts} MIME parts")
        if depth > limits.max_depth:
            raise MessageRejected(f"MIME nesting deeper than {limits.max_depth}")
        if part.get_content_maintype() == "multipart":
            children = part.get_payload()
            if isinstance(children, list):
                stack.extend(
                    (child, depth + 1) for child in reversed(children) if isinstance(child, Message)
                )
            continue
        leaves.append((part, depth))
    return leaves


def parse_message(raw: bytes, *, limits: Limits | None = None) -> ParsedMessage:
    """The one parse of a received message. Raises MessageRejected for a message over a limit."""
    limits = limits or Limits()
    if len(raw) > limits.max_bytes:
        raise MessageRejected(f"message of {len(raw)} bytes is over {limits.max_bytes}")
    if len(raw) > limits.max_header_bytes and not _HEADER_END.search(
        raw, 0, limits.max_header_bytes
    ):
        raise MessageRejected(f"header block over {limits.max_header_bytes} bytes")
    try:
        return _parse(raw, limits)
    except RecursionError:
        raise MessageRejected(f"MIME nesting too deep to parse (over {limits.max_depth})") from None


def _parse(raw: bytes, limits: Limits) -> ParsedMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)

    headers = tuple(
        (str(key).lower(), one_line(decode_words(str(value)), limit=4000))
        for key, value in msg.items()
    )
    raw_from = [str(v) for v in msg.get_all("From", [])]
    from_list = addresses(raw_from)
    sender_list = addresses([str(v) for v in msg.get_all("Sender", [])])
    msgid = first_message_id(str(msg.get("Message-ID", "")))
    has_id = bool(msgid)
    if not has_id:
        msgid = f"{hashlib.sha256(raw).hexdigest()[:32]}@missing-id.invalid"
    date = None
    try:
        raw_date = msg.get("Date")
        if raw_date:
            date = parsedate_to_datetime(str(raw_date))
    except (TypeError, ValueError, IndexError):
        date = None

    text_parts: list[str] = []
    html_parts: list[str] = []
    attachments: list[Attachment] = []
    forwarded: list[bytes] = []
    for part, _depth in _walk(msg, limits):
        ctype = part.get_content_type()
        disposition = str(part.get("Content-Disposition", "")).split(";")[0].strip().lower()
        filename = part.get_filename()
        if ctype == "message/rfc822" or ctype == "message/global":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                flat = _flattened(inner[0])
                if flat is not None:
                    forwarded.append(flat)
            continue
        if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
            (text_parts if ctype == "text/plain" else html_parts).append(_text_of(part))
            continue
        if part.get_content_maintype() == "message" or ctype == "text/rfc822-headers":
            continue  # delivery-status and the like: read by the bounce parser
        attachments.append(
            Attachment(
                filename=safe_filename(str(filename or "")),
                content_type=ctype,
                data=_decoded_payload(part),
                content_id=first_message_id(str(part.get("Content-ID", ""))),
                inline=disposition == "inline",
            )
        )

    html = "\n".join(html_parts)[: limits.max_text_chars]
    text = "\n".join(text_parts) if text_parts else html_to_text(html)
    text = text.replace("\r\n", "\n")[: limits.max_text_chars]
    defects = tuple(sorted({type(d).__name__ for p in msg.walk() for d in p.defects}))

    return ParsedMessage(
        message_id=msgid,
        has_message_id=has_id,
        in_reply_to=message_ids(" ".join(str(v) for v in msg.get_all("In-Reply-To", []))),
        references=message_ids(" ".join(str(v) for v in msg.get_all("References", []))),
        from_addr=from_list[0] if from_list else None,
        from_count=len(from_list),
        sender=sender_list[0] if sender_list else None,
        reply_to=addresses([str(v) for v in msg.get_all("Reply-To", [])]),
        to=addresses([str(v) for v in msg.get_all("To", [])]),
        cc=addresses([str(v) for v in msg.get_all("Cc", [])]),
        subject=one_line(decode_words(str(msg.get("Subject", ""))), limit=1000),
        date=date,
        text=text,
        html=html,
        new_text=extract_new_text(text),
        attachments=tuple(attachments),
        forwarded=tuple(forwarded),
        headers=headers,
        bounce=parse_bounce(msg),
        content_hash=content_hash(raw),
        size=len(raw),
        defects=defects,
        automatic=auto_reply_reason(msg, envelope_from=None) or "",
    )


def display(address: Address | None) -> str:
    """An address as a person reads it, for logs and listings."""
    if address is None:
        return ""
    return f"{address.name} <{address.addr}>" if address.name else address.addr
