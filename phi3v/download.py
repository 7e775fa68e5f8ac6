"""Fetch a Phi-3 Vision ONNX model set from the Hugging Face Hub into ``data/<name>``.

The flow, top to bottom: list the Hub folder (names, sizes, sha256) -> check free disk ->
for each file not yet verified: stream it into ``NAME.part`` (resuming with an HTTP Range
request), hash it while it arrives, compare with the listing, fsync, rename into place and
record it in a small manifest. A second launch reads the manifest and makes no request.

Why not huggingface_hub: it restarts a killed download from zero and checks only sizes
(docs/ecosystem.md §4). Here a killed 2.33 GB download continues where it stopped, and no
file is renamed into place before its sha256 matched.

Secrets: HF_TOKEN is sent only to the endpoint's origin (scheme, host, port), never to the
CDN a file redirects to nor to a host an answer links to; every URL a message shows goes
through ``redact_url`` first, so a password in HF_ENDPOINT is never shown.

This module imports nothing from phi3v except ``phi3v.errors``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import requests
from tqdm import tqdm

from phi3v.errors import DownloadError

if os.name == "nt":
    import msvcrt
else:
    import fcntl

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST_NAME = ".phi3v-manifest.json"
LOCK_NAME = ".phi3v-download.lock"
PART_SUFFIX = ".part"
# Bytes per read: progress moves every few seconds even at 100 kB/s, and a dropped connection
# loses at most this much (urllib3 discards the chunk it was reading).
CHUNK_BYTES = 256 * 1024
SPEED_WINDOW_S = 5.0  # speed and ETA follow the last few seconds, not the whole run
REPORT_EVERY_S = 0.1  # the callback hears about bytes at most this often (a UI need not more)
MAX_BACKOFF_S = 30.0
FULL_SHA = re.compile(r"[0-9a-f]{40}")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10  # the Hub needs one (resolve -> CDN); a loop ends here
DEFAULT_PORTS = {"http": 80, "https": 443}
# Query parameters whose values are credentials: signed CDN links (Signature, Key-Pair-Id,
# Policy, X-Amz-Credential, X-Amz-Signature, X-Amz-Security-Token), tokens, passwords.
SECRET_PARAM = re.compile(r"token|sig|credential|key|secret|password|auth|policy", re.IGNORECASE)
URL_PARTS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)?(?P<authority>[^/?#]*)(?P<path>[^?#]*)"
    r"(?:\?(?P<query>[^#]*))?(?P<fragment>#.*)?",
    re.IGNORECASE | re.DOTALL,
)
URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


# --- errors: each says what went wrong and what to do -------------------------------------


class AuthError(DownloadError):
    """The server refused access (HTTP 401 or 403): the token is missing, wrong or too weak."""


class NotFoundError(DownloadError):
    """The repo, revision or folder does not exist on the endpoint (HTTP 404)."""


class RangeNotSatisfiableError(DownloadError):
    """The server refused the byte range even after the file was restarted from zero (HTTP 416)."""


class ServerError(DownloadError):
    """The server kept answering 5xx (or 429) after every retry."""


class NetworkError(DownloadError):
    """The endpoint could not be reached (no network, DNS, proxy, timeouts) after every retry."""


class DiskSpaceError(DownloadError):
    """Not enough free disk space for the files still to fetch."""


class ChecksumError(DownloadError):
    """A file's bytes did not match the Hub's sha256 (or size), also after a fresh download."""


class LockedError(DownloadError):
    """Another process is downloading into the same folder."""


# --- the registry of known model sets -----------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One downloadable model set: a folder of a Hub repo at a revision, in a known layout."""

    name: str
    repo: str
    folder: str
    revision: str  # a full 40-character commit, or "main" where none is known (see README)
    layout: str  # "legacy" (June 2024, onnxruntime-genai <= 0.4) | "redesigned" (genai >= 0.5)
    approx_bytes: int


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="phi-3-vision-cpu",
            repo="microsoft/Phi-3-vision-128k-instruct-onnx-cpu",
            folder="cpu-int4-rtn-block-32-acc-level-4",
            revision="5ec8e2b2b96cd2815f8478c6a728616f9043e62a",
            layout="legacy",
            approx_bytes=3_220_000_000,  # Hub file listing, docs/ecosystem.md §4.1
        ),
        ModelSpec(
            name="phi-3-vision",
            repo="microsoft/Phi-3-vision-128k-instruct-onnx",
            folder="cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
            revision="main",  # only the short id d6673a5 is known
            layout="redesigned",
            approx_bytes=3_220_000_000,
        ),
        ModelSpec(
            name="phi-3.5-vision",
            repo="microsoft/Phi-3.5-vision-instruct-onnx",
            folder="cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
            revision="main",  # only the short id a764e22 is known
            layout="redesigned",
            approx_bytes=3_220_000_000,
        ),
    )
}
DEFAULT_MODEL = "phi-3-vision-cpu"


