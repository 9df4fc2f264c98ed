"""Staff forwards: find the forwarded block and check the forwarder's own words carry context.

The gateway refuses a blind forward ("FYI" and nothing else); this module only detects and
measures, so the rules stay testable without mail servers or a database.
"""

from __future__ import annotations

import functools
import html as htmllib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import message_from_bytes
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32
from email.utils import getaddresses

from parsing.model import Address

# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Forward:
    """A detected forward: the forwarder's words and what the outermost forwarded block says."""

    own_text: str  # the forwarder's text above the forwarded block, signature removed
    original_from: Address | None
    original_to: str
    original_date: str
    original_subject: str
    original_text: str
    style: str  # gmail | outlook | apple | thunderbird | rfc822-attachment | generic


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One piece of context a forward must carry, and the labels a forwarder may write it under."""

    name: str
    labels: tuple[str, ...]
    kind: str  # customer | link | summary | consequences | timing


@dataclass(frozen=True, slots=True)
class ContextCheck:
    """Which fields the forwarder gave (with their values) and which are missing, in spec order."""

    present: tuple[str, ...]
    missing: tuple[str, ...]
    values: tuple[tuple[str, str], ...]


DEFAULT_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "customer",
        (
            "Customer",
            "Customer details",
            "Customer name",
            "Customer contact",
            "Client",
            "Account",
            "Company",
            "Contact",
            "Organisation",
            "Organization",
        ),
        "customer",
    ),
    FieldSpec(
        "link",
        ("Link", "Issue", "Ticket", "URL", "Issue link", "Ticket link", "Link to the issue"),
        "link",
    ),
    FieldSpec("summary", ("Summary", "TL;DR", "TLDR", "Problem", "Context"), "summary"),
    FieldSpec(
        "consequences",
        (
            "Consequences",
            "Impact",
            "Risk",
            "If we don't act",
            "If we do nothing",
            "Business impact",
            "Consequence",
        ),
        "consequences",
    ),
    FieldSpec(
        "timing",
        (
            "Timing",
            "Deadline",
            "Time considerations",
            "Urgency",
            "When",
            "Timeline",
            "Time frame",
            "Timeframe",
            "Due date",
            "Needed by",
        ),
        "timing",
    ),
)

# --------------------------------------------------------------------------------------------
# Subjects

_FORWARD_PREFIXES = frozenset(
    {"fwd", "fw", "wg", "tr", "rv", "vs", "pd", "i", "vb", "vl", "doorst", "enc", "fs"}
    | {"转发", "轉寄", "転送", "пересл"}
)
_REPLY_PREFIXES = frozenset(
    {"re", "aw", "sv", "antw", "r", "rif", "odp", "res", "ynt", "atb"}
    | {"回复", "答复", "回覆", "返信", "отв", "ответ"}
)
_SUBJECT_PREFIX = re.compile(r"\s*(?:\[[^\]]*\]\s*)*([^\W\d_]{1,8})\s*(?:\[\d+\]|\(\d+\))?\s*[:：]")


def _subject_kind(subject: str) -> str:
    """Forward, reply or neither, from the outermost subject prefix only ("RE: FW:" is a reply)."""
    match = _SUBJECT_PREFIX.match(subject)
    if match is None:
        return ""
    word = match.group(1).lower()
    if word in _FORWARD_PREFIXES:
        return "forward"
    if word in _REPLY_PREFIXES:
        return "reply"
    return ""


# --------------------------------------------------------------------------------------------
# Block separators and header labels (clients localise both)

_FORWARD_PHRASES = (
    "forwarded message",
    "forwarded e-mail",
    "forwarded email",
    "weitergeleitete nachricht",
    "message transféré",
    "message transfere",
    "mensaje reenviado",
    "messaggio inoltrato",
    "doorgestuurd bericht",
    "vidarebefordrat meddelande",
    "videresendt melding",
    "videresendt meddelelse",
    "mensagem encaminhada",
    "wiadomość przekazana dalej",
    "przekazana wiadomość",
    "přeposlaná zpráva",
    "edelleenlähetetty viesti",
    "välitetty viesti",
    "пересылаемое сообщение",
    "пересланное сообщение",
    "转发的邮件",
    "轉寄的郵件",
    "転送されたメッセージ",
)
_ORIGINAL_PHRASES = (
    "original message",
    "ursprüngliche nachricht",
    "originalnachricht",
    "message d'origine",
    "message original",
    "mensaje original",
    "messaggio originale",
    "oorspronkelijk bericht",
    "origineel bericht",
    "ursprungligt meddelande",
    "originalmeddelande",
    "oryginalna wiadomość",
    "wiadomość oryginalna",
    "původní zpráva",
    "mensagem original",
    "alkuperäinen viesti",
    "oprindelig meddelelse",
    "opprinnelig melding",
    "исходное сообщение",
    "原始邮件",
    "原始郵件",
    "元のメッセージ",
)
_APPLE_PHRASES = (
    "begin forwarded message",
    "anfang der weitergeleiteten nachricht",
    "début du message réexpédié",
    "début du message transféré",
    "inicio del mensaje reenviado",
    "comienzo del mensaje reenviado",
    "inizio messaggio inoltrato",
    "begin doorgestuurd bericht",
    "vidarebefordrat mejl",
    "vidarebefordrat brev",
    "start på videresendt besked",
    "videresendt melding",
    "początek przekazywanej wiadomości",
    "início da mensagem reencaminhada",
    "начало переадресованного сообщения",
    "转发的邮件",
    "転送されたメッセージ",
)


def _alternation(phrases: Sequence[str]) -> str:
    return "|".join(
        re.escape(p).replace("'", "['’]") for p in sorted(phrases, key=len, reverse=True)
    )


_DASHED = re.compile(
    r"^(?P<left>[-=]{2,})\s*(?P<phrase>.+?)\s*[-=]{2,}\s*$",
)
_APPLE = re.compile(rf"^(?:{_alternation(_APPLE_PHRASES)})\s*[:：]?\s*$", re.IGNORECASE)
_UNDERSCORES = re.compile(r"^_{10,}\s*$")
# HTML rendered without line breaks glues the separator to the text around it.
_INLINE_SEPARATOR = re.compile(
    rf"(-{{5,}}\s*(?:{_alternation(_FORWARD_PHRASES)})\s*-{{5,}}|"
    rf"\b(?:{_alternation(_APPLE_PHRASES[:1])})\s*:)",
    re.IGNORECASE,
)

_HEADER_LABELS: dict[str, tuple[str, ...]] = {
    "from": (
        "From", "Von", "De", "Da", "Van", "Från", "Od", "Fra", "Mittente", "Lähettäjä",
        "Odesílatel", "Afzender", "Remitente", "Expéditeur", "发件人", "寄件者", "差出人", "От",
    ),
    "date": (
        "Sent", "Date", "Gesendet", "Datum", "Envoyé", "Envoyé le", "Enviado", "Enviado el",
        "Fecha", "Inviato", "Data", "Verzonden", "Skickat", "Wysłano", "Sendt", "Lähetetty",
        "Odesláno", "发送时间", "日期", "寄件日期", "送信日時", "日付", "Отправлено", "Дата",
    ),
    "to": (
        "To", "An", "À", "A", "Para", "Aan", "Till", "Do", "Til", "Pour", "Vastaanottaja",
        "Komu", "收件人", "宛先", "Кому",
    ),
    "cc": ("Cc", "Kopie", "Kopia", "DW", "Kopio", "抄送", "副本", "Копия"),
    "subject": (
        "Subject", "Betreff", "Objet", "Sujet", "Asunto", "Oggetto", "Onderwerp", "Ämne",
        "Temat", "Emne", "Assunto", "Aihe", "Předmět", "主题", "主旨", "件名", "Тема",
    ),
}  # fmt: skip
_LABEL_KEY = {label.lower(): key for key, labels in _HEADER_LABELS.items() for label in labels}
_HEADER_LINE = re.compile(
    rf"^\s*\*{{0,2}}(?P<label>{_alternation(list(_LABEL_KEY))})\*{{0,2}}\s*"
    r"(?:：|:\*{0,2}(?:\s+|$))(?P<value>.*)$",
    re.IGNORECASE,
)
_GLUED_HEADER = re.compile(r"(?<=[^\s-])(?=(?:Date|Sent|Subject|To|Cc):\s)")

_ATTRIBUTION = re.compile(
    r"^(?:on|am|le|el|il|op|den|w dniu|em)\b.{4,200}?"
    r"(?:wrote|schrieb|a écrit|escribió|ha scritto|schreef|skrev|napisał\(a\)|napisał|escreveu)"
    r"\s*:\s*$|^.{2,120}\s(?:wrote|писал\(а\)|написал\(а\)|написал)\s*:\s*$",
    re.IGNORECASE,
)
_QUOTE_PREFIX = re.compile(r"^((?:[ \t]*>)+)[ \t]?")


def _unquote(line: str) -> tuple[int, str]:
    """Quote depth and the line's content without its '>' markers."""
    match = _QUOTE_PREFIX.match(line)
    if match is None:
        return 0, line
    return match.group(1).count(">"), line[match.end() :]


