"""Hostile mail: every bomb, trick and injection is refused or quarantined with a reason.

Nothing here may crash the pipeline or stall the SMTP listener for other sessions. Sample mail
lives in tests/fixtures/hostile/, named for what it shows; the bombs too large to keep in the
repository are built by the functions below. Every bug these tests found was fixed at its
source; the test that showed it stays as a regression test.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import select

from gateway import db
from gateway.app import App, Parser, build_app
from gateway.models import AttachmentRow, Message, RawMail, Ticket
from gateway.pipeline import process_pending
from parsing.headers import addresses
from parsing.mime import Limits, MessageRejected, parse_message, safe_filename
from responders.compose import is_safe_address
from responders.render import SAMPLE_CONTEXT, Renderer, RenderError

from conftest import (
    SECRET,
    Clock,
    deliveries,
    load_config,
    mail,
    receive,
    stored_raw,
    write_config,
)

HOSTILE = Path(__file__).parent / "fixtures" / "hostile"
DONE = ("processed", "duplicate", "quarantined")


def fixture(name: str) -> bytes:
    return (HOSTILE / name).read_bytes()


def headed(subject: str, extra: bytes = b"", *, message_id: str = "") -> bytes:
    """The header block of a made-to-measure bomb, CRLF ended, open for more headers."""
    mid = message_id or hashlib.sha256(subject.encode() + extra[:64]).hexdigest()[:24]
    return (
        b"From: Mallory <mallory@customer.org>\r\n"
        b"To: support@example.com\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + mid.encode() + b"@hostile.test>\r\n"
        b"Date: Mon, 02 Mar 2026 09:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n" + extra
    )


def header_block_2mb() -> bytes:
    """One header of 2 MB: the header limit must refuse it before the parser reads it."""
    return headed("huge header", b"X-Big: " + b"a" * (2 * 1024 * 1024) + b"\r\n") + b"\r\nhi\r\n"


def header_lines_100k() -> bytes:
    """100,000 header lines (1.3 MB): over the header limit."""
    lines = b"".join(b"X-Line-%d: v\r\n" % n for n in range(100_000))
    return headed("100k header lines", lines) + b"\r\nhi\r\n"


def header_lines_100k_small() -> bytes:
    """100,000 tiny header lines that stay under the header limit: parsed, slowly but surely."""
    lines = b"".join(b"X:%x\r\n" % (n % 16) for n in range(100_000))
    return headed("100k small header lines", lines) + b"\r\nhi\r\n"


def base64_attachment(size: int) -> tuple[bytes, bytes]:
    """A message carrying `size` bytes of base64 text as one attachment, and the decoded data."""
    data = hashlib.sha256(b"seed").digest() * (size * 3 // 4 // 32)
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    raw = (
        headed("big attachment", b"Content-Type: multipart/mixed; boundary=B\r\n\r\n")
        + b"--B\r\nContent-Type: text/plain\r\n\r\nthe log file you asked for\r\n--B\r\n"
        + b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        + b"Content-Disposition: attachment; filename=big.log\r\n\r\n"
        + encoded
        + b"--B--\r\n"
    )
    return raw, data


def adjacent_encoded_words(count: int) -> bytes:
    """A subject of `count` adjacent encoded words: the stdlib decoder is quadratic in them."""
    return headed("x").replace(b"Subject: x", b"Subject: " + b"=?x?q?a?=" * count) + b"\r\nhi\r\n"


async def raw_rows(app: App) -> list[RawMail]:
    return await stored_raw(app)


async def raw_row(app: App, raw_id: int) -> RawMail:
    async with app.sessions() as session:
        row = await session.get(RawMail, raw_id)
        assert row is not None
        return row


async def messages_of(app: App, raw_id: int) -> list[Message]:
    async with app.sessions() as session:
        query = select(Message).where(Message.raw_id == raw_id)
        return list((await session.execute(query)).scalars())


async def attachment_rows(app: App) -> list[AttachmentRow]:
    async with app.sessions() as session:
        return list((await session.execute(select(AttachmentRow))).scalars())


async def assert_refused_for_good(app: App, raw_id: int, reason: str) -> None:
    """Quarantined with a reason that names the limit, and never retried automatically."""
    row = await raw_row(app, raw_id)
    assert row.state == "quarantined", (row.state, row.note)
    assert reason in row.note, row.note
    assert row.attempts >= app.config.pipeline.max_attempts


async def make_app(tmp_path: Path, clock: Clock, *, edits: dict[str, str], workers: int) -> App:
    """An app whose example config has `edits` applied (keys the `extra` TOML cannot override)."""
    path = write_config(tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path}/var/sg.db")
    text = path.read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    config = load_config(path)
    await asyncio.to_thread(db.upgrade, config.database_url)
    return build_app(config, clock=clock, parse_workers=workers)


# -- MIME bombs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: fixture("mime-bomb-many-parts.eml"), "more than 500 MIME parts"),
        (header_block_2mb, "header block over"),
        (header_lines_100k, "header block over"),
    ],
    ids=["many-parts", "header-block-2mb", "header-lines-100k"],
)
async def test_mime_bombs_are_quarantined_for_good_with_the_limit_named(
    app: App, build: Callable[[], bytes], reason: str
) -> None:
    raw_id = await receive(app, build())
    await assert_refused_for_good(app, raw_id, reason)
    assert await messages_of(app, raw_id) == []


async def test_deep_nesting_is_quarantined_with_a_reason(app: App) -> None:
    raw_id = await receive(app, fixture("mime-bomb-deep-nesting.eml"))
    row = await raw_row(app, raw_id)
    assert row.state == "quarantined" and row.note
    # The pipeline still works for the next mail.
    assert (await raw_row(app, await receive(app, mail()))).state == "processed"


def test_deep_nesting_is_a_parse_limit_not_a_crash() -> None:
    with pytest.raises(MessageRejected, match="nest"):
        parse_message(fixture("mime-bomb-deep-nesting.eml"))


def test_nesting_just_past_the_limit_is_rejected_by_the_walk() -> None:
    body = b"Content-Type: text/plain\r\n\r\ninner\r\n"
    for level in range(25):
        b = b"L%d" % level
        body = (
            b"Content-Type: multipart/mixed; boundary="
            + b
            + b"\r\n\r\n--"
            + b
            + b"\r\n"
            + body
            + b"\r\n--"
            + b
            + b"--\r\n"
        )
    with pytest.raises(MessageRejected, match="nesting deeper than 20"):
        parse_message(headed("25 levels") + body)


async def test_many_small_header_lines_under_the_limit_are_processed(app: App) -> None:
    raw_id = await receive(app, header_lines_100k_small())
    assert (await raw_row(app, raw_id)).state == "processed"


async def test_a_20mb_base64_attachment_is_stored_content_addressed(app: App) -> None:
    raw, data = base64_attachment(20 * 1024 * 1024)
    assert len(raw) < app.config.smtp.max_message_bytes
    raw_id = await receive(app, raw)
    assert (await raw_row(app, raw_id)).state == "processed"
    (row,) = await attachment_rows(app)
    digest = hashlib.sha256(data).hexdigest()
    assert (row.sha256, row.size, row.filename) == (digest, len(data), "big.log")
    assert (app.attachments_dir / digest[:2] / digest).read_bytes() == data


async def test_a_zip_bomb_is_stored_as_its_bytes_and_never_expanded(app: App) -> None:
    raw = fixture("attachment-zip-bomb.eml")
    raw_id = await receive(app, raw)
    assert (await raw_row(app, raw_id)).state == "processed"
    (row,) = await attachment_rows(app)
    stored = (app.attachments_dir / row.sha256[:2] / row.sha256).read_bytes()
    assert stored[:4] == b"PK\x03\x04" and row.size == len(stored) < 64 * 1024
    assert row.filename == "bomb.zip" and row.content_type == "application/zip"
    on_disk = sum(p.stat().st_size for p in app.attachments_dir.rglob("*") if p.is_file())
    assert on_disk == len(stored)


async def test_a_subject_of_100k_encoded_words_parses_within_the_deadline() -> None:
    parser = Parser(workers=1, timeout=5.0, limits=Limits())
    try:
        parsed = await parser.parse(adjacent_encoded_words(100_000))
    finally:
        parser.close()
    assert parsed.subject


async def test_a_parse_that_overruns_its_deadline_is_quarantined_and_the_pool_recovers(
    tmp_path: Path, clock: Clock
) -> None:
    app = await make_app(tmp_path, clock, edits={}, workers=1)
    try:
        app.parser.timeout = 0.5  # a 27 MB message cannot even reach the worker that fast
        raw, _data = base64_attachment(20 * 1024 * 1024)
        slow = await receive(app, raw)
        row = await raw_row(app, slow)
        assert row.state == "quarantined" and "parsing took longer than 0.5 s" in row.note
        app.parser.timeout = 60.0
        after = await receive(app, mail())
        assert (await raw_row(app, after)).state == "processed"
    finally:
        await app.close()


# -- broken boundaries and charsets --------------------------------------------------------------

BROKEN = [
    "boundary-empty.eml",
    "boundary-missing-parameter.eml",
    "boundary-never-closed.eml",
    "boundary-prefix-of-another.eml",
    "boundary-reused-in-child.eml",
    "charset-invalid-bytes-for-utf8.eml",
    "charset-unknown-name.eml",
    "charset-utf7-garbage.eml",
    "cte-base64-garbage.eml",
    "cte-unknown.eml",
    "header-8bit-mixed.eml",
    "header-encoded-word-bad-qp.eml",
]


@pytest.mark.parametrize("name", BROKEN)
async def test_broken_structure_and_charsets_still_make_a_ticket(app: App, name: str) -> None:
    raw_id = await receive(app, fixture(name))
    row = await raw_row(app, raw_id)
    assert row.state == "processed", row.note
    (message,) = await messages_of(app, raw_id)
    assert "\x00" not in message.text and "\r" not in message.subject


@pytest.mark.parametrize("name", BROKEN)
def test_broken_structure_and_charsets_parse_to_text(name: str) -> None:
    parsed = parse_message(fixture(name))
    assert parsed.from_addr is not None and parsed.from_addr.addr == "mallory@customer.org"
    assert "\n" not in parsed.subject


async def test_a_subject_with_bad_base64_still_makes_a_ticket(app: App) -> None:
    raw_id = await receive(app, fixture("header-encoded-word-bad-base64.eml"))
    assert (await raw_row(app, raw_id)).state == "processed"


def test_an_encoded_word_with_a_charset_name_that_is_not_ascii_is_kept_raw() -> None:
    # Found by test_fuzz: the stdlib raises CharsetError (not a UnicodeError) for it.
    raw = (
        b"From: j@customer.org\r\nTo: =?\xff\xfeiso-8859-15?Q?shironeko?= <s@example.com>\r\n"
        b"Subject: =?\xfeutf-8?Q?hello?=\r\nMessage-ID: <cs@customer.org>\r\n\r\nhi\r\n"
    )
    parsed = parse_message(raw)
    assert [a.addr for a in parsed.to] == ["s@example.com"]
    assert "hello" in parsed.subject


def test_an_attachment_name_with_a_bad_encoded_word_parses() -> None:
    parsed = parse_message(fixture("attachment-name-bad-base64-word.eml"))
    (attachment,) = parsed.attachments
    assert attachment.data == b"data" and "?" not in attachment.filename


# -- encoded-word and CRLF tricks in the headers our notices repeat --------------------------------

INJECTED = "evil@attacker.example"


def qword(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


CRLF_TRICKS = [
    "=?utf-8?q?hi=0D=0ABcc:_" + INJECTED + "?=",
    qword(f"hi\r\nBcc: {INJECTED}\r\n\r\nforged body"),
    qword(f"hi\nBcc: {INJECTED}"),
    qword(f"hi\rBcc: {INJECTED}"),
    qword("=?utf-8?q?hi=0D=0ABcc:_" + INJECTED + "?="),  # an encoded word inside one
    qword(qword(f"hi\r\nBcc: {INJECTED}")),
    qword(f"hi\u2028Bcc: {INJECTED}\u2029\u202e"),
    qword(f"hi\x00\x0bBcc: {INJECTED}\x1b[2J"),
    "=?utf-8?q?hi=0D=0A?=\r\n =?utf-8?q?Bcc:_" + INJECTED + "?=",
    "hi\r\n Bcc: " + INJECTED,  # plain folding: a continuation, not a header
    qword("X" * 3000 + f"\r\nBcc: {INJECTED}"),
]
ACK_HEADERS = {
    "from",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "auto-submitted",
    "x-auto-response-suppress",
    "thread-topic",
    "thread-index",
    "mime-version",
    "content-type",
}


def check_notice_headers(data: bytes, *, to: str) -> None:
    """Exactly our headers, once each, on CRLF lines; the hostile text only inside values."""
    head, sep, _body = data.partition(b"\r\n\r\n")
    assert sep, "no end of header block"
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    names = []
    for line in head.split(b"\r\n"):
        assert len(line) <= 998
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _value = line.partition(b":")
        assert colon, line
        names.append(name.decode("ascii").lower())
    expected = set(ACK_HEADERS)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    if not msg.is_multipart():
        expected.add("content-transfer-encoding")
    assert sorted(names) == sorted(expected), names
    assert [a.addr_spec.lower() for a in msg["To"].addresses] == [to]
    assert [a.addr_spec for a in msg["From"].addresses] == ["support@example.com"]
    (reply_to,) = msg["Reply-To"].addresses
    assert reply_to.domain == "example.com" and reply_to.username.startswith("support+")
    for name in expected - {"content-type"}:
        value = str(msg[name])
        assert "\n" not in value and "\r" not in value and "\x00" not in value, (name, value)


async def check_outcome(app: App, raw_id: int, *, requester_header: str) -> None:
    """Ticketed with sound notices, or quarantined with a reason; never a forged recipient.

    An attacker's own From or Reply-To may be garbled into an address we then answer (it is
    theirs to choose); what must never happen is an address that only appeared *inside* an
    encoded word, or a header line of their making.
    """
    row = await raw_row(app, raw_id)
    assert row.state in ("processed", "quarantined"), row.state
    rows = await deliveries(app)
    if row.state == "quarantined":
        assert row.note and rows == []
        return
    assert {d.kind for d in rows} <= {"acknowledgement", "agent_notification"}
    acks = [d for d in rows if d.kind == "acknowledgement"]
    parsed = addresses([requester_header])
    # a garbled address we cannot write in a header gets no notice (a notice-skipped event)
    expected = [parsed[0].addr] if is_safe_address(parsed[0].addr) else []
    assert [d.recipient for d in acks] == expected
    for delivery in rows:
        check_notice_headers(delivery.data, to=delivery.recipient)


@pytest.mark.parametrize("trick", CRLF_TRICKS)
async def test_a_hostile_subject_stays_inside_our_subject(app: App, trick: str) -> None:
    raw_id = await receive(app, mail(subject=trick))
    assert (await raw_row(app, raw_id)).state == "processed"
    await check_outcome(app, raw_id, requester_header="jane@customer.org")
    assert [d.kind for d in await deliveries(app)].count("acknowledgement") == 1


@pytest.mark.parametrize("trick", CRLF_TRICKS)
async def test_a_hostile_display_name_stays_inside_our_to(app: App, trick: str) -> None:
    sender = f"{trick} <jane@customer.org>"
    raw_id = await receive(app, mail(sender=sender))
    await check_outcome(app, raw_id, requester_header=sender)


@pytest.mark.parametrize("trick", [t for t in CRLF_TRICKS if t.startswith("=?utf-8?b?")])
async def test_an_encoded_display_name_always_makes_a_ticket(app: App, trick: str) -> None:
    raw_id = await receive(app, mail(sender=f"{trick} <jane@customer.org>"))
    assert (await raw_row(app, raw_id)).state == "processed"
    acks = [d for d in await deliveries(app) if d.kind == "acknowledgement"]
    assert [d.recipient for d in acks] == ["jane@customer.org"]


@pytest.mark.parametrize(
    "reply_to",
    [
        *(f"{trick} <rt@customer.org>" for trick in CRLF_TRICKS),
        f"=?utf-8?q?{INJECTED}?= <rt@customer.org>",
        f'"{INJECTED}, " <rt@customer.org>',
        qword(f"x <{INJECTED}>, y") + " <rt@customer.org>",
    ],
)
async def test_a_hostile_reply_to_cannot_add_a_recipient(app: App, reply_to: str) -> None:
    raw_id = await receive(app, mail(headers={"Reply-To": reply_to}))
    await check_outcome(app, raw_id, requester_header=reply_to)
    if reply_to.startswith("=?utf-8?b?") or reply_to.startswith('"'):
        acks = [d for d in await deliveries(app) if d.kind == "acknowledgement"]
        assert [d.recipient for d in acks] == ["rt@customer.org"]


async def test_an_encoded_word_cannot_smuggle_a_second_sender(app: App) -> None:
    sender = qword(f"Jane <{INJECTED}>, Eve") + " <jane@customer.org>"
    raw_id = await receive(app, mail(sender=sender))
    assert (await raw_row(app, raw_id)).state == "processed"
    async with app.sessions() as session:
        (ticket,) = (await session.execute(select(Ticket))).scalars()
    assert ticket.requester == "jane@customer.org"


@pytest.mark.parametrize(
    "sender",
    [
        "Jörg <jörg@bücher.example>",
        "Jane <jane@customer_org.example>",
        "Jane <jane@[192.0.2.1]>",
    ],
    ids=["utf8-address", "underscore-domain", "domain-literal"],
)
async def test_a_sender_address_we_cannot_answer_still_makes_a_ticket(
    app: App, sender: str
) -> None:
    raw_id = await receive(app, mail(sender=sender))
    assert (await raw_row(app, raw_id)).state == "processed"


# -- attachment names ------------------------------------------------------------------------------


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def escaped_files(root: Path) -> list[Path]:
    """Files an attachment name would have created had it been used as a path."""
    return [p for p in root.rglob("*") if p.name in ("passwd", "x.exe", "boot.ini", "etc")]


async def test_attachment_names_are_safe_and_files_land_content_addressed(
    app: App, tmp_path: Path
) -> None:
    before = files_under(tmp_path)
    raw_id = await receive(app, fixture("attachment-hostile-names.eml"))
    assert (await raw_row(app, raw_id)).state == "processed"
    rows = await attachment_rows(app)
    assert len(rows) == 12
    names = {row.filename for row in rows}
    assert {"passwd", "x.exe", "boot.ini", "evil_.sh", "%2E%2E%2Fsplit.txt", "shadow"} <= names
    for row in rows:
        name = row.filename
        assert name and len(name) <= 200 and not name.startswith(".")
        assert not any(c in name for c in "/\\:\x00") and name.isprintable(), name
        assert "\u202e" not in name
    db_files = {p for p in files_under(tmp_path) if p.name.startswith("supportgate.db")}
    new = files_under(tmp_path) - before - db_files
    root = app.attachments_dir.resolve()
    for path in new:
        resolved = path.resolve()
        assert resolved.parent.parent == root, path
        assert resolved.name == hashlib.sha256(resolved.read_bytes()).hexdigest()
        assert resolved.parent.name == resolved.name[:2]
    assert {p.resolve().name for p in new} == {row.sha256 for row in rows}
    assert not escaped_files(tmp_path)


@pytest.mark.parametrize(
    ("raw_name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Windows\\x.exe", "x.exe"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("a\x00b\r\nc.txt", "a_b_c.txt"),
        ("=?utf-8?q?=2E=2E=2Fx?=", "x"),
        ("...", "attachment"),
        ("", "attachment"),
        ("\u202egnp.exe", "gnp.exe"),
    ],
)
def test_safe_filename(raw_name: str, safe: str) -> None:
    assert safe_filename(raw_name) == safe


# -- HTML ------------------------------------------------------------------------------------------


async def test_stored_html_is_sanitised(app: App) -> None:
    raw_id = await receive(app, fixture("html-scripts-and-handlers.eml"))
    assert (await raw_row(app, raw_id)).state == "processed"
    (message,) = await messages_of(app, raw_id)
    html = message.html.lower()
    assert "hello" in html and "styled" in html
    for bad in (
        "<script",
        "onload",
        "onerror",
        "javascript:",
        "vbscript:",
        "data:text/html",
        "<iframe",
        "<style",
        "<object",
        "<svg",
        "alert(",
        "style=",
    ):
        assert bad not in html, bad


# -- Jinja2 sandbox escapes in an admin's template folder ----------------------------------------


def escapes(marker: Path) -> dict[str, str]:
    """Template bodies that would run code, read files or mutate state outside a sandbox."""
    touch = f"popen('touch {marker}').read()"
    return {
        "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "cycler": "{{ cycler.__init__.__globals__.os." + touch + " }}",
        "lipsum": "{{ lipsum.__globals__['os']." + touch + " }}",
        "joiner": "{{ joiner.__init__.__globals__.__builtins__.__import__('os')." + touch + " }}",
        "namespace": "{{ namespace.__init__.__globals__ }}",
        "self": "{{ self.__init__.__globals__ }}",
        "attr-filter": "{{ ticket|attr('__class__')|attr('__mro__') }}",
        "format-attr": "{{ '{0.__class__.__init__.__globals__}'.format(ticket) }}",
        "format-map": "{{ '{0.__class__}'.format_map({'0': ticket}) }}",
        "percent-width": "{{ '%999999999d' % 1 }}",
        "mutate-dict": "{{ ticket.update({'ref': 'HACKED'}) }}",
        "mutate-list": "{{ extra.present.append('HACKED') }}",
        "huge-repeat": "{{ 'x' * 10 ** 9 }}",
        "huge-range": "{{ range(10 ** 9) | list | length }}",
        "include-parent": "{% include '../outside.txt.j2' %}",
        "include-absolute": "{% include '/etc/passwd' %}",
        "builtins-via-range": "{{ range.__self__ }}",
        "gi-frame": "{{ (x for x in []).gi_frame.f_globals }}",
        "str-mod-class": "{{ '%s' % ticket.__class__ }}",
    }


def escape_folder(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    folder = tmp_path / "templates"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (tmp_path / "outside.txt.j2").write_text("TOP SECRET outside the folder")
    bodies = escapes(marker)
    for name, body in bodies.items():
        (folder / f"escape-{name}.subject.j2").write_text("Ticket {{ ticket.ref }}")
        (folder / f"escape-{name}.txt.j2").write_text(body + "\n")
    return folder, marker, bodies


def test_rendering_refuses_every_sandbox_escape(tmp_path: Path) -> None:
    folder, marker, bodies = escape_folder(tmp_path)
    renderer = Renderer(folder)
    ticket = dict(SAMPLE_CONTEXT["ticket"])  # type: ignore[call-overload]
    context = {**SAMPLE_CONTEXT, "ticket": ticket}
    for name in bodies:
        with pytest.raises(RenderError):
            renderer.render(f"escape-{name}", context)
    assert not marker.exists()
    assert ticket["ref"] == "SUP-1042"


def test_templates_check_reports_every_escape_and_runs_nothing(tmp_path: Path) -> None:
    _folder, marker, bodies = escape_folder(tmp_path)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('templates_dir = ""', 'templates_dir = "templates"'))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(path), "templates", "check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"SUPPORTGATE_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    reported = {line.split(":")[0].rpartition("/")[2] for line in result.stderr.splitlines()}
    assert {f"escape-{name}.txt.j2" for name in bodies} <= reported, result.stderr
    assert "TOP SECRET" not in result.stdout + result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("workers", [0, 1], ids=["inline", "composer-process"])
async def test_an_escape_in_the_acknowledgement_runs_nothing_in_the_pipeline(
    tmp_path: Path, clock: Clock, workers: int
) -> None:
    """Inline, and in the composer process that writes a pipeline group's notices."""
    folder, marker, bodies = escape_folder(tmp_path)
    (folder / "acknowledgement.txt.j2").write_text(bodies["cycler"])
    app = await make_app(
        tmp_path,
        clock,
        edits={'templates_dir = ""': 'templates_dir = "templates"'},
        workers=workers,
    )
    try:
        raw_id = await receive(app, mail())
        row = await raw_row(app, raw_id)
        assert row.state in DONE and (row.state != "quarantined" or "sandbox" in row.note)
        assert all(b"__globals__" not in d.data for d in await deliveries(app))
        assert not marker.exists()
    finally:
        await app.close()