@dataclass(frozen=True)
class DownloadProgress:
    """A snapshot for a progress display: the current file, and bytes over the whole set."""

    filename: str
    file_done: int
    file_total: int
    done: int
    total: int
    speed: float  # bytes per second over the last few seconds
    eta: float | None  # seconds left, None while the speed is unknown


@dataclass(frozen=True)
class RemoteFile:
    """One file of the Hub listing: its name in our flat folder, its repo path and checksum."""

    name: str
    path: str
    size: int
    sha256: str | None  # lfs.oid; None for small files kept in git (checked by size)
    oid: str | None  # the git object id: it changes whenever the content does


# --- public functions ---------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` as it may be shown: ``http://user:secret@host/x`` -> ``http://***@host/x``.

    The user and password go (also without a scheme: ``user:pw@host`` -> ``***@host``), and
    so do the values of query parameters that carry credentials (``?Signature=...`` of a
    signed CDN link -> ``?Signature=***``). Scheme, host, port, path and the other parameters
    stay, so a message still says where. Never raises, whatever the string.
    """
    parts = URL_PARTS.fullmatch(url)
    authority = parts["authority"]
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    query = parts["query"]
    if query:
        query = "&".join(_redact_param(param) for param in query.split("&"))
    return "".join(
        (
            parts["scheme"] or "",
            authority,
            parts["path"],
            "" if query is None else "?" + query,
            parts["fragment"] or "",
        )
    )


def _redact_param(param: str) -> str:
    key, equals, _ = param.partition("=")
    return f"{key}=***" if equals and SECRET_PARAM.search(key) else param


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; DownloadError naming the known sets otherwise."""
    if name not in MODELS:
        known = ", ".join(MODELS)
        raise DownloadError(f"unknown model set {name!r}: choose one of {known}")
    return MODELS[name]


def model_folder(name: str, root: Path | str = "data") -> Path:
    """Where model set ``name`` lives: ``root/name``, with the files flat in it."""
    return Path(root) / model_spec(name).name


