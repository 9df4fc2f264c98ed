"""The transport against a real aiosmtpd sink on loopback, and the Maildir fallback."""

from __future__ import annotations

import asyncio
import email
import sys
from email import policy
from pathlib import Path

import pytest

# The repo root is not on sys.path under plain `pytest` (no conftest or pythonpath setting yet).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parsing.model import Address
from responders import transport
from responders.compose import compose
from responders.render import Notice
from responders.transport import Relay, SendResult, SmtpPool, deliver_maildir, send_smtp

from smtp_sink import SmtpSink, smtp_sink_fixture  # noqa: F401 - until conftest has it

FROM = "bounces@example.com"


def _mail(subject: str = "Hello") -> bytes:
    return compose(
        Notice(subject, "Body line\n.\n..leading dots survive\n", None),
        from_addr=Address("support@example.com", "Support"),
        to=[Address("ada@customer.example")],
        message_id="m1@example.com",
    )


def _relay(sink: SmtpSink, *, timeout: float = 5.0) -> Relay:
    return Relay(host="127.0.0.1", port=sink.port, timeout=timeout, helo_name="gw.test")


def _outcomes(result: SendResult) -> list[tuple[str, str, int]]:
    return [(r.recipient, r.outcome, r.code) for r in result.per_recipient]


async def test_delivers_to_the_sink(smtp_sink: SmtpSink) -> None:
    data = _mail()
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["ada@customer.example"], data=data
    )
    assert _outcomes(result) == [("ada@customer.example", "sent", 250)]
    assert result.all_sent
    (got,) = smtp_sink.messages
    assert got.mail_from == FROM
    assert got.rcpt_tos == ("ada@customer.example",)
    assert got.data.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
    parsed = email.message_from_bytes(got.data, policy=policy.default)
    assert parsed["Subject"] == "Hello"
    body = parsed.get_content().splitlines()
    assert body == ["Body line", ".", "..leading dots survive"]


async def test_451_is_temporary(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(451, "4.3.0 try again later")
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["a@x.example"], data=_mail()
    )
    (only,) = result.per_recipient
    assert (only.outcome, only.code) == ("temporary", 451)
    assert "try again later" in only.reply
    assert smtp_sink.messages == []


async def test_550_at_rcpt_for_one_of_two_is_partial(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(550, "5.1.1 no such user", stage="rcpt")
    result = await send_smtp(
        _relay(smtp_sink),
        mail_from=FROM,
        recipients=["gone@x.example", "ada@x.example"],
        data=_mail(),
    )
    assert _outcomes(result) == [
        ("gone@x.example", "permanent", 550),
        ("ada@x.example", "sent", 250),
    ]
    assert not result.all_sent
    (got,) = smtp_sink.messages
    assert got.rcpt_tos == ("ada@x.example",)


async def test_every_rcpt_refused(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(550, "5.1.1 no", stage="rcpt")
    smtp_sink.fail_next(452, "4.5.3 too many", stage="rcpt")
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["a@x.example", "b@x.example"], data=_mail()
    )
    assert _outcomes(result) == [
        ("a@x.example", "permanent", 550),
        ("b@x.example", "temporary", 452),
    ]
    assert smtp_sink.messages == []


async def test_554_at_data_is_permanent(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(554, "5.7.1 rejected as spam")
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["a@x.example", "b@x.example"], data=_mail()
    )
    assert _outcomes(result) == [
        ("a@x.example", "permanent", 554),
        ("b@x.example", "permanent", 554),
    ]


async def test_dropped_connection_is_temporary(smtp_sink: SmtpSink) -> None:
    smtp_sink.drop_next_connection()
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["a@x.example"], data=_mail()
    )
    (only,) = result.per_recipient
    assert (only.outcome, only.code) == ("temporary", 0)
    assert only.reply and "Traceback" not in only.reply


