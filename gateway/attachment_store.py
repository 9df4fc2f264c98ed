"""Attachments on disk, content-addressed: a file named by the sha256 of its bytes, so a
second copy costs nothing and a name says what it holds."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path

from responders.transport import fsync_folder, publish


def attachment_path(directory: Path, digest: str) -> Path:
    return directory / digest[:2] / digest


def save_attachments(directory: Path, blobs: Sequence[bytes]) -> list[str | OSError]:
    """Store each blob under `directory` by its sha256 unless it is there already, all of
    them made durable at once (`publish`): per blob, its digest, or the OSError that kept
    it from being stored. A folder made for a new digest prefix is made durable too."""
    digests = [hashlib.sha256(data).hexdigest() for data in blobs]
    index_of: dict[str, int] = {}
    files: list[tuple[Path, Path, bytes]] = []
    made_folders = False
    for digest, data in zip(digests, blobs, strict=True):
        target = attachment_path(directory, digest)
        if digest in index_of or target.exists():
            continue
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            made_folders = True
        index_of[digest] = len(files)
        files.append((target.with_name(f"{digest}.tmp{uuid.uuid4().hex}"), target, data))
    if not files:
        return list(digests)
    errors = publish(directory, files)
    if made_folders:  # the new prefix folders' names, in `directory`
        try:
            fsync_folder(directory)
        except OSError as exc:
            errors = [exc] * len(errors)
    results: list[str | OSError] = []
    for digest in digests:
        error = errors[index_of[digest]] if digest in index_of else None
        results.append(digest if error is None else error)
    return results