def is_complete(folder: Path | str) -> bool:
    """True when the manifest lists every file as verified and each is there with its size.

    No network and no hashing: this is what a launch checks before loading the model.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    return manifest is not None and _complete(manifest, folder)


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
    if _up_to_date(_read_manifest(folder), folder, spec, wanted):
        return folder
    hub = _Hub(
        endpoint=(endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        token=token or os.environ.get("HF_TOKEN") or None,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        chunk_bytes=chunk_bytes,
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with hub, _folder_lock(folder):
            manifest = _read_manifest(folder)  # another process may have finished meanwhile
            if not _up_to_date(manifest, folder, spec, wanted):
                meter = _Meter(progress, bars)
                _fetch_all(hub, spec, folder, wanted, manifest, meter, free_bytes or _free_disk)
    except requests.RequestException as error:  # not a network failure: a bad URL, say
        raise DownloadError(
            f"cannot download from {hub.shown}: {hub.scrub(str(error))}. Check --endpoint / "
            "HF_ENDPOINT, which must be a URL like https://huggingface.co"
        ) from error
    except OSError as error:  # (requests' errors are OSErrors too, hence the order)
        raise _file_error(folder, error) from error
    return folder


def _file_error(folder: Path, error: OSError) -> DownloadError:
    if error.errno == errno.ENOSPC:
        return DiskSpaceError(
            f"the disk filled up while writing into {folder}: free some space and run again, "
            "the download resumes where it stopped"
        )
    return DownloadError(
        f"cannot write into {folder} ({error.strerror or error}): check that it is a folder "
        "you may write to, or choose another one with --dir"
    )


# --- the download, file by file -----------------------------------------------------------


def _fetch_all(
    hub: _Hub,
    spec: ModelSpec,
    folder: Path,
    wanted: str,
    old_manifest: dict | None,
    meter: _Meter,
    free_bytes: Callable[[Path], int],
) -> None:
    """List the folder on the Hub, check the disk, then put every file in place, verified."""
    # On "main", keep to the commit an earlier run pinned, so its .part files still fit.
    same_request = old_manifest is not None and _same_set(old_manifest, spec, wanted)
    revision = (old_manifest.get("commit") if same_request else None) or wanted
    files, listed_commit = hub.list_folder(spec.repo, revision, spec.folder)
    commit = listed_commit or (revision if FULL_SHA.fullmatch(revision) else None)
    manifest = _new_manifest(spec, wanted, commit, files, old_manifest)
    _check_disk(folder, files, free_bytes)
    _write_manifest(folder, manifest)  # from now on is_complete() judges against this listing
    meter.total = sum(remote.size for remote in files)
    for remote in files:
        entry = manifest["files"][remote.name]
        if not _already_there(folder, remote, entry["verified"]):
            # Once the Hub has named the commit, fetch the rest from it: "main" may move.
            served_commit = _fetch_verified(
                hub, spec.repo, commit or revision, remote, folder, meter
            )
            commit = commit or served_commit
            manifest["commit"] = commit
        if not entry["verified"]:
            entry["verified"] = True
            _write_manifest(folder, manifest)
        meter.placed(remote)


def _already_there(folder: Path, remote: RemoteFile, verified: bool) -> bool:
    """A file the manifest verified, or one already on disk whose hash matches (adopted)."""
    dest = folder / remote.name
    if _size_of(dest) != remote.size:
        return False
    if verified:
        return True
    # Never verified by us (copied in by hand, or left by another revision): hash it once
    # instead of fetching it again.
    if remote.sha256:
        return _hash_file(dest, hashlib.sha256()).hexdigest() == remote.sha256
    return remote.oid is None or _git_blob_oid(dest) == remote.oid


def _fetch_verified(
    hub: _Hub, repo: str, revision: str, remote: RemoteFile, folder: Path, meter: _Meter
) -> str | None:
    """Fetch one file into place; a bad .part gets one fresh start. Returns X-Repo-Commit."""
    part = folder / (remote.name + PART_SUFFIX)
    url = f"{hub.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(remote.path)}"
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
    _fsync_dir(folder)
    return commit


def _stream_to_part(
    hub: _Hub, url: str, path: Path, remote: RemoteFile, meter: _Meter
) -> str | None:
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
                    commit = commit or _repo_commit(response)
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
                reason = _root_cause(error)
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
            f"{remote.size}; the partial file was deleted. Run again, or try another HF_ENDPOINT"
        )
    digest = part.sha.hexdigest()
    if remote.sha256 and digest != remote.sha256:
        raise ChecksumError(
            f"{remote.name}: sha256 of the downloaded bytes is {digest}, the Hub lists "
            f"{remote.sha256}; the partial file was deleted. A proxy or mirror may be altering "
            "the data: run again, or try another network or HF_ENDPOINT"
        )


def _continues_at(response: requests.Response, have: int) -> bool:
    """True when a ranged request got a 206 whose body starts at byte ``have``."""
    if response.status_code != 206:
        return False
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if match and int(match.group(1)) != have:
        raise RangeNotSatisfiableError(
            f"asked for bytes from {have} but the server sent a range starting at "
            f"{match.group(1)} ({redact_url(response.url)})"
        )
    return True


class _Part:
    """An open ``NAME.part`` file with its size and the sha256 of the bytes it holds."""

    def __init__(self, path: Path, expected_size: int):
        size = _size_of(path) or 0
        if size > expected_size:  # a leftover of some other file: start clean
            path.unlink()
            size = 0
        # Re-hash what an earlier run left, so the final sha256 covers the whole file.
        self.sha = _hash_file(path, hashlib.sha256()) if size else hashlib.sha256()
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


# --- talking to the Hub -------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``url``, the port filled in for http and https; None if no host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, a broken [IPv6] host
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname:
        return None
    return scheme, parts.hostname, port or DEFAULT_PORTS.get(scheme, 0)


class _Hub:
    """A requests session for one endpoint with the token, timeouts and retry policy.

    The token goes only to the endpoint's origin (scheme, host and port): it is attached per
    request by ``auth_for``, never to the session, and redirects are followed here hop by hop
    so that the same rule decides each hop.
    """

    RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

    def __init__(
        self,
        endpoint: str,
        token: str | None,
        retries: int,
        backoff: float,
        timeout: float,
        chunk_bytes: int,
    ):
        self.endpoint, self.token = endpoint, token
        self.shown = redact_url(endpoint)  # the endpoint as messages name it
        self.origin = _origin(endpoint)
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.chunk_bytes = chunk_bytes
        self.session = requests.Session()
        # identity: a gzipped body would break byte offsets for Range and the hash
        self.session.headers["Accept-Encoding"] = "identity"

    def __enter__(self) -> _Hub:
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def auth_for(self, url: str) -> dict[str, str]:
        """The Authorization header for a request to ``url``: empty unless it is the endpoint's
        origin. The CDN an LFS file redirects to, or any host an answer names, never sees it."""
        if self.token and self.origin is not None and _origin(url) == self.origin:
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def scrub(self, text: str) -> str:
        """``text`` (a requests error, say) with the endpoint and every URL in it redacted."""
        if self.endpoint:
            text = text.replace(self.endpoint, self.shown)  # also when it has no scheme
        return URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)

    def wait(self, failures: int) -> None:
        time.sleep(min(self.backoff * 2 ** (failures - 1), MAX_BACKOFF_S))

    def get(
        self, url: str, *, headers: dict | None = None, stream: bool = False, what: str
    ) -> requests.Response:
        """GET ``url`` (following redirects), retrying network errors, 429 and 5xx.

        Any other error status becomes the matching DownloadError; ``what`` names the thing
        asked for in messages.
        """
        failures = 0
        while True:
            try:
                response = self._follow(url, headers or {}, stream)
            except (requests.ConnectionError, requests.Timeout) as error:
                failures += 1
                if failures > self.retries:
                    raise self.network_error(_root_cause(error)) from error
            else:
                if response.status_code not in self.RETRY_STATUSES:
                    _raise_for_status(response, what, self.token)
                    return response
                response.close()
                failures += 1
                if failures > self.retries:
                    raise ServerError(
                        f"{self.shown} answered HTTP {response.status_code} for {what} "
                        f"{failures} times in a row; the server is having trouble: try again "
                        "later (what was verified is kept), or use a mirror via HF_ENDPOINT"
                    )
            self.wait(failures)

    def _follow(self, url: str, headers: dict, stream: bool) -> requests.Response:
        """GET ``url`` and the redirects it answers with, each hop with its own ``auth_for``.

        requests would drop Authorization on a redirect to another host by itself, but by its
        own rule (it keeps it from http to https on one host, say); following the hops here
        leaves one rule, ours, for every request sent. The hops end up in ``.history``.
        """
        hops: list[requests.Response] = []
        while True:
            response = self.session.get(
                url,
                headers={**headers, **self.auth_for(url)},
                stream=stream,
                timeout=self.timeout,
                allow_redirects=False,
            )
            location = response.headers.get("Location")
            if response.status_code not in REDIRECT_STATUSES or not location:
                response.history = hops
                return response
            response.close()
            hops.append(response)
            if len(hops) > MAX_REDIRECTS:
                raise DownloadError(
                    f"{self.shown} redirected more than {MAX_REDIRECTS} times in a row (last to "
                    f"{redact_url(location)}); the server or a proxy is misconfigured: try "
                    "again later, or use another HF_ENDPOINT"
                )
            url = urljoin(response.url, location)

    def network_error(self, reason: str) -> NetworkError:
        return NetworkError(
            f"cannot reach {self.shown} ({reason}) after {self.retries + 1} "
            "tries: check the internet connection or proxy, or set HF_ENDPOINT to a mirror; "
            "run again to resume. If the model is already on disk, point the app at that folder"
        )

    def list_folder(
        self, repo: str, revision: str, folder: str
    ) -> tuple[list[RemoteFile], str | None]:
        """The files of ``repo/folder`` at ``revision`` and the X-Repo-Commit, if sent."""
        url = f"{self.endpoint}/api/models/{repo}/tree/{quote(revision, safe='')}/{quote(folder)}"
        entries, commit = [], None
        while url:  # the tree API pages with a Link: <...>; rel="next" header
            with self.get(url, what=f"{repo}@{revision}/{folder}") as response:
                commit = commit or _repo_commit(response)
                try:
                    page = response.json()
                except ValueError:
                    page = None
                if not isinstance(page, list):
                    raise DownloadError(
                        f"{redact_url(url)} did not answer with a JSON file list; is "
                        f"{self.shown} a Hugging Face Hub or mirror? Check HF_ENDPOINT"
                    )
                entries += page
                url = self._next_page(response)
        files = [_remote_file(entry) for entry in entries if entry.get("type") == "file"]
        if not files:
            raise NotFoundError(
                f"folder {folder!r} of {repo} at revision {revision} holds no "
                "files; check the folder name and revision"
            )
        return files, commit

    def _next_page(self, response: requests.Response) -> str | None:
        """The tree API's next page (``Link: <...>; rel="next"``), if on the endpoint's origin.

        The Hub links the next page on its own origin. A link to another one is refused
        rather than followed without the token: for a private repo that page would answer
        401 and the message would blame HF_TOKEN; for any repo, the listing holds the sha256
        every file is checked against, which we take from the endpoint the user chose only.
        Such a link comes from a mirror handing on its upstream's links, or a hostile answer;
        either way the user is better told than guessed for.
        """
        link = response.links.get("next", {}).get("url")
        if not link:
            return None
        url = urljoin(response.url, link)  # a relative link is on the same origin
        if _origin(url) != self.origin:
            raise DownloadError(
                f"{self.shown} linked the next page of its file list to another host "
                f"({redact_url(url)}); it was not followed, because HF_TOKEN and the file "
                f"list are taken from {self.shown} only. Check HF_ENDPOINT: a mirror must "
                "link to itself"
            )
        return url


def _remote_file(entry: dict) -> RemoteFile:
    lfs = entry.get("lfs") or {}
    return RemoteFile(
        name=entry["path"].rsplit("/", 1)[-1],
        path=entry["path"],
        size=int(entry["size"]),
        sha256=lfs.get("oid"),
        oid=entry.get("oid"),
    )


def _repo_commit(response: requests.Response) -> str | None:
    """The X-Repo-Commit of the Hub's own answer (a CDN redirect target does not send it)."""
    for hop in (*response.history, response):
        commit = hop.headers.get("X-Repo-Commit")
        if commit:
            return commit
    return None


