"""Finding the sender's own words in a reply: quoted history and signatures removed.

Mail clients mark history in many ways: '>' prefixes, an attribution line ("On … wrote:",
"Le … a écrit :", "2017-11-24 16:32 GMT+01:00 X <x@y>:"), an Outlook header block
("From: … Sent: … Subject: …" in the client's language), or a separator ("-----Original
Message-----", "---------- Forwarded message ---------", a line of underscores). The rules here
are line-based, bounded per line, and linear in the size of the text.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser

__all__ = ["extract_new_text", "html_to_text"]

# Lines longer than this are never attribution lines, separators or signatures; the cap also
# bounds the regex work per line.
_MAX_MARKER_LINE = 1000
_MAX_JOINED_LINES = 3

_QUOTED = re.compile(r"[ \t]{0,3}>")
_WRAPPED_QUOTE_MIN = 50  # a quoted line at least this long may have lost its tail to wrapping

# --- separators: the rest of the message is history (or a forwarded message) ---------------

_SEPARATOR_WORDS = (
    r"original|message|nachricht|forward|weitergeleitet|mensaje|messaggio|bericht|meddelande|"
    r"melding|meddelelse|besked|viesti|wiadomo|сообщени|mensagem|zpráva|správa|üzenet|mesaj|"
    r"reenviado|transféré|inoltrato|encaminhad|doorgestuurd|vidarebefordra|videresend|välitetty|"
    r"przekazan|邮件|郵件|メッセージ|메시지"
)
_DASH_SEPARATOR = re.compile(
    rf"\s*[-=_*]{{2,}}\s*(?=[^\n]*(?:{_SEPARATOR_WORDS}))"
    rf"[^\W\d_][^-=_*\n]{{1,60}}?\s*[-=_*]{{2,}}\s*$",
    re.IGNORECASE,
)
_BEGIN_FORWARD = re.compile(
    r"\s*(?:begin forwarded message|anfang der weitergeleiteten nachricht|"
    r"début du message (?:réexpédié|transféré)|(?:inicio|comienzo) del mensaje reenviado|"
    r"inizio messaggio inoltrato|begin doorgestuurd bericht|vidarebefordrat (?:mejl|brev)|"
    r"videresendt (?:melding|besked|meddelelse)|välitetty viesti alkaa|"
    r"początek przekazywanej wiadomości|начало переадресованного сообщения|"
    r"início da mensagem (?:re)?encaminhada|转发的邮件|開始轉寄郵件|転送されたメッセージ)"
    r"\s*[:：]?\s*$",
    re.IGNORECASE,
)
_UNDERSCORES = re.compile(r"\s*_{20,}\s*$")
_DECORATION = re.compile(r"[\s\-_=*~#+.·•—–]*")

# --- signatures --------------------------------------------------------------------------

_MOBILE_LEAD = re.compile(
    r"\s*(?P<lead>sent\s+(?:from|with|via|using)|envoy[ée]\s+(?:de|depuis|à\s+partir\s+de|avec)|"
    r"gesendet\s+(?:von|mit|vom|über)|enviado\s+(?:desde|de|do|com|a\s+partir\s+d[eo])|"
    r"inviato\s+(?:da|dal|con)|verzonden\s+(?:met|vanaf|van|via)|verstuurd\s+(?:met|vanaf|van)|"
    r"skickat\s+från|sendt\s+fra|lähetetty|wysłane\s+z|wysłano\s+z|odesláno\s+z|"
    r"отправлено\s+(?:с|из)|надіслано\s+з|发自|發自)\s*(?P<rest>.*)$",
    re.IGNORECASE,
)
_OUTLOOK_PROMO = re.compile(
    r"\s*(?:get\s+outlook\s+for|obtenir\s+outlook\s+pour|holen\s+sie\s+sich\s+outlook\s+für|"
    r"scarica\s+outlook\s+per|obtener\s+outlook\s+para|outlook\s+voor)\s+\S+",
    re.IGNORECASE,
)
_VON_MEINEM = re.compile(r"\s*von\s+meinem\s+.{1,40}\s+gesendet\W*$", re.IGNORECASE)
_JA_SENT_FROM = re.compile(r"\s*\S.{0,30}から送信\s*$")
_LINK = re.compile(r"<[^<>]*>|\[[^\[\]]*\]|\(?https?://\S*\)?")
_MOBILE_WORDS = re.compile(
    r"\b(?:my|mon|ma|mein|meinem|mi|mio|mijn|min|mitt|mój|mojego|мой|моего|iphone|ipad|ipod|"
    r"android|blackberry|samsung|galaxy|pixel|huawei|xiaomi|nokia|motorola|oneplus|mobile|"
    r"phone|smartphone|handy|tablet|outlook|mail|gmail|yahoo|aol|proton|spark|windows|ios)\b",
    re.IGNORECASE,
)

# What any of the markers above can start with: one search that fails on most lines of prose
# instead of seven (each pattern starts at the line's first non-space character).
_MAY_END_NEW_TEXT = re.compile(
    "|".join(
        f"(?:{p.pattern})"
        for p in (
            _UNDERSCORES,
            _DASH_SEPARATOR,
            _BEGIN_FORWARD,
            _OUTLOOK_PROMO,
            _VON_MEINEM,
            _JA_SENT_FROM,
            _MOBILE_LEAD,
        )
    ),
    re.IGNORECASE,
)

# --- attribution lines ---------------------------------------------------------------------

_VERBS = (
    r"wrote|writes|a\s+écrit|a\s+ecrit|schrieb|escribió|escribio|ha\s+scritto|scrisse|schreef|"
    r"het\s+volgende\s+geschreven|skrev(?:\s+følgende)?|napisał(?:\(a\)|a)?|napisal(?:\(a\)|a)?|"
    r"kirjoitti|escreveu|написал(?:\(а\)|а)?|пише|писал|yazdı|έγραψε|napsal(?:\(a\)|a)?|írta|"
    r"a\s+scris|rašė|kirjutas|rakstīja"
)
_VERBS_CJK = r"写道|寫道|のメッセージ|のメール|님이\s*작성"  # no word boundary before these
_VERB = rf"(?:(?<!\w)(?:{_VERBS})(?!\w)|{_VERBS_CJK})"
_VERB_END = re.compile(rf"{_VERB}\s*(?P<colon>[:：])?\s*-*\s*$", re.IGNORECASE)
_VERB_ANYWHERE = re.compile(_VERB, re.IGNORECASE)
_WRAPPED_ADDRESS_END = re.compile(r">\s*[:：]")  # "<addr" wrapped before its ">:"
_ON_START = re.compile(r"-*\s*on\s", re.IGNORECASE)
_GMAIL_ISO = re.compile(r"\d{4}-\d{2}-\d{2} \d{1,2}:\d{2} GMT[+-]\d{1,2}:\d{2}(?!\S)")
_ENDS_WITH_ADDRESS = re.compile(r"@[^\s@]+\s*[>\])]?\s*[:：]\s*$")
_ENDS_WITH_COLON = re.compile(r"[:：]\s*$")
_DIGIT = re.compile(r"\d")
_MARK = re.compile(r"[\d@]")
_YEAR = re.compile(r"(?<!\d)(?:19|20)\d\d(?!\d)")
_TIME = re.compile(r"(?<!\d)\d{1,2}[:.]\d{2}(?!\d)")

# --- header blocks ("From: … Sent: … Subject: …") -------------------------------------------

_HEADER_LABELS: dict[str, tuple[str, ...]] = {
    "from": (
        "from", "de", "von", "van", "da", "från", "fra", "od", "lähettäjä", "feladó", "kimden",
        "от", "від", "από", "发件人", "寄件者", "寄件人", "差出人", "보낸 사람", "afsender", "frá",
        "saatja", "nuo", "de la", "remetente",
    ),
    "date": (
        "sent", "date", "datum", "data", "fecha", "dato", "päivämäärä", "дата", "日期",
        "发送时间", "寄件日期", "送信日時", "날짜", "보낸 날짜", "envoyé", "envoyé le", "gesendet",
        "enviado", "enviada", "enviado el", "inviato", "verzonden", "skickat", "sendt",
        "wysłano", "wysłane", "lähetetty", "elküldve", "gönderildi", "gönderilme tarihi",
        "отправлено", "надіслано", "odesláno", "poslano", "tarih", "message du",
    ),
    "to": (
        "to", "à", "a", "an", "aan", "para", "till", "til", "do", "vastaanottaja", "címzett",
        "kime", "кому", "προς", "收件人", "收件者", "宛先", "받는 사람", "pour", "komu",
    ),
    "cc": ("cc", "kopie", "copie à", "copia", "kopia", "копия", "抄送", "副本"),
    "subject": (
        "subject", "objet", "betreff", "asunto", "oggetto", "onderwerp", "ämne", "emne", "temat",
        "aihe", "tárgy", "konu", "тема", "θέμα", "主题", "主旨", "件名", "제목", "assunto", "sujet",
        "predmet", "předmět",
    ),
    "reply-to": ("reply-to", "antwort an", "répondre à", "responder a"),
}  # fmt: skip
_LABEL_KIND = {label: kind for kind, labels in _HEADER_LABELS.items() for label in labels}
_HEADER_LINE = re.compile(r"\s*\*{0,2}\s*(?P<label>[^\W\d_][\w .'’-]{0,24}?)\s*\*{0,2}\s*[:：]")
_HEADER_BLOCK_SPAN = 8


def extract_new_text(text: str) -> str:
    """The new text of a reply: what the sender wrote, without quoted history or signature.

    Text above the first quote marker is kept. A '>' block may be followed by more of the
    sender's words (bottom-posting, inline answers), which are kept too; an attribution,
    header block, separator or signature ends the new text.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # Every attribution has a digit or an '@': where no line of the next few has either, no
    # attribution starts, and most lines of prose are passed over with no more regex work.
    marked = [_MARK.search(line) is not None for line in lines]
    kept: list[str] = []
    header_kinds: dict[int, str | None] = {}  # memo: a header block is looked at line by line
    after_quote = False
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            if kept and not after_quote:
                kept.append(line)  # no leading blank lines; one blank line where a quote was
            i += 1
            continue
        if _QUOTED.match(line):
            i = _end_of_quote_block(lines, i)
            after_quote = True
            while kept and not kept[-1].strip():
                kept.pop()
            continue
        if _ends_new_text(line):
            break
        end = _attribution_end(lines, i) if any(marked[i : i + _MAX_JOINED_LINES]) else -1
        if end > i:
            j = end
            while j < n and not lines[j].strip():
                j += 1
            if j < n and _QUOTED.match(lines[j]):
                i = j
                continue
            break  # history that is not '>'-quoted: nothing after it is the sender's
        if _is_header_block(lines, i, header_kinds):
            break
        if after_quote and kept:
            kept.append("")
        after_quote = False
        kept.append(line)
        i += 1
    while kept and _DECORATION.fullmatch(kept[-1]):
        kept.pop()
    return "\n".join(kept).rstrip()


