"""What a checkpoint holds, recorded by its uploader: every file with its size, sha256 and modification time.

The uploader computes each hash while it streams the file to the store (no second read) and stores the list as
``MANIFEST_FILE`` next to the files, last, once every file is in; the same list travels in ``CheckpointStored``.
Whoever downloads the checkpoint (a trial restoring it, the gateway's tar, the SDK) checks each file against it
and sets the recorded modification time.
"""

from __future__ import annotations

import msgspec

# The manifest's object name inside a checkpoint (beside the user's files and metadata.json).
MANIFEST_FILE = "kiln-manifest.json"


class CheckpointFile(msgspec.Struct, frozen=True, kw_only=True):
    """One file of a checkpoint as uploaded."""

    size: int
    sha256: str  # hex digest of the bytes uploaded
    mtime: float  # the file's modification time on the uploader's disk (seconds since the epoch)


class CheckpointManifest(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint's record of itself: how far its trial was, what wrote it, and its files."""

    steps_completed: int
    framework: str = ""  # e.g. "torch-2.13.0"; "" when the trial used none Kiln knows
    files: dict[str, CheckpointFile] = {}  # relative path -> the file


class CorruptCheckpoint(ValueError):
    """A downloaded file does not match what its checkpoint's manifest records (the bytes are wrong, not the
    connection: no retry brings the right ones back)."""


def mismatch(rel: str, want: CheckpointFile, size: int, sha256: str) -> str:
    """Why a file of ``size`` bytes hashing to ``sha256`` is not ``want``; "" when it is."""
    if size != want.size:
        return f"{rel}: {size} bytes where the checkpoint recorded {want.size}"
    if sha256 != want.sha256:
        return f"{rel}: sha256 {sha256} where the checkpoint recorded {want.sha256}"
    return ""
