"""Attachments stored content-addressed: durable at once, a second copy free, a failure
named per blob."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gateway.attachment_store import attachment_path, save_attachments
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
    # there already: nothing written, its folder (and theirs) fsynced before it is trusted
    assert synced == [str(attachment_path(folder, second).parent), str(folder)]
    assert len([p for p in folder.rglob("*") if p.is_file()]) == 2


def test_a_file_found_there_is_not_trusted_when_its_folder_will_not_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file renamed into place by a process that died (or failed) before syncing its
    folder is visible but may not survive a crash: it is only vouched for once synced."""
    folder = tmp_path / "attachments"
    (digest,) = save_attachments(folder, [b"blob"])
    assert isinstance(digest, str)

    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    (again,) = save_attachments(folder, [b"blob"])
    assert isinstance(again, OSError) and again.errno == 5


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
