"""From an OpenAI chat-completions request body to phi3v's messages, images and settings.

The wire format is OpenAI's ``POST /v1/chat/completions``: ``messages`` of ``system`` /
``developer`` / ``user`` / ``assistant`` roles, whose content is a string or a list of parts
(``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``), and the
sampling fields. :func:`parse_request` checks all of it before any image is read or any model
runs, and turns it into a :class:`ChatRequest`: phi3v messages where each image part has become
an ``<|image_N|>`` tag, numbered over the whole conversation, and the images in that order.

Nothing here does I/O: ``data:`` images are decoded here, ``http(s)`` ones are left as
:class:`RemoteImage` for the caller to fetch (or refuse).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from phi3v import DEFAULT_MAX_NEW_TOKENS, MAX_CROPS
from phi3v.sampling import OFFERED_MAX_TEMPERATURE
from phi3v_app.history import (  # a typed <|image_N|> stays text, as in the chat
    MAX_NEW_TOKENS,
    typed_text,
)

# OpenAI's defaults for the sampling fields a request leaves out.
DEFAULT_TEMPERATURE = 1.0
MAX_STOP_SEQUENCES = 4  # as OpenAI: `stop` holds at most 4 strings
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# An image part's `detail`. OpenAI reads a "low" image at low resolution, at a fixed small cost;
# here that is one crop (313 positions for a 4:3 photo, against 1,921 at 16 crops). "high" and
# "auto" read it at `num_crops` (default: the model's).
DETAILS = ("auto", "low", "high")
LOW_DETAIL_CROPS = 1
# Request fields whose meaning this server cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("tools", "functions", "audio", "prediction")

_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


class APIError(Exception):
    """A request the endpoint answers with an error: HTTP ``status`` and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class RemoteImage:
    """An image given by an http(s) URL: fetched only where the server allows it."""

    url: str


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completions request, checked: what ``Pipeline.stream`` and the answer need."""

    messages: tuple[dict[str, str], ...]  # phi3v messages, images as <|image_N|> tags
    images: tuple[bytes | RemoteImage, ...]  # images[N-1] is <|image_N|>
    image_params: tuple[str, ...] = ()  # where each image was in the request, for its errors
    image_details: tuple[str, ...] = ()  # each image's `detail`: "auto", "low" or "high"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    num_crops: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    model: str | None = None  # the model the caller asked for (None: whatever is served)

    def generation_options(self) -> dict:
        """Keyword arguments for ``Pipeline.stream``."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "num_crops": self.crops(),
        }

    def crops(self) -> int | list[int | None] | None:
        """The crops to read the images at: ``num_crops`` (None: the model's), but one crop
        for an image whose ``detail`` is "low" (OpenAI's low-resolution reading)."""
        if "low" not in self.image_details:
            return self.num_crops
        return [LOW_DETAIL_CROPS if d == "low" else self.num_crops for d in self.image_details]


def parse_request(body: object, *, max_images: int, max_image_bytes: int) -> ChatRequest:
    """A decoded JSON body -> :class:`ChatRequest`; raises :class:`APIError` (400, or 413 for an
    inline image over ``max_image_bytes``) saying which field is wrong and what to send."""
    if not isinstance(body, Mapping):
        raise APIError(400, "the request body must be a JSON object with a `messages` list")
    for name in UNSUPPORTED:
        if body.get(name):
            raise APIError(400, f"`{name}` is not supported by this server", param=name)
    _check_unsupported_values(body)
    messages, found = _conversation(body.get("messages"), max_images, max_image_bytes)
    max_tokens = body.get("max_completion_tokens")
    max_tokens_field = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_field = body.get("max_tokens"), "max_tokens"
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):
        raise APIError(400, "`stream_options` must be an object", param="stream_options")
    return ChatRequest(
        messages=messages,
        images=tuple(found.images),
        image_params=tuple(found.places),
        image_details=tuple(found.details),
        max_new_tokens=_integer(
            max_tokens, max_tokens_field, DEFAULT_MAX_NEW_TOKENS, minimum=1, maximum=MAX_NEW_TOKENS
        ),
        temperature=_temperature(body.get("temperature")),
        top_p=_top_p(body.get("top_p")),
        top_k=_integer(body.get("top_k"), "top_k", 0, minimum=0) or None,
        seed=_integer(body.get("seed"), "seed", None, minimum=0),
        num_crops=_integer(body.get("num_crops"), "num_crops", None, minimum=1, maximum=MAX_CROPS),
        stop=_stop(body.get("stop")),
        stream=_flag(body.get("stream"), "stream"),
        include_usage=_flag(stream_options.get("include_usage"), "stream_options.include_usage"),
        user=_user(body.get("user")),
        model=_model(body.get("model")),
    )


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL; ``where`` names it in errors."""
    match = _DATA_URL.fullmatch(url)
    if match is None or ";base64" not in match["params"].lower():
        raise APIError(
            400,
            f"{where}: a data URL must look like data:image/png;base64,<base64 data>",
            param=where,
        )
    if not match["type"].lower().startswith("image/"):
        raise APIError(
            400,
            f"{where}: the data URL holds {match['type'] or 'no media type'!r}, not an image "
            "(send data:image/png;base64,... or data:image/jpeg;base64,...)",
            param=where,
        )
    data = "".join(match["data"].split())  # base64 wrapped over lines is still base64
    if len(data) * 3 // 4 > max_bytes:
        raise too_large(where, max_bytes)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(
            400, f"{where}: the image's base64 data is invalid ({err})", param=where
        ) from err


def too_large(where: str, max_bytes: int) -> APIError:
    return APIError(
        413,
        f"{where}: the image is larger than this server takes ({max_bytes // 1_000_000} MB); "
        "send a smaller or more compressed image",
        param=where,
        code="image_too_large",
    )


# --- messages -----------------------------------------------------------------------------------


@dataclass
class _Images:
    """A request's images in order, where each was, and the ``detail`` each asked for."""

    images: list[bytes | RemoteImage] = field(default_factory=list)
    places: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


