"""Fetch a Phi-3 Vision ONNX model set from the Hugging Face Hub into ``root/<name>``.

The flow, top to bottom: list the Hub folder (names, sizes, sha256; ``phi3v.hub``) -> check
free disk -> for each file not yet verified: stream it into ``NAME.part``, resuming, hashed
while it arrives, and rename it into place once it matched (``phi3v.transfer``) -> record it
in the folder's manifest (``phi3v.manifest``). A second launch reads the manifest and makes no
request. Progress goes to a tqdm bar and the caller's callback (``phi3v.meter``).

Why not huggingface_hub: it restarts a killed download from zero and checks only sizes
(docs/ARCHITECTURE.md#downloading). Here a killed 2.33 GB download continues where it
stopped, and no file is renamed into place before its sha256 matched.

The errors say what to do in terms of this function's arguments and the HF_* environment
variables; a command line adds its own flag names (download_models.py does).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import requests

from phi3v.errors import DownloadError
from phi3v.files import git_blob_oid, sha256_file, size_of
from phi3v.hub import (
    CHUNK_BYTES,
    DEFAULT_ENDPOINT,
    AuthError,
    EndpointError,
    Hub,
    NetworkError,
    NotFoundError,
    RangeNotSatisfiableError,
    RemoteFile,
    ServerError,
)
from phi3v.manifest import (
    LOCK_NAME,
    MANIFEST_NAME,
    LockedError,
    folder_lock,
    is_complete,
    new_manifest,
    read_manifest,
    same_set,
    up_to_date,
    write_manifest,
)
from phi3v.meter import DownloadProgress, Meter
from phi3v.models import DEFAULT_MODEL, MODELS, ModelSpec, model_folder, model_spec
from phi3v.transfer import ChecksumError, fetch_verified, missing_bytes
from phi3v.urls import redact_url

__all__ = [  # what callers import from here: download_model and the names they need with it
    "CHUNK_BYTES",
    "DEFAULT_ENDPOINT",
    "DEFAULT_MODEL",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "MODELS",
    "AuthError",
    "ChecksumError",
    "DiskSpaceError",
    "DownloadError",
    "DownloadProgress",
    "EndpointError",
    "FolderError",
    "LockedError",
    "ModelSpec",
    "NetworkError",
    "NotFoundError",
    "RangeNotSatisfiableError",
    "ServerError",
    "download_model",
    "is_complete",
    "model_folder",
    "model_spec",
    "redact_url",
]

FULL_SHA = re.compile(r"[0-9a-f]{40}")


class DiskSpaceError(DownloadError):
    """Not enough free disk space for the files still to fetch."""


class FolderError(DownloadError):
    """The model folder cannot be created or written to."""


def download_model(
    name: str = DEFAULT_MODEL,
    root: Path | str = "data",
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: Callable[[DownloadProgress], None] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    chunk_bytes: int = CHUNK_BYTES,
    free_bytes: Callable[[Path], int] | None = None,
    bars: bool = True,
) -> Path:
    """Make ``root/name`` a complete, verified model folder and return its path.

    ``revision`` overrides the pinned one; ``endpoint`` defaults to ``$HF_ENDPOINT`` or the
    public Hub, ``token`` to ``$HF_TOKEN``. ``progress`` is called with a DownloadProgress as
    bytes arrive; ``bars`` draws a tqdm bar per file. Network trouble is retried ``retries``
    times, waiting ``backoff`` * 2**n seconds. ``free_bytes(folder)`` replaces the disk-space
    probe (for tests). A folder already complete for this revision is returned at once,
    without touching the network. Raises a DownloadError subclass on failure; whatever was
    verified (and any ``.part`` file) stays for the next run.
    """
    spec = model_spec(name)
    folder = model_folder(name, root)
    wanted = revision or spec.revision
    if up_to_date(read_manifest(folder), folder, spec, wanted):
        return folder
    hub = Hub(
        endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT,
        token or os.environ.get("HF_TOKEN") or None,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        chunk_bytes=chunk_bytes,
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with hub, folder_lock(folder):
            manifest = read_manifest(folder)  # another process may have finished meanwhile
            if not up_to_date(manifest, folder, spec, wanted):
                meter = Meter(progress, bars)
                _fetch_all(hub, spec, folder, wanted, manifest, meter, free_bytes or _free_disk)
    except requests.RequestException as error:  # not a network failure: a bad URL, say
        raise EndpointError(
            f"cannot download from {hub.shown}: {hub.scrub(str(error))}. The endpoint "
            "(HF_ENDPOINT) must be a URL like https://huggingface.co"
        ) from error
    except OSError as error:  # (requests' errors are OSErrors too, hence the order)
        raise _file_error(folder, error) from error
    return folder


def _file_error(folder: Path, error: OSError) -> DownloadError:
    if error.errno == errno.ENOSPC:
        return DiskSpaceError(
            f"the disk filled up while writing into {folder}: free some space and try again, "
            "the download resumes where it stopped"
        )
    return FolderError(
        f"cannot write into {folder} ({error.strerror or error}): check that it is a folder "
        "you may write to, or download into another folder"
    )


def _fetch_all(
    hub: Hub,
    spec: ModelSpec,
    folder: Path,
    wanted: str,
    old_manifest: dict | None,
    meter: Meter,
    free_bytes: Callable[[Path], int],
) -> None:
    """List the folder on the Hub, check the disk, then put every file in place, verified."""
    # On "main", keep to the commit an earlier run pinned, so its .part files still fit.
    same_request = old_manifest is not None and same_set(old_manifest, spec, wanted)
    revision = (old_manifest.get("commit") if same_request else None) or wanted
    files, listed_commit = hub.list_folder(spec.repo, revision, spec.folder)
    commit = listed_commit or (revision if FULL_SHA.fullmatch(revision) else None)
    manifest = new_manifest(spec, wanted, commit, files, old_manifest)
    _check_disk(folder, files, free_bytes)
    write_manifest(folder, manifest)  # from now on is_complete() judges against this listing
    meter.total = sum(remote.size for remote in files)
    for remote in files:
        entry = manifest["files"][remote.name]
        if not _already_there(folder, remote, entry["verified"]):
            # Once the Hub has named the commit, fetch the rest from it: "main" may move.
            url = hub.file_url(spec.repo, commit or revision, remote.path)
            served_commit = fetch_verified(hub, url, remote, folder, meter)
            commit = commit or served_commit
            manifest["commit"] = commit
        if not entry["verified"]:
            entry["verified"] = True
            write_manifest(folder, manifest)
        meter.placed(remote)


def _already_there(folder: Path, remote: RemoteFile, verified: bool) -> bool:
    """A file the manifest verified, or one already on disk whose hash matches (adopted)."""
    dest = folder / remote.name
    if size_of(dest) != remote.size:
        return False
    if verified:
        return True
    # Never verified by us (copied in by hand, or left by another revision): hash it once
    # instead of fetching it again.
    if remote.sha256:
        return sha256_file(dest) == remote.sha256
    return remote.oid is None or git_blob_oid(dest) == remote.oid


def _free_disk(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _check_disk(folder: Path, files: list[RemoteFile], free_bytes: Callable[[Path], int]) -> None:
    """Refuse to start when the bytes still to fetch do not fit on the disk."""
    needed = sum(missing_bytes(folder, remote) for remote in files)
    free = free_bytes(folder)
    if needed > free:
        raise DiskSpaceError(
            f"not enough free disk space in {folder}: {_gb(needed)} still to download, "
            f"{_gb(free)} free. Free some space, or download into a folder on a bigger disk"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
