"""One-line header text: the single place that decides what may reach a mail header.

A customer's name or subject must never add a header line or reorder text on screen, so every
control character (C0, DEL, C1, line/paragraph separators, bidi controls) becomes a space.
"""

from __future__ import annotations

import re

__all__ = ["one_line"]

# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators, and the bidi marks,
# embeddings, overrides and isolates that can make a subject read differently from its bytes.
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def one_line(text: str, *, limit: int | None = None) -> str:
    """``text`` on one line: controls replaced by spaces, whitespace collapsed, cut to ``limit``."""
    flat = " ".join(_CONTROL.sub(" ", text).split())
    if limit is not None and len(flat) > limit:
        flat = flat[:limit].rstrip()
    return flat