# -- SMTP: smuggling and a listener that stays responsive ------------------------------------------


def smtp_script(port: int, payload: bytes) -> list[bytes]:
    """EHLO, MAIL, RCPT, DATA, the payload, QUIT; every reply the server gave, until it hangs up."""
    script = (
        b"EHLO hostile.test\r\nMAIL FROM:<mallory@customer.org>\r\n"
        b"RCPT TO:<support@example.com>\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        reader = sock.makefile("rb")
        replies: list[bytes] = []

        def reply() -> bytes:
            lines = []
            while True:
                line = reader.readline()
                if not line:
                    return b"".join(lines)
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        replies.append(reply())
        for command in script.split(b"\r\n")[:-1]:
            sock.sendall(command + b"\r\n")
            replies.append(reply())
        sock.sendall(b"DATA\r\n")
        replies.append(reply())
        assert replies[-1].startswith(b"354"), replies
        sock.sendall(payload + b"QUIT\r\n")
        while answer := reply():
            replies.append(answer)
    return replies


SMUGGLED = (
    b"MAIL FROM:<mallory@customer.org>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)


@pytest.mark.parametrize(
    "end",
    [
        b"\n.\n",
        b"\r.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\n.\r",
        b"\r.\n",
        b"\r\n.\x00\r\n",
        b"\r\n\x00.\r\n",
        b"\r\n.\r\r\n",
        b"\n\n.\n\n",
    ],
)
async def test_smuggled_end_of_data_never_makes_two_messages(
    app: App, listener: int, end: bytes
) -> None:
    message = b"From: jane@customer.org\r\nSubject: real\r\n\r\nhello" + end + SMUGGLED
    replies = await asyncio.to_thread(smtp_script, listener, message + b".\r\n")
    data_replies = replies[5:]
    queued = [r for r in data_replies if r.startswith(b"250")]
    assert len(queued) <= 1, replies
    assert all(r[:1] in (b"2", b"5") for r in data_replies[:-1]), replies
    rows = await raw_rows(app)
    assert len(rows) == len(queued) <= 1
    if rows:
        assert rows[0].data == message
    assert not any(b"Subject: smuggled" in r.data and b"Subject: real" not in r.data for r in rows)


async def send_slowly(port: int, stop: asyncio.Event) -> None:
    """A session that streams DATA a line at a time and never finishes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        for command in (
            b"EHLO slow.test",
            b"MAIL FROM:<slow@customer.org>",
            b"RCPT TO:<support@example.com>",
            b"DATA",
        ):
            writer.write(command + b"\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
        writer.write(b"Subject: slow\r\n\r\n")
        while not stop.is_set():
            writer.write(b"x" * 998 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
    finally:
        writer.close()


async def test_the_listener_stays_responsive_during_a_slow_session_and_a_bomb(
    app: App, listener: int
) -> None:
    stop = asyncio.Event()
    slow = asyncio.create_task(send_slowly(listener, stop))
    bomb, _data = base64_attachment(20 * 1024 * 1024)
    bombs = [
        fixture("mime-bomb-deep-nesting.eml"),
        fixture("mime-bomb-many-parts.eml"),
        bomb,
    ]
    try:
        await asyncio.sleep(0.2)
        for raw in bombs:
            await asyncio.wait_for(
                aiosmtplib.send(
                    raw,
                    sender="mallory@customer.org",
                    recipients=["support@example.com"],
                    hostname="127.0.0.1",
                    port=listener,
                    timeout=60,
                ),
                120,
            )
        pipeline = asyncio.create_task(process_pending(app))
        normal = mail(message_id="normal@customer.org")
        errors, _reply = await asyncio.wait_for(
            aiosmtplib.send(
                normal,
                sender="jane@customer.org",
                recipients=["support@example.com"],
                hostname="127.0.0.1",
                port=listener,
                timeout=60,
            ),
            120,
        )
        assert errors == {}
        assert not slow.done()
        await asyncio.wait_for(pipeline, 120)
    finally:
        stop.set()
        await asyncio.wait_for(slow, 30)
    await process_pending(app)
    rows = {r.message_id: r for r in await raw_rows(app)}
    assert rows["normal@customer.org"].data == normal
    assert rows["normal@customer.org"].state == "processed"
    assert all(r.state in DONE for r in rows.values())
    assert len(rows) == 4


async def test_a_refused_mail_does_not_end_the_session_for_the_next_one(
    app: App, listener: int
) -> None:
    def session() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", listener, timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError):
                client.sendmail(
                    "mallory@customer.org",
                    ["support@example.com"],
                    b"Subject: nul\r\n\r\nNUL \x00 inside\r\n",
                )
            return client.sendmail("jane@customer.org", ["support@example.com"], mail())

    assert await asyncio.to_thread(session) == {}
    assert len(await raw_rows(app)) == 1
