"""A fake Hugging Face Hub on 127.0.0.1 for the download tests.

It serves one repo folder the way the real Hub does, as far as phi3v.download cares:

* ``GET /api/models/{repo}/tree/{revision}/{folder}``: the JSON file list (``path``, ``size``,
  ``oid`` = git blob id, ``lfs.oid`` = sha256 for LFS files), paged with a ``Link`` header.
* ``GET /{repo}/resolve/{revision}/{path}``: ``.json`` files are plain git files served
  directly; every other file is an LFS file, answered with a 302 to ``/cdn/{name}`` (of this
  server, or of another one: ``cdn_base``). Both send ``X-Repo-Commit``. The tree API does
  not (as far as we know the Hub does not either).
* Byte ranges (``Range: bytes=N-``) on content, answered with 206 + Content-Range.
* Errors as the Hub sends them: 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound /
  EntryNotFound, 401 when a token is required and missing.

Knobs on the FakeHub object make it misbehave: see the attributes below.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    """One repo folder at one commit, served on a free port while the ``with`` block runs."""

    def __init__(
        self,
        repo: str,
        folder: str,
        revision: str,
        files: dict[str, bytes],
        commit: str = "c0ffee" * 6 + "beef",
    ):
        self.repo, self.folder, self.revision, self.commit = repo, folder, revision, commit
        self.files = dict(files)
        # --- knobs ---
        self.token: str | None = None  # when set, the Hub wants "Authorization: Bearer <token>"
        self.fail_tree: list[int] = []  # statuses to answer to the next tree requests, in order
        self.fail_content: dict[str, list[int]] = {}  # name -> the same for its resolve requests
        self.drop_after: dict[str, int] = {}  # name -> close the socket after N body bytes, once
        self.corrupt: dict[str, int] = {}  # name -> how many responses get one byte flipped
        self.ignore_range = False  # answer 200 with the whole file to ranged requests
        self.page_size = 1000  # entries per tree page
        self.link_base: str | None = None  # next-page links start with this (None: self.url)
        self.cdn_base: str | None = None  # LFS redirects go to {cdn_base}/cdn/ (None: self.url)
        self.tree_body: bytes | None = None  # answer tree requests 200 with this body instead
        self.hold: threading.Event | None = None  # content waits for this event (up to 10 s)
        self.content_arrived = threading.Event()
        # --- what happened ---
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers), in order
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def git_oid(self, name: str) -> str:
        """The tree API's ``oid``: git's blob id of the content (for an LFS file the real Hub
        lists its pointer's id instead; any id that changes with the content does here)."""
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def content_requests(self) -> list[tuple[str, dict[str, str]]]:
        """The resolve requests (one per file fetch attempt; the CDN hop is not counted)."""
        return [(path, headers) for path, headers in self.requests if "/resolve/" in path]

    def ranges_asked(self, name: str) -> list[str | None]:
        """The Range header of each resolve request for ``name`` (None when absent)."""
        return [
            headers.get("Range")
            for path, headers in self.content_requests()
            if path.endswith("/" + name)
        ]

    def _pop(self, queue: list[int]) -> int | None:
        with self._lock:
            return queue.pop(0) if queue else None

    def _use_one(self, counts: dict[str, int], name: str) -> bool:
        """Use up one of ``counts[name]``; True when there was one left."""
        with self._lock:
            if counts.get(name, 0) <= 0:
                return False
            counts[name] -= 1
            return True


def _is_lfs(name: str) -> bool:
    return not name.endswith(".json")


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot keep a server thread forever

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            hub.requests.append((unquote(self.path), dict(self.headers)))
            path = unquote(urlsplit(self.path).path)
            tree_prefix = f"/api/models/{hub.repo}/tree/"
            resolve_prefix = f"/{hub.repo}/resolve/"
            if path.startswith("/cdn/"):
                self._content(path.removeprefix("/cdn/"), lfs_hop=True)
            elif path.startswith(tree_prefix):
                self._tree(path.removeprefix(tree_prefix))
            elif path.startswith(resolve_prefix):
                self._resolve(path.removeprefix(resolve_prefix))
            elif path.startswith("/api/models/") or "/resolve/" in path:
                self._error(404, "RepoNotFound")
            else:
                self._error(404, "")

        # --- the three endpoints -----------------------------------------------------------

        def _tree(self, rest: str) -> None:
            if not self._authorized():
                return
            status = hub._pop(hub.fail_tree)
            if status:
                return self._error(status, "")
            if hub.tree_body is not None:
                return self._send(200, hub.tree_body, {})
            revision, _, folder = rest.partition("/")
            if revision not in (hub.revision, hub.commit):
                return self._error(404, "RevisionNotFound")
            if folder != hub.folder:
                return self._error(404, "EntryNotFound")
            entries = []
            for name, data in hub.files.items():
                entry = {
                    "type": "file",
                    "path": f"{hub.folder}/{name}",
                    "size": len(data),
                    "oid": hub.git_oid(name),
                }
                if _is_lfs(name):
                    entry["lfs"] = {"oid": hub.sha256(name), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            entries.append({"type": "directory", "path": f"{hub.folder}/sub", "size": 0})
            start = int(parse_qs(urlsplit(self.path).query).get("cursor", ["0"])[0])
            page = entries[start : start + hub.page_size]
            headers = {"Content-Type": "application/json"}
            if start + hub.page_size < len(entries):
                base = hub.url if hub.link_base is None else hub.link_base
                next_url = f"{base}{urlsplit(self.path).path}?cursor={start + hub.page_size}"
                headers["Link"] = f'<{next_url}>; rel="next"'
            self._send(200, json.dumps(page).encode(), headers)

        def _resolve(self, rest: str) -> None:
            if not self._authorized():
                return
            revision, _, path = rest.partition("/")
            if revision not in (hub.revision, hub.commit):
                return self._error(404, "RevisionNotFound")
            folder, _, name = path.rpartition("/")
            if folder != hub.folder or name not in hub.files:
                return self._error(404, "EntryNotFound")
            status = hub._pop(hub.fail_content.get(name, []))
            if status:
                return self._error(status, "")
            if _is_lfs(name):
                base = hub.url if hub.cdn_base is None else hub.cdn_base
                headers = {"Location": f"{base}/cdn/{name}", "X-Repo-Commit": hub.commit}
                return self._send(302, b"", headers)
            self._content(name, lfs_hop=False)

        def _content(self, name: str, lfs_hop: bool) -> None:
            hub.content_arrived.set()
            if hub.hold is not None:
                hub.hold.wait(timeout=10)
            data = hub.files[name]
            headers = {} if lfs_hop else {"X-Repo-Commit": hub.commit}
            start, status = 0, 200
            asked = self.headers.get("Range")
            if asked and not hub.ignore_range:
                start = int(asked.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    headers["Content-Range"] = f"bytes */{len(data)}"
                    return self._send(416, b"", headers)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = bytearray(data[start:])
            if body and hub._use_one(hub.corrupt, name):
                body[0] ^= 0xFF
            with hub._lock:
                cut = hub.drop_after.pop(name, None)
            self._send(status, bytes(body), headers, cut=cut)

        # --- helpers -----------------------------------------------------------------------

        def _authorized(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "")
            return False

        def _error(self, status: int, code: str) -> None:
            headers = {"X-Error-Code": code} if code else {}
            self._send(status, json.dumps({"error": code or "error"}).encode(), headers)

        def _send(
            self, status: int, body: bytes, headers: dict[str, str], cut: int | None = None
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # cut: the connection drops after that many body bytes (Content-Length says more)
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True

    return Handler