def _end_of_quote_block(lines: list[str], i: int) -> int:
    """Index after the '>' block starting at i, including wrapped remainders of long lines.

    A client that re-wraps quoted text leaves the tail of a long quoted line unprefixed; such a
    line directly under a long quoted line belongs to the quote, not to the sender.
    """
    n = len(lines)
    previous_long = False
    while i < n:
        line = lines[i]
        if _QUOTED.match(line):
            previous_long = len(line.rstrip()) >= _WRAPPED_QUOTE_MIN
            i += 1
            continue
        if (
            previous_long
            and line.strip()
            and not _ends_new_text(line)
            and _header_kind(line) is None
        ):
            previous_long = len(line.rstrip()) >= _WRAPPED_QUOTE_MIN
            i += 1
            continue
        break
    return i


def _ends_new_text(line: str) -> bool:
    """A signature delimiter, a mobile signature, or a separator before history or a forward."""
    if len(line) > _MAX_MARKER_LINE:
        return False
    stripped = line.strip()
    if not stripped:
        return False
    if stripped == "--":
        return True  # "-- ", the signature delimiter, often loses its trailing space
    if not _MAY_END_NEW_TEXT.match(line):
        return False
    return bool(
        _UNDERSCORES.match(line)
        or _DASH_SEPARATOR.match(line)
        or _BEGIN_FORWARD.match(line)
        or _is_mobile_signature(stripped)
    )