def _raise_for_status(response: requests.Response, what: str, token: str | None) -> None:
    """Turn an error status into a DownloadError that says what to do."""
    status = response.status_code
    if status < 400:
        return
    response.close()
    code = response.headers.get("X-Error-Code", "")
    if status == 401:
        token_state = "HF_TOKEN was refused" if token else "no HF_TOKEN is set"
        raise AuthError(
            f"HTTP 401 for {what} ({token_state}): the repository is private, gated or does "
            "not exist. Check the repo name; if it needs a login, set HF_TOKEN to a read token "
            "from https://huggingface.co/settings/tokens"
        )
    if status == 403:
        raise AuthError(
            f"HTTP 403 for {what}: the token has no access. Accept the model's licence on its "
            "Hub page if it is gated, or set HF_TOKEN to a token with read access"
        )
    if status == 404:
        raise NotFoundError(_not_found_message(code, what, redact_url(response.url)))
    if status == 416:
        raise RangeNotSatisfiableError(
            f"HTTP 416 for {what}: the server refused the byte range asked for, so the file "
            "there is not the size the listing says; run again later, or use another HF_ENDPOINT"
        )
    raise DownloadError(f"HTTP {status} {response.reason} for {what} ({redact_url(response.url)})")


def _not_found_message(code: str, what: str, url: str) -> str:
    reason = {
        "RepoNotFound": "no such repository",
        "RevisionNotFound": "no such revision (branch, tag or full 40-character commit)",
        "EntryNotFound": "no such folder or file at that revision",
    }.get(code, "the repository, revision or folder does not exist")
    return (
        f"HTTP 404 for {what}: {reason}. Check the name and --revision, and that "
        f"HF_ENDPOINT points at a Hub that has it ({url})"
    )


