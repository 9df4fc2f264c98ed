"""Fuzzing the parsers and the whole pipeline with Hypothesis, seeded with tests/corpus.

Bounded for CI (the file runs in well under two minutes); raise the budget for a longer local
run with ``SUPPORTGATE_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``. Every crash found becomes
a named fixture under tests/fixtures/hostile/ and a regular test in tests/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_corpus import messages, smtp_form

from gateway import db
from gateway.app import App, build_app
from gateway.models import RawMail
from parsing.bounce import parse_bounce
from parsing.commands import parse_commands
from parsing.forward import check_context, detect_forward
from parsing.headers import (
    addresses,
    content_hash,
    decode_words,
    first_message_id,
    message_ids,
    one_line,
    threading_headers,
)
from parsing.mime import MessageRejected, parse_message, safe_filename
from parsing.quoted import extract_new_text, html_to_text

from conftest import load_config, receive, write_config

BUDGET = int(os.environ.get("SUPPORTGATE_FUZZ_EXAMPLES", "0")) or None
HOSTILE = Path(__file__).parent / "fixtures" / "hostile"
CORPUS = [smtp_form(p.read_bytes()) for p in messages()]
SEEDS = sorted(HOSTILE.glob("*.eml"))


def budget(default: int) -> settings:
    return settings(
        max_examples=BUDGET or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


def parse_or_reject(raw: bytes) -> None:
    """parse_message returns a message or refuses it with MessageRejected; nothing else."""
    try:
        parsed = parse_message(raw)
    except MessageRejected as exc:
        assert str(exc)
        return
    assert parsed.size == len(raw)
    assert "\n" not in parsed.subject and "\r" not in parsed.subject
    assert all("\n" not in value for _name, value in parsed.headers)
    for attachment in parsed.attachments:
        assert_safe_name(attachment.filename)


def assert_safe_name(name: str) -> None:
    assert name and not name.startswith(".") and len(name) <= 200
    assert not re.search(r"[\x00-\x1f\x7f/\\:]", name), name


# -- mutations of real mail --------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A corpus message with a few byte flips, insertions, deletions and splices."""
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "splice", "boundary", "header"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(
                st.sampled_from(
                    [
                        b"\r\n",
                        b"\r\n\r\n",
                        b"--",
                        b"=?utf-8?b?",
                        b"?=",
                        b"\x00",
                        b"\xff\xfe",
                        b"Content-Type: multipart/mixed; boundary=x\r\n",
                        b"Content-Transfer-Encoding: base64\r\n",
                        b"charset=x-unknown\r\n",
                    ]
                )
                | st.binary(max_size=32)
            )
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            other = draw(st.sampled_from(CORPUS))
            head = other.partition(b"\r\n\r\n")[0]
            start = draw(st.integers(0, len(head)))
            data[at:at] = head[start : start + draw(st.integers(1, 400))]
        elif kind == "boundary":
            found = re.search(rb"^--[^\r\n]+\r\n", bytes(data), re.M)
            if found:
                times = draw(st.integers(2, 50))
                data[found.start() : found.start()] = found.group(0) * times
        else:
            name = draw(st.sampled_from([b"From", b"Subject", b"Reply-To", b"Content-Type"]))
            value = draw(st.binary(max_size=80).filter(lambda v: b"\r" not in v and b"\n" not in v))
            data[0:0] = name + b": " + value + b"\r\n"
    return bytes(data)


@budget(500)
@given(st.binary(max_size=4096))
def test_parse_message_on_arbitrary_bytes(raw: bytes) -> None:
    parse_or_reject(raw)


@budget(500)
@given(mutated())
def test_parse_message_on_mutated_corpus_mail(raw: bytes) -> None:
    parse_or_reject(raw)


_NUL_CHARSET = b"Content-Type: text/plain; charset=\x00us-ascii\r\n\r\nThe printer is broken.\r\n"


