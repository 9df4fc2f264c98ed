"""Outlook's Thread-Index, so Outlook users see a ticket's mail as one conversation.

Format (MS-OXOMSG 2.2.1.3, the 22-byte conversation index header), base64-encoded:

- byte 0: ``0x01`` (reserved);
- bytes 1-5: the top 40 bits of the message date as a FILETIME (100 ns ticks since
  1601-01-01 UTC), big-endian;
- bytes 6-21: a GUID-sized value, the first 16 bytes of SHA-256 of a seed that is stable for the
  whole ticket (the thread's root Message-ID), so every message of a ticket shares it.

We send only the header block (no 5-byte response levels): Outlook groups by the GUID part.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

__all__ = ["THREAD_INDEX_BYTES", "thread_index"]

THREAD_INDEX_BYTES = 22
_FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)


def _filetime(when: datetime) -> int:
    delta = when.astimezone(UTC) - _FILETIME_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def thread_index(*, seed: str, date: datetime) -> str:
    """The base64 Thread-Index for a message dated ``date`` in the thread named by ``seed``."""
    if date.tzinfo is None:
        raise ValueError("thread_index needs an aware datetime")
    stamp = (_filetime(date) >> 24).to_bytes(5, "big")
    guid = hashlib.sha256(seed.encode("utf-8")).digest()[:16]
    return base64.b64encode(b"\x01" + stamp + guid).decode("ascii")
