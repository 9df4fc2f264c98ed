"""Bounce reading: corpus agreement with sisimai/flanker, no false positives, table-driven cases."""

from __future__ import annotations

import csv
import email
import email.policy
import json
import sys
from email.message import Message
from pathlib import Path

import pytest

# The repo root is not on sys.path under plain `pytest` (no conftest or pythonpath setting yet).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parsing.bounce import parse_bounce
from parsing.model import Bounce

CORPUS = Path(__file__).parent / "corpus"
MANIFEST = list(csv.DictReader((CORPUS / "MANIFEST.tsv").open(encoding="utf-8"), delimiter="\t"))
BOUNCES = [row["file"] for row in MANIFEST if row["category"] == "bounce"]
# Bodies without headers and an Outlook .msg: parsed for robustness only, not as mail.
NOT_RFC822 = {row["file"] for row in MANIFEST if row["file"].endswith((".txt", ".html", ".msg"))}
NOT_RFC822 -= {row["file"] for row in MANIFEST if row["file"].startswith("cpython-test_email/")}
NON_BOUNCES = [
    row["file"] for row in MANIFEST if row["category"] != "bounce" and row["file"] not in NOT_RFC822
]
# Corpus files that are not bounces but that a reader could fairly call one, and why.
# (Empty: every `looks-like-bounce` file in the corpus is filed under category `bounce`.)
AMBIGUOUS: dict[str, str] = {}

MIN_AGREEMENT = 0.95


def load(relative: str) -> Message:
    return email.message_from_bytes((CORPUS / relative).read_bytes(), policy=email.policy.compat32)


def parse(raw: str) -> Bounce | None:
    return parse_bounce(email.message_from_string(raw, policy=email.policy.compat32))


def sisimai_expectations() -> list[tuple[str, list[bool]]]:
    cases = []
    for path in sorted((CORPUS / "sisimai" / "bounce").glob("*.expected.json")):
        expected = json.loads(path.read_text(encoding="utf-8"))
        eml = f"sisimai/bounce/{path.name.removesuffix('.expected.json')}.eml"
        cases.append((eml, [bool(r["hardbounce"]) for r in expected["recipients"]]))
    return cases


def test_corpus_bounce_and_hard_soft_agreement() -> None:
    detected = [f for f in BOUNCES if parse_bounce(load(f)) is not None]
    agree = total = 0
    misses: list[str] = []
    for eml, expected in sisimai_expectations():
        bounce = parse_bounce(load(eml))
        got = [r.hard for r in bounce.recipients] if bounce else []
        for index, hard in enumerate(expected):
            total += 1
            if index < len(got) and got[index] == hard:
                agree += 1
            else:
                misses.append(f"{eml}#{index + 1}")
    bounce_rate = len(detected) / len(BOUNCES)
    hard_rate = agree / total
    print(
        f"\nbounce agreement {len(detected)}/{len(BOUNCES)} = {bounce_rate:.1%}; "
        f"hard/soft agreement {agree}/{total} = {hard_rate:.1%}; misses: {misses or 'none'}"
    )
    assert bounce_rate >= MIN_AGREEMENT
    assert hard_rate >= MIN_AGREEMENT


def test_corpus_non_bounces_are_not_bounces() -> None:
    false_positives = [
        f for f in NON_BOUNCES if f not in AMBIGUOUS and parse_bounce(load(f)) is not None
    ]
    print(f"\nfalse positives {len(false_positives)}/{len(NON_BOUNCES)}: {false_positives}")
    assert false_positives == []


@pytest.mark.parametrize("relative", [row["file"] for row in MANIFEST])
def test_every_fixture_parses_without_raising(relative: str) -> None:
    parse_bounce(load(relative))


