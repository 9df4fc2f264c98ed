"""Outbound composition: exact header sets under hostile input, threading, signed ids."""

from __future__ import annotations

import base64
import email
import re
import sys
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

# The repo root is not on sys.path under plain `pytest` (no conftest or pythonpath setting yet).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parsing.model import Address
from responders.compose import (
    MAX_REFERENCES,
    compose,
    message_id_for,
    parse_own_message_id,
    reply_token,
    verify_reply_token,
)
from responders.render import SAMPLE_CONTEXT, Notice, Renderer
from responders.threadindex import THREAD_INDEX_BYTES, thread_index

SECRET = b"s" * 32
SUPPORT = Address("support@example.com", "Example Support")
ADA = Address("ada@customer.example", "Ada Lovelace")
WHEN = datetime(2024, 5, 6, 9, 30, tzinfo=UTC)
BASE_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "x-auto-response-suppress",
    "thread-index",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _names(msg: EmailMessage) -> list[str]:
    return [k.lower() for k in msg.keys()]


def _build(subject: str = "Hello", name: str = "Ada Lovelace", **kwargs: Any) -> bytes:
    notice = Notice(subject=subject, text="Body text\n", html=None)
    kwargs.setdefault("date", WHEN)
    to = [Address("ada@customer.example", name)]
    return compose(notice, from_addr=SUPPORT, to=to, message_id="m1@example.com", **kwargs)


