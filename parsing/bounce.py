"""Delivery reports (RFC 3464 DSNs and common non-standard bounces) read per recipient.

`parse_bounce` returns a `Bounce` for anything that is a delivery report and None otherwise.
`Bounce.recipients` holds only the recipients whose delivery failed or is delayed; an RFC 3464
report that lists only `delivered`/`relayed`/`expanded` recipients is still a delivery report
(the gateway records it and never answers it) and comes back with no recipients.

Hard versus soft follows sisimai's hard-bounce semantics: a bounce is hard only when the
address itself is dead (unknown user, unknown host, moved, null MX); a full mailbox, a disabled
account, a policy/spam block, a size limit, a loop or a timeout is soft, as is every 4.x.x.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses

from parsing.headers import decode_words
from parsing.model import Bounce, BounceRecipient

_MAX_PARTS = 200  # bounds the work on hostile MIME trees
_MAX_TEXT = 256 * 1024
_MAX_RECIPIENTS = 100
_CONTEXT_LINES = 12
_MAX_LINE = 2000  # address scanning looks no further into one line

_ADDR = re.compile(
    r"[A-Za-z0-9.!#$%&*+/=?^_{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
_LEADING_ADDR = re.compile(r"^[\s<>\"'*(\-]*(" + _ADDR.pattern + ")")
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_REPLY_CODE = re.compile(r"(?:^|(?<=[\s'\"#(\[:]))([45][0-5]\d)(?=[\s\-]|$)", re.M)
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)$")
_MESSAGE_ID = re.compile(r"^[ \t]*Message-?Id:[ \t]*<([^<>\s]+)>", re.I | re.M)
_RETURN_PATH = re.compile(r"^Return-Path:[ \t]*<?([^<>\s]+@[^<>\s]+)>?", re.I | re.M)
_TAG = re.compile(r"<[^<>]*>")  # stops at the next "<": linear even on unclosed tags

# Lines that start the returned copy of the original message in a plain-text bounce.
_ORIGINAL_MARKER = re.compile(
    r"^[\s\-=*_>]*(?:(?:this is a |below this line is a )?copy of the (?:original )?message"
    r"|original message(?: headers| follows| below)?\b|the headers? of the original message"
    r"|message headers follow|unsent message follows|returned message|undelivered message"
    r"|original message details)"
    r"|^(?:Received|Return-Path|DKIM-Signature|X-Received|ARC-Seal|Message-ID):",
    re.I,
)
_HEADERISH_LINE = re.compile(
    r"^\s*(?:From|Sender|Reply-To|Return-Path|Message-ID|In-Reply-To|References):", re.I
)

_DAEMON_LOCAL = re.compile(
    r"^(?:mailer[-_.]?daemon|mail[-_.]?daemon|postmaster|poostmaster"
    r"|mail[-_.]?delivery[-_.]?(?:system|subsystem)?)$",
    re.I,
)
_DAEMON_NAME = re.compile(
    r"mailer[-_ ]?daemon|mail delivery (?:system|subsystem|service)|postmaster"
    r"|mail administrator|internet mail delivery",
    re.I,
)
# Anchored so that a person's "Fwd: Undeliverable: ..." is not taken for the bounce itself.
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(?:undeliver(?:ed|able)|undelivered mail returned to sender|returned mail"
    r"|mail delivery failed|delivery status notification|delivery (?:failure|notification)"
    r"|failure notice|mail system error|non[- ]?deliver|nondeliverable|delivery has failed"
    r"|message delivery has failed|delayed mail|warning: could not send|notice: mail delivery"
    r"|mail could not be delivered|could not deliver|returned to sender|unzustellbar"
    r"|non remis|no se puede entregar|onbestelbaar|olevererbart|impossible de remettre)",
    re.I,
)
_DELAY = re.compile(
    r"still being retried|will (?:continue to )?(?:be )?retr(?:y|ied)|warning only"
    r"|delivery status notification \(delay\)|^\s*delayed mail|has not yet been delivered",
    re.I | re.M,
)

_FAILURE_TEXT = re.compile(
    r"(?:could ?not|couldn't|cannot|can't|unable to|wasn't able to) (?:be )?deliver"
    r"|undeliver|not (?:be )?delivered|delivery (?:has )?failed|failed permanently"
    r"|permanent (?:fatal )?error|did not reach|error (?:occurred|delivering)"
    r"|delivery (?:to the following|problems|failure)|returned to sender"
    r"|delivery status notification",
    re.I,
)
_PHASE_DATA = re.compile(r"end of data|data command|>>> data\b|final data|after data", re.I)
_PHASE_RCPT = re.compile(
    r"rcpt to|rcpt command|rcpt_to|does not like recipient|recipient address rejected", re.I
)

# Ordered: the first reason that matches wins, so the more specific come first.
_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "mailboxfull",
        re.compile(
            r"mailbox (?:is )?full|mailbox full|over ?quota|quota (?:exceeded|full)"
            r"|exceed(?:s|ed)? (?:the |his |her )?(?:storage|quota|allowed size|mailbox)"
            r"|disk quota|insufficient (?:disk )?(?:space|storage)|mailbox size limit"
            r"|mail ?folder is full|full mailbox|not enough (?:storage|space)",
            re.I,
        ),
    ),
    (
        "suspend",
        re.compile(
            r"(?:account|mailbox|user)(?: has been| is)? (?:disabled|suspended|inactive"
            r"|deactivated|locked|discontinued|expired)|(?:disabled|suspended|inactive"
            r"|deactivated) (?:account|mailbox|user)|has been disabled|is disabled",
            re.I,
        ),
    ),
    (
        "toobig",
        re.compile(
            r"message (?:is )?too (?:big|large)|message size exceeds|exceeds (?:the )?"
            r"(?:maximum|message) size|size limit",
            re.I,
        ),
    ),
    (
        "hostunknown",
        re.compile(
            r"host (?:or domain name )?(?:not found|unknown)|domain (?:name )?not found"
            r"|unknown (?:host|domain)|no such domain|domain (?:does not|doesn't) exist"
            r"|name or service not known|nxdomain|unrouteable (?:mail )?domain|null mx",
            re.I,
        ),
    ),
    (
        "userunknown",
        re.compile(
            r"user(?:name)? unknown|unknown (?:user|recipient|mailbox|address|local[- ]part)"
            r"|no such (?:user|mailbox|recipient|address|account)|(?:does|do|did)(?: not|n't) exist"
            r"|(?:address|recipient|user|mailbox|account) (?:was |is )?not found|not found at"
            r"|could(?: not|n't) be found|invalid (?:recipient|mailbox|address|user)"
            r"|recipient (?:address )?(?:is )?invalid|is not a valid (?:mailbox|user|recipient)"
            r"|recipient name is not recognized|unknown or illegal alias|recipnotfound"
            r"|destinataire invalide|bad destination mailbox|unrouteable address"
            r"|recipient address rejected: (?:user unknown|access denied|undeliverable)"
            r"|mailbox not found|no mailbox here|address (?:is )?no longer (?:valid|in use)",
            re.I,
        ),
    ),
    (
        "policy",
        re.compile(
            r"spam|block(?:ed|list)|blacklist|dmarc|\bspf\b|dkim|policy|reputation"
            r"|content rejected|banned|virus|not authori[sz]ed|relay(?:ing)? (?:denied|not)",
            re.I,
        ),
    ),
    (
        "expired",
        re.compile(
            r"retry time(?:out)? exceeded|could not be delivered for|too many hops|loop"
            r"|timed? ?out|aborted after|could not find a gateway|delivery time expired",
            re.I,
        ),
    ),
)
# The status a reason stands for when the report's own code says nothing (x.0.0, x.5.0).
_REASON_STATUS = {
    "mailboxfull": "5.2.2",
    "suspend": "5.2.1",
    "toobig": "5.3.4",
    "hostunknown": "5.1.2",
    "userunknown": "5.1.1",
    "policy": "5.7.1",
    "expired": "5.4.7",
}
# Permanent failures of the address itself: unknown user, bad domain, syntax, moved, null MX.
_HARD_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
# The report's own parties, never a failed recipient. Not X-Original-To: some MTAs (dma) put
# the failed recipient there.
_OWN_HEADERS = ("From", "To", "Cc", "Sender", "Reply-To", "Return-Path", "Delivered-To")
_FAILING_ACTIONS = frozenset({"failed", "delayed"})
_NOT_FAILURES = frozenset({"delivered", "relayed", "expanded"})
_NOT_BOUNCE_REPORTS = frozenset({"feedback-report", "disposition-notification"})
_NOT_BOUNCE_PARTS = frozenset({"message/feedback-report", "message/disposition-notification"})
_STATUS_PARTS = frozenset({"message/delivery-status", "message/global-delivery-status"})


@dataclass(frozen=True, slots=True)
class _Report:
    """The pieces of one message that a bounce is read from, collected in one pass."""

    text: str  # the human-readable notification, cut before any inline copy of the original
    body: str  # every text part, uncut (the inline original's headers are in here)
    groups: tuple[dict[str, str], ...]  # DSN field groups (per-message and per-recipient)
    has_status_part: bool
    declared_report: bool  # multipart/report; report-type=delivery-status
    original: Message | None  # the returned message or its headers


def parse_bounce(msg: Message) -> Bounce | None:
    """The bounce this message reports, or None when it is not a delivery report."""
    try:
        return _parse(msg)
    except Exception:  # the input is untrusted mail: a broken part must never stop the pipeline
        return None


def _parse(msg: Message) -> Bounce | None:
    report_type = str(msg.get_param("report-type", "") or "").lower()
    if msg.get_content_type() == "multipart/report" and report_type in _NOT_BOUNCE_REPORTS:
        return None
    if not _sent_by_mail_system(msg) and not _may_be_standard(msg):
        return None  # decided below as well, but only after reading every text part
    report = _collect(msg)
    if report is None:
        return None
    recipient_groups = [g for g in report.groups if _group_address(g)]
    standard = report.has_status_part or report.declared_report
    if not standard and not _sent_by_mail_system(msg):
        return None
    if recipient_groups:
        recipients = _from_groups(recipient_groups, report)
    elif standard:
        recipients = _from_text(msg, report, delayed=False)
    else:
        if not _failure_evidence(msg, report.text):
            return None
        recipients = _from_text(msg, report, delayed=_is_delay_notice(msg, report.text))
        if not recipients and not _strongly_a_bounce(msg):
            return None
    per_message = _per_message_fields(report.groups)
    return Bounce(
        recipients=tuple(recipients),
        original_message_id=_original_message_id(msg, report, per_message),
        original_envelope_from=_original_envelope_from(report, per_message),
        reporting_mta=_strip_type(per_message.get("reporting-mta", "")),
        standard=standard,
    )


def _may_be_standard(msg: Message) -> bool:
    """Whether `_collect` could find the report standard: declared, or with a status part."""
    return _declared_report(msg) or any(
        part.get_content_type() in _STATUS_PARTS for part in _parts(msg)
    )


def _declared_report(msg: Message) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type", "") or "").lower() == "delivery-status"
    )


def _collect(msg: Message) -> _Report | None:
    texts: list[str] = []
    htmls: list[str] = []
    groups: list[dict[str, str]] = []
    has_status_part = False
    original: Message | None = None
    for part in _parts(msg):
        ctype = part.get_content_type()
        if ctype in _NOT_BOUNCE_PARTS:
            return None
        if ctype in _STATUS_PARTS:
            has_status_part = True
            groups.extend(_status_groups(part))
        elif ctype == "message/rfc822" and original is None:
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                original = payload[0]
        elif ctype == "text/rfc822-headers" and original is None:
            original = HeaderParser().parsestr(_decoded(part))
        elif ctype == "text/html":
            htmls.append(html.unescape(_TAG.sub(" ", _decoded(part))))
        elif part.get_content_maintype() == "text" or isinstance(part.get_payload(), str):
            texts.append(_decoded(part))  # a multipart whose boundary is broken reads as text
    body = "\n".join(texts or htmls)[:_MAX_TEXT]
    if not groups:
        groups = [g for g in _field_groups(body) if _group_address(g) and _group_outcome(g)]
    declared = _declared_report(msg)
    return _Report(
        text=_cut_original(body),
        body=body,
        groups=tuple(groups),
        has_status_part=has_status_part,
        declared_report=declared,
        original=original,
    )


def _parts(msg: Message) -> Iterator[Message]:
    """The message's own parts in document order, never descending into attached messages."""
    stack = [msg]
    seen = 0
    while stack and seen < _MAX_PARTS:
        part = stack.pop()
        seen += 1
        yield part
        if part.get_content_maintype() == "multipart":
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(p for p in reversed(payload) if isinstance(p, Message))


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except (LookupError, ValueError):  # a NUL in the name is a ValueError
        return payload.decode("latin-1")