@pytest.mark.parametrize(
    ("relative", "address", "status", "hard"),
    [
        (
            "flanker/bounce/zed.eml",
            "asdfasdfasdfasdfasdfasdfewrqertrtyrthsfgdfgadfqeadvxzvz@gmail.com",
            "5.1.1",
            True,
        ),
        ("flanker/bounce/mailbox-full.eml", "user@aol.com", "5.2.2", False),
        ("flanker/bounce/no-mx.eml", "user@example.com", "4.4.4", False),
        ("flanker/bounce/office365.eml", "noname@example.com", "5.1.10", True),
        ("flanker/bounce/gmail-no-dns.eml", "user@example.comm", "5.1.2", True),
        ("cpython-test_email/bounce/msg_16.txt", "jangel1@cougar.noc.ucla.edu", "5.2.2", False),
        ("cpython-test_email/bounce/msg_25.txt", "scoffman@wellpartner.com", "5.4.6", False),
        ("nodemailer-mailparser/bounce/delivery-status.eml", "xxxx@xxxx.com", "5.1.1", True),
        ("sisimai/bounce/lhost-messagingserver-02.eml", "kijitora@example.net", "5.2.0", False),
    ],
)
def test_corpus_first_recipient(relative: str, address: str, status: str, hard: bool) -> None:
    bounce = parse_bounce(load(relative))
    assert bounce is not None
    first = bounce.recipients[0]
    assert (first.address, first.status, first.hard) == (address, status, hard)


@pytest.mark.parametrize(
    ("relative", "message_id", "envelope_from", "standard"),
    [
        ("sisimai/bounce/lhost-postfix-02.eml", "", "kijitora@example.jp", True),
        (
            "sisimai/bounce/lhost-outlook-02.eml",
            "BLU436-SMTP6688F46CFBFB4294F252B1BA770@phx.gbl",
            "shironeko@outlook.example.com",
            True,
        ),
        ("flanker/bounce/no-mx.eml", "19E44CA63F984902B7D654F8FF40F89D@bo", "", True),
        (
            "sisimai/bounce/lhost-exim-02.eml",
            "E1X58pB-0004bW-2s@marutamachi.example.org",
            "shironeko@example.jp",
            False,
        ),
        (
            "sisimai/bounce/lhost-gmx-02.eml",
            "trinity-fde69d4e-12a0-462b-9dcd-7312ce506d03-1417194013122@3capp-mailcom-lxa07",
            "",
            False,
        ),
    ],
)
def test_corpus_original_message(
    relative: str, message_id: str, envelope_from: str, standard: bool
) -> None:
    bounce = parse_bounce(load(relative))
    assert bounce is not None
    assert bounce.original_message_id == message_id
    assert bounce.original_envelope_from == envelope_from
    assert bounce.standard is standard


def dsn(groups: str, *, report_type: str = "delivery-status", status_type: str = "") -> str:
    status_type = status_type or "message/delivery-status"
    return (
        "From: MAILER-DAEMON@mx.example.net\nTo: support@example.com\n"
        "Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nSorry.\n\n"
        f"--B\nContent-Type: {status_type}\n\nReporting-MTA: dns; mx.example.net\n\n{groups}\n"
        "--B\nContent-Type: text/rfc822-headers\n\nReturn-Path: <bounce+t1@example.com>\n"
        "Message-ID: <orig-1@example.com>\nSubject: Your ticket\n\n--B--\n"
    )


