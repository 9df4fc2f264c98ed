"""Turning a rendered notice into SMTP-ready bytes with headers nobody can inject into.

Every header value and display name passes `one_line` and then `_settle`, because the email
policy decodes RFC 2047 words in what we set: a customer's subject ``=?utf-8?q?=0D=0A...?=``
would otherwise come back as a real line break. Message-IDs are validated and written raw so a
long one is never turned into an encoded word (which would break threading).
"""

from __future__ import annotations

import binascii
import functools
import itertools
import random
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime

from parsing.headers import one_line
from parsing.model import Address
from responders.render import Notice
from responders.threadindex import thread_index
from responders.tokens import (
    message_id_for,
    parse_own_message_id,
    reply_token,
    verify_reply_token,
)

__all__ = [
    "MAX_REFERENCES",
    "SMTP_POLICY",
    "compose",
    "is_safe_address",
    "message_id_for",
    "parse_own_message_id",
    "reply_token",
    "verify_reply_token",
]


class _Registry(HeaderRegistry):
    """The stdlib registry builds a new header class on every lookup (`type(...)` each time,
    about a tenth of composing); the classes depend only on the name, so build each once."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(key)
        return cls


# refold_source="none": the raw Message-ID headers we set are written exactly as given.
SMTP_POLICY = policy.default.clone(
    linesep="\r\n", cte_type="7bit", refold_source="none", header_factory=_Registry()
)
MAX_REFERENCES = 20
TEXT_LIMIT = 200  # subjects, display names, Thread-Topic
VALUE_LIMIT = 900  # any other header value; a header line stays under 998 octets

_MSG_ID = re.compile(r"[!-;=?-~]+@[!-;=?-~]+")  # printable ASCII, no spaces, no < or >
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# A dot-atom local part at a domain of dot-separated labels: what a header can carry unquoted.
_ADDR = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_OURS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "reply-to",
        "auto-submitted",
        "x-auto-response-suppress",
        "thread-topic",
        "thread-index",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "sender",
        "return-path",
    }
)


def _settle(text: str, limit: int) -> str:
    """One-line text that stays one line after the policy decodes any encoded words in it."""
    for _ in range(4):
        clean = one_line(text, limit=limit)
        if "=?" not in clean:  # no encoded word: the policy gives it back as it is
            return clean
        decoded = str(SMTP_POLICY.header_factory("subject", clean))
        if decoded == clean:
            return clean
        text = decoded
    # Still changing after several rounds: nested encoded words, so keep no "=?" at all.
    return one_line(text.replace("=?", "= ?"), limit=limit)


_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*")  # printable ASCII words, one space between
_FOLD_AT = 78  # the policy folds lines longer than this


def _header(name: str, value: str | HeaderAddress | list[HeaderAddress]) -> bytes:
    """One header's folded line(s), as ``msg[name] = value`` would write them.

    A value of plain ASCII words with no encoded word is never parsed here (parsing it into a
    tree and folding that back was over a third of composing): a short one is the line the
    policy would write anyway, and a long one is folded where the policy folds a value of the
    same shape (`_breaks`). The rest goes through the policy."""
    text = value if isinstance(value, str) else ", ".join(map(str, _listed(value)))
    if not isinstance(value, str) and not text.isascii():
        encoded = _encoded_addresses(name, _listed(value))
        if encoded is not None:
            return encoded
    if "=?" not in text and _PLAIN.fullmatch(text):
        line = f"{name}: {text}"
        if len(line) <= _FOLD_AT:
            return f"{line}\r\n".encode("ascii")
        breaks = _breaks(name, _ALNUM.sub("a", text))
        if breaks is not None:
            ends = zip((0, *breaks), (*breaks, len(line)), strict=True)
            return ("\r\n".join(line[i:j] for i, j in ends) + "\r\n").encode("ascii")
    return SMTP_POLICY.fold_binary(name, SMTP_POLICY.header_store_parse(name, value)[1])


_ALNUM = re.compile(r"[A-Za-z0-9]")
# RFC 2047 5(3): what a Q-encoded word in a phrase may carry as itself; "_" is a space.
_Q_LITERAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q_WORD_TEXT = 48  # encoded text per word: "=?utf-8?q?" + 48 + "?=" fits after "Reply-To: "
_ENCODED_LINE = 76  # RFC 2047 section 2: a line with an encoded word, at most


def _q_words(phrase: str) -> list[str]:
    """`phrase` as RFC 2047 Q-encoded UTF-8 words, never splitting a character's bytes
    (decoders join adjacent encoded words, dropping the space between them)."""
    words: list[str] = []
    chunk = ""
    for char in phrase:
        if char in _Q_LITERAL:
            piece = char
        elif char == " ":
            piece = "_"
        else:
            piece = "".join(f"={byte:02X}" for byte in char.encode("utf-8"))
        if len(chunk) + len(piece) > _Q_WORD_TEXT:
            words.append(f"=?utf-8?q?{chunk}?=")
            chunk = ""
        chunk += piece
    words.append(f"=?utf-8?q?{chunk}?=")
    return words


def _encoded_addresses(name: str, addresses: list[HeaderAddress]) -> bytes | None:
    """An address header whose display names are not ASCII, written without the policy
    (which parsed, encoded and refolded it in ~280 µs, most of composing such a notice):
    each name as Q-encoded words, folded between words. None, for the policy, when any
    name is ASCII: those follow quoting rules this does not repeat."""
    tokens: list[str] = []
    for address in addresses:
        display, spec = address.display_name, address.addr_spec
        if display.isascii():
            return None
        tokens += [*_q_words(display), f"<{spec}>,"]
    tokens[-1] = tokens[-1].removesuffix(",")
    lines, line = [], f"{name}:"
    for token in tokens:
        if len(line) + 1 + len(token) > _ENCODED_LINE and line != f"{name}:":
            lines.append(line)
            line = ""
        line += f" {token}"
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


@functools.lru_cache(maxsize=1024)
def _breaks(name: str, shape: str) -> tuple[int, ...] | None:
    """Where the policy breaks ``name: shape`` into lines, as offsets in the one-line form;
    None when folding it does more than break lines (an over-long word it would encode).

    ``shape`` is a plain value with every letter and digit made an ``a``. The header parser
    and the folder treat letters and digits alike (structure comes from spaces and
    punctuation, and a value with ``=?`` never gets here), so a value folds where its shape
    does: a long Reply-To with a reply token has the same few shapes across a mailbox's
    notices."""
    folded = SMTP_POLICY.fold_binary(name, SMTP_POLICY.header_store_parse(name, shape)[1])
    lines = folded.decode("ascii").removesuffix("\r\n").split("\r\n")
    if "".join(lines) != f"{name}: {shape}":
        return None
    return tuple(itertools.accumulate(len(x) for x in lines[:-1]))


@functools.lru_cache(maxsize=64)
def _date(when: datetime, offset: timedelta | None) -> bytes:
    """The Date header, kept: the notices of one pipeline group share their date. Keyed by
    the offset too, since equal instants in two zones are equal datetimes."""
    return _header("Date", format_datetime(when))


def _raw(name: str, value: str) -> bytes:
    """A header written as given (our own ids, already checked), as ``set_raw`` would be."""
    return f"{name}: {value}\r\n".encode("ascii")


def _listed(value: HeaderAddress | list[HeaderAddress]) -> list[HeaderAddress]:
    return value if isinstance(value, list) else [value]


def is_safe_address(spec: str) -> bool:
    """Whether `compose` can write this address into a header."""
    return bool(_ADDR.fullmatch(spec))


def _address(addr: Address) -> HeaderAddress:
    spec = addr.addr
    if not is_safe_address(spec):
        raise ValueError(f"not a safe ASCII mail address: {spec!r}")
    # Split as the header parser would split it, without running the parser (a fifth of
    # composing): a safe address is a dot-atom at a domain.
    local, _, domain = spec.rpartition("@")
    return HeaderAddress(_settle(addr.name, TEXT_LIMIT), username=local, domain=domain)


def _clean_id(value: str) -> str | None:
    """A Message-ID from mail we received, bare; None when it is unfit to repeat in a header."""
    bare = value.strip().removeprefix("<").removesuffix(">")
    return bare if _MSG_ID.fullmatch(bare) and len(bare) < VALUE_LIMIT else None


def _references(references: Sequence[str], in_reply_to: str | None) -> list[str]:
    ids = [i for i in (_clean_id(r) for r in references) if i]
    if in_reply_to and in_reply_to not in ids:
        ids.append(in_reply_to)
    unique = list(dict.fromkeys(ids))
    if len(unique) > MAX_REFERENCES:  # keep the thread's root and the newest ones
        unique = [unique[0], *unique[-(MAX_REFERENCES - 1) :]]
    return unique


def compose(
    notice: Notice,
    *,
    from_addr: Address,
    to: Sequence[Address],
    cc: Sequence[Address] = (),
    message_id: str,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    reply_to: Address | None = None,
    auto_submitted: str | None = None,
    thread_topic: str | None = None,
    date: datetime | None = None,
    extra_headers: Sequence[tuple[str, str]] = (),
    attachments: Sequence[tuple[str, str, bytes]] = (),
) -> bytes:
    """The notice as a complete message, CRLF line endings, ready for DATA or a Maildir.

    ``in_reply_to`` is appended to ``references`` when missing; ids from received mail that are
    unfit for a header are dropped rather than failing the reply. ``attachments`` are
    ``(filename, content_type, data)``. Raises ValueError for an unsafe address, our own
    malformed ``message_id``, a naive ``date``, or an extra header that would shadow ours.
    """
    own_id = _clean_id(message_id)
    if own_id is None:
        raise ValueError(f"not a valid Message-ID: {message_id!r}")
    when = date if date is not None else datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("date must be timezone-aware")
    if not to:
        raise ValueError("a message needs at least one To address")
    parent = _clean_id(in_reply_to) if in_reply_to else None
    refs = _references(references, parent)

    head = [_header("From", _address(from_addr)), _header("To", [_address(a) for a in to])]
    if cc:
        head.append(_header("Cc", [_address(a) for a in cc]))
    if reply_to is not None:
        head.append(_header("Reply-To", _address(reply_to)))
    head.append(_header("Subject", _settle(notice.subject, TEXT_LIMIT)))
    head.append(_date(when, when.utcoffset()))
    head.append(_raw("Message-ID", f"<{own_id}>"))
    if parent:
        head.append(_raw("In-Reply-To", f"<{parent}>"))
    if refs:
        head.append(_raw("References", "\r\n ".join(f"<{i}>" for i in refs)))
    if auto_submitted:
        head.append(_header("Auto-Submitted", _settle(auto_submitted, VALUE_LIMIT)))
    head.append(_header("X-Auto-Response-Suppress", "All"))
    if thread_topic:
        head.append(_header("Thread-Topic", _settle(thread_topic, TEXT_LIMIT)))
    head.append(_header("Thread-Index", thread_index(seed=refs[0] if refs else own_id, date=when)))
    for name, value in extra_headers:
        lowered = name.lower()
        if not _HEADER_NAME.fullmatch(name) or lowered in _OURS or lowered.startswith("content-"):
            raise ValueError(f"extra header not allowed: {name!r}")
        head.append(_header(name, _settle(value, VALUE_LIMIT)))
    body = _mime_body(notice, attachments) if attachments else _text_body(notice)
    return b"".join(head) + body


def _mime_body(notice: Notice, attachments: Sequence[tuple[str, str, bytes]]) -> bytes:
    """The MIME headers and body of the notice by the email package: the general way, for
    notices with attachments, and the reference `_text_body` is tested against."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg.set_content(notice.text)
    if notice.html is not None:
        msg.add_alternative(notice.html, subtype="html")
    for filename, content_type, data in attachments:
        maintype, _, subtype = content_type.partition("/")
        if not (maintype and subtype and _HEADER_NAME.fullmatch(content_type)):
            maintype, subtype = "application", "octet-stream"
        name = _settle(filename, TEXT_LIMIT).replace("/", "_").replace("\\", "_") or "attachment"
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=SMTP_POLICY)