def _norm(text: str) -> str:
    return " ".join(text.replace("’", "'").split()).lower()


def _starts_with_phrase(phrase: str, phrases: Sequence[str]) -> bool:
    phrase = _norm(phrase)
    return any(phrase.startswith(p) for p in phrases)


# --------------------------------------------------------------------------------------------
# Finding the outermost block


@dataclass(frozen=True, slots=True)
class _Block:
    start: int  # first line that is not the forwarder's own text
    body: int  # first line of the forwarded body
    depth: int
    headers: tuple[tuple[str, str], ...]
    style: str
    strength: str  # forward (unambiguous) | original (reply or forward) | quote (only with Fwd:)


def _parse_headers(
    lines: Sequence[str], start: int, depth: int, *, glued: bool
) -> tuple[dict[str, str], int]:
    """The header table of a forwarded block and the index of the first line after it."""
    fields: dict[str, str] = {}
    key = ""
    i = start
    while i < len(lines):
        d, content = _unquote(lines[i])
        if d != depth and content.strip():
            break
        pieces = _GLUED_HEADER.split(content) if glued else [content]
        if len(pieces) > 1 and all(_HEADER_LINE.match(p) for p in pieces[1:]):
            for piece in pieces:  # a header table that HTML rendering put on one line
                _add_header(fields, piece)
            i += 1
            continue
        added = _add_header(fields, content)
        if added:
            key = added
        elif not fields:
            if content.strip():
                break
        elif not content.strip():
            nxt = _next_content(lines, i + 1, depth)
            label = _HEADER_LINE.match(nxt) if nxt is not None else None
            waiting = not fields[key]  # HTML tables put a value a few lines below its label
            fresh = label is not None and _LABEL_KEY[label.group("label").lower()] not in fields
            if not (waiting or fresh):
                break
        else:
            following = _next_line(lines, i + 1, depth)
            wraps = (
                not fields[key]
                or content[:1] in " \t"
                or fields[key].endswith((",", ";"))
                or (following is not None and _HEADER_LINE.match(following) is not None)
            )
            if not wraps:
                break
            fields[key] = f"{fields[key]} {content.strip()}".strip()
        i += 1
    return fields, i


