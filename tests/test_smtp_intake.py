"""Our SMTP port, driven by real clients over loopback: what gets 250, what gets refused."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import subprocess

import aiosmtplib
import pytest
from sqlalchemy import select

from gateway.app import App
from gateway.models import RawMail

from conftest import fail_raw_inserts, mail, stored_raw
from services import REQUIRED


async def stored(app: App) -> list[RawMail]:
    return await stored_raw(app)


def smtp_sync(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=10)


async def test_accepts_mail_for_our_mailboxes_and_stores_it_first(
    app: App, listener: int, backend: str
) -> None:
    data = mail(message_id="one@customer.org")

    def send() -> dict[str, tuple[int, bytes]]:
        with smtp_sync(listener) as client:
            return client.sendmail(
                "jane@customer.org", ["support@example.com", "hey@example.com"], data
            )

    assert await asyncio.to_thread(send) == {}
    (raw,) = await stored(app)
    assert raw.data == data
    assert raw.rcpt_tos == ["support@example.com", "hey@example.com"]
    assert raw.mail_from == "jane@customer.org"
    assert raw.message_id == "one@customer.org"


async def test_plus_token_forms_and_bounce_address_are_ours(app: App, listener: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener)
    await client.connect()
    for address in ("support+abc@example.com", "bounces+12-deadbeef@example.com"):
        code, _ = await client.rcpt(address) if await client.mail("") else (0, "")
        assert code == 250, address
        await client.rset()
    await client.quit()


async def test_unknown_recipients_get_550_and_we_never_relay(app: App, listener: int) -> None:
    def send(rcpt: str) -> smtplib.SMTPRecipientsRefused | None:
        with smtp_sync(listener) as client:
            try:
                client.sendmail("jane@customer.org", [rcpt], mail())
            except smtplib.SMTPRecipientsRefused as exc:
                return exc
        return None

    for rcpt in ("nobody@example.com", "victim@elsewhere.org", "support@example.com.evil.org"):
        refused = await asyncio.to_thread(send, rcpt)
        assert refused is not None
        code, reply = refused.recipients[rcpt]
        assert code == 550 and reply.startswith(b"5.1.1")
    assert await stored(app) == []


async def test_too_many_recipients_get_452(app: App, listener: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener)
    await client.connect()
    await client.mail("jane@customer.org")
    codes = []
    for n in range(app.config.smtp.max_recipients + 1):
        try:
            response = await client.rcpt(f"support+{n}@example.com")
            codes.append(response.code)
        except aiosmtplib.SMTPRecipientRefused as exc:
            codes.append(exc.code)
    await client.quit()
    assert codes[-1] == 452 and set(codes[:-1]) == {250}


async def test_oversize_mail_gets_552(app: App, listener: int) -> None:
    big = mail(body="x" * 100 + "\r\n") + (b"y" * 998 + b"\r\n") * (
        app.config.smtp.max_message_bytes // 1000 + 10
    )

    def send() -> int:
        with smtp_sync(listener) as client:
            try:
                client.sendmail("jane@customer.org", ["support@example.com"], big)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code
            except smtplib.SMTPSenderRefused as exc:
                return exc.smtp_code
            return 250

    assert await asyncio.to_thread(send) == 552
    assert await stored(app) == []


def raw_session(port: int, payload: bytes) -> list[bytes]:
    """Speak SMTP by hand so the DATA bytes reach the server exactly as written."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")

        def reply() -> bytes:
            lines = []
            while True:
                line = f.readline()
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        reply()
        for cmd in (
            b"EHLO test\r\n",
            b"MAIL FROM:<jane@customer.org>\r\n",
            b"RCPT TO:<support@example.com>\r\n",
            b"DATA\r\n",
        ):
            sock.sendall(cmd)
            replies.append(reply())
        sock.sendall(payload)
        replies.append(reply())
        sock.sendall(b"QUIT\r\n")
    return replies


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"Subject: x\r\n\r\nbare LF here\nand more\r\n.\r\n", b"554"),
        (b"Subject: x\r\n\r\nbare CR here\rand more\r\n.\r\n", b"554"),
        (b"Subject: x\r\n\r\nNUL \x00 here\r\n.\r\n", b"554"),
        # smuggling: a bare-LF end of data must not end the message
        (b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<x@y>\r\n.\r\n", b"554"),
        (b"Subject: x\r\n\r\nhello\r\n.\r\n", b"250"),
    ],
)
async def test_bare_cr_lf_nul_and_smuggling_are_refused(
    app: App, listener: int, body: bytes, code: bytes
) -> None:
    replies = await asyncio.to_thread(raw_session, listener, body)
    assert replies[-1][:3] == code, replies
    assert len(await stored(app)) == (1 if code == b"250" else 0)


async def test_storage_failure_answers_451_and_stores_nothing(
    app: App, listener: int, backend: str
) -> None:
    await fail_raw_inserts(app, backend)

    def send() -> tuple[int, bytes]:
        with smtp_sync(listener) as client:
            try:
                client.sendmail("jane@customer.org", ["support@example.com"], mail())
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error
        return 250, b""

    code, reply = await asyncio.to_thread(send)
    assert code == 451
    assert reply == b"4.3.0 Requested action aborted: local error in processing"
    assert await stored(app) == []


async def test_concurrent_sessions_share_group_commits(app: App, listener: int) -> None:
    async def one(n: int) -> None:
        await aiosmtplib.send(
            mail(message_id=f"c{n}@x.org"),
            sender="a@x.org",
            recipients=["support@example.com"],
            hostname="127.0.0.1",
            port=listener,
        )

    await asyncio.gather(*(one(n) for n in range(40)))
    assert sorted(r.message_id for r in await stored(app)) == sorted(
        f"c{n}@x.org" for n in range(40)
    )


async def test_swaks_delivers(app: App, listener: int) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        if REQUIRED:
            pytest.fail("swaks is not installed: apt-get install swaks")
        pytest.skip("swaks is not installed: apt-get install swaks")
    result = await asyncio.to_thread(
        subprocess.run,
        [
            swaks,
            "--server",
            f"127.0.0.1:{listener}",
            "--from",
            "jane@customer.org",
            "--to",
            "support@example.com",
            "--header",
            "Subject: via swaks",
            "--body",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 OK queued as" in result.stdout
    (raw,) = await stored(app)
    assert b"Subject: via swaks" in raw.data


async def test_no_auth_is_offered_and_nothing_internal_is_said(app: App, listener: int) -> None:
    """We take no logins: AUTH is not advertised, and an attempt gets a plain refusal."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener)
    await client.connect()
    await client.ehlo()
    assert not client.supports_extension("auth")
    response = await client.execute_command(b"AUTH", b"PLAIN", b"AGphbmUAc2VjcmV0")
    assert response.code >= 500 and "Traceback" not in response.message
    await client.quit()


async def test_the_null_sender_over_smtp_is_stored_as_the_null_sender(
    app: App, listener: int
) -> None:
    """aiosmtpd reports MAIL FROM:<> as "<>": it must still be the null sender, never answered."""
    from gateway.models import Delivery
    from gateway.pipeline import process_pending

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", listener, timeout=10) as client:
            client.sendmail("", ["support@example.com"], mail(message_id="nullsender@x.org"))

    await asyncio.to_thread(send)  # smtplib writes MAIL FROM:<> for an empty sender
    (raw,) = await stored(app)
    assert raw.mail_from == ""
    await process_pending(app)
    async with app.sessions() as session:
        kinds = list((await session.execute(select(Delivery.kind))).scalars())
    assert "acknowledgement" not in kinds