def test_a_charset_name_with_a_nul_is_an_unknown_charset() -> None:
    """`bytes.decode` raises ValueError, not LookupError, for a codec name with a NUL: found
    by the mutation fuzzer in a Courier bounce. The body, the bounce's text and a forwarded
    message's body are each read with a fallback charset instead."""
    plain = b"From: a@customer.org\r\nSubject: nul\r\n" + _NUL_CHARSET
    report = (
        b"From: postmaster@example.org\r\nSubject: NOTICE: mail delivery status.\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\n" + _NUL_CHARSET + b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; example.org\r\n\r\nFinal-Recipient: rfc822; c@example.jp\r\n"
        b"Action: failed\r\nStatus: 5.0.0\r\n\r\n--b--\r\n"
    )
    attached = b"From: c@customer.org\r\nSubject: printer\r\n" + _NUL_CHARSET
    forwarded = (
        b"From: agent@example.com\r\nSubject: Fwd: printer\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\nSee below.\r\n--b\r\n"
        b"Content-Type: message/rfc822\r\n\r\n" + attached + b"--b--\r\n"
    )
    for raw in (plain, report, forwarded):
        parse_or_reject(raw)
    assert "printer is broken" in parse_message(plain).text
    bounce = parse_bounce(email.message_from_bytes(report, policy=email.policy.compat32))
    assert bounce is not None and [r.status for r in bounce.recipients] == ["5.0.0"]
    found = detect_forward("See below.", subject="Fwd: printer", attached=[attached])
    assert found is not None and "printer is broken" in found.original_text


def test_an_attached_message_the_bytes_generator_refuses_is_still_read() -> None:
    """A message/rfc822 part whose multipart Content-Type is mangled keeps its body as
    decoded text, which `as_bytes` cannot write back: found by the mutation fuzzer in a
    1993 multi-media demo message. It is read as text instead of failing the parse."""
    raw = (
        b"From: a@customer.org\r\nSubject: demo\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\n"
        b"Content-Type: text/plain\r\n\r\nSee the attached message.\r\n--outer\r\n"
        b"Content-Type: message/rfc822\r\n\r\nFrom: c@customer.org\r\nSubject: inner\r\n"
        b"Content-Type: multipart/\r\n\xff\xfealternative; boundary=inner\r\n\r\n"
        b"--inner\r\nContent-Type: text/plain\r\n\r\nThe printer is broken.\r\n"
        b"--inner--\r\n--outer--\r\n"
    )
    parse_or_reject(raw)
    parsed = parse_message(raw)
    assert "See the attached message." in parsed.text


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.name)
def test_parse_message_on_every_hostile_fixture(path: Path) -> None:
    parse_or_reject(path.read_bytes())


# -- header helpers ------------------------------------------------------------------------------

header_text = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda charset, enc, body, tail: f"=?{charset}?{enc}?{body}?={tail}",
        st.sampled_from(["utf-8", "iso-8859-1", "x-unknown", "utf-7", ""]),
        st.sampled_from(["q", "b", "Q", "B", "x"]),
        st.text(alphabet='=ABCDEFabcdef0123456789+/_-?\r\n :<>@,"', max_size=60),
        st.text(max_size=40),
    ),
)


@budget(800)
@given(header_text, st.integers(1, 2000))
def test_header_helpers_on_hostile_text(value: str, limit: int) -> None:
    decoded = decode_words(value)
    assert isinstance(decoded, str)
    flat = one_line(decoded, limit=limit)
    assert len(flat) <= limit and not re.search(r"[\x00-\x1f\x7f]", flat)
    for address in addresses([value]):
        assert "@" in address.addr and " " not in address.addr
        assert not re.search(r"[\x00-\x1f\x7f]", address.addr + address.name)
    for found in message_ids(value):
        assert "<" not in found and ">" not in found and not re.search(r"\s", found)
    first = first_message_id(value)
    assert " " not in first and len(first) <= 500
    assert_safe_name(safe_filename(value))  # once crashed: attachment-name-bad-base64-word.eml


@budget(500)
@given(st.binary(max_size=2048))
def test_header_helpers_on_raw_bytes(raw: bytes) -> None:
    assert len(content_hash(raw)) == 64
    msgid, irt, refs = threading_headers(raw)
    assert "\n" not in msgid + irt + refs