def _add_header(fields: dict[str, str], content: str) -> str:
    """Record a "Label: value" line not seen yet in this table; its key, or ""."""
    match = _HEADER_LINE.match(content)
    if match is None:
        return ""
    key = _LABEL_KEY[match.group("label").lower()]
    if key in fields:
        return ""
    fields[key] = match.group("value").strip().strip("*").strip()
    return key


def _next_line(lines: Sequence[str], i: int, depth: int) -> str | None:
    if i >= len(lines):
        return None
    d, content = _unquote(lines[i])
    return content if d == depth else None


def _next_content(lines: Sequence[str], i: int, depth: int) -> str | None:
    while i < len(lines):
        d, content = _unquote(lines[i])
        if d != depth:
            return None
        if content.strip():
            return content
        i += 1
    return None


def _is_header_table(fields: dict[str, str]) -> bool:
    """A header table with no separator above it: Outlook's, with an address or complete."""
    if not ({"from", "date"} <= fields.keys() and ("subject" in fields or "to" in fields)):
        return False
    return "@" in fields["from"] or {"to", "subject"} <= fields.keys()


def _block_at(lines: Sequence[str], i: int) -> _Block | None:
    """The forwarded block that starts at line i, if one does."""
    depth, content = _unquote(lines[i])
    stripped = content.strip()
    if not stripped:
        return None
    dashed = _DASHED.match(stripped)
    if dashed is not None:
        phrase, left = dashed.group("phrase"), len(dashed.group("left"))
        if _starts_with_phrase(phrase, _FORWARD_PHRASES):
            style = "gmail" if left >= 9 else "thunderbird" if left >= 6 else "generic"
            return _with_headers(lines, i, depth, style=style, strength="forward", glued=True)
        if _starts_with_phrase(phrase, _ORIGINAL_PHRASES):
            style = "thunderbird" if left >= 6 else "outlook"
            block = _with_headers(lines, i, depth, style=style, strength="original", glued=False)
            if "from" in dict(block.headers):
                return block
            return _Block(i, i + 1, depth, (), "generic", "quote")
    if _APPLE.match(stripped):
        return _with_headers(lines, i, depth, style="apple", strength="forward", glued=False)
    if _UNDERSCORES.match(stripped):
        block = _with_headers(lines, i, depth, style="outlook", strength="original", glued=False)
        return block if "from" in dict(block.headers) else None
    header = _HEADER_LINE.match(stripped)
    if header is not None and _LABEL_KEY[header.group("label").lower()] == "from":
        fields, end = _parse_headers(lines, i, depth, glued=False)
        if _is_header_table(fields):
            return _Block(i, end, depth, tuple(fields.items()), "outlook", "original")
    attribution = stripped
    if depth == 0 and i + 1 < len(lines) and not _ATTRIBUTION.match(stripped):
        attribution = f"{stripped} {lines[i + 1].strip()}"  # clients wrap long attributions
    if _ATTRIBUTION.match(attribution) and _quote_follows(lines, i + 1):
        return _quote_block(lines, i, attribution)
    if depth > 0:
        return _Block(i, i, depth, (), "generic", "quote")
    return None


