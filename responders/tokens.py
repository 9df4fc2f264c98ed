"""Signed identifiers: our own Message-IDs and the reply tokens in ``support+<token>@domain``.

Both carry the ticket reference and an HMAC, so a reply threads to its ticket even when a mail
client drops every header but one, and nobody can forge a token for a ticket they never saw.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

__all__ = [
    "message_id_for",
    "parse_own_message_id",
    "reply_token",
    "verify_reply_token",
]

_ID_PART = re.compile(r"[A-Za-z0-9_-]+")
_MID_MAC_CHARS = 10  # lower-case base32: 50 bits
# 80 bits: a forger gets one guess per mail sent to us, never an offline check, and every
# byte counts because the local part of an address should stay within 64 octets.
_TOKEN_MAC_BYTES = 10


def _mac(secret: bytes, purpose: bytes, data: bytes) -> bytes:
    if not secret:
        raise ValueError("an empty secret signs nothing")
    return hmac.digest(secret, purpose + b"\x00" + data, hashlib.sha256)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes | None:
    if not text or not text.isascii() or not text.isalnum():
        return None
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None
    # Only the canonical spelling counts: unused trailing bits must not make a second token.
    return raw if _b32(raw) == text.lower() else None


def _mid_mac(*, ticket_ref: str, unique: str, domain: str, secret: bytes) -> str:
    data = f"{ticket_ref}.{unique}@{domain.lower()}".encode()
    # Base32 spells each 5 bytes as 8 characters, so encoding the first 10 bytes gives the
    # first 16 characters of the whole digest's spelling.
    return _b32(_mac(secret, b"supportgate/message-id", data)[:10])[:_MID_MAC_CHARS]


def message_id_for(*, ticket_ref: str, domain: str, secret: bytes, unique: str) -> str:
    """``sg.<ticket_ref>.<unique>.<hmac10>@<domain>``, without angle brackets."""
    for label, part in (("ticket_ref", ticket_ref), ("unique", unique)):
        if not _ID_PART.fullmatch(part):
            raise ValueError(f"{label} must be letters, digits, '-' or '_': {part!r}")
    if not domain or not re.fullmatch(r"[A-Za-z0-9.-]+", domain):
        raise ValueError(f"not a domain: {domain!r}")
    mac = _mid_mac(ticket_ref=ticket_ref, unique=unique, domain=domain, secret=secret)
    return f"sg.{ticket_ref}.{unique}.{mac}@{domain}"


def parse_own_message_id(mid: str, *, domain: str, secret: bytes) -> str | None:
    """The ticket reference of one of our Message-IDs when its HMAC verifies, else None."""
    mid = mid.strip().removeprefix("<").removesuffix(">")
    local, at, mid_domain = mid.rpartition("@")
    if not at or mid_domain.lower() != domain.lower():
        return None
    parts = local.split(".")
    if len(parts) != 4 or parts[0] != "sg":
        return None
    _, ref, unique, mac = parts
    if not (_ID_PART.fullmatch(ref) and _ID_PART.fullmatch(unique)):
        return None
    expected = _mid_mac(ticket_ref=ref, unique=unique, domain=domain, secret=secret)
    if not hmac.compare_digest(expected.encode(), mac.lower().encode("ascii", "replace")):
        return None
    return ref


def reply_token(*, ticket_ref: str, agent: str, secret: bytes) -> str:
    """A lower-case base32 token naming the ticket and who replies ("" for the requester).

    It survives MTAs that lower-case local parts. The agent's address is lower-cased.
    """
    if not ticket_ref or "\x00" in ticket_ref or "\x00" in agent:
        raise ValueError("ticket_ref must be non-empty and neither value may hold NUL")
    payload = ticket_ref.encode() + b"\x00" + agent.lower().encode()
    mac = _mac(secret, b"supportgate/reply-token", payload)[:_TOKEN_MAC_BYTES]
    return _b32(payload + mac)


def verify_reply_token(token: str, *, secret: bytes) -> tuple[str, str] | None:
    """``(ticket_ref, agent)`` when the token's HMAC verifies, else None."""
    raw = _unb32(token)
    if raw is None or len(raw) <= _TOKEN_MAC_BYTES:
        return None
    payload, mac = raw[:-_TOKEN_MAC_BYTES], raw[-_TOKEN_MAC_BYTES:]
    expected = _mac(secret, b"supportgate/reply-token", payload)[:_TOKEN_MAC_BYTES]
    if not hmac.compare_digest(expected, mac):
        return None
    ref, sep, agent = payload.partition(b"\x00")
    if not sep:
        return None
    try:
        return ref.decode(), agent.decode()
    except UnicodeDecodeError:
        return None