def _status_groups(part: Message) -> list[dict[str, str]]:
    payload = part.get_payload()
    if isinstance(payload, str):
        return _field_groups(_decoded(part))
    groups: list[dict[str, str]] = []
    for block in payload if isinstance(payload, list) else []:
        if isinstance(block, Message):
            fields: dict[str, str] = {}
            for name, value in block.items():
                fields.setdefault(name.lower(), " ".join(str(value).split()))
            groups.append(fields)
    return groups


def _field_groups(text: str) -> list[dict[str, str]]:
    """Blank-line separated `Name: value` blocks, as in a delivery-status body."""
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                groups.append(current)
            current, last = {}, ""
        elif line[0] in " \t" and last:
            current[last] += " " + line.strip()
        elif match := _FIELD.match(line):
            name = match.group(1).lower()
            last = "" if name in current else name
            current.setdefault(name, match.group(2).strip())
        else:
            last = ""
    if current:
        groups.append(current)
    return groups


def _group_address(group: dict[str, str]) -> str:
    for name in ("original-recipient", "final-recipient"):
        if addr := _dsn_address(group.get(name, "")):
            return addr
    return ""


def _group_outcome(group: dict[str, str]) -> bool:
    return bool(group.get("action") or group.get("status"))


def _dsn_address(value: str) -> str:
    _, sep, rest = value.partition(";")
    found = _ADDR.search(rest if sep else value)
    return found.group(0).lower() if found else ""