def _text_body(notice: Notice) -> bytes:
    """What `_mime_body` gives for a notice without attachments (text, or text and HTML as
    multipart/alternative), byte for byte but for the random boundary, written directly: the
    email package's content manager and generator were half of composing a notice."""
    if notice.html is None:
        return _text_part(notice.text, "plain", mime_version=True)
    parts = [
        _text_part(notice.text, "plain", mime_version=False),
        _text_part(notice.html, "html", mime_version=True),  # the package repeats it here
    ]
    boundary = _boundary(parts)
    return b"".join(
        [
            b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n boundary="%s"\r\n'
            b"\r\n--%s\r\n" % (boundary, boundary),
            f"\r\n--{boundary.decode()}\r\n".encode().join(parts),
            b"\r\n--%s--\r\n" % boundary,
        ]
    )


def _boundary(parts: Sequence[bytes]) -> bytes:
    """A boundary in the email package's form that no part contains."""
    while True:
        boundary = b"===============%019d==" % random.randrange(sys.maxsize)
        if not any(b"--" + boundary in part for part in parts):
            return boundary


def _text_part(text: str, subtype: str, *, mime_version: bool) -> bytes:
    """A UTF-8 text part, its transfer encoding chosen as `set_content` chooses it: 7bit when
    every line is ASCII and short enough, else the shorter of quoted-printable and base64 as
    judged on the first ten lines. Written with CRLF line ends, as the generator writes it."""
    limit = _FOLD_AT  # SMTP_POLICY.max_line_length
    lines = text.encode("utf-8").splitlines()
    embedded = b"\r\n".join(lines) + b"\r\n"
    if max(map(len, lines), default=0) <= limit and embedded.isascii():
        cte, payload = "7bit", embedded
    else:
        sniff = b"\r\n".join(lines[:10]) + b"\r\n"
        sniff_qp = _quoted_printable(sniff.decode("latin-1"), limit)
        # Lengths as set_content compares them: its quoted-printable has one-byte line ends.
        if len(sniff_qp) - sniff_qp.count("\r\n") > len(binascii.b2a_base64(sniff)):
            cte, step = "base64", limit // 4 * 3
            payload = b"".join(
                binascii.b2a_base64(embedded[i : i + step], newline=False) + b"\r\n"
                for i in range(0, len(embedded), step)
            )
        elif len(lines) <= 10:
            cte, payload = "quoted-printable", sniff_qp.encode("ascii")
        else:
            cte = "quoted-printable"
            payload = _quoted_printable(embedded.decode("latin-1"), limit).encode("ascii")
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    if mime_version:
        head += "MIME-Version: 1.0\r\n"
    return (head + "\r\n").encode("ascii") + payload


