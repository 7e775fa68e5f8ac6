"""What a model folder holds: its manifest of verified files, and the lock a downloader holds.

The manifest (``.phi3v-manifest.json``) records the model set, the revision asked for, the
commit the Hub served, and for each file its size, sha256, git id and whether it was verified.
A launch reads it to decide, with no network and no hashing, that the folder is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from phi3v.errors import DownloadError
from phi3v.files import size_of
from phi3v.hub import RemoteFile
from phi3v.models import ModelSpec

if os.name == "nt":
    import msvcrt
else:
    import fcntl

MANIFEST_NAME = ".phi3v-manifest.json"
LOCK_NAME = ".phi3v-download.lock"


class LockedError(DownloadError):
    """Another process is downloading into the same folder."""


def is_complete(folder: Path | str) -> bool:
    """True when the manifest lists every file as verified and each is there with its size.

    No network and no hashing: this is what a launch checks before loading the model.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    return manifest is not None and _complete(manifest, folder)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder`` as written by ``write_manifest``; None when it is missing
    or not one."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (
        manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None
    )


def write_manifest(folder: Path, manifest: dict) -> None:
    """Replace the manifest of ``folder`` at once (a crash leaves the old one or the new)."""
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)


def new_manifest(
    spec: ModelSpec, wanted: str, commit: str | None, files: list[RemoteFile], old: dict | None
) -> dict:
    """A manifest for this listing, keeping the 'verified' marks of unchanged files of ``old``."""
    old_files = (old or {}).get("files", {})

    def still_verified(remote: RemoteFile) -> bool:
        before = old_files.get(remote.name, {})
        return (
            before.get("verified") is True
            and before.get("size") == remote.size
            and before.get("sha256") == remote.sha256
            and before.get("oid") == remote.oid
        )

    return {
        "model": spec.name,
        "repo": spec.repo,
        "folder": spec.folder,
        "layout": spec.layout,
        "revision": wanted,
        "commit": commit,
        "files": {
            f.name: {
                "path": f.path,
                "size": f.size,
                "sha256": f.sha256,
                "oid": f.oid,
                "verified": still_verified(f),
            }
            for f in files
        },
    }


def same_set(manifest: dict, spec: ModelSpec, wanted: str) -> bool:
    """Whether ``manifest`` is of model set ``spec`` at revision ``wanted`` (a branch name
    asked for before, or the commit it was pinned to)."""
    return (
        manifest.get("repo") == spec.repo
        and manifest.get("folder") == spec.folder
        and wanted in (manifest.get("revision"), manifest.get("commit"))
    )


def up_to_date(manifest: dict | None, folder: Path, spec: ModelSpec, wanted: str) -> bool:
    """Whether ``folder`` is complete for ``spec`` at ``wanted``: nothing to download."""
    return manifest is not None and same_set(manifest, spec, wanted) and _complete(manifest, folder)


def _complete(manifest: dict, folder: Path) -> bool:
    files = manifest["files"]
    return bool(files) and all(
        entry.get("verified") is True and size_of(folder / name) == entry.get("size")
        for name, entry in files.items()
    )


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an OS lock on ``folder/.phi3v-download.lock`` for the ``with`` block; LockedError
    when another process holds it.

    The OS drops the lock when the process dies, so a lock file left by a killed run never
    blocks: only a live downloader does.
    """
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = _read_pid(fd)
            raise LockedError(
                f"another process (pid {holder}) is downloading into {folder}; wait for it to "
                "finish, or stop it and try again. If no such process exists, delete "
                f"{path}"
            )
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_pid(fd: int) -> str:
    try:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    except OSError:  # Windows refuses to read a locked byte range
        return "unknown"


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