def _is_mobile_signature(line: str) -> bool:
    """A one-line mobile or app signature ("Sent from my iPhone", "Get Outlook for iOS")."""
    if len(line) > 200:
        return False
    if _OUTLOOK_PROMO.match(line) or _VON_MEINEM.match(line) or _JA_SENT_FROM.match(line):
        return True
    match = _MOBILE_LEAD.match(line)
    if not match:
        return False
    rest = _LINK.sub(" ", match.group("rest")).strip(" .!-")
    words = rest.split()
    if not words or len(words) > 6:
        return False
    return len(words) <= 2 or bool(_MOBILE_WORDS.search(rest))


def _attribution_end(lines: list[str], i: int) -> int:
    """Index after the attribution line(s) starting at i, or -1.

    Attributions are often wrapped over two or three lines. When a later line inside the
    matched span would itself start an attribution, the match belongs to that later line, so
    the sender's last line is never swallowed.
    """
    size = _attribution_size(lines, i)
    if size < 0:
        return -1
    for j in range(i + 1, i + size):
        inner = _attribution_size(lines, j)
        if inner > 0 and j + inner <= i + size and not _continues_header(lines[j]):
            return -1
    return i + size


def _attribution_size(lines: list[str], i: int) -> int:
    """How many lines (1-3) starting at i form an attribution, or -1."""
    parts: list[str] = []
    length = 0
    for j in range(i, min(i + _MAX_JOINED_LINES, len(lines))):
        line = lines[j].strip()
        length += len(line) + 1
        if not line or length > _MAX_MARKER_LINE:
            return -1
        if j > i and _QUOTED.match(lines[j]) and not _WRAPPED_ADDRESS_END.fullmatch(line):
            return -1
        parts.append(line)
        if _is_attribution(" ".join(parts)):
            return j - i + 1
    return -1