def group(action: str, status: str, diagnostic: str = "", rcpt: str = "a@example.org") -> str:
    lines = [f"Final-Recipient: rfc822; {rcpt}", f"Action: {action}", f"Status: {status}"]
    if diagnostic:
        lines.append(f"Diagnostic-Code: smtp; {diagnostic}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("action", "status", "diagnostic", "want_status", "want_hard"),
    [
        ("failed", "5.1.1", "550 5.1.1 User unknown", "5.1.1", True),
        ("failed", "5.1.2", "550 Host not found", "5.1.2", True),
        ("failed", "5.1.10", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", "5.1.10", True),
        ("failed", "5.0.0", "550 sorry, user unknown", "5.1.1", True),
        ("failed", "5.0.0", "552 mailbox over quota", "5.2.2", False),
        ("failed", "5.0.0", "550 User unknown (in reply to end of DATA command)", "5.0.0", False),
        ("failed", "5.0.0", "554 rejected for policy reasons", "5.7.1", False),
        ("failed", "5.0.0", "550 5.1.1 <a@example.org> no such user", "5.1.1", True),
        ("failed", "5.2.2", "552 5.2.2 Mailbox full", "5.2.2", False),
        ("failed", "5.2.1", "550 5.2.1 The email account is disabled", "5.2.1", False),
        ("failed", "5.2.1", "550 5.2.1 User unknown (in reply to RCPT TO command)", "5.2.1", True),
        ("failed", "5.2.3", "552 5.2.3 Message length exceeds", "5.2.3", False),
        ("failed", "5.3.4", "552 5.3.4 Message too big", "5.3.4", False),
        ("failed", "5.4.6", "554 5.4.6 Too many hops", "5.4.6", False),
        ("failed", "5.7.1", "550 5.7.1 Blocked by spam filter; user unknown", "5.7.1", False),
        ("failed", "4.2.2", "452 4.2.2 Over quota", "4.2.2", False),
        ("delayed", "4.4.1", "421 connection timed out", "4.4.1", False),
        ("failed", "", "550 5.1.1 User unknown", "5.1.1", True),
    ],
)
def test_hard_soft_rules(
    action: str, status: str, diagnostic: str, want_status: str, want_hard: bool
) -> None:
    bounce = parse(dsn(group(action, status, diagnostic)))
    assert bounce is not None and bounce.standard
    (recipient,) = bounce.recipients
    assert (recipient.status, recipient.hard, recipient.action) == (want_status, want_hard, action)


def test_dsn_fields() -> None:
    bounce = parse(
        dsn(group("failed", "5.1.1") + "\n" + group("delivered", "2.0.0", rcpt="b@x.org"))
    )
    assert bounce is not None
    assert [r.address for r in bounce.recipients] == ["a@example.org"]
    assert bounce.original_message_id == "orig-1@example.com"
    assert bounce.original_envelope_from == "bounce+t1@example.com"
    assert bounce.reporting_mta == "mx.example.net"


def test_report_with_only_successes_is_a_report_without_failures() -> None:
    bounce = parse(
        dsn(group("delivered", "2.0.0") + "\n" + group("relayed", "2.0.0", rcpt="c@x.org"))
    )
    assert bounce is not None
    assert bounce.recipients == ()


def test_text_plain_typed_status_part() -> None:
    bounce = parse(dsn(group("failed", "5.1.1"), status_type="text/plain"))
    assert bounce is not None
    assert [(r.address, r.hard) for r in bounce.recipients] == [("a@example.org", True)]


@pytest.mark.parametrize("report_type", ["feedback-report", "disposition-notification"])
def test_other_reports_are_not_bounces(report_type: str) -> None:
    assert parse(dsn(group("failed", "5.1.1"), report_type=report_type)) is None


NON_STANDARD = {
    "qmail": (
        "From: MAILER-DAEMON@mx.example.net\nTo: support@example.com\nSubject: failure notice\n\n"
        "Hi. This is the qmail-send program at mx.example.net.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n\n"
        "<gone@example.org>:\n192.0.2.1 does not like recipient.\n"
        "Remote host said: 550 5.1.1 <gone@example.org>... User unknown\n\n"
        "<full@example.org>:\nRemote host said: 552 5.2.2 Mailbox full\n\n"
        "--- Below this line is a copy of the message.\n\n"
        "Return-Path: <support@example.com>\nMessage-ID: <t-9@example.com>\n"
        "To: gone@example.org, full@example.org, ok@example.org\n\nHello\n"
    ),
    "exim": (
        "From: Mail Delivery System <Mailer-Daemon@mx.example.net>\nTo: support@example.com\n"
        "Subject: Mail delivery failed: returning message to sender\n\n"
        "This message was created automatically by mail delivery software.\n\n"
        "A message that you sent could not be delivered to one or more of its\n"
        "recipients. This is a permanent error. The following address(es) failed:\n\n"
        "  gone@example.org\n"
        "    SMTP error from remote mail server after RCPT TO:<gone@example.org>:\n"
        "    host mx.example.org [192.0.2.1]: 550 No such user here\n"
        "  full@example.org\n"
        "    SMTP error from remote mail server after RCPT TO:<full@example.org>:\n"
        "    host mx.example.org [192.0.2.1]: 452 Mailbox over quota\n\n"
        "------ This is a copy of the message, including all the headers. ------\n\n"
        "Message-Id: <t-9@example.com>\n\nHello\n"
    ),
    "postfix-without-dsn": (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\nTo: support@example.com\n"
        "Subject: Undelivered Mail Returned to Sender\n\n"
        "This is the mail system at host mx.example.net.\n\n"
        "<gone@example.org>: host mx.example.org[192.0.2.1] said: 550 5.1.1\n"
        "    <gone@example.org>: Recipient address rejected: User unknown (in reply to RCPT\n"
        "    TO command)\n\n"
        "<full@example.org>: host mx.example.org[192.0.2.1] said: 552 5.2.2 Over quota\n"
    ),
}


@pytest.mark.parametrize("name", sorted(NON_STANDARD))
def test_non_standard_bounces(name: str) -> None:
    bounce = parse(NON_STANDARD[name])
    assert bounce is not None and not bounce.standard
    got = [(r.address, r.hard) for r in bounce.recipients]
    assert got == [("gone@example.org", True), ("full@example.org", False)]
    if name != "postfix-without-dsn":
        assert bounce.original_message_id == "t-9@example.com"


@pytest.mark.parametrize(
    "raw",
    [
        # a person forwarding a bounce inline, asking why their mail did not arrive
        "From: Ann <ann@customer.example>\nTo: support@example.com\n"
        "Subject: Fwd: Undelivered Mail Returned to Sender\n\nWhy did this bounce?\n\n"
        "<bob@example.org>: host mx said: 550 5.1.1 User unknown\n",
        # the same bounce forwarded as an attachment
        "From: Ann <ann@customer.example>\nTo: support@example.com\nSubject: Fwd: bounce\n"
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="O"\n\n--O\n'
        "Content-Type: text/plain\n\nSee attached.\n--O\nContent-Type: message/rfc822\n\n"
        "From: MAILER-DAEMON@mx.example.net\nSubject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status;"
        ' boundary="I"\n\n'
        "--I\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx\n\n"
        "Final-Recipient: rfc822; bob@example.org\nAction: failed\nStatus: 5.1.1\n\n--I--\n--O--\n",
        # an out-of-office reply
        "From: Carl <carl@example.org>\nTo: support@example.com\nAuto-Submitted: auto-replied\n"
        "Subject: Automatic reply: your ticket\n\nI am away until Monday.\n",
        # a postmaster writing as a person, with no failure in it
        "From: postmaster@example.org\nTo: support@example.com\nSubject: question\n\n"
        "Hi, can you tell me about pricing? Mail me at dana@example.org.\n",
    ],
)
def test_not_bounces(raw: str) -> None:
    assert parse(raw) is None


def test_delay_notice_without_dsn_is_soft() -> None:
    bounce = parse(
        "From: MAILER-DAEMON@mx.example.net\nTo: support@example.com\n"
        "Subject: Delayed Mail (still being retried)\n\n"
        "<slow@example.org>: 451 4.4.1 connection timed out\n"
    )
    assert bounce is not None
    assert [(r.action, r.status, r.hard) for r in bounce.recipients] == [
        ("delayed", "4.4.1", False)
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"Content-Type: multipart/report; report-type=delivery-status\n\n--x\n",
        b"Content-Type: message/delivery-status\n\nFinal-Recipient: ;\nAction:\nStatus: 9.9\n",
        b"From: MAILER-DAEMON@x\nSubject: failure notice\nContent-Transfer-Encoding: base64\n\n!!!",
        b'Content-Type: multipart/report; boundary="a"\n\n'
        b"--a\nContent-Type: message/rfc822\n\n--a--",
        # inputs that make naive regexes quadratic: an unclosed tag soup, one endless line
        b"From: MAILER-DAEMON@x\nSubject: failure notice\nContent-Type: text/html\n\n"
        + b"<" * 100_000,
        b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + b"a." * 100_000,
    ],
)
def test_malformed_input_never_raises(raw: bytes) -> None:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    result = parse_bounce(msg)
    assert result is None or isinstance(result, Bounce)
