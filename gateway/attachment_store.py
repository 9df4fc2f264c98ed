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
    """Store each blob under `directory` by its sha256, durably (`publish`, a file's fsync
    each: this runs on the pipeline's loop, where a syncfs would wait for the whole
    filesystem): per blob, its digest, or the OSError that kept it from being stored.

    A file already there is trusted once its folder is fsynced: whoever renamed it there
    may not have synced the folder yet (or failed to). A folder made for a new digest
    prefix is made durable in `directory` too."""
    digests = [hashlib.sha256(data).hexdigest() for data in blobs]
    writing: list[str] = []
    files: list[tuple[Path, Path, bytes]] = []
    present: dict[Path, list[str]] = {}  # folder -> digests found there already
    made_folders = False
    for digest, data in zip(digests, blobs, strict=True):
        target = attachment_path(directory, digest)
        if digest in writing or digest in present.get(target.parent, ()):
            continue
        if target.exists():
            present.setdefault(target.parent, []).append(digest)
            continue
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            made_folders = True
        writing.append(digest)
        files.append((target.with_name(f"{digest}.tmp{uuid.uuid4().hex}"), target, data))
    failed: dict[str, OSError] = {}
    if files:
        for (_, target, _), error in zip(
            files, publish(directory, files, syncfs=False), strict=True
        ):
            if error is not None:
                failed[target.name] = error
    # The folders holding files found there, and `directory` where a prefix folder was
    # made or found: each fsynced once, its failure failing the digests it vouches for.
    vouch: dict[Path, list[str]] = {folder: found for folder, found in present.items()}
    if made_folders or present:
        vouch.setdefault(directory, []).extend(
            [*writing, *(d for f in present.values() for d in f)]
        )
    for folder, vouched in vouch.items():
        try:
            fsync_folder(folder)
        except OSError as exc:
            for digest in vouched:
                failed.setdefault(digest, exc)
    return [failed.get(digest, digest) for digest in digests]