def _root_cause(error: BaseException) -> str:
    """The innermost OS-level reason ('Connection refused') of a requests error, or its text."""
    seen: list[BaseException] = []
    todo: list[object] = [error]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or item in seen:
            continue
        seen.append(item)
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return type(error).__name__


# --- manifest, lock, disk -----------------------------------------------------------------


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (
        manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None
    )


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_NAME)


def _new_manifest(
    spec: ModelSpec, wanted: str, commit: str | None, files: list[RemoteFile], old: dict | None
) -> dict:
    """A manifest for this listing, keeping the 'verified' marks of unchanged files."""
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


def _complete(manifest: dict, folder: Path) -> bool:
    files = manifest["files"]
    return bool(files) and all(
        entry.get("verified") is True and _size_of(folder / name) == entry.get("size")
        for name, entry in files.items()
    )


def _same_set(manifest: dict, spec: ModelSpec, wanted: str) -> bool:
    return (
        manifest.get("repo") == spec.repo
        and manifest.get("folder") == spec.folder
        and wanted in (manifest.get("revision"), manifest.get("commit"))
    )


def _up_to_date(manifest: dict | None, folder: Path, spec: ModelSpec, wanted: str) -> bool:
    return (
        manifest is not None and _same_set(manifest, spec, wanted) and _complete(manifest, folder)
    )


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _free_disk(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _check_disk(folder: Path, files: list[RemoteFile], free_bytes: Callable[[Path], int]) -> None:
    """Refuse to start when the bytes still to fetch do not fit on the disk."""
    needed = 0
    for remote in files:
        if _size_of(folder / remote.name) == remote.size:
            continue  # verified, or about to be hashed and adopted
        needed += remote.size - min(
            _size_of(folder / (remote.name + PART_SUFFIX)) or 0, remote.size
        )
    free = free_bytes(folder)
    if needed > free:
        raise DiskSpaceError(
            f"not enough free disk space in {folder}: {_gb(needed)} still to download, "
            f"{_gb(free)} free. Free some space, or choose a folder on a bigger disk with --dir"
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an OS lock on ``folder/.phi3v-download.lock`` while downloading.

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
                "finish (the app shows its progress), or stop it and run again. If no such "
                f"process exists, delete {path}"
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


# --- files --------------------------------------------------------------------------------


def _hash_file(path: Path, sha):
    """Feed the file's bytes to ``sha`` (a hashlib object) in chunks and return it."""
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha


def _git_blob_oid(path: Path) -> str:
    """The id git gives the file's content: sha1 of "blob <size>\\0" and the bytes."""
    header = f"blob {path.stat().st_size}\0".encode()
    return _hash_file(path, hashlib.sha1(header)).hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX only; Windows cannot open a directory)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- progress -----------------------------------------------------------------------------


class _Meter:
    """Counts bytes for the current file's tqdm bar and for the caller's progress callback."""

    def __init__(self, callback: Callable[[DownloadProgress], None] | None, bars: bool):
        self.callback, self.bars = callback, bars
        self.total = 0  # bytes of the whole set, known once the folder is listed
        self.placed_bytes = 0  # bytes of the files already in place
        self.file: RemoteFile | None = None
        self.file_done = 0  # bytes of the file being fetched
        self.bar: tqdm | None = None
        self.received = 0  # bytes over the network in this run, for the speed
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        self.last_report = 0.0

    def start(self, remote: RemoteFile, have: int) -> None:
        """Fetching ``remote`` begins (or resumes with ``have`` bytes already in its part)."""
        self.file, self.file_done = remote, have
        self.bar = tqdm(
            total=remote.size,
            initial=have,
            desc=remote.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not self.bars,
        )
        self._report()

    def add(self, n: int) -> None:
        self.file_done += n
        self.received += n
        now = time.monotonic()
        self.samples.append((now, self.received))
        while len(self.samples) > 2 and now - self.samples[1][0] > SPEED_WINDOW_S:
            self.samples.popleft()
        self.bar.update(n)
        if now - self.last_report >= REPORT_EVERY_S:
            self._report()

    def restart(self) -> None:
        """The current file starts again from byte 0 (the server ignored our Range)."""
        self.file_done = 0
        self.bar.reset(total=self.file.size)
        self._report()

    def end(self) -> None:
        """Fetching the current file stopped (done, failed or to be restarted)."""
        self.file_done = 0
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def placed(self, remote: RemoteFile) -> None:
        """``remote`` is in place, fetched just now or before."""
        self.file, self.file_done = remote, remote.size
        self._report()
        self.placed_bytes += remote.size
        self.file_done = 0

    def _report(self) -> None:
        if self.callback is None:
            return
        self.last_report = time.monotonic()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        speed = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        done = self.placed_bytes + self.file_done
        self.callback(
            DownloadProgress(
                filename=self.file.name,
                file_done=self.file_done,
                file_total=self.file.size,
                done=done,
                total=self.total,
                speed=speed,
                eta=(self.total - done) / speed if speed > 0 else None,
            )
        )
