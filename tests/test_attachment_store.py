"""Attachments stored content-addressed: durable at once, a second copy free, a failure
named per blob; a parser process stores them before the pipeline needs them."""

from __future__ import annotations

import hashlib
import os
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway import attachment_store
from gateway.app import App, Parser
from gateway.attachment_store import attachment_path, save_attachments
from gateway.models import AttachmentRow, RawMail
from gateway.pipeline import process_pending
from gateway.spool import insert_raw, raw_row
from parsing.mime import Limits
from responders import transport


def test_blobs_are_stored_by_digest_once_and_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "attachments"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(transport, "_SYNCFS", None)  # every file's fsync is seen
    blobs = [b"first", b"second", b"first"]
    first, second, again = save_attachments(folder, blobs)
    assert first == again == hashlib.sha256(b"first").hexdigest()
    assert isinstance(second, str)
    assert attachment_path(folder, first).read_bytes() == b"first"
    assert attachment_path(folder, second).read_bytes() == b"second"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted([first, second])  # no tmp file left
    # each file before its rename, each prefix folder after it, and the folder holding them
    assert len(synced) == 5 and synced[-1] == str(folder)
    synced.clear()
    assert save_attachments(folder, [b"second"]) == [second]
    assert synced == []  # there already: nothing written


def test_a_blob_that_cannot_be_stored_gets_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "attachments"
    good = hashlib.sha256(b"good").hexdigest()
    bad = hashlib.sha256(b"bad").hexdigest()
    real_open = os.open

    def open_(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if Path(path).name.startswith(f"{bad}.tmp"):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    stored, failed = save_attachments(folder, [b"good", b"bad"])
    assert stored == good and attachment_path(folder, good).read_bytes() == b"good"
    assert isinstance(failed, OSError) and failed.errno == 28
    assert not attachment_path(folder, bad).exists()
    assert [p.name for p in folder.rglob("*") if p.is_file()] == [good]


def _with_attachment(n: int) -> bytes:
    message = EmailMessage()
    message["From"] = f"c{n}@customer.org"
    message["To"] = "support@example.com"
    message["Subject"] = f"log {n} attached"
    message["Message-ID"] = f"<log{n}@customer.org>"
    message.set_content("The log is attached.\n")
    message.add_attachment(f"log {n}\n".encode(), "text", "plain", filename=f"log{n}.txt")
    return message.as_bytes()


async def test_a_parser_process_stores_the_attachments_before_the_pipeline(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pipeline's own writes failing, mail with attachments is still processed:
    the parser process stored them (`publish` is patched in this process only)."""
    app.parser = Parser(workers=1, timeout=20.0, limits=Limits(), attachments=app.attachments_dir)

    def publish(*args: object) -> list[OSError | None]:
        raise AssertionError("the pipeline wrote an attachment itself")

    monkeypatch.setattr(attachment_store, "publish", publish)
    async with app.sessions() as session, session.begin():
        rows = [
            raw_row(
                _with_attachment(n),
                mail_from=f"c{n}@customer.org",
                rcpt_tos=["support@example.com"],
                source="smtp",
                now=app.clock(),
            )
            for n in range(3)
        ]
        await insert_raw(session, rows)
    try:
        assert await process_pending(app) == {"processed": 3}
    finally:
        app.parser.close()
    async with app.sessions() as session:
        stored = list((await session.execute(select(AttachmentRow))).scalars())
        assert set((await session.execute(select(RawMail.state))).scalars()) == {"processed"}
    assert len(stored) == 3
    for row in stored:
        data = attachment_path(app.attachments_dir, row.sha256).read_bytes()
        assert data.startswith(b"log ") and row.size == len(data)