# -- quoted text, HTML, forwards, commands, bounces ---------------------------------------------

mail_text = st.one_of(
    st.text(max_size=2000),
    st.lists(
        st.sampled_from(
            [
                "> quoted",
                ">> deeper",
                "On Mon, 2 Mar 2026, Jane <jane@x.org> wrote:",
                "-----Original Message-----",
                "---------- Forwarded message ---------",
                "From: Jane <jane@x.org>",
                "Subject: Fwd: help",
                "Sent: Monday",
                "-- ",
                "Customer: ACME",
                "Link: https://x.example/1",
                "#status pending",
                "#assign me",
                "",
                "Hello there",
                "\u202e\u2028",
            ]
        )
        | st.text(max_size=80),
        max_size=60,
    ).map("\n".join),
)


@budget(500)
@given(mail_text)
def test_extract_new_text_on_hostile_text(text: str) -> None:
    assert isinstance(extract_new_text(text), str)


@budget(500)
@given(
    st.one_of(
        st.text(max_size=2000),
        st.lists(
            st.sampled_from(
                [
                    "<p>",
                    "</p>",
                    "<div class=gmail_quote>",
                    "<blockquote>",
                    "</blockquote>",
                    "<a href='javascript:x'>",
                    "</a>",
                    "<br>",
                    "<script>",
                    "<style>",
                    "<!--",
                    "-->",
                    "<![CDATA[",
                    "&amp;",
                    "&#0;",
                    "&#x110000;",
                    "<table><tr><td>",
                    "<",
                    ">",
                    '"',
                ]
            )
            | st.text(max_size=20),
            max_size=200,
        ).map("".join),
    )
)
def test_html_to_text_on_hostile_html(html: str) -> None:
    assert isinstance(html_to_text(html), str)


@budget(500)
@given(mail_text, st.text(max_size=100), st.lists(st.sampled_from(CORPUS), max_size=1))
def test_forward_detection_and_context_on_hostile_text(
    text: str, subject: str, attached: list[bytes]
) -> None:
    found = detect_forward(text, subject=subject, attached=attached)
    own = found.own_text if found else text
    check = check_context(own)
    assert set(check.present).isdisjoint(check.missing)
    assert len(check.present) + len(check.missing) == 5


@budget(500)
@given(mail_text)
def test_parse_commands_on_hostile_text(text: str) -> None:
    block = parse_commands(text)
    for command in block.commands:
        assert re.fullmatch(r"[a-z][a-z_-]*", command.name)
        assert "\n" not in command.args
    assert block.body in text.replace("\r\n", "\n").replace("\r", "\n")


@budget(500)
@given(st.one_of(mutated(), st.binary(max_size=2048)))
def test_parse_bounce_on_hostile_mail(raw: bytes) -> None:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    bounce = parse_bounce(msg)
    if bounce is not None:
        assert all("@" in r.address or not r.address for r in bounce.recipients)


# -- the whole pipeline --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_app(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[App, asyncio.AbstractEventLoop]]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = load_config(write_config(folder, database_url=f"sqlite+aiosqlite:///{folder}/fuzz.db"))
    db.upgrade(config.database_url)
    loop = asyncio.new_event_loop()
    app = build_app(config, parse_workers=0)
    try:
        yield app, loop
    finally:
        loop.run_until_complete(app.close())
        loop.close()


@budget(150)
@given(st.one_of(mutated(), st.binary(max_size=1024), st.sampled_from(CORPUS)))
@example(b"")
@example(b"\r\n\r\n")
def test_pipeline_ends_every_message_processed_duplicate_or_quarantined(
    pipeline_app: tuple[App, asyncio.AbstractEventLoop], raw: bytes
) -> None:
    app, loop = pipeline_app
    raw_id = loop.run_until_complete(receive(app, raw))

    async def row() -> RawMail:
        async with app.sessions() as session:
            found = await session.get(RawMail, raw_id)
            assert found is not None
            return found

    result = loop.run_until_complete(row())
    assert result.state in ("processed", "duplicate", "quarantined"), result.state
    if result.state == "quarantined":
        assert result.note
