"""One file from the Hub into place: resumable, and verified before it gets its name.

The file streams into ``NAME.part`` (resuming with an HTTP Range request from what an earlier
run left), is hashed while it arrives, compared with the Hub listing's size and sha256,
fsynced, and only then renamed to ``NAME``. A killed run loses at most one chunk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import requests

from phi3v.errors import DownloadError
from phi3v.files import fsync_dir, hash_into, size_of
from phi3v.hub import Hub, RangeNotSatisfiableError, RemoteFile, repo_commit, root_cause
from phi3v.meter import Meter
from phi3v.urls import redact_url

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
CONTENT_RANGE_START = re.compile(r"bytes (\d+)-")


class ChecksumError(DownloadError):
    """A file's bytes did not match the Hub's sha256 (or size), also after a fresh download."""


def fetch_verified(
    hub: Hub, url: str, remote: RemoteFile, folder: Path, meter: Meter
) -> str | None:
    """Fetch ``remote`` from ``url`` into ``folder/remote.name``, verified, and return the
    X-Repo-Commit the Hub sent (None if it sent none).

    A part file that fails its check (or a byte range the server refuses) gets one fresh start
    from byte 0; a second failure raises ChecksumError or RangeNotSatisfiableError, with the
    part deleted. Network trouble is retried by ``hub``'s policy; the part stays for next time.
    """
    part = folder / (remote.name + PART_SUFFIX)
    for attempt in (1, 2):
        try:
            commit = _stream_to_part(hub, url, part, remote, meter)
            break
        except (ChecksumError, RangeNotSatisfiableError) as error:
            part.unlink(missing_ok=True)
            if attempt == 2:
                raise
            log.warning("%s; starting %s again from zero", error, remote.name)
        finally:
            meter.end()
    os.replace(part, folder / remote.name)
    fsync_dir(folder)
    return commit


def missing_bytes(folder: Path, remote: RemoteFile) -> int:
    """How many bytes of ``remote`` are still to fetch into ``folder``: none when a file of
    its size is there, else what its part file does not hold yet."""
    if size_of(folder / remote.name) == remote.size:
        return 0  # verified, or about to be hashed and adopted
    have = size_of(folder / (remote.name + PART_SUFFIX)) or 0
    return remote.size - min(have, remote.size)


def _stream_to_part(hub: Hub, url: str, path: Path, remote: RemoteFile, meter: Meter) -> str | None:
    """Fill ``path`` up to the file's size, check its sha256 and fsync it.

    Resumes from what the part already holds; a broken connection is resumed as long as each
    try brings new bytes. Returns the X-Repo-Commit the Hub sent, if any.
    """
    with _Part(path, remote.size) as part:
        meter.start(remote, part.size)
        commit, failures = None, 0
        while part.size < remote.size:
            received_before = meter.received
            reason = f"the server ended {remote.name} early"
            try:
                headers = {"Range": f"bytes={part.size}-"} if part.size else {}
                with hub.get(url, headers=headers, stream=True, what=remote.path) as response:
                    commit = commit or repo_commit(response)
                    if part.size and not _continues_at(response, part.size):
                        part.restart()  # the server ignored the Range: whole file from byte 0
                        meter.restart()
                    for chunk in response.iter_content(hub.chunk_bytes):
                        part.write(chunk)
                        meter.add(len(chunk))
                        if part.size > remote.size:
                            break
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as error:  # the body broke off: go on from what arrived
                reason = root_cause(error)
            # Go on at once while each try brings bytes; back off once they stop coming.
            failures = 0 if meter.received > received_before else failures + 1
            if failures > hub.retries:
                raise hub.network_error(reason)
            if failures:
                hub.wait(failures)
        _check_bytes(part, remote)
        part.sync()
    return commit


def _check_bytes(part: _Part, remote: RemoteFile) -> None:
    if part.size != remote.size:
        raise ChecksumError(
            f"{remote.name}: the server sent {part.size} bytes, the Hub listing says "
            f"{remote.size}; the partial file was deleted. Try again, or another HF_ENDPOINT"
        )
    digest = part.sha.hexdigest()
    if remote.sha256 and digest != remote.sha256:
        raise ChecksumError(
            f"{remote.name}: sha256 of the downloaded bytes is {digest}, the Hub lists "
            f"{remote.sha256}; the partial file was deleted. A proxy or mirror may be altering "
            "the data: try again, or try another network or HF_ENDPOINT"
        )


def _continues_at(response: requests.Response, have: int) -> bool:
    """True when a ranged request got a 206 whose body starts at byte ``have``."""
    if response.status_code != 206:
        return False
    match = CONTENT_RANGE_START.match(response.headers.get("Content-Range", ""))
    if match and int(match.group(1)) != have:
        raise RangeNotSatisfiableError(
            f"asked for bytes from {have} but the server sent a range starting at "
            f"{match.group(1)} ({redact_url(response.url)})"
        )
    return True


class _Part:
    """An open ``NAME.part`` file with its size and the sha256 of the bytes it holds."""

    def __init__(self, path: Path, expected_size: int):
        size = size_of(path) or 0
        if size > expected_size:  # a leftover of some other file: start clean
            path.unlink()
            size = 0
        # Re-hash what an earlier run left, so the final sha256 covers the whole file.
        self.sha = hash_into(path, hashlib.sha256()) if size else hashlib.sha256()
        self.size = size
        self.file = path.open("ab")

    def __enter__(self) -> _Part:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()  # whatever arrived stays on disk for the next run

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.sha.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        self.file.truncate(0)  # append mode: the next write lands at the new end, byte 0
        self.sha = hashlib.sha256()
        self.size = 0

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