def _strip_type(value: str) -> str:
    return value.partition(";")[2].strip() if ";" in value else value.strip()


def _per_message_fields(groups: tuple[dict[str, str], ...]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for group in groups:
        for name, value in group.items():
            if "recipient" not in name:
                fields.setdefault(name, value)
    return fields


def _from_groups(groups: list[dict[str, str]], report: _Report) -> list[BounceRecipient]:
    lines = report.text.splitlines()
    known = {_group_address(g) for g in groups}
    recipients: list[BounceRecipient] = []
    for group in groups[:_MAX_RECIPIENTS]:
        address = _group_address(group)
        status_field = group.get("status", "")
        diagnostic = _strip_type(group.get("diagnostic-code", ""))
        status = _best_code(status_field, diagnostic)
        action = (group.get("action", "").split() or [""])[0].lower()
        if not action:
            action = {"5": "failed", "4": "delayed", "2": "delivered"}.get(status[:1], "")
        if action in _NOT_FAILURES or (action not in _FAILING_ACTIONS and not status):
            continue
        context = _context(lines, address, known)
        evidence = " ".join((diagnostic, status_field, context))
        if not diagnostic:  # nothing per recipient: the notification is all there is to read
            evidence += " " + report.text
        status, hard = _judge(status, action, evidence, _phase(diagnostic + " " + context))
        recipients.append(BounceRecipient(address, status, hard, diagnostic, action))
    return recipients


def _from_text(msg: Message, report: _Report, *, delayed: bool) -> list[BounceRecipient]:
    addresses = _failed_recipients_header(msg) or _text_addresses(msg, report.text)
    addresses = addresses[:_MAX_RECIPIENTS]
    lines = report.text.splitlines()
    known = set(addresses)
    action = "delayed" if delayed else "failed"
    recipients: list[BounceRecipient] = []
    for address in addresses:
        context = _context(lines, address, known)
        if len(addresses) == 1 and not (_ENHANCED.search(context) or _REPLY_CODE.search(context)):
            context += "\n" + report.text
        status = _best_code("", context)
        status, hard = _judge(status, action, context, _phase(context))
        diagnostic = " ".join(context.split())[:500]
        recipients.append(BounceRecipient(address, status, hard, diagnostic, action))
    return recipients


def _best_code(status_field: str, diagnostic: str) -> str:
    """The most specific enhanced status code; a bare 4xx/5xx reply gives its class."""
    codes = [".".join(m.groups()) for m in _ENHANCED.finditer(status_field)]
    if codes and not _generic(codes[0]):
        return codes[0]
    found = [".".join(m.groups()) for m in _ENHANCED.finditer(diagnostic)]
    specific = [c for c in found if not _generic(c)]
    if specific and (not codes or specific[0][0] == codes[0][0]):
        return specific[0]
    if codes or found:
        return (codes or found)[0]
    if reply := _REPLY_CODE.search(diagnostic):
        return f"{reply.group(1)[0]}.0.0"
    return ""


def _generic(code: str) -> bool:
    return code.split(".", 1)[1] in ("0.0", "5.0")


def _judge(status: str, action: str, evidence: str, phase: str) -> tuple[str, bool]:
    """Refine an uninformative status from the diagnostic text, then decide hard or soft."""
    if action == "delayed" or status.startswith("4"):
        return status, False
    reason = _reason(evidence)
    if not status or _generic(status):
        refined = _REASON_STATUS.get(reason, "")
        if reason == "userunknown" and phase == "data":
            refined = ""  # accepted at RCPT, refused after the content: a filter, not a dead box
        status = refined or status
    if status in _HARD_STATUSES:
        return status, True
    if status == "5.2.1":  # disabled mailbox: dead only when refused as unknown at RCPT time
        return status, reason == "userunknown" and phase == "rcpt"
    if status in ("5.1.0", "5.4.1"):  # 5.4.1 "Recipient address rejected": Microsoft's DBEB
        return status, reason == "userunknown" and phase != "data"
    return status, False


def _reason(text: str) -> str:
    for name, pattern in _REASONS:
        if pattern.search(text):
            return name
    return ""


def _phase(text: str) -> str:
    if _PHASE_DATA.search(text):
        return "data"
    if _PHASE_RCPT.search(text):
        return "rcpt"
    return ""


def _context(lines: list[str], address: str, known: set[str]) -> str:
    """The lines about one recipient: from each mention to a blank line or another recipient."""
    chunks: list[str] = []
    for index, line in enumerate(lines):
        if address not in line.lower():
            continue
        chunk = [line]
        for following in lines[index + 1 : index + _CONTEXT_LINES]:
            lead = _LEADING_ADDR.match(following)
            other = lead.group(1).lower() if lead else ""
            if not following.strip() or (other in known and other != address):
                break
            chunk.append(following)
        chunks.append("\n".join(chunk))
        if len(chunks) >= 4:
            break
    return "\n".join(chunks)


def _cut_original(text: str) -> str:
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if index > 0 and _ORIGINAL_MARKER.match(line):
            return "\n".join(lines[:index])
    return text


def _failed_recipients_header(msg: Message) -> list[str]:
    values = [str(v) for v in msg.get_all("X-Failed-Recipients", [])]
    return _unique(m.group(0).lower() for v in values for m in _ADDR.finditer(v))


def _text_addresses(msg: Message, text: str) -> list[str]:
    own = {
        addr.lower()
        for name in _OWN_HEADERS
        for _, addr in getaddresses([str(v) for v in msg.get_all(name, [])])
    }
    found: list[str] = []
    for line in text.splitlines():
        if _HEADERISH_LINE.match(line):
            continue
        for match in _ADDR.finditer(line[:_MAX_LINE]):
            addr = match.group(0).lower()
            if addr not in own and not _DAEMON_LOCAL.match(addr.rpartition("@")[0]):
                found.append(addr)
    return _unique(found)


def _unique(items: Iterator[str] | list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _sent_by_mail_system(msg: Message) -> bool:
    """From a mailer daemon, with a null or daemon return path, or under a bounce subject."""
    return (
        _daemon_sender(msg) or _null_return_path(msg) or bool(_BOUNCE_SUBJECT.match(_subject(msg)))
    )


def _failure_evidence(msg: Message, text: str) -> bool:
    """A failure said in words, an SMTP status, or the header Exim and Gmail set."""
    if msg.get("X-Failed-Recipients"):
        return True
    return bool(
        _FAILURE_TEXT.search(text) or _ENHANCED.search(text) or _REPLY_CODE.search(text)
    ) or bool(_reason(text))


def _strongly_a_bounce(msg: Message) -> bool:
    return _daemon_sender(msg) and bool(_BOUNCE_SUBJECT.match(_subject(msg)))


def _daemon_sender(msg: Message) -> bool:
    for value in msg.get_all("From", []) + msg.get_all("Return-Path", []):
        text = str(value)
        if _DAEMON_NAME.search(text):
            return True
        for _, addr in getaddresses([text]):
            if _DAEMON_LOCAL.match(addr.rpartition("@")[0] or addr):
                return True
    return False


def _null_return_path(msg: Message) -> bool:
    return any(str(v).strip() in ("<>", "") for v in msg.get_all("Return-Path", []))


def _subject(msg: Message) -> str:
    return decode_words(str(msg.get("Subject", "") or ""))


def _is_delay_notice(msg: Message, text: str) -> bool:
    return bool(_DELAY.search(_subject(msg)) or _DELAY.search(text))


def _original_message_id(msg: Message, report: _Report, per_message: dict[str, str]) -> str:
    candidates = [
        str(report.original.get("Message-ID", "")) if report.original is not None else "",
        m.group(1) if (m := _MESSAGE_ID.search(report.body)) else "",
        per_message.get("x-original-message-id", ""),
        str(msg.get("In-Reply-To", "") or ""),
    ]
    for candidate in candidates:
        if value := candidate.strip().strip("<>").strip():
            return value.split()[0].strip("<>")
    return ""


def _original_envelope_from(report: _Report, per_message: dict[str, str]) -> str:
    if report.original is not None:
        found = _ADDR.search(str(report.original.get("Return-Path", "")))
        if found:
            return found.group(0).lower()
    if match := _RETURN_PATH.search(report.body):
        return match.group(1).lower()
    for name, value in per_message.items():
        if name.startswith("x-") and name.endswith("-sender") and (addr := _dsn_address(value)):
            return addr
    return ""
