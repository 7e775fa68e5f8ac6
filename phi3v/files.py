"""Files on disk: hashing (one sha256 for the whole package), sizes and durable renames.

The downloader checks every file against the Hub's sha256 with these, and the fast-precision
converter keys its cache by the same digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Protocol, TypeVar

# Bytes per read: large enough that hashing a 2 GB file is bound by the disk, small enough
# that the buffer does not count in the memory budget.
READ_BYTES = 1 << 20


class Digest(Protocol):
    """What ``hash_into`` needs of a hashlib object."""

    def update(self, data: bytes, /) -> None: ...


D = TypeVar("D", bound=Digest)


def hash_into(path: Path | str, digest: D) -> D:
    """Feed the bytes of the file at ``path`` to ``digest`` (a hashlib object) and return it.

    For a running hash that goes on after the file (a download resumed from its part file).
    """
    with Path(path).open("rb") as file:
        while block := file.read(READ_BYTES):
            digest.update(block)
    return digest


def sha256_file(path: Path | str, *, memo: Path | str | None = None) -> str:
    """The sha256 of the file at ``path``, as 64 lowercase hex digits.

    With ``memo`` (a JSON file, created when missing), the digest is remembered there under
    the file's name with its size and mtime_ns, and an unchanged file is not read again. A memo
    that cannot be read or written is ignored: the file is hashed.
    """
    path = Path(path)
    if memo is None:
        return hash_into(path, hashlib.sha256()).hexdigest()
    memo = Path(memo)
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    known: dict = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(memo.read_text(encoding="utf-8"))
    entry = known.get(path.name) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and "sha256" in entry:
        return entry["sha256"]
    digest = hash_into(path, hashlib.sha256()).hexdigest()
    known = known if isinstance(known, dict) else {}
    known[path.name] = {"stamp": stamp, "sha256": digest}
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(known, indent=1), encoding="utf-8")
    return digest


def git_blob_oid(path: Path | str) -> str:
    """The id git gives the file's content: sha1 of ``"blob <size>\\0"`` and the bytes.

    The Hub lists it for every file; it is the only checksum it gives for small files kept in
    git rather than LFS.
    """
    header = f"blob {Path(path).stat().st_size}\0".encode()
    return hash_into(path, hashlib.sha1(header)).hexdigest()


def size_of(path: Path | str) -> int | None:
    """The size of the file at ``path`` in bytes, None when it is not there (or unreadable)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def fsync_dir(folder: Path | str) -> None:
    """Make a rename inside ``folder`` durable (POSIX only; Windows cannot open a folder)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
