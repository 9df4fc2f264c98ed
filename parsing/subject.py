"""Subject lines: reply/forward prefixes, header-safe single lines and ticket tags."""

from __future__ import annotations

import re

from parsing.headers import one_line

__all__ = ["find_ticket_refs", "is_forward_subject", "normalise_subject", "one_line"]

__all__ = ["find_ticket_refs", "is_forward_subject", "normalise_subject", "one_line"]

# Forward prefixes: English, German (WG), French (TR), Spanish (RV), Danish/Norwegian (VS),
# Polish (PD), Dutch (Doorst), Italian (I), Swedish (VB), Finnish (VL), Portuguese (ENC),
# Turkish (İLT), Chinese, Russian.
_FORWARD = (
    "fwd", "fw", "wg", "tr", "rv", "vs", "pd", "doorst", "i", "vb", "vl", "enc", "ilt", "i̇lt",
    "转发", "轉發", "轉寄", "пересл",
)  # fmt: skip
# Reply prefixes: English, German (AW, Antw, Antwort), Scandinavian (SV), Finnish (VS is
# ambiguous; it is a forward above), Dutch (Antw), Polish (Odp), Turkish (YNT), Italian (RIF),
# French (Réf), Croatian (Odg), Greek, Chinese, Russian.
_REPLY = (
    "re", "aw", "sv", "antw", "antwort", "odp", "ynt", "rif", "réf", "ref", "odg", "απ", "σχετ",
    "回复", "答复", "回覆", "答覆", "ответ", "отв",
)  # fmt: skip
_WORDS = "|".join(re.escape(w) for w in sorted({*_FORWARD, *_REPLY}, key=len, reverse=True))
_FORWARD_WORDS = "|".join(re.escape(w) for w in sorted(_FORWARD, key=len, reverse=True))
# "Re:", "RE :", "Re[2]:", "Re(2):", "回复：". The word must be followed by its colon, so
# "Return policy" or "Irish: …" keep their first word.
_PREFIX = re.compile(
    rf"\s*(?<!\w)(?:{_WORDS})\s*(?:\[\d{{1,4}}\]|\(\d{{1,4}}\))?\s*[:：]", re.IGNORECASE
)
_FORWARD_PREFIX = re.compile(
    rf"\s*(?<!\w)(?:{_FORWARD_WORDS})\s*(?:\[\d{{1,4}}\]|\(\d{{1,4}}\))?\s*[:：]", re.IGNORECASE
)
_TAG = re.compile(r"\s*\[[^\[\]\n]{1,100}\]")
_TICKET_REF = re.compile(r"\[#(?:([A-Za-z]{1,10})-([0-9]{1,12})|([0-9]{1,12}))\]")

# Characters that must never reach a header or a log line: C0, DEL, C1, the Unicode line and
# paragraph separators, and the bidi embeddings, overrides and isolates (which can make a
# subject display differently from what it says).


def normalise_subject(subject: str) -> str:
    """The subject without its leading Re:/Fwd:/AW:/… chain, whitespace collapsed.

    Bracketed tags in the chain ("[#SG-1]", "[EXTERNAL]") are kept in place; only the
    prefixes around them go, so "Re: [#SG-1] Re: Printer" becomes "[#SG-1] Printer".
    """
    text = one_line(subject, limit=len(subject) + 1)
    kept: list[str] = []
    pos = 0
    while True:
        prefix = _PREFIX.match(text, pos)
        if prefix:
            pos = prefix.end()
            continue
        tag = _TAG.match(text, pos)
        if tag and not _is_last_word(text, tag.end()):
            kept.append(tag.group().strip())
            pos = tag.end()
            continue
        break
    kept.append(text[pos:].strip())
    return " ".join(part for part in kept if part)


def _is_last_word(text: str, pos: int) -> bool:
    return not text[pos:].strip()


def find_ticket_refs(subject: str) -> tuple[str, ...]:
    """The refs of the "[#REF]" tags in a subject, in order, each once ("[#sg-7]" -> "SG-7")."""
    refs: list[str] = []
    for match in _TICKET_REF.finditer(subject):
        prefix, number, bare = match.groups()
        ref = f"{prefix.upper()}-{number}" if prefix else bare
        if ref not in refs:
            refs.append(ref)
    return tuple(refs)


def is_forward_subject(subject: str) -> bool:
    """Whether the first prefix of the subject (after any "[tag]") is a forward prefix."""
    text = one_line(subject, limit=len(subject) + 1)
    pos = 0
    while tag := _TAG.match(text, pos):
        pos = tag.end()
    return bool(_FORWARD_PREFIX.match(text, pos))
