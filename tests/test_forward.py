"""Blind-forward detection and context checks: labelled sample forwards and real corpus mail."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32
from pathlib import Path

import pytest

from parsing.forward import (
    DEFAULT_FIELDS,
    ContextCheck,
    FieldSpec,
    Forward,
    check_context,
    detect_forward,
    fill_in_block,
    merge_context,
)
from parsing.quoted import html_to_text

FIXTURES = Path(__file__).parent / "fixtures" / "forwards"
CORPUS = Path(__file__).parent / "corpus"
ALL = ("customer", "link", "summary", "consequences", "timing")


# --------------------------------------------------------------------------------------------
# Reading a message the way the pipeline hands it over


@dataclass(frozen=True)
class Mail:
    text: str
    subject: str
    attached: tuple[bytes, ...]


def _decode(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "utf-8")


def _walk(msg: Message) -> tuple[list[Message], list[bytes]]:
    """Body parts and attached messages, never looking inside an attached message."""
    if msg.get_content_type() == "message/rfc822":
        inner = msg.get_payload(0)
        assert isinstance(inner, Message)
        return [], [inner.as_bytes()]
    if msg.is_multipart():
        parts: list[Message] = []
        attached: list[bytes] = []
        for sub in msg.get_payload():
            assert isinstance(sub, Message)
            more, more_attached = _walk(sub)
            parts += more
            attached += more_attached
        return parts, attached
    return [msg], []


def read_mail(raw: bytes) -> Mail:
    msg = message_from_bytes(raw, policy=compat32)
    parts, attached = _walk(msg)
    bodies = [p for p in parts if p.get_content_disposition() != "attachment"]
    plain = [p for p in bodies if p.get_content_type() == "text/plain"]
    html = [p for p in bodies if p.get_content_type() == "text/html"]
    text = _decode(plain[0]) if plain else html_to_text(_decode(html[0])) if html else ""
    subject = str(make_header(decode_header(str(msg.get("Subject", "")))))
    return Mail(text, subject, tuple(attached))


# --------------------------------------------------------------------------------------------
# The labelled set: refusal precision / recall and exact missing lists


@dataclass(frozen=True)
class Label:
    file: str
    is_forward: bool
    missing: tuple[str, ...]


def _labels() -> list[Label]:
    with open(FIXTURES / "labels.tsv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = []
    for row in rows:
        missing = tuple(m for m in row["missing"].split(",") if m)
        assert row["is_forward"] in ("yes", "no"), row
        assert row["complete"] == ("-" if row["is_forward"] == "no" else "no" if missing else "yes")
        out.append(Label(row["file"], row["is_forward"] == "yes", missing))
    return out


LABELS = _labels()


def _run(file: str) -> tuple[Forward | None, ContextCheck | None]:
    mail = read_mail((FIXTURES / file).read_bytes())
    forward = detect_forward(mail.text, subject=mail.subject, attached=mail.attached)
    return forward, check_context(forward.own_text) if forward else None


def test_labelled_set_covers_what_the_brief_asks() -> None:
    files = {label.file for label in LABELS}
    assert files == {p.name for p in FIXTURES.glob("*.eml")}
    assert len(files) >= 40
    for prefix in ("gmail-", "outlook-", "outlook-web-", "apple-", "thunderbird-", "rfc822-"):
        assert any(f.startswith(prefix) for f in files), prefix
    for field in ALL:
        assert any(label.missing == (field,) for label in LABELS), field
    assert any(label.missing == ALL for label in LABELS)
    assert any(not label.is_forward for label in LABELS)


def test_refusal_precision_and_recall() -> None:
    tp = fp = fn = detected_ok = missing_ok = 0
    wrong: list[str] = []
    for label in LABELS:
        forward, check = _run(label.file)
        refuse = bool(forward and check and check.missing)
        expected_refuse = label.is_forward and bool(label.missing)
        tp += refuse and expected_refuse
        fp += refuse and not expected_refuse
        fn += expected_refuse and not refuse
        detected_ok += (forward is not None) == label.is_forward
        got = check.missing if check else ()
        if got == label.missing:
            missing_ok += 1
        else:
            wrong.append(f"{label.file}: expected {label.missing}, got {got}")
    n = len(LABELS)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    print(
        f"\nforwards: {n} labelled mails, detection accuracy {detected_ok / n:.3f}, "
        f"refusal precision {precision:.3f}, recall {recall:.3f} "
        f"(tp={tp} fp={fp} fn={fn}), exact missing lists {missing_ok}/{n}"
    )
    for line in wrong:
        print("  ", line)
    assert (precision, recall, detected_ok, missing_ok) == (1.0, 1.0, n, n), wrong


STYLES = {
    "gmail-": "gmail",
    "quoted-gmail-": "gmail",
    "outlook-": "outlook",
    "apple-": "apple",
    "thunderbird-": "thunderbird",
    "rfc822-": "rfc822-attachment",
    "quoted-attribution-": "generic",
    "subject-only-": "generic",
    "mutt-": "generic",
    "yahoo-": "generic",
}


@pytest.mark.parametrize("label", [lb for lb in LABELS if lb.is_forward], ids=lambda lb: lb.file)
def test_each_forward(label: Label) -> None:
    forward, check = _run(label.file)
    assert forward is not None and check is not None
    prefix = max((p for p in STYLES if label.file.startswith(p)), key=len)
    assert forward.style == STYLES[prefix]
    assert check.missing == label.missing
    assert check.present == tuple(f for f in ALL if f not in label.missing)
    if forward.style != "generic" or label.file.startswith(("quoted-", "mutt-", "yahoo-")):
        assert forward.original_from is not None, "the forwarded block names its sender"
        assert forward.original_from.addr == forward.original_from.addr.lower()
        assert forward.original_text or label.file == "gmail-html-fyi-only.eml"  # one long line
    # the customer's words and the forwarded headers never leak into the forwarder's text
    assert "From:" not in forward.own_text
    if forward.original_text:
        assert forward.original_text not in forward.own_text


@pytest.mark.parametrize(
    "label", [lb for lb in LABELS if not lb.is_forward], ids=lambda lb: lb.file
)
def test_each_non_forward(label: Label) -> None:
    assert _run(label.file)[0] is None


# Sender, subject and body of the outermost block, for the formats that carry them.
ORIGINALS = [
    (
        "gmail-complete.eml",
        "jane.doe@acme.example",
        "Jane Doe",
        "Nightly export failing since upgrade",
    ),
    ("gmail-de-weitergeleitet-complete.eml", "gavin@hooli.example", "Gavin Belson", None),
    (
        "gmail-html-fyi-only.eml",
        "pepper@stark.example",
        "Pepper Potts",
        "Webhooks delayed by hours",
    ),
    ("outlook-mailto-brackets-missing-consequences.eml", "hank.scorpio@globex.example", None, None),
    ("outlook-web-zh-missing-customer.eml", "bill@initech.example", "Bill Lumbergh", None),
    ("outlook-ja-complete.eml", "alice@umbrella.example", None, "Rate limited far below our plan"),
    ("outlook-ru-fyi-only.eml", "pepper@stark.example", None, None),
    ("outlook-html-only-complete.eml", "pepper@stark.example", None, "Webhooks delayed by hours"),
    ("outlook-web-html-only-missing-link.eml", "bill@initech.example", None, None),
    ("outlook-forward-of-forward-complete.eml", "maria.lopez@example.com", "Maria Lopez", None),
    ("apple-html-only-missing-timing.eml", "alice@umbrella.example", None, None),
    ("apple-fr-complete.eml", "bill@initech.example", None, "TPS report generator crashes"),
    ("thunderbird-html-only-complete.eml", "gavin@hooli.example", None, None),
    ("thunderbird-forward-of-forward-missing-summary.eml", "tony@example.com", "Tony Stark", None),
    ("gmail-forward-of-forward-missing-link.eml", "erlich@example.com", "Erlich Bachman", None),
    ("rfc822-attachment-complete.eml", "joerg.mueller@kunde.example", "Müller, Jörg", None),
    (
        "rfc822-attachment-html-only-missing-link.eml",
        "bill@initech.example",
        "Lumbergh, Bill",
        None,
    ),
    ("quoted-attribution-fwd-missing-timing.eml", "bill@initech.example", None, None),
    ("mutt-forward-missing-summary.eml", "alice@umbrella.example", None, None),
]


@pytest.mark.parametrize(("file", "addr", "name", "subject"), ORIGINALS)
def test_original_fields(file: str, addr: str, name: str | None, subject: str | None) -> None:
    forward, _ = _run(file)
    assert forward is not None and forward.original_from is not None
    assert forward.original_from.addr == addr
    if name is not None:
        assert forward.original_from.name == name
    if subject is not None:
        assert forward.original_subject == subject


def test_attached_message_headers_are_decoded_after_splitting() -> None:
    forward, _ = _run("rfc822-attachment-complete.eml")
    assert forward is not None
    assert forward.original_subject == "Abrechnung für März ist doppelt"
    assert "René Roux <rene@example.com>" in forward.original_to
    assert forward.original_date == "Tue, 11 Mar 2025 08:00:55 +0100"
    assert "doppelt abgebucht" in forward.original_text
    assert forward.own_text.startswith("Hallo Support,")


def test_forward_of_forward_keeps_the_outer_text_only() -> None:
    forward, check = _run("thunderbird-forward-of-forward-missing-summary.eml")
    assert forward is not None and check is not None
    assert "wrote to me directly" not in forward.own_text  # the colleague's words are in the block
    assert "---------- Forwarded message" in forward.original_text


# --------------------------------------------------------------------------------------------
# Real corpus mail


def _corpus_eml(path: str) -> Mail:
    return read_mail((CORPUS / path).read_bytes())


def _corpus_body(path: str, subject: str) -> Mail:
    return Mail((CORPUS / path).read_text(encoding="utf-8"), subject, ())


CORPUS_CASES = [
    # (mail, style or None, original sender, own text starts with)
    (
        lambda: _corpus_eml("cpython-test_email/forwarded/msg_46.txt"),
        "rfc822-attachment",
        "sender@example.net",
        "",
    ),
    (
        lambda: _corpus_eml("django-helpdesk/quoted-reply/forwarded-message.eml"),
        "outlook",
        "noreply@github.com",
        "This is email body",
    ),
    (
        lambda: _corpus_body("email_reply_trimmer/quoted-reply/forwarded_message.txt", ""),
        "gmail",
        "foo@bar.com",
        "",
    ),
    (
        lambda: _corpus_body("crisp-email-reply-parser/quoted-reply/email_german_outlook.txt", ""),
        "outlook",
        "max.m@beispiel.de",
        "Fusce",
    ),
    (
        lambda: _corpus_body(
            "crisp-email-reply-parser/quoted-reply/email_tricky_15_original_message_variations.txt",
            "FW: Test",
        ),
        "outlook",
        "sender@example.com",
        "Fusce",
    ),
    (
        lambda: _corpus_body(
            "crisp-email-reply-parser/quoted-reply/email_ios_outlook_fr.txt", "TR: Chauffeur"
        ),
        "outlook",
        "job-applicant-incoming-text+65701@hiringenginemail.com",
        "Fusce",
    ),
    (
        lambda: _corpus_body(
            "crisp-email-reply-parser/quoted-reply/email_original_message_2.txt", "Fwd: proposal"
        ),
        "generic",
        None,
        "Fusce",
    ),
    (
        lambda: _corpus_body(
            "crisp-email-reply-parser/quoted-reply/email_msn.txt", "RE: Your application"
        ),
        None,
        None,
        "",
    ),
    (
        lambda: _corpus_body(
            "crisp-email-reply-parser/quoted-reply/email_original_message_2.txt", ""
        ),
        None,
        None,
        "",
    ),
    (
        lambda: _corpus_body(
            "crisp-email-reply-parser/quoted-reply/email_norwegian_gmail.txt", "Re: CMD+T"
        ),
        None,
        None,
        "",
    ),
    (
        lambda: _corpus_body("email_reply_trimmer/quoted-reply/embedded_email_8.txt", ""),
        None,
        None,
        "",
    ),
]


@pytest.mark.parametrize(("load", "style", "sender", "own_start"), CORPUS_CASES)
def test_corpus_forwards(
    load: object, style: str | None, sender: str | None, own_start: str
) -> None:
    assert callable(load)
    mail = load()
    assert isinstance(mail, Mail)
    forward = detect_forward(mail.text, subject=mail.subject, attached=mail.attached)
    if style is None:
        assert forward is None
        return
    assert forward is not None and forward.style == style
    assert (forward.original_from.addr if forward.original_from else None) == sender
    assert forward.own_text.startswith(own_start)
    assert "Envoyé à partir de" not in forward.own_text  # a phone signature is not context


def test_corpus_attached_forward_fields() -> None:
    mail = _corpus_eml("cpython-test_email/forwarded/msg_46.txt")
    forward = detect_forward(mail.text, subject=mail.subject, attached=mail.attached)
    assert forward is not None and forward.original_from is not None
    assert forward.original_from.name == "Dr. Sender"
    assert forward.original_subject == "GroupwiseForwardingTest"
    assert forward.original_text == "Testing email forwarding with Groupwise 1.2.2010"
    assert check_context(forward.own_text).missing == ALL


# --------------------------------------------------------------------------------------------
# detect_forward units

SUBJECTS = [
    ("Fwd: x", True),
    ("FW: x", True),
    ("Fw: x", True),
    ("WG: x", True),
    ("TR: x", True),
    ("RV: x", True),
    ("VS: x", True),
    ("PD: x", True),
    ("I: x", True),
    ("[EXTERNAL] FW: x", True),
    ("Re: x", False),
    ("AW: FW: x", False),
    ("Info: x", False),
    ("Fwd x", False),
]


@pytest.mark.parametrize(("subject", "forward"), SUBJECTS)
def test_subject_prefix_alone(subject: str, forward: bool) -> None:
    found = detect_forward("FYI, see the customer's note.", subject=subject)
    assert (found is not None) == forward
    if found is not None:
        assert found.style == "generic"
        assert found.own_text == "FYI, see the customer's note."
        assert (found.original_from, found.original_subject, found.original_text) == (None, "", "")


def test_reply_with_outlook_block_is_not_a_forward_but_an_unprefixed_one_is() -> None:
    text = (
        "ok\n\n-----Original Message-----\n"
        "From: a@b.example\nSent: Monday\nTo: c@d.example\nSubject: x\n\nhi\n"
    )
    assert detect_forward(text, subject="RE: x") is None
    assert detect_forward(text, subject="x") is not None


@pytest.mark.parametrize(
    ("value", "addr", "name"),
    [
        ("Doe, Jane <Jane.Doe@Acme.example>", "jane.doe@acme.example", "Doe, Jane"),
        ('"Doe, Jane" <jane@acme.example>', "jane@acme.example", "Doe, Jane"),
        ("Jane Doe [mailto:jane@acme.example]", "jane@acme.example", "Jane Doe"),
        ("jane@acme.example<mailto:jane@acme.example>", "jane@acme.example", ""),
        (
            "=?utf-8?q?M=C3=BCller=2C_J=C3=B6rg?= <j@kunde.example>",
            "j@kunde.example",
            "Müller, Jörg",
        ),
        ("Jane <jane@acme.example>, Bob <bob@acme.example>", "jane@acme.example", "Jane"),
    ],
)
def test_block_sender_addresses(value: str, addr: str, name: str) -> None:
    text = (
        "FYI\n\n---------- Forwarded message ---------\n"
        f"From: {value}\nDate: Mon\nSubject: s\nTo: t\n\nbody\n"
    )
    forward = detect_forward(text, subject="Fwd: s")
    assert forward is not None and forward.original_from is not None
    assert (forward.original_from.addr, forward.original_from.name) == (addr, name)


def test_outlook_cjk_full_width_colons() -> None:
    text = (
        "请处理\n\n发件人：王伟 <wang.wei@kehu.example>\n发送时间：2025年3月3日 9:12\n"
        "收件人：销售 <sales@example.com>\n主题：发票错误\n\n您好\n"
    )
    forward = detect_forward(text, subject="转发: 发票错误")
    assert forward is not None and forward.original_from is not None
    assert forward.original_from.addr == "wang.wei@kehu.example"
    assert forward.original_subject == "发票错误"
    assert forward.own_text == "请处理"


# --------------------------------------------------------------------------------------------
# check_context units

URL = "https://example.atlassian.net/browse/SUP-1"
FULL = (
    f"Customer: Acme, jane@acme.example\nLink: {URL}\nSummary: exports fail\n"
    "Impact: month-end close blocked\nDeadline: Friday"
)
PROSE_24 = " ".join(["word"] * 24)

CONTEXT_CASES = [
    ("all labelled", FULL, ()),
    ("empty own text", "", ALL),
    ("fyi", "FYI", ALL),
    ("placeholder angle", FULL.replace("Friday", "<fill in>"), ("timing",)),
    ("placeholder tbd", FULL.replace("Friday", "TBD"), ("timing",)),
    ("placeholder n/a", FULL.replace("month-end close blocked", "n/a"), ("consequences",)),
    ("placeholder question", FULL.replace("exports fail", "?"), ("summary",)),
    (
        "placeholder brackets",
        FULL.replace("Acme, jane@acme.example", "[customer name]"),
        ("customer",),
    ),
    ("empty label", FULL.replace("Acme, jane@acme.example", ""), ("customer",)),
    ("customer number only", FULL.replace("Acme, jane@acme.example", "12345"), ("customer",)),
    ("customer email only", FULL.replace("Acme, jane@acme.example", "<jane@acme.example>"), ()),
    (
        "label mid-line",
        FULL.replace("Deadline: Friday", "Please note the Deadline: Friday"),
        ("timing",),
    ),
    ("label without separator", FULL.replace("Deadline: Friday", "Deadline Friday"), ("timing",)),
    ("plural is another word", FULL.replace("Customer:", "Customers:"), ("customer",)),
    ("link label needs a URL", FULL.replace(URL, "see Jira"), ("link",)),
    ("mailto is not a link", FULL.replace(URL, "mailto:jane@acme.example"), ("link",)),
    ("bare URL counts as link", FULL.replace(f"Link: {URL}", f"See {URL} for the logs."), ()),
    (
        "URL in customer value is not the issue",
        FULL.replace(f"Link: {URL}\n", "").replace("Acme,", "Acme https://acme.example,"),
        ("link",),
    ),
    (
        "bold labels",
        FULL.replace("Customer:", "**Customer:**").replace("Deadline:", "**Deadline**:"),
        (),
    ),
    (
        "bullets and dashes",
        FULL.replace("Customer:", "- Customer:").replace("Deadline:", "Deadline -"),
        (),
    ),
    ("numbered", FULL.replace("Customer:", "1. Customer:"), ()),
    ("case-insensitive", FULL.upper().replace("HTTPS", "https"), ()),
    (
        "synonyms",
        f"Client: Globex\nTicket: {URL}\nTL;DR: loop\nIf we don't act: churn\nUrgency: high",
        (),
    ),
    (
        "curly apostrophe",
        f"Company: Globex\nURL: {URL}\nProblem: loop\nIf we don’t act: churn\nWhen: now",
        (),
    ),
    (
        "more synonyms",
        f"Account: Globex\nIssue: {URL}\nTL;DR: loop\nRisk: churn\nTime considerations: Q2",
        (),
    ),
    (
        "continuation lines",
        "Customer:\n    Acme\nLink:\n\t" + URL + "\nSummary: a\nImpact: b\nTiming:\n  Friday",
        (),
    ),
    (
        "unindented next line is not a value",
        FULL.replace("Deadline: Friday", "Deadline:\nFriday"),
        ("timing",),
    ),
    ("prose summary, 25 words", FULL.replace("Summary: exports fail", PROSE_24 + " more"), ()),
    ("prose summary, 24 words", FULL.replace("Summary: exports fail", PROSE_24), ("summary",)),
    (
        "greeting does not count",
        FULL.replace("Summary: exports fail", "Hi team,\n" + PROSE_24),
        ("summary",),
    ),
    (
        "URLs are not words",
        FULL.replace("Summary: exports fail", " ".join([URL] * 30)),
        ("summary",),
    ),
    (
        "signature does not count",
        FULL.replace("Summary: exports fail", "") + "\n-- \n" + PROSE_24 + " x y",
        ("summary",),
    ),
    (
        "empty summary label, long prose",
        FULL.replace("exports fail", "") + "\n\n" + PROSE_24 + " more",
        (),
    ),
    ("later value wins", FULL + "\nDeadline: TBD", ()),
    (
        "labelled lines are not prose",
        "\n".join(f"Impact: {PROSE_24}" for _ in range(3)),
        ("customer", "link", "summary", "timing"),
    ),
]


@pytest.mark.parametrize(
    ("case", "own_text", "missing"), CONTEXT_CASES, ids=[c[0] for c in CONTEXT_CASES]
)
def test_check_context(case: str, own_text: str, missing: tuple[str, ...]) -> None:
    check = check_context(own_text)
    assert check.missing == missing, case
    assert check.present == tuple(f for f in ALL if f not in missing)
    assert [name for name, _ in check.values] == list(check.present)


def test_values_are_the_useful_part() -> None:
    check = check_context(FULL.replace(f"Link: {URL}", f"Link: the ticket is {URL}, thanks"))
    values = dict(check.values)
    assert values["link"] == URL
    assert values["customer"] == "Acme, jane@acme.example"
    assert values["timing"] == "Friday"


def test_summary_word_threshold_is_a_parameter() -> None:
    own = FULL.replace("Summary: exports fail", "the export fails every night")
    assert "summary" in check_context(own).missing
    assert "summary" in check_context(own, summary_min_words=5).present


def test_custom_fields() -> None:
    fields = (
        FieldSpec("kunde", ("Kunde",), "customer"),
        FieldSpec("frist", ("Frist",), "timing"),
    )
    check = check_context("Kunde: Müller GmbH\nFrist: ", fields=fields)
    assert (check.present, check.missing) == (("kunde",), ("frist",))
    assert fill_in_block(check, fields).startswith("Frist: \n(")


def test_only_own_text_counts() -> None:
    forward, check = _run("gmail-missing-link.eml")
    assert forward is not None and check is not None
    assert "https://" in forward.original_text  # the customer gave a URL ...
    assert "link" in check.missing  # ... but the forwarder did not


# --------------------------------------------------------------------------------------------
# The refusal's fill-in block and the reply that completes it


def test_fill_in_block_lists_missing_fields_with_hints() -> None:
    block = fill_in_block(check_context(FULL.replace("Friday", "TBD").replace(URL, "")))
    lines = block.splitlines()
    assert lines[0] == "Link: "
    assert lines[1].startswith("(") and lines[1].endswith(")")
    assert "Timing: " in lines
    assert "Customer: " not in lines
    assert fill_in_block(check_context(FULL)) == ""


def test_an_untouched_fill_in_block_completes_nothing() -> None:
    block = fill_in_block(check_context("FYI"))
    assert check_context(block).missing == ALL
    assert check_context(merge_context("FYI", block)).missing == ALL


def test_filled_in_block_completes_the_context() -> None:
    first = "FYI\n\nCustomer: Acme\nDeadline: TBD"
    check = check_context(first)
    assert check.missing == ("link", "summary", "consequences", "timing")
    reply = fill_in_block(check)
    for label, value in (
        ("Link: ", URL),
        ("Summary: ", "exports fail"),
        ("Consequences: ", "churn"),
        ("Timing: ", "Friday"),
    ):
        reply = reply.replace(label, label + value, 1)
    merged = merge_context(first, reply)
    assert check_context(merged).missing == ()
    assert "TBD" not in merged  # the reply's value replaced the placeholder
    assert "Customer: Acme" in merged
    assert "(the problem in your own words" not in merged


def test_merge_later_values_win() -> None:
    merged = merge_context(FULL, "Deadline: Monday\nImpact: ")
    assert dict(check_context(merged).values)["timing"] == "Monday"
    assert dict(check_context(merged).values)["consequences"] == "month-end close blocked"
    assert merge_context("", "Deadline: Monday") == "Deadline: Monday"
    assert merge_context(FULL, "") == FULL


def test_default_fields_carry_the_required_labels() -> None:
    labels = {spec.kind: {label.lower() for label in spec.labels} for spec in DEFAULT_FIELDS}
    assert [spec.kind for spec in DEFAULT_FIELDS] == list(ALL)
    assert {"customer", "customer details", "client", "account", "company"} <= labels["customer"]
    assert {"link", "issue", "ticket", "url"} <= labels["link"]
    assert {"summary", "tl;dr", "problem"} <= labels["summary"]
    assert {"consequences", "impact", "risk", "if we don't act"} <= labels["consequences"]
    assert {"timing", "deadline", "time considerations", "urgency", "when"} <= labels["timing"]


def test_header_lines_in_own_words_are_not_a_block() -> None:
    text = "Customer: Acme\nFrom: our side all good\nDate: tomorrow\nSubject: later\n"
    assert detect_forward(text, subject="hello") is None


def test_separator_above_a_quoted_header_table() -> None:
    text = (
        "Hi,\n\nBegin forwarded message:\n\n"
        "> From: Jane <j@a.example>\n> Subject: s\n> Date: d\n> To: t\n>\n> body"
    )
    forward = detect_forward(text, subject="Fwd: s")
    assert forward is not None and forward.original_from is not None
    assert (forward.style, forward.own_text, forward.original_text) == ("apple", "Hi,", "body")
    assert forward.original_from.addr == "j@a.example"


def test_attribution_is_a_block_only_above_a_quote() -> None:
    gmail = "---------- Forwarded message ---------\nFrom: Jane <j@a.example>\nDate: d\n\nbody"
    forward = detect_forward("Here is what the customer wrote:\n\n" + gmail, subject="Fwd: s")
    assert forward is not None and forward.style == "gmail"
    assert forward.own_text == "Here is what the customer wrote:"