def _with_headers(
    lines: Sequence[str], i: int, depth: int, *, style: str, strength: str, glued: bool
) -> _Block:
    following = next((line for line in lines[i + 1 :] if _unquote(line)[1].strip()), None)
    if following is not None:
        depth = max(depth, _unquote(following)[0])  # the separator may sit above the quote
    fields, end = _parse_headers(lines, i + 1, depth, glued=glued)
    if not fields:
        end = i + 1
    return _Block(i, end, depth, tuple(fields.items()), style, strength)


def _quote_follows(lines: Sequence[str], i: int) -> bool:
    """Whether a '>' quote follows (after the attribution's wrapped second line, if any)."""
    for line in lines[i : i + 3]:
        if _unquote(line)[0] > 0:
            return True
    return False


def _quote_block(lines: Sequence[str], i: int, attribution: str) -> _Block:
    """A '>'-quoted message under an "On …, X wrote:" line; the author comes from that line."""
    body = i + 1
    while body < len(lines) and _unquote(lines[body])[0] == 0 and lines[body].strip():
        body += 1  # the wrapped second line of the attribution
    depth = _unquote(lines[body])[0] if body < len(lines) else 0
    address = re.search(r"<?([^\s<>()\"]+@[^\s<>()\"]+?)>?\s", attribution)
    headers = (("from", address.group(0).strip()),) if address else ()
    return _Block(i, body, max(depth, 1), headers, "generic", "quote")