HOSTILE = [
    "a\r\nBcc: evil@x.example",
    "a\nBcc: evil@x.example",
    "a\rBcc: evil@x.example",
    "=?utf-8?q?x=0D=0ABcc:_evil@x?=",
    "=?utf-8?b?eA0KQmNjOiBldmlsQHg=?=",
    "nested =?utf-8?q?=3D=3Futf-8=3Fq=3Fx=3D0D=3D0ABcc:=5Fevil@x=3F=3D?=",
    "{{ 7*7 }}",
    "x" * 5000,
    "a\u2028Bcc: evil@x.example\u2029b",
    "a\x00b\x1bc\x7fd\x85e\u202ef",
    "Grüße aus Köln 👋\r\nBcc: evil@x",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_subject_never_adds_a_header(hostile: str) -> None:
    raw = _build(subject=hostile)
    msg = _parse(raw)
    assert set(_names(msg)) == BASE_HEADERS
    assert len(_names(msg)) == len(BASE_HEADERS)
    subject = str(msg["Subject"])
    assert all(ch.isprintable() for ch in subject)
    assert len(subject) <= 200
    assert b"\nBcc" not in raw and b"\rBcc" not in raw


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_display_name_never_adds_a_header(hostile: str) -> None:
    msg = _parse(_build(name=hostile))
    assert set(_names(msg)) == BASE_HEADERS
    (to,) = msg["To"].addresses
    assert to.addr_spec == "ada@customer.example"
    assert all(ch.isprintable() for ch in to.display_name)


def test_template_syntax_in_a_subject_stays_literal() -> None:
    context = dict(SAMPLE_CONTEXT)
    context["ticket"] = {**SAMPLE_CONTEXT["ticket"], "subject": "{{ 7*7 }} {% if 1 %}x{% endif %}"}  # type: ignore[dict-item]
    notice = Renderer().render("acknowledgement", context)
    msg = _parse(compose(notice, from_addr=SUPPORT, to=[ADA], message_id="m@example.com"))
    assert msg["Subject"] == "[#SUP-1042] {{ 7*7 }} {% if 1 %}x{% endif %}"


@pytest.mark.parametrize(
    "addr",
    ["ada@x.example\r\nBcc: e@x", "ada@x.example\n", "a b@x.example", "<a@x>", "ädä@x.example"],
)
def test_unsafe_addresses_are_rejected(addr: str) -> None:
    notice = Notice("s", "t", None)
    with pytest.raises(ValueError):
        compose(notice, from_addr=SUPPORT, to=[Address(addr)], message_id="m@example.com")
    with pytest.raises(ValueError):
        compose(notice, from_addr=Address(addr), to=[ADA], message_id="m@example.com")


def test_full_header_set_and_values() -> None:
    notice = Notice("[#SUP-1] Hi", "text", "<p>html</p>")
    raw = compose(
        notice,
        from_addr=SUPPORT,
        to=[ADA],
        cc=[Address("bob@customer.example", "Bob")],
        message_id="sg.SUP-1.a.b@example.com",
        in_reply_to="<parent@customer.example>",
        references=["<root@customer.example>"],
        reply_to=Address("support+tok@example.com", "Example Support"),
        auto_submitted="auto-replied",
        thread_topic="Hi",
        date=WHEN,
        extra_headers=[("X-Supportgate-Ticket", "SUP-1")],
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = _parse(raw)
    assert _names(msg) == [
        "from",
        "to",
        "cc",
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
        "x-supportgate-ticket",
        "mime-version",
        "content-type",
    ]
    assert msg["From"] == "Example Support <support@example.com>"
    assert msg["Cc"] == "Bob <bob@customer.example>"
    assert msg["Message-ID"] == "<sg.SUP-1.a.b@example.com>"
    assert msg["In-Reply-To"] == "<parent@customer.example>"
    assert msg["References"].split() == ["<root@customer.example>", "<parent@customer.example>"]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["Date"].datetime == WHEN
    assert msg.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in msg.iter_parts()]
    assert parts == ["text/plain", "text/html"]


def test_references_are_capped_keeping_the_root() -> None:
    refs = [f"<r{i}@customer.example>" for i in range(40)]
    msg = _parse(_build(references=refs, in_reply_to="<r39@customer.example>"))
    ids = msg["References"].split()
    assert len(ids) == MAX_REFERENCES
    assert ids[0] == "<r0@customer.example>"
    assert ids[1:] == refs[-(MAX_REFERENCES - 1) :]


def test_long_and_bad_ids_keep_threading_intact() -> None:
    long_id = "<" + "x" * 150 + "@outlook.example>"
    msg = _parse(
        _build(in_reply_to=long_id, references=["<ok@a.example>", "bad id <x>", "<\r\nBcc:@x>"])
    )
    assert msg["In-Reply-To"] == long_id
    assert msg["References"].split() == ["<ok@a.example>", long_id]
    assert set(_names(msg)) == BASE_HEADERS | {"in-reply-to", "references"}


def test_thread_index_is_22_bytes_and_stable_per_thread() -> None:
    first = _parse(_build(references=["<root@c.example>"]))
    later = _parse(
        _build(references=["<root@c.example>", "<x@c.example>"], date=WHEN + timedelta(days=2))
    )
    a = base64.b64decode(str(first["Thread-Index"]))
    b = base64.b64decode(str(later["Thread-Index"]))
    assert len(a) == len(b) == THREAD_INDEX_BYTES
    assert a[0] == b[0] == 1
    assert a[6:] == b[6:]  # same conversation GUID
    assert a[1:6] < b[1:6]  # later FILETIME


def test_thread_index_time_field_is_the_filetime() -> None:
    raw = base64.b64decode(thread_index(seed="x", date=datetime(1601, 1, 1, tzinfo=UTC)))
    assert raw[1:6] == b"\x00" * 5
    raw = base64.b64decode(thread_index(seed="x", date=WHEN))
    filetime = int((WHEN.timestamp() + 11644473600) * 10_000_000)
    assert int.from_bytes(raw[1:6], "big") == filetime >> 24


def test_non_ascii_round_trips() -> None:
    notice = Notice("Grüße, ça va? 日本語", "Grüße aus Köln\n", "<p>Grüße</p>")
    raw = compose(
        notice,
        from_addr=Address("support@example.com", "Süpport Team"),
        to=[Address("jose@customer.example", "José Núñez")],
        message_id="m@example.com",
        thread_topic="Grüße",
        date=WHEN,
    )
    assert raw.isascii()
    msg = _parse(raw)
    assert msg["Subject"] == "Grüße, ça va? 日本語"
    assert msg["To"].addresses[0].display_name == "José Núñez"
    assert msg["From"].addresses[0].display_name == "Süpport Team"
    assert msg["Thread-Topic"] == "Grüße"
    text = msg.get_body(("plain",))
    assert text is not None and text.get_content().splitlines() == ["Grüße aus Köln"]


def test_attachments_and_alternative() -> None:
    notice = Notice("s", "text", "<p>h</p>")
    raw = compose(
        notice,
        from_addr=SUPPORT,
        to=[ADA],
        message_id="m@example.com",
        attachments=[("../../etc/passwd\r\nX: y", "text/csv", b"a,b\n1,2\n")],
    )
    msg = _parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == ".._.._etc_passwd X: y"
    assert attachment.get_content().splitlines() == ["a,b", "1,2"]


def test_extra_headers_cannot_shadow_ours() -> None:
    for name in ("From", "bcc", "Message-ID", "Bad Name", "X-A:b", "Content-Disposition"):
        with pytest.raises(ValueError):
            _build(extra_headers=[(name, "x")])


def test_naive_date_and_bad_message_id_are_rejected() -> None:
    with pytest.raises(ValueError):
        _build(date=datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        compose(Notice("s", "t", None), from_addr=SUPPORT, to=[ADA], message_id="a b@x")


def test_date_keeps_its_offset() -> None:
    when = datetime(2024, 5, 6, 11, 30, tzinfo=timezone(timedelta(hours=2)))
    msg = _parse(_build(date=when))
    assert msg["Date"].datetime == when


# Signed identifiers


def test_message_id_round_trips() -> None:
    mid = message_id_for(ticket_ref="SUP-1042", domain="example.com", secret=SECRET, unique="a1b2")
    local, _, domain = mid.partition("@")
    assert domain == "example.com"
    sg, ref, unique, mac = local.split(".")
    assert (sg, ref, unique, len(mac)) == ("sg", "SUP-1042", "a1b2", 10)
    assert parse_own_message_id(mid, domain="example.com", secret=SECRET) == "SUP-1042"
    assert parse_own_message_id(f"<{mid}>", domain="EXAMPLE.com", secret=SECRET) == "SUP-1042"


def _flip(text: str, index: int) -> str:
    ch = text[index]
    other = "b" if ch != "b" else "c"
    return text[:index] + other + text[index + 1 :]


def test_message_id_rejects_tampering() -> None:
    mid = message_id_for(ticket_ref="SUP-1042", domain="example.com", secret=SECRET, unique="a1b2")
    other = message_id_for(ticket_ref="SUP-7", domain="example.com", secret=SECRET, unique="a1b2")
    forged = mid.replace("SUP-1042", "SUP-7")
    at = mid.index("@")
    for bad in (
        forged,
        _flip(mid, at - 1),
        _flip(mid, 4),
        mid.replace("@example.com", "@evil.example"),
        other.split(".")[0] + ".SUP-1042." + ".".join(other.split(".")[2:]),
        "sg.SUP-1042.a1b2@example.com",
        "random@example.com",
    ):
        assert parse_own_message_id(bad, domain="example.com", secret=SECRET) is None, bad
    assert parse_own_message_id(mid, domain="example.com", secret=b"t" * 32) is None


def test_reply_token_round_trips_and_is_local_part_safe() -> None:
    agent_token = reply_token(ticket_ref="SUP-1042", agent="Sam@Example.com", secret=SECRET)
    requester_token = reply_token(ticket_ref="SUP-1042", agent="", secret=SECRET)
    for token in (agent_token, requester_token):
        assert token == token.lower() and token.isalnum() and token.isascii()
    assert verify_reply_token(agent_token, secret=SECRET) == ("SUP-1042", "sam@example.com")
    assert verify_reply_token(requester_token, secret=SECRET) == ("SUP-1042", "")
    assert verify_reply_token(agent_token.upper(), secret=SECRET) == ("SUP-1042", "sam@example.com")
    assert len("support+" + requester_token) <= 64


def test_signed_ids_keep_their_spelling() -> None:
    """Ids already out in the world must still verify after an upgrade: pinned values."""
    key = b"k" * 32
    mid = message_id_for(ticket_ref="SG-1", domain="example.com", secret=key, unique="abc")
    assert mid == "sg.SG-1.abc.bbq27vteuz@example.com"
    token = reply_token(ticket_ref="SG-1", agent="Sam@Example.com", secret=key)
    assert token == "knds2miaonqw2qdfpbqw24dmmuxgg33nd2pbiyr45mkxeywl"


def test_reply_token_rejects_tampering() -> None:
    token = reply_token(ticket_ref="SUP-1042", agent="sam@example.com", secret=SECRET)
    other = reply_token(ticket_ref="SUP-7", agent="sam@example.com", secret=SECRET)
    for index in range(len(token)):
        assert verify_reply_token(_flip(token, index), secret=SECRET) is None, index
    assert verify_reply_token(token, secret=b"t" * 32) is None
    assert verify_reply_token(other, secret=SECRET) == ("SUP-7", "sam@example.com")
    spliced = other[: len(other) // 2] + token[len(token) // 2 :]
    assert verify_reply_token(spliced, secret=SECRET) is None
    for bad in ("", "!!!", token[:-1], token + "a", "a" * 80):
        assert verify_reply_token(bad, secret=SECRET) is None


# -- the short-header shortcut writes what the policy would ---------------------------------------

_SPECIALS = ' "(),.:;<>@[\\]=?_-!#'


def _random_text(rng: Any, longest: int) -> str:
    alphabet = "abcxyzABC019" + _SPECIALS
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def _policy_header(name: str, value: Any) -> tuple[bytes, bool]:
    """The header's bytes as the email package writes ``msg[name] = value``, and whether it
    was stored as written (not parsed)."""
    from responders.compose import SMTP_POLICY

    msg = EmailMessage(policy=SMTP_POLICY)
    msg[name] = value
    (stored,) = [value for _name, value in msg._headers]
    return msg.as_bytes(policy=SMTP_POLICY).removesuffix(b"\r\n"), not hasattr(stored, "fold")


def _redrawn(rng: Any, text: str) -> str:
    """The same shape: every ASCII letter and digit drawn again, everything else kept."""
    return "".join(rng.choice("abqXYZ0189") if c.isascii() and c.isalnum() else c for c in text)


def test_headers_written_without_the_policy_match_its_folding() -> None:
    """Seeded random values, plain and not, short and long, each with a twin of the same shape
    (letters and digits drawn again): `_header` gives the policy's bytes for all of them, by
    each of its three paths (short and written as is, long and folded as its shape, the
    policy), so a shape's cached folding is checked on values it was not computed from."""
    import random
    from email.headerregistry import Address as HeaderAddress
    from email.utils import format_datetime

    from responders.compose import _ALNUM, _PLAIN, TEXT_LIMIT, _breaks, _header, _settle

    rng = random.Random(20261122)
    paths = {"short": 0, "shape": 0, "policy": 0}
    for n in range(6000):
        kind = n % 4
        values: list[Any]
        if kind == 0:
            name = rng.choice(["Subject", "Thread-Topic", "Auto-Submitted", "X-Custom"])
            text = _settle(_random_text(rng, rng.choice([90, 200])), TEXT_LIMIT)
            values = [text, _redrawn(rng, text)]
        elif kind == 1:
            name = "Date"
            moment = WHEN + timedelta(seconds=rng.randint(-(10**9), 10**9))
            values = [
                format_datetime(
                    moment.astimezone(timezone(timedelta(minutes=rng.choice([-300, 0, 330]))))
                )
            ]
        else:
            name = rng.choice(["From", "To", "Cc", "Reply-To"])
            local = rng.choice(["ada", "a.b", "x+t_1", "support+" + "k7" * rng.randint(5, 45)])
            spec = f"{local}@{rng.choice(['example.com', 'mail.example-2.co.uk'])}"
            display = _settle(_random_text(rng, rng.choice([30, 60])), TEXT_LIMIT)
            people = [
                [HeaderAddress(display_name=d, addr_spec=a)]
                for d, a in [(display, spec), (_redrawn(rng, display), _redrawn(rng, spec))]
            ]
            if kind == 3:
                extra = HeaderAddress("Ann Other", addr_spec="ann@example.org")
                people = [[*group, extra] for group in people]
            values = [group[0] if kind == 2 else group for group in people]

        for value in values:
            expected, policy_raw = _policy_header(name, value)
            assert _header(name, value) == expected, (name, value)
            assert not policy_raw
            text = value if isinstance(value, str) else ", ".join(map(str, people[0]))
            if "=?" in text or not _PLAIN.fullmatch(text):
                paths["policy"] += 1
            elif len(name) + 2 + len(text) <= 78:
                paths["short"] += 1
            else:
                paths["shape" if _breaks(name, _ALNUM.sub("a", text)) else "policy"] += 1
    assert min(paths.values()) > 500, paths  # every path was taken, often


def test_safe_addresses_are_split_as_the_header_parser_splits_them() -> None:
    """Seeded random addresses: every one `is_safe_address` lets through is what the header
    parser makes of it, and the rest are refused before anything is written."""
    import random
    from email.headerregistry import Address as HeaderAddress

    from responders.compose import _address, is_safe_address

    rng = random.Random(7)
    alphabet = "ab.+_-'=/?{}~|@\"<> ,;:\\()[]\u00e9"
    fixed = ["a@b.co", "a.b+c_d@x-y.example.com", "o'neil@ex.com", "a..b@ex.com", "a@ex..com"]
    randoms = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(5000)
    ]
    safe = 0
    for spec in fixed + [f"{r}@ex.com" for r in randoms] + [f"a@{r}" for r in randoms]:
        if not is_safe_address(spec):
            with pytest.raises(ValueError):
                _address(Address(spec, "N"))
            continue
        safe += 1
        expected = HeaderAddress("N", addr_spec=spec)
        got = _address(Address(spec, "N"))
        assert (got, got.addr_spec, str(got)) == (expected, expected.addr_spec, str(expected))
    assert safe > 300


# -- notices without attachments are written without the email package ---------------------------

_BOUNDARY = re.compile(rb"===============\d{19}==")


def _random_body(rng: Any) -> str:
    """Lines of ASCII, Latin-1, CJK and emoji, short and over-long, with every line ending."""
    pieces = [
        "plain words",
        "caf\u00e9",
        "\u4e2d\u6587",
        "\U0001f600",
        "From me",
        ".",
        "--x",
        "=3D",
        " trailing ",
        "\t",
        "a" * 90,
        "b" * 1200,
        "",
        "=?utf-8?q?x?=",
    ]
    ends = ["\n", "\n", "\n", "\r\n", "\r", ""]
    mix = rng.choice([pieces, pieces[:2] + pieces[6:9], pieces[2:4], pieces[:1] + pieces[4:8]])
    return "".join(
        " ".join(rng.choice(mix) for _ in range(rng.randint(0, 6))) + rng.choice(ends)
        for _ in range(rng.choice([0, 1, 3, 10, 11, 40]))
    )


def test_text_body_matches_the_email_package_byte_for_byte() -> None:
    """Seeded random notices, text alone and with HTML: the direct writer gives the package's
    bytes (the random boundary aside), so 7bit, quoted-printable and base64 all come out."""
    import random

    from responders.compose import _mime_body, _text_body

    rng = random.Random(20261123)
    seen: set[bytes] = set()
    for _ in range(3000):
        notice = Notice(
            subject="s",
            text=_random_body(rng),
            html=rng.choice([None, _random_body(rng), "<p>Hi caf\u00e9</p>\n"]),
        )
        got, expected = _text_body(notice), _mime_body(notice, ())
        assert _BOUNDARY.sub(b"B", got) == _BOUNDARY.sub(b"B", expected), notice
        seen.update(re.findall(rb"Content-Transfer-Encoding: (\S+)", got))
    assert seen == {b"7bit", b"quoted-printable", b"base64"}


def test_quoted_printable_matches_the_stdlib_encoder() -> None:
    """Seeded random Latin-1 text (every byte value, '=' and trailing blanks near the break
    points, every line end): the same output as quoprimime.body_encode."""
    import random
    from email import quoprimime

    from responders.compose import _quoted_printable

    rng = random.Random(11)
    alphabet = "ab =\t\u00e9\u00ff\x00\x0b\x7f.-~" + "".join(map(chr, range(256)))
    for _ in range(4000):
        body = "".join(
            "".join(
                rng.choice(alphabet) for _ in range(rng.choice([0, 5, 74, 75, 76, 77, 78, 150]))
            )
            + rng.choice(["", " ", "\t", "=", " =", "  "])
            + rng.choice(["\n", "\r\n", "\r", ""])
            for _ in range(rng.randint(0, 4))
        )
        for limit in (76, 78):
            expected = quoprimime.body_encode(body, limit, eol="\r\n")
            assert _quoted_printable(body, limit) == expected, (body, limit)


def test_names_that_are_not_ascii_are_encoded_words_that_parse_back() -> None:
    """Seeded random display names with letters from many scripts, specials, emoji and
    long runs, one to three addresses: the header `_header` writes without the policy parses
    back to the same names and addresses, and its lines stay within the 76 octets RFC 2047
    allows a line with an encoded word."""
    import random

    from parsing.headers import addresses
    from responders.compose import TEXT_LIMIT, _address, _header, _settle

    rng = random.Random(20261123)
    alphabet = "aZ09 " + _SPECIALS + "üßÆøÅéñçİı中文字Ωж€\u00a0🎉👩‍💻"
    written = 0
    for _ in range(3000):
        people = [
            Address(
                f"{rng.choice(['ada', 'x+t_1', 'support+' + 'k7' * rng.randint(1, 20)])}"
                f"@{rng.choice(['example.com', 'mail.example-2.co.uk'])}",
                "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90))) + "é",
            )
            for _ in range(rng.randint(1, 3))
        ]
        name = rng.choice(["From", "To", "Cc", "Reply-To"])
        value: Any = [_address(p) for p in people]
        if len(value) == 1 and rng.random() < 0.5:
            value = value[0]
        raw = _header(name, value)
        assert raw.endswith(b"\r\n") and raw.isascii()
        lines = raw.removesuffix(b"\r\n").split(b"\r\n")
        assert all(line.startswith(b" ") for line in lines[1:])
        assert all(len(line) <= 76 or b" " not in line.strip() for line in lines)
        # Read back as the gateway reads mail (RFC 2047: the space between two encoded
        # words is dropped; the email package's header parser keeps it, for its own
        # policy's output too).
        unfolded = raw.decode("ascii").partition(":")[2].replace("\r\n", "")
        assert addresses([unfolded]) == tuple(
            Address(p.addr, _settle(p.name, TEXT_LIMIT)) for p in people
        ), raw
        written += b"=?utf-8?q?" in raw
    assert written == 3000