def _is_attribution(candidate: str) -> bool:
    has_digit = bool(_DIGIT.search(candidate))
    if not has_digit and "@" not in candidate:
        return False  # every attribution form carries a date or an address
    if _GMAIL_ISO.match(candidate):
        return True
    verb = _VERB_END.search(candidate)
    if verb and (has_digit or "@" in candidate):
        return bool(verb.group("colon")) or bool(_ON_START.match(candidate))
    if not _ENDS_WITH_COLON.search(candidate) or "@" not in candidate or not has_digit:
        return False
    if not _ENDS_WITH_ADDRESS.search(candidate):
        return False
    # "Am 3.3.2025 schrieb X <x@y>:" (verb before the name), or a date and time before it
    return bool(
        _VERB_ANYWHERE.search(candidate) or (_YEAR.search(candidate) and _TIME.search(candidate))
    )


def _continues_header(line: str) -> bool:
    """A line that reads as the wrapped tail of a header: "<addr> wrote:", "addr) escreveu:"."""
    stripped = line.strip()
    if stripped[:1] in "<([>":
        return True
    first = stripped.split(maxsplit=1)[0]
    return "@" in first


def _is_header_block(lines: list[str], i: int, memo: dict[int, str | None]) -> bool:
    """Whether a forwarded/replied header block ("From:", "Sent:", "Subject:" …) starts at i."""
    if ":" not in lines[i] and "：" not in lines[i]:
        return False  # its first line is a header (`_header_kind`), and has a colon
    kinds: set[str] = set()
    for j in range(i, min(i + _HEADER_BLOCK_SPAN, len(lines))):
        if not lines[j].strip():
            break
        if j not in memo:
            memo[j] = _header_kind(lines[j])
        kind = memo[j]
        if kind:
            kinds.add(kind)
        elif j == i:
            return False
    return "from" in kinds and ("date" in kinds or "subject" in kinds)