def _split_glued(text: str) -> list[str]:
    """Lines, with forward separators that HTML rendering glued to other text split off."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    for line in text.split("\n"):
        content = _unquote(line)[1]
        match = _INLINE_SEPARATOR.search(content)
        if match is None or (match.start() == 0 and match.end() == len(content.rstrip())):
            out.append(line)
            continue
        prefix = line[: len(line) - len(content)]
        for piece in (content[: match.start()], match.group(0), content[match.end() :]):
            if piece.strip():
                out.append(prefix + piece)
    return out


# --------------------------------------------------------------------------------------------
# Own text: signatures


_SIGNATURE_START = re.compile(
    r"^(?:--\s*|__+\s*|sent from my \w+.*|sent from outlook.*|get outlook for .*|"
    r"von meinem \w+ gesendet.*|gesendet von .*|envoyé de mon \w+.*|envoyé à partir de .*|"
    r"enviado desde .*|inviato da(?:l mio)? \w+.*|verzonden vanaf mijn \w+.*|"
    r"skickat från min \w+.*)$",
    re.IGNORECASE,
)
_VALEDICTION = re.compile(
    r"^(?:thanks|thank you|many thanks|thanks a lot|thx|cheers|best|all the best|best wishes|"
    r"(?:best|kind|warm|warmest|many)? ?regards|br|mvh|med vänlig hälsning|"
    r"med vänliga hälsningar|hälsningar|viele grüße|beste grüße|liebe grüße|"
    r"mit freundlichen grüßen|gruß|grüße|vg|lg|cordialement|bien à vous|bien cordialement|"
    r"merci|saludos|un saludo|saludos cordiales|gracias|cordiali saluti|saluti|grazie|"
    r"met vriendelijke groet|groeten|groet|pozdrawiam|z poważaniem|с уважением|спасибо|"
    r"谢谢|此致|よろしくお願いします|よろしくお願いいたします)[\s,.!]*$",
    re.IGNORECASE,
)
_SIGNATURE_MAX_LINES = 6


def _strip_signature(text: str) -> str:
    """The text without a '-- ' signature, a "Sent from my phone" line or a sign-off block."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if _SIGNATURE_START.match(line.strip()):
            lines = lines[:n]
            break
    labels = _label_pattern(DEFAULT_FIELDS)
    for n in range(len(lines) - 1, -1, -1):
        if _VALEDICTION.match(lines[n].strip()):
            rest = [line for line in lines[n + 1 :] if line.strip()]
            before = any(line.strip() for line in lines[:n])
            if before and len(rest) <= _SIGNATURE_MAX_LINES and not any(map(labels.match, rest)):
                lines = lines[:n]
            break
    return "\n".join(lines).strip()


# --------------------------------------------------------------------------------------------
# Addresses and attached messages


def _decode_words(value: str) -> str:
    """RFC 2047 encoded-words decoded; text that is not valid MIME is kept as it is."""
    value = re.sub(r"\r?\n[ \t]+", " ", value)
    if "=?" not in value:
        return value.strip()
    try:
        return str(make_header(decode_header(value))).strip()
    except (HeaderParseError, LookupError, UnicodeDecodeError, ValueError):
        return value.strip()


_NAME_ADDR = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<addr>[^<>\s]+@[^<>\s]+)>\s*$")


