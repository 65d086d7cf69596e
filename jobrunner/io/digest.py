"""sha256 of a file's bytes, read in 1 MiB chunks (bounded memory for any size), or of bytes in
memory: how inputs are fingerprinted and stored prompts and result parts are checked."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK_BYTES = 1 << 20


def file_sha256(path: str | Path, *, fsync: bool = False) -> str:
    """The file's sha256 (hex); with `fsync`, the file is also flushed to disk in the same pass."""
    digest = hashlib.sha256()
    with open(path, "rb+" if fsync else "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
