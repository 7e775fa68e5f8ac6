"""The Hugging Face Hub over HTTP: list a repo folder, GET its files, with retries and errors
that say what to do.

Secrets: HF_TOKEN is sent only to the endpoint's origin (scheme, host, port), never to the
CDN a file redirects to nor to a host an answer links to; every URL a message shows goes
through ``redact_url`` first, so a password in HF_ENDPOINT is never shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import quote, urljoin

import requests

from phi3v.errors import DownloadError
from phi3v.urls import origin, redact_text, redact_url

DEFAULT_ENDPOINT = "https://huggingface.co"
# Bytes per read of a body: progress moves every few seconds even at 100 kB/s, and a dropped
# connection loses at most this much (urllib3 discards the chunk it was reading).
CHUNK_BYTES = 256 * 1024
MAX_BACKOFF_S = 30.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 10  # the Hub needs one (resolve -> CDN); a loop ends here


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


class EndpointError(DownloadError):
    """The endpoint is not a URL, or does not answer the way a Hub or mirror does."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the Hub listing: its name in our flat folder, its repo path and checksum."""

    name: str
    path: str
    size: int
    sha256: str | None  # lfs.oid; None for small files kept in git (checked by size)
    oid: str | None  # the git object id: it changes whenever the content does


class Hub:
    """A requests session for one endpoint with the token, timeouts and retry policy.

    The token goes only to the endpoint's origin (scheme, host and port): it is attached per
    request by ``auth_for``, never to the session, and redirects are followed here hop by hop
    so that the same rule decides each hop. Network errors, 429 and 5xx are retried
    ``retries`` times, waiting ``backoff`` * 2**n seconds; a streamed body is read
    ``chunk_bytes`` at a time. Use it in a ``with`` block.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        token: str | None = None,
        *,
        retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 30.0,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.endpoint, self.token = endpoint.rstrip("/"), token
        self.shown = redact_url(self.endpoint)  # the endpoint as messages name it
        self.origin = origin(self.endpoint)
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.chunk_bytes = chunk_bytes  # bytes per read of a streamed body
        self.session = requests.Session()
        # identity: a gzipped body would break byte offsets for Range and the hash
        self.session.headers["Accept-Encoding"] = "identity"

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def file_url(self, repo: str, revision: str, path: str) -> str:
        """Where the Hub serves file ``path`` of ``repo`` at ``revision``."""
        return f"{self.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"

    def auth_for(self, url: str) -> dict[str, str]:
        """The Authorization header for a request to ``url``: empty unless it is the endpoint's
        origin. The CDN an LFS file redirects to, or any host an answer names, never sees it."""
        if self.token and self.origin is not None and origin(url) == self.origin:
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def scrub(self, text: str) -> str:
        """``text`` (a requests error, say) with the endpoint and every URL in it redacted."""
        return redact_text(text, self.endpoint)

    def wait(self, failures: int) -> None:
        """Sleep before the next try, longer after each of ``failures`` in a row."""
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
                    raise self.network_error(root_cause(error)) from error
            else:
                if response.status_code not in RETRY_STATUSES:
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
                raise EndpointError(
                    f"{self.shown} redirected more than {MAX_REDIRECTS} times in a row (last to "
                    f"{redact_url(location)}); the server or a proxy is misconfigured: try "
                    "again later, or use another HF_ENDPOINT"
                )
            url = urljoin(response.url, location)

    def network_error(self, reason: str) -> NetworkError:
        """The error for an endpoint that stayed unreachable, with ``reason`` ('Connection
        refused') and what to do."""
        return NetworkError(
            f"cannot reach {self.shown} ({reason}) after {self.retries + 1} "
            "tries: check the internet connection or proxy, or set HF_ENDPOINT to a mirror; "
            "try again to resume. If the model is already on disk, load that folder instead"
        )

    def list_folder(
        self, repo: str, revision: str, folder: str
    ) -> tuple[list[RemoteFile], str | None]:
        """The files of ``repo/folder`` at ``revision`` and the X-Repo-Commit, if sent."""
        url = f"{self.endpoint}/api/models/{repo}/tree/{quote(revision, safe='')}/{quote(folder)}"
        entries, commit = [], None
        while url:  # the tree API pages with a Link: <...>; rel="next" header
            with self.get(url, what=f"{repo}@{revision}/{folder}") as response:
                commit = commit or repo_commit(response)
                try:
                    page = response.json()
                except ValueError:
                    page = None
                if not isinstance(page, list):
                    raise EndpointError(
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
        if origin(url) != self.origin:
            raise EndpointError(
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


def repo_commit(response: requests.Response) -> str | None:
    """The X-Repo-Commit of the Hub's own answer (a CDN redirect target does not send it)."""
    for hop in (*response.history, response):
        commit = hop.headers.get("X-Repo-Commit")
        if commit:
            return commit
    return None


def root_cause(error: BaseException) -> str:
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
            "there is not the size the listing says; try again later, or use another HF_ENDPOINT"
        )
    raise DownloadError(f"HTTP {status} {response.reason} for {what} ({redact_url(response.url)})")


def _not_found_message(code: str, what: str, url: str) -> str:
    reason = {
        "RepoNotFound": "no such repository",
        "RevisionNotFound": "no such revision (branch, tag or full 40-character commit)",
        "EntryNotFound": "no such folder or file at that revision",
    }.get(code, "the repository, revision or folder does not exist")
    return (
        f"HTTP 404 for {what}: {reason}. Check the model set and the revision asked for, and "
        f"that HF_ENDPOINT points at a Hub that has it ({url})"
    )