async def test_connection_dropped_after_data_is_temporary(smtp_sink: SmtpSink) -> None:
    smtp_sink.drop_next_connection(stage="data")
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["a@x.example"], data=_mail()
    )
    assert _outcomes(result) == [("a@x.example", "temporary", 0)]


async def test_sink_down_is_temporary_and_up_again_delivers(smtp_sink: SmtpSink) -> None:
    await smtp_sink.down()
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["a@x.example"], data=_mail()
    )
    (only,) = result.per_recipient
    assert (only.outcome, only.code) == ("temporary", 0)
    assert only.reply
    await smtp_sink.up()
    result = await send_smtp(
        _relay(smtp_sink), mail_from=FROM, recipients=["a@x.example"], data=_mail()
    )
    assert result.all_sent


async def test_slow_sink_beyond_timeout_is_temporary(smtp_sink: SmtpSink) -> None:
    smtp_sink.delay(2.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await send_smtp(
        _relay(smtp_sink, timeout=0.3), mail_from=FROM, recipients=["a@x.example"], data=_mail()
    )
    assert loop.time() - started < 1.5
    (only,) = result.per_recipient
    assert (only.outcome, only.code) == ("temporary", 0)
    assert "imed out" in only.reply or "imeout" in only.reply


async def test_pool_reuses_connections(smtp_sink: SmtpSink) -> None:
    pool = SmtpPool(_relay(smtp_sink), size=3)
    try:
        results = await asyncio.gather(
            *(
                pool.send(mail_from=FROM, recipients=[f"r{i}@x.example"], data=_mail(f"n{i}"))
                for i in range(30)
            )
        )
    finally:
        await pool.aclose()
    assert all(r.all_sent for r in results)
    assert len(smtp_sink.messages) == 30
    assert 1 <= smtp_sink.connections <= 3


async def test_pool_recovers_from_a_relay_restart(smtp_sink: SmtpSink) -> None:
    pool = SmtpPool(_relay(smtp_sink), size=1)
    try:
        first = await pool.send(mail_from=FROM, recipients=["a@x.example"], data=_mail())
        await smtp_sink.down()  # cuts the idle pooled connection
        down = await pool.send(mail_from=FROM, recipients=["a@x.example"], data=_mail())
        await smtp_sink.up()
        again = await pool.send(mail_from=FROM, recipients=["a@x.example"], data=_mail())
        smtp_sink.fail_next(451, "4.3.0 later")
        refused = await pool.send(mail_from=FROM, recipients=["a@x.example"], data=_mail())
        after = await pool.send(mail_from=FROM, recipients=["a@x.example"], data=_mail())
    finally:
        await pool.aclose()
    assert first.all_sent and again.all_sent and after.all_sent
    assert _outcomes(down) == [("a@x.example", "temporary", 0)]
    assert _outcomes(refused) == [("a@x.example", "temporary", 451)]
    assert len(smtp_sink.messages) == 3
    assert smtp_sink.connections == 2  # the 451 kept its connection usable


def test_maildir_delivery(tmp_path: Path) -> None:
    data = _mail("Maildir")
    name = deliver_maildir(tmp_path / "Maildir", data)
    assert sorted(p.name for p in (tmp_path / "Maildir").iterdir()) == ["cur", "new", "tmp"]
    assert list((tmp_path / "Maildir" / "tmp").iterdir()) == []
    path = tmp_path / "Maildir" / "new" / name
    assert path.read_bytes() == data
    parsed = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    assert parsed["Subject"] == "Maildir"
    second = deliver_maildir(tmp_path / "Maildir", data)
    assert second != name and ":" not in name and "/" not in name


def test_maildir_delivery_of_several_fails_only_the_message_that_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without syncfs, one thread call writes a group: each message its own file and fsync,
    the folder fsynced once; a message whose fsync fails gets its error and leaves no file,
    and a failed folder fsync fails every message it was to make durable."""
    import os

    from responders import transport
    from responders.transport import deliver_maildir_many

    monkeypatch.setattr(transport, "_SYNCFS", None)
    maildir = tmp_path / "Maildir"
    messages = [_mail(f"m{i}") for i in range(3)]
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the second message's file
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    first, failed, third = deliver_maildir_many(maildir, messages)
    assert isinstance(first, str) and isinstance(third, str)
    assert isinstance(failed, OSError) and failed.errno == 28
    assert len(calls) == 4  # three files, then the folder once
    assert sorted(p.name for p in (maildir / "new").iterdir()) == sorted([first, third])
    assert (maildir / "new" / third).read_bytes() == messages[2]
    assert list((maildir / "tmp").iterdir()) == []

    calls.clear()
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or _folder_fails(len(calls)))
    results = deliver_maildir_many(maildir, messages[:2])
    assert [isinstance(r, OSError) for r in results] == [True, True]


@pytest.mark.skipif(transport._SYNCFS is None, reason="no syncfs(2) here")
def test_maildir_delivery_of_several_syncs_the_filesystem_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With syncfs, the files of a group are made durable by one syncfs, not an fsync each
    (only the folder is fsynced); a message whose write fails gets its error and leaves no
    file; a failed syncfs fails every message of the group and leaves none in the Maildir."""
    import os

    maildir = tmp_path / "Maildir"
    messages = [_mail(f"m{i}") for i in range(3)]
    real_fsync, real_write = os.fsync, os.write
    fsyncs: list[int] = []
    syncs: list[int] = []
    writes: list[int] = []

    real_syncfs = transport._SYNCFS
    assert real_syncfs is not None

    def syncfs(fd: int) -> None:
        syncs.append(fd)
        real_syncfs(fd)

    def write(fd: int, data: memoryview) -> int:
        writes.append(fd)
        if len(writes) == 2:  # the second message's file
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(transport, "_SYNCFS", syncfs)
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    monkeypatch.setattr(os, "write", write)
    first, failed, third = transport.deliver_maildir_many(maildir, messages)
    assert isinstance(first, str) and isinstance(third, str)
    assert isinstance(failed, OSError) and failed.errno == 28
    assert len(syncs) == 1 and len(fsyncs) == 1  # the filesystem once, then the folder
    assert sorted(p.name for p in (maildir / "new").iterdir()) == sorted([first, third])
    assert (maildir / "new" / first).read_bytes() == messages[0]
    assert list((maildir / "tmp").iterdir()) == []

    def syncfs_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(transport, "_SYNCFS", syncfs_fails)
    monkeypatch.setattr(os, "write", real_write)
    results = transport.deliver_maildir_many(maildir, messages)
    assert [isinstance(r, OSError) and r.errno == 5 for r in results] == [True] * 3
    assert sorted(p.name for p in (maildir / "new").iterdir()) == sorted([first, third])
    assert list((maildir / "tmp").iterdir()) == []


def _folder_fails(call: int) -> None:
    if call == 3:  # after the two files: the folder
        raise OSError(5, "Input/output error")


def test_maildir_delivery_where_syncfs_is_refused_fsyncs_each_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A syncfs refused as a call (ENOSYS, EPERM under a seccomp filter) is not a failed
    delivery: the files are fsynced one by one, and syncfs is not tried again."""
    import errno
    import os

    def refused(fd: int) -> None:
        raise transport._Unsupported(errno.ENOSYS, "Function not implemented")

    real_fsync, fsyncs = os.fsync, []
    monkeypatch.setattr(transport, "_SYNCFS", refused)
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    messages = [_mail(f"m{i}") for i in range(2)]
    names = transport.deliver_maildir_many(tmp_path / "Maildir", messages)
    assert all(isinstance(n, str) for n in names)
    assert len(fsyncs) == 3  # each file, then the folder
    assert transport._SYNCFS is None
    assert sorted(p.name for p in (tmp_path / "Maildir" / "new").iterdir()) == sorted(names)