def _address(value: str) -> Address | None:
    """The first mailbox in a From value; split first, decode the display name afterwards."""
    value = re.sub(r"<mailto:[^>]*>", "", value, flags=re.IGNORECASE)
    value = re.sub(r"\[mailto:([^\]]*)\]", r"<\1>", value, flags=re.IGNORECASE)
    value = value.strip()
    match = _NAME_ADDR.match(value)  # also "Doe, Jane <jane@…>" as Outlook writes it
    pairs = [(match.group("name"), match.group("addr"))] if match else getaddresses([value])
    for name, addr in pairs:
        if "@" in addr:
            name = _decode_words(name.strip().strip("\"'*").strip())
            return Address(addr.strip().lower(), " ".join(name.split()))
    return None


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    return "" if value is None else str(value)


_HTML_DROP = re.compile(r"<(style|script|head|title)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BREAK = re.compile(r"<\s*(?:br|hr|/p|/div|/tr|/li|/h\d|/blockquote|/table)\b[^>]*>", re.I)


def _crude_html_text(html: str) -> str:
    """Just enough rendering to read an attached HTML-only message."""
    html = _HTML_BREAK.sub("\n", _HTML_DROP.sub("", html))
    return htmllib.unescape(re.sub(r"<[^>]*>", "", html))


def _decode_part(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset)
    except (LookupError, ValueError):  # a NUL in the charset name is a ValueError
        return payload.decode("utf-8", errors="replace")


def _body_text(msg: Message) -> str:
    """The message's text/plain body, or its text/html one rendered crudely."""
    html = ""
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            return _decode_part(part)
        if ctype == "text/html" and not html:
            html = _decode_part(part)
    return _crude_html_text(html)


def _attached_forward(own_text: str, raw: bytes) -> Forward:
    msg = message_from_bytes(raw, policy=compat32)
    sender = None
    for name, addr in getaddresses(msg.get_all("From", [])):
        if "@" in addr:
            sender = Address(addr.strip().lower(), " ".join(_decode_words(name).split()))
            break
    return Forward(
        own_text=own_text,
        original_from=sender,
        original_to=_decode_words(_header(msg, "To")),
        original_date=_decode_words(_header(msg, "Date")),
        original_subject=_decode_words(_header(msg, "Subject")),
        original_text=_body_text(msg).strip(),
        style="rfc822-attachment",
    )


# --------------------------------------------------------------------------------------------
# Detection


def detect_forward(text: str, *, subject: str, attached: Sequence[bytes] = ()) -> Forward | None:
    """The forward this message is, or None.

    The first block in the text decides: an unambiguous forward separator always counts, an
    Outlook-style "Original Message" block counts unless the subject says reply, and a bare
    '>' quote counts only when the subject says forward.
    """
    kind = _subject_kind(subject)
    lines = _split_glued(text)
    first = next((b for i in range(len(lines)) if (b := _block_at(lines, i)) is not None), None)
    if first is not None and (
        first.strength == "forward"
        or (first.strength == "original" and kind != "reply")
        or (first.strength == "quote" and kind == "forward")
    ):
        return _inline_forward(lines, first)
    own = _strip_signature("\n".join(lines if first is None else lines[: first.start]))
    if attached:
        return _attached_forward(own, attached[0])
    if kind == "forward":
        return Forward(own, None, "", "", "", "", "generic")
    return None


def _inline_forward(lines: Sequence[str], block: _Block) -> Forward:
    headers = dict(block.headers)
    body = [_strip_depth(line, block.depth) for line in lines[block.body :]]
    return Forward(
        own_text=_strip_signature("\n".join(lines[: block.start])),
        original_from=_address(headers["from"]) if headers.get("from") else None,
        original_to=headers.get("to", ""),
        original_date=headers.get("date", ""),
        original_subject=headers.get("subject", ""),
        original_text=_END_MARKER.sub("", "\n".join(body).strip()).strip(),
        style=block.style,
    )


_END_MARKER = re.compile(r"\n-{2,}\s*end (?:of )?forwarded message\s*-{2,}\s*$", re.IGNORECASE)


def _strip_depth(line: str, depth: int) -> str:
    """The line with `depth` levels of '>' removed (deeper quotes keep their extra levels)."""
    for _ in range(depth):
        match = re.match(r"[ \t]*>[ \t]?", line)
        if match is None:
            break
        line = line[match.end() :]
    return line


# --------------------------------------------------------------------------------------------
# Context check

_PLACEHOLDERS = frozenset(
    {
        "tbd", "tbc", "tba", "n/a", "na", "n.a", "none", "nil", "unknown", "todo", "to do",
        "fill in", "fill me in", "fill in later", "to be filled", "xxx", "xx", "x", "pending",
        "later", "see below", "see above", "?", "??", "???",
    }
)  # fmt: skip
_BRACKETED = re.compile(r"^[<\[{](?P<inner>[^<>\[\]{}]*)[>\]}]$")
_URL = re.compile(r"https?://[^\s<>()\[\]\"']+[^\s<>()\[\]\"'.,;:!?]", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)+")
_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]|[^\W\d_][\w'’-]*")
_GREETING = re.compile(
    r"^(?:hi|hello|hey|dear|hiya|good (?:morning|afternoon|evening)|greetings|hallo|"
    r"guten (?:morgen|tag)|liebe|bonjour|salut|hola|ciao|buongiorno|hej|hoi|dag|cześć|"
    r"dzień dobry|привет|здравствуйте)\b[^.!?]{0,40}[,!.:]?$",
    re.IGNORECASE,
)

_HINTS = {
    "customer": "(the company affected, and a contact name or email address)",
    "link": "(a URL to the issue: ticket, CRM record or chat thread)",
    "summary": "(the problem in your own words, in a few sentences)",
    "consequences": "(what happens if we do not act)",
    "timing": "(deadlines, renewal or go-live dates, how urgent this is)",
}
_HINT_LINES = frozenset(_norm(hint) for hint in _HINTS.values())


@dataclass(frozen=True, slots=True)
class _Entry:
    field: int  # index into the field specs
    value: str
    lines: tuple[int, ...]


@functools.lru_cache(maxsize=16)
def _label_pattern(fields: tuple[FieldSpec, ...]) -> re.Pattern[str]:
    labels = [label for spec in fields for label in spec.labels]
    return re.compile(
        r"^\s*(?:[-*•+·]\s+|\d{1,2}[.)]\s+)?(?:\*\*|__|\*|_)?\s*"
        rf"(?P<label>{_alternation(labels)})"
        r"\s*(?:\*\*|__|\*|_)?\s*(?:[:：]|\s[-–—](?=\s|$))\s*(?:\*\*|__)?(?P<value>.*)$",
        re.IGNORECASE,
    )


def _entries(lines: Sequence[str], fields: Sequence[FieldSpec]) -> list[_Entry]:
    """Every labelled line (with its indented continuation lines), in text order."""
    pattern = _label_pattern(tuple(fields))
    by_label = {_norm(label): n for n, spec in enumerate(fields) for label in spec.labels}
    entries: list[_Entry] = []
    i = 0
    while i < len(lines):
        match = pattern.match(lines[i].replace("’", "'"))
        if match is None:
            i += 1
            continue
        taken = [i]
        value = match.group("value")
        indent = _indent(lines[i])
        i += 1
        while i < len(lines) and _indent(lines[i]) > indent and lines[i].strip():
            if pattern.match(lines[i].replace("’", "'")):
                break
            value = f"{value} {lines[i].strip()}"
            taken.append(i)
            i += 1
        entries.append(_Entry(by_label[_norm(match.group("label"))], value, tuple(taken)))
    return entries


def _indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


def _clean(value: str) -> str:
    """A label's value, or "" when it is empty or a placeholder."""
    value = value.strip().strip("*_").strip()
    value = re.sub(r"<[^<>@]*>", lambda m: m.group(0) if "://" in m.group(0) else "", value)
    value = value.strip()
    bracketed = _BRACKETED.match(value)
    if bracketed and "@" not in value and "://" not in value:
        return ""
    bare = value.strip("()").strip(" .,;:!").lower()
    if bare in _PLACEHOLDERS or not re.search(r"[^\W_]", bare):
        return ""
    return value


def _valid(kind: str, value: str) -> str:
    """The usable part of a value for this kind of field ("" when it does not qualify)."""
    value = _clean(value)
    if not value:
        return ""
    if kind == "link":
        url = _URL.search(value)
        return url.group(0) if url else ""
    if kind == "customer":
        return value if _EMAIL.search(value) or _LETTER.search(value) else ""
    return value


def check_context(
    own_text: str, *, fields: Sequence[FieldSpec] = DEFAULT_FIELDS, summary_min_words: int = 25
) -> ContextCheck:
    """Which of the required fields the forwarder's own words give (later values win)."""
    lines = _strip_signature(own_text).splitlines()
    entries = _entries(lines, fields)
    found: dict[int, str] = {}
    for entry in entries:
        value = _valid(fields[entry.field].kind, entry.value)
        if value:
            found[entry.field] = value
    labelled = {n for entry in entries for n in entry.lines}
    prose_lines = [
        line
        for n, line in enumerate(lines)
        if n not in labelled and _norm(line) not in _HINT_LINES and line.strip()
    ]
    if prose_lines and _GREETING.match(prose_lines[0].strip()):
        prose_lines = prose_lines[1:]
    prose = " ".join(" ".join(prose_lines).split())
    customer_lines = {
        n for entry in entries if fields[entry.field].kind == "customer" for n in entry.lines
    }
    loose_urls = [
        url.group(0)
        for n, line in enumerate(lines)
        if n not in customer_lines
        for url in _URL.finditer(line)
    ]
    words = len(_WORD.findall(_EMAIL.sub(" ", _URL.sub(" ", prose))))
    for n, spec in enumerate(fields):
        if n in found:
            continue
        if spec.kind == "link" and loose_urls:
            found[n] = loose_urls[-1]
        elif spec.kind == "summary" and words >= summary_min_words:
            found[n] = prose
    return ContextCheck(
        present=tuple(spec.name for n, spec in enumerate(fields) if n in found),
        missing=tuple(spec.name for n, spec in enumerate(fields) if n not in found),
        values=tuple((spec.name, found[n]) for n, spec in enumerate(fields) if n in found),
    )


def fill_in_block(check: ContextCheck, fields: Sequence[FieldSpec] = DEFAULT_FIELDS) -> str:
    """The missing fields as "Label: " lines to fill in, each with a one-line hint below it."""
    blocks = [
        f"{spec.labels[0]}: \n{_HINTS.get(spec.kind, '')}".rstrip()
        for spec in fields
        if spec.name in check.missing
    ]
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def merge_context(first: str, reply: str, *, fields: Sequence[FieldSpec] = DEFAULT_FIELDS) -> str:
    """The original context completed by a reply: fields the reply fills replace earlier ones."""
    reply_lines = [line for line in reply.splitlines() if _norm(line) not in _HINT_LINES]
    filled = {
        entry.field
        for entry in _entries(reply_lines, fields)
        if _valid(fields[entry.field].kind, entry.value)
    }
    first_lines = first.splitlines()
    dropped = {n for e in _entries(first_lines, fields) if e.field in filled for n in e.lines}
    kept = "\n".join(line for n, line in enumerate(first_lines) if n not in dropped).strip()
    added = "\n".join(reply_lines).strip()
    return "\n\n".join(part for part in (kept, added) if part)