def _header_kind(line: str) -> str | None:
    if len(line) > _MAX_MARKER_LINE or (":" not in line and "：" not in line):
        return None
    match = _HEADER_LINE.match(line)
    if not match:
        return None
    return _LABEL_KIND.get(" ".join(match.group("label").lower().split()))


# --- HTML ------------------------------------------------------------------------------------

_VOID = frozenset(
    "area base br col embed hr img input keygen link meta param source track wbr".split()
)
_SKIP = frozenset({"script", "style", "title", "template", "head", "xml"})
_HEAD_CONTENT = frozenset(
    {"title", "meta", "link", "style", "script", "base", "noscript", "template", "xml"}
)
_PARAGRAPH = frozenset(
    "p h1 h2 h3 h4 h5 h6 blockquote pre table ul ol dl hr address figure fieldset".split()
)
_BLOCK = _PARAGRAPH | frozenset(
    "div li tr dt dd section article header footer nav aside main center form caption "
    "details summary figcaption tbody thead tfoot".split()
)
_QUOTE_MARKER_IDS = frozenset({"appendonsend", "divrplyfwdmsg"})
_QUOTE_MARKER_CLASSES = frozenset({"gmail_quote", "yahoo_quoted"})
_WHITESPACE = re.compile(r"\s+")
_IMPLIED_CLOSE_REACH = 32  # bounded, so hostile nesting cannot make this quadratic
_MAX_NESTING = 10  # deeper quotes and lists render at this depth, so output stays linear


def html_to_text(html: str) -> str:
    """A plain-text rendering of an HTML body, with quoted parts as '>' lines.

    Client-specific quote containers (Outlook's reply header, Gmail's quote) become '>' text so
    that extract_new_text treats HTML-only mail like plain text.
    """
    renderer = _Renderer()
    renderer.feed(_tidy(html))
    renderer.close()
    return renderer.text()


def _tidy(html: str) -> str:
    """The HTML with comments, declarations and stray '<' defused, in one linear pass.

    html.parser rescans the rest of the document for every '<' that does not close, which is
    quadratic on hostile input; after this pass every tag it sees ends before the next '<'.
    """
    out: list[str] = []
    i, n = 0, len(html)
    next_gt = -1
    while i < n:
        lt = html.find("<", i)
        if lt < 0:
            out.append(html[i:])
            break
        out.append(html[i:lt])
        if html.startswith("<!--", lt):
            end = html.find("-->", lt + 4)
            if end < 0:
                break  # an unclosed comment hides the rest, as in a browser
            i = end + 3
            continue
        kind = _markup_kind(html, lt)
        if kind and next_gt != -2 and next_gt <= lt:
            next_gt = html.find(">", lt + 1)
            if next_gt < 0:
                next_gt = -2  # no '>' anywhere after this point
        following_lt = html.find("<", lt + 1)
        if not kind or next_gt == -2 or (0 <= following_lt < next_gt):
            out.append("&lt;")  # a '<' that opens nothing: text, as a browser shows it
            i = lt + 1
            continue
        if kind == "tag":
            out.append(_balance_quotes(html[lt : next_gt + 1]))
        # else "<!doctype …>", "<![if …]>", "<?xml …?>": nothing to show
        i = next_gt + 1
    return "".join(out)


