"""URLs as messages may show them, and the origin a token is limited to.

Every URL a message shows goes through ``redact_url`` first, so a password in HF_ENDPOINT or
the signature of a CDN link is never shown; ``origin`` decides where HF_TOKEN may go.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

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


def redact_text(text: str, endpoint: str = "") -> str:
    """``text`` (a library's error message, say) with every URL in it redacted.

    ``endpoint`` is replaced by its redacted form first, which also catches it where it has no
    scheme and so does not look like a URL.
    """
    if endpoint:
        text = text.replace(endpoint, redact_url(endpoint))
    return URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)


def origin(url: str) -> tuple[str, str, int] | None:
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