# What body quoted-printable spells as =XX: '=', control characters but tab and line ends,
# and every 8-bit byte (the body arrives as UTF-8 bytes read as Latin-1).
_QP_UNSAFE = re.compile(r"[^\t\n\r -<>-~]")
_QP_ESCAPES = [f"={c:02X}" for c in range(256)]


def _qp_escape(match: re.Match[str]) -> str:
    return _QP_ESCAPES[ord(match.group())]


def _quoted_printable(body: str, limit: int) -> str:
    """``quoprimime.body_encode(body, limit, eol="\\r\\n")``, the same output, with the
    character-by-character table lookup replaced by a search for the characters to escape
    (mail is mostly ASCII). The line breaking below is the stdlib's, unchanged."""
    if not body:
        return body
    body = _QP_UNSAFE.sub(_qp_escape, body)
    soft_break = "=\r\n"
    limit1 = limit - 1
    encoded: list[str] = []
    append = encoded.append
    for line in body.splitlines():
        start = 0
        laststart = len(line) - 1 - limit
        while start <= laststart:
            stop = start + limit1
            if line[stop - 2] == "=":  # never split an escape
                append(line[start : stop - 1])
                start = stop - 2
            elif line[stop - 1] == "=":
                append(line[start:stop])
                start = stop - 1
            else:
                append(line[start:stop] + "=")
                start = stop
        if line and line[-1] in " \t":  # trailing whitespace is escaped, room permitting
            room = start - laststart
            if room >= 3:
                q = _QP_ESCAPES[ord(line[-1])]
            elif room == 2:
                q = line[-1] + soft_break
            else:
                q = soft_break + _QP_ESCAPES[ord(line[-1])]
            append(line[start:-1] + q)
        else:
            append(line[start:])
    if body[-1] in "\r\n":
        append("")
    return "\r\n".join(encoded)