def _conversation(
    messages: object, max_images: int, max_image_bytes: int
) -> tuple[tuple[dict[str, str], ...], _Images]:
    """The messages as phi3v's, and their images."""
    if not isinstance(messages, list) or not messages:
        raise APIError(
            400,
            "`messages` must be a non-empty list of {'role': ..., 'content': ...} objects",
            param="messages",
        )
    converted: list[dict[str, str]] = []
    found = _Images()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise APIError(400, f"{where} must be an object with `role` and `content`", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(
                400,
                f"{where} has role {role!r}; this server takes system, developer, user and "
                "assistant messages",
                param=f"{where}.role",
            )
        content = _content(message.get("content"), role, where, found, max_images, max_image_bytes)
        converted.append({"role": ROLES[role], "content": content})
    return tuple(converted), found


def _content(
    content: object,
    role: str,
    where: str,
    found: _Images,
    max_images: int,
    max_image_bytes: int,
) -> str:
    """One message's content as phi3v text; its image parts are added to ``found``."""
    if isinstance(content, str):
        return typed_text(content) if role == "user" else content
    if not isinstance(content, list):
        what = (
            "tool calls are not supported" if content is None else "got " + type(content).__name__
        )
        raise APIError(
            400,
            f"{where}.content must be a string or a list of content parts ({what})",
            param=f"{where}.content",
        )
    pieces = []
    for number, part in enumerate(content):
        here = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(typed_text(part["text"]) if role == "user" else part["text"])
        elif kind == "image_url" and role == "user":
            if len(found.images) == max_images:
                raise APIError(
                    400,
                    f"{here}: the conversation has more than {max_images} images, the most this "
                    "server takes in one request; send fewer (or start a new conversation)",
                    param=here,
                    code="too_many_images",
                )
            found.images.append(_image(part.get("image_url"), here, max_image_bytes))
            found.places.append(here)
            found.details.append(_detail(part.get("image_url"), here))
            pieces.append(f"<|image_{len(found.images)}|>")
        elif kind == "image_url":
            raise APIError(400, f"{here}: images go in user messages only", param=here)
        else:
            raise APIError(
                400,
                f"{here} must be {{'type': 'text', 'text': ...}} or "
                "{'type': 'image_url', 'image_url': {'url': ...}}",
                param=here,
            )
    # Images and text in the order given, one per line (as the chat writes an image then text).
    return "\n".join(pieces)


def _detail(image_url: object, where: str) -> str:
    """An image part's ``detail``: "auto" (the default), "low" or "high"."""
    detail = image_url.get("detail") if isinstance(image_url, Mapping) else None
    if detail is None:
        return "auto"
    if detail not in DETAILS:
        raise APIError(
            400,
            f'{where}.image_url.detail must be "auto", "low" or "high", got {detail!r}',
            param=f"{where}.image_url.detail",
        )
    return detail


def _image(image_url: object, where: str, max_bytes: int) -> bytes | RemoteImage:
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str):
        raise APIError(400, f"{where}.image_url must be {{'url': ...}}", param=where)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return decode_data_url(url, where, max_bytes)
    if scheme in ("http", "https"):
        return RemoteImage(url)
    raise APIError(
        400,
        f"{where}: image URLs must be data:image/...;base64,... (or http(s) where the server "
        "allows them)",
        param=where,
    )


# --- settings -----------------------------------------------------------------------------------


def _check_unsupported_values(body: Mapping) -> None:
    n = body.get("n")
    if n not in (None, 1):
        raise APIError(400, "`n` must be 1: this server writes one answer per request", param="n")
    if body.get("logprobs"):
        raise APIError(400, "`logprobs` is not supported by this server", param="logprobs")
    if body.get("tool_choice") not in (None, "none"):
        raise APIError(400, "`tool_choice` is not supported by this server", param="tool_choice")
    response_format = body.get("response_format")
    if response_format and (
        not isinstance(response_format, Mapping) or response_format.get("type") != "text"
    ):
        raise APIError(
            400,
            "`response_format` other than {'type': 'text'} is not supported by this server",
            param="response_format",
        )


def _integer(value: object, field: str, default, *, minimum: int, maximum: int | None = None):
    if value is None:
        return default
    too_big = maximum is not None and isinstance(value, int) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_big:
        wanted = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
        raise APIError(400, f"`{field}` must be an integer {wanted}, got {value!r}", param=field)
    return value


def _temperature(value: object) -> float:
    if value is None:
        return DEFAULT_TEMPERATURE
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 <= value <= OFFERED_MAX_TEMPERATURE:
        raise APIError(
            400,
            f"`temperature` must be a number from 0 to {OFFERED_MAX_TEMPERATURE:g}, got {value!r}",
            param="temperature",
        )
    return float(value)


def _top_p(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise APIError(400, f"`top_p` must be a number in (0, 1], got {value!r}", param="top_p")
    return float(value) if value < 1 else None


def _stop(value: object) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(stop, str) and stop for stop in stops)
    ):
        raise APIError(
            400,
            f"`stop` must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them",
            param="stop",
        )
    return tuple(stops)


def _flag(value: object, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"`{field}` must be true or false, got {value!r}", param=field)
    return value


def _model(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise APIError(400, f"`model` must be a string, got {value!r}", param="model")


def _user(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise APIError(400, f"`user` must be a string, got {value!r}", param="user")