def _markup_kind(html: str, lt: int) -> str:
    """What the '<' at lt opens: "tag", "other" (declaration, processing instruction) or ""."""
    second = html[lt + 1 : lt + 2]
    if second == "/":
        second = html[lt + 2 : lt + 3]
    if second.isascii() and second.isalpha():
        return "tag"
    if html[lt + 1 : lt + 2] in ("!", "?"):
        return "other"
    return ""


def _balance_quotes(tag: str) -> str:
    """The tag without quote characters when one is left open (so no value runs past '>')."""
    state = ""
    for char in tag:
        if char in "\"'":
            if not state:
                state = char
            elif state == char:
                state = ""
    if state:
        return tag.replace('"', "").replace("'", "")
    return tag


@dataclass(slots=True)
class _Open:
    tag: str
    block: int = 0  # 0 inline, 1 line break, 2 paragraph break
    quote: int = 0
    rest_quote: int = 0  # depth added for what follows a quote marker child, until this closes
    skip: bool = False
    pre: bool = False
    listing: bool = False
    href: str = ""


class _Renderer(HTMLParser):
    """Renders to (quote depth, text) lines; tolerant of unclosed and misnested tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._stack: list[_Open] = []
        self._open_tags: Counter[str] = Counter()
        self._lines: list[tuple[int, str]] = []
        self._cur: list[str] = []
        self._cur_depth = 0
        self._depth = 0
        self._skip = 0
        self._pre = 0
        self._lists = 0
        self._pending = 0
        self._marker = ""
        self._anchor: _Open | None = None
        self._anchor_text: list[str] = []
        self._document_rest_quote = False

    # -- parser callbacks

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._open_tags["head"] and tag not in _HEAD_CONTENT:
            self._close_to("head")
        if tag == "a" and self._anchor is not None:
            self._close_to("a")
        if tag in _VOID:
            self._void(tag)
            return
        if tag in ("li", "dt", "dd", "p") and self._open_tags[tag]:
            self._close_implied(tag)
        attributes = {name: (value or "") for name, value in attrs}
        if tag == "div" and self._is_quote_marker(attributes):
            self._start_rest_quote()
        entry = _Open(tag)
        if tag in _BLOCK:
            entry.block = 2 if tag in _PARAGRAPH and not self._lists else 1
            self._break(entry.block)
        if tag == "blockquote":
            entry.quote = 1
            self._depth += 1
        if tag in _SKIP:
            entry.skip = True
            self._skip += 1
        if tag in ("pre", "textarea"):
            entry.pre = True
            self._pre += 1
        if tag in ("ul", "ol", "dl"):
            entry.listing = True
            self._lists += 1
        if tag == "li":
            self._marker = "  " * min(max(self._lists - 1, 0), _MAX_NESTING) + "- "
        if tag == "a":
            href = attributes.get("href", "").strip()
            if href and not href.lower().startswith(("#", "javascript:")):
                entry.href = href
            self._anchor = entry
            self._anchor_text = []
        if tag in ("td", "th") and self._cur:
            self._cur.append(" ")
        if tag == "div" and "gmail_signature" in attributes.get("class", "").split():
            self._break(1)
            self._flush_pending()
            self._lines.append((self._depth, "-- "))
        self._stack.append(entry)
        self._open_tags[tag] += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "br":
            self._void(tag)
        elif self._open_tags[tag]:
            self._close_to(tag)

    def handle_data(self, data: str) -> None:
        if self._skip or not data:
            return
        if self._anchor is not None:
            self._anchor_text.append(data)
        if self._pre:
            for k, part in enumerate(data.split("\n")):
                if k:
                    self._newline()
                if part:
                    self._write(part.replace("\t", "    "), collapse=False)
            return
        if data.strip(" \t\r\n\f") and not data.strip():
            # "<div>&nbsp;</div>" is how Outlook and Gmail write an empty line
            self._flush_pending()
            if not self._cur:
                self._newline()
                return
        self._write(_WHITESPACE.sub(" ", data), collapse=True)

    # -- structure

    def _void(self, tag: str) -> None:
        if tag == "br":
            self._flush_pending()
            self._newline()
        elif tag == "hr":
            self._break(2)  # no rule drawn: a line of dashes or underscores reads as a separator

    def _is_quote_marker(self, attributes: dict[str, str]) -> bool:
        if attributes.get("id", "").lower() in _QUOTE_MARKER_IDS:
            return True
        return not _QUOTE_MARKER_CLASSES.isdisjoint(attributes.get("class", "").split())

    def _start_rest_quote(self) -> None:
        if self._stack:
            parent = self._stack[-1]
            if parent.rest_quote:
                return
            parent.rest_quote = 1
        elif self._document_rest_quote:
            return
        else:
            self._document_rest_quote = True
        self._break(1)
        self._depth += 1

    def _close_implied(self, tag: str) -> None:
        """Close an open <li>/<p> the way a browser does when a sibling starts."""
        for entry in reversed(self._stack[-_IMPLIED_CLOSE_REACH:]):
            if entry.tag == tag:
                self._close_to(tag)
                return
            if entry.block or entry.listing:
                return

    def _close_to(self, tag: str) -> None:
        while self._stack:
            entry = self._stack.pop()
            self._open_tags[entry.tag] -= 1
            self._undo(entry)
            if entry.tag == tag:
                return

    def _undo(self, entry: _Open) -> None:
        if entry is self._anchor:
            self._finish_anchor(entry)
        if entry.block:
            self._break(entry.block)
        self._depth -= entry.quote + entry.rest_quote
        if entry.skip:
            self._skip -= 1
        if entry.pre:
            self._pre -= 1
        if entry.listing:
            self._lists -= 1

    def _finish_anchor(self, entry: _Open) -> None:
        self._anchor = None
        text = " ".join("".join(self._anchor_text).split())
        self._anchor_text = []
        if entry.href and text and not _same_link(text, entry.href):
            self._write(f" <{entry.href}>", collapse=True)

    # -- output

    def _break(self, level: int) -> None:
        self._pending = max(self._pending, level)

    def _flush_pending(self) -> None:
        level, self._pending = self._pending, 0
        if not level:
            return
        if self._cur:
            self._end_line()
        if level >= 2 and self._lines and self._lines[-1][1]:
            self._lines.append((min(self._lines[-1][0], self._depth), ""))

    def _write(self, text: str, *, collapse: bool) -> None:
        if self._pending:
            self._flush_pending()
        if not self._cur:
            if collapse:
                text = text.lstrip(" ")
            if not text:
                return
            self._cur_depth = self._depth
            if self._marker:
                self._cur.append(self._marker)
                self._marker = ""
        elif collapse and text.startswith(" ") and self._cur[-1].endswith(" "):
            text = text[1:]
        if text:
            self._cur.append(text)

    def _newline(self) -> None:
        if self._cur:
            self._end_line()
        else:
            self._lines.append((self._depth, ""))

    def _end_line(self) -> None:
        self._lines.append((self._cur_depth, "".join(self._cur).rstrip()))
        self._cur = []

    def text(self) -> str:
        """The rendered text; whatever is still open is closed first, as at end of file."""
        while self._stack:
            self._close_to(self._stack[-1].tag)
        self._flush_pending()
        if self._cur:
            self._end_line()
        out: list[str] = []
        previous_blank = True  # also drops leading blank lines
        for depth, line in self._lines:
            blank = not line
            if blank and previous_blank:
                continue
            previous_blank = blank
            prefix = "> " * min(depth, _MAX_NESTING)
            out.append(prefix + line if line else prefix.rstrip())
        return "\n".join(out).rstrip()


def _same_link(text: str, href: str) -> bool:
    return _link_key(text) == _link_key(href)


def _link_key(value: str) -> str:
    value = value.strip().lower()
    for prefix in ("mailto:", "https://", "http://", "www."):
        if value.startswith(prefix):
            value = value[len(prefix) :]
    return value.rstrip("/")
