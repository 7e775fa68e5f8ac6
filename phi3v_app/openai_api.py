"""An OpenAI-compatible ``/v1/chat/completions`` over the same pipeline and turn as the chat.

    add_openai_routes(demo_app, lambda: loader.pipeline, turns, model_name="phi-3-vision-cpu")

adds ``POST /v1/chat/completions`` and ``GET /v1/models`` to a FastAPI app: Gradio's own, so the
page's port, a Space and a share link serve them too. Tools that speak OpenAI's protocol (the
``openai`` package, Open WebUI, curl scripts) can then ask about images.

One request: the key -> the body (:func:`~phi3v_app.openai_schema.parse_request`) -> the images
(``data:`` URLs decoded; ``http(s)`` ones fetched only with ``allow_remote_images``) -> the answer
runner (:mod:`phi3v_app.runner`, the chat's too: the same line for the model's turn) -> its
typed events rendered here: a failure before the first word as an HTTP error (429 when the line
is full, 400 for bad input such as a prompt over the limit), the text cut at stop sequences into
one JSON answer or server-sent events ending in ``data: [DONE]``. A caller that goes away
cancels its answer and frees the turn.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from phi3v import Pipeline
from phi3v_app import runner
from phi3v_app.history import MAX_IMAGES_PER_CONVERSATION, MAX_UPLOAD_BYTES
from phi3v_app.openai_schema import (
    APIError,
    ChatRequest,
    RemoteImage,
    parse_request,
    too_large,
)
from phi3v_app.turns import ModelTurns

log = logging.getLogger("phi3v.app.openai")

API_KEY_ENV = "PHI3V_API_KEY"  # the same as the app's --api-key
MAX_IMAGES = MAX_IMAGES_PER_CONVERSATION  # per request, over the whole conversation
MAX_IMAGE_BYTES = MAX_UPLOAD_BYTES  # per image, as the chat's uploads
MAX_BODY_BYTES = 100_000_000  # a few large images, base64-encoded
REMOTE_TIMEOUT_S = 20  # to connect, and between two reads, when fetching an image URL
REMOTE_DEADLINE_S = 60  # for a whole image download
POLL_S = 0.25  # how often a request without news looks whether its caller is still there
KEEPALIVE_S = 15  # an SSE comment after this long without text (proxies close idle streams)
RETRY_AFTER_S = 10  # suggested to callers told that the model is busy or not ready


@dataclass(frozen=True)
class _Settings:
    runner: runner.Runner
    model_name: str
    api_key: str | None
    allow_remote_images: bool
    max_images: int
    max_image_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))


def add_openai_routes(
    app: FastAPI,
    pipeline: Callable[[], Pipeline | None],
    turns: ModelTurns,
    *,
    model_name: str,
    api_key: str | None = None,
    allow_remote_images: bool = False,
    max_images: int = MAX_IMAGES,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> None:
    """Serve ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{id}`` on
    ``app``; any other ``/v1`` request gets a 404 or 405 in OpenAI's error shape.

    ``pipeline()`` gives the loaded model, or None while it is still downloading or loading
    (requests then get 503). ``turns`` is the one-at-a-time turn the chat takes too. With
    ``api_key`` every request must send ``Authorization: Bearer <api_key>``. ``http(s)`` image
    URLs are fetched only with ``allow_remote_images`` (a server fetching URLs for anyone can be
    made to reach hosts behind its firewall).
    """
    settings = _Settings(
        runner.Runner(pipeline, turns),
        model_name,
        api_key,
        allow_remote_images,
        max_images,
        max_image_bytes,
    )

    async def chat_completions(request: Request) -> Response:
        try:
            return await _chat_completions(request, settings)
        except APIError as err:
            return _error_response(request, err)

    def served_model() -> dict:
        model = {
            "id": settings.model_name,
            "object": "model",
            "created": settings.created,
            "owned_by": "phi3v",
        }
        if (pipe := pipeline()) is not None:  # which precision runs, and its self-check
            choice = pipe.precision_choice
            check = choice.check.to_json() if choice.check else None
            model["phi3v"] = {"precision": choice.precision, "reason": choice.reason}
            model["phi3v"]["self_check"] = check
            if choice.precision == "fast":  # what computes each attention, and why
                model["phi3v"]["prompt_attention"] = pipe.sessions.prefill_attention
                model["phi3v"]["vision_attention"] = pipe.sessions.vision_attention
        return model

    async def models(request: Request) -> Response:
        try:
            _check_key(request, settings.api_key)
        except APIError as err:
            return _error_response(request, err)
        return JSONResponse({"object": "list", "data": [served_model()]})

    async def model(request: Request, model_id: str) -> Response:
        """One model by id, as OpenAI's ``GET /v1/models/{model}``: the served one, or a 404."""
        try:
            _check_key(request, settings.api_key)
            _check_model(model_id, settings.model_name)
        except APIError as err:
            return _error_response(request, err)
        return JSONResponse(served_model())

    async def elsewhere(request: Request, rest: str) -> Response:
        """Any other ``/v1`` path or method: OpenAI's error shape, saying what this server has."""
        path = f"/v1/{rest}"
        allowed = {"/v1/chat/completions": "POST", "/v1/models": "GET"}.get(path.rstrip("/"))
        if allowed is None and path.startswith("/v1/models/"):
            allowed = "GET"
        if allowed:
            err = APIError(
                405,
                f"{request.method} is not allowed on {path}; use {allowed}",
                code="method_not_allowed",
            )
        else:
            err = APIError(
                404,
                f"{path} is not an endpoint of this server; it serves POST /v1/chat/completions "
                "and GET /v1/models",
                code="not_found",
            )
        return _error_response(request, err)

    app.add_api_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], include_in_schema=False
    )
    app.add_api_route("/v1/models", models, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"], include_in_schema=False)
    app.add_api_route(
        "/v1/{rest:path}",
        elsewhere,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )


def _error_response(request: Request, err: APIError) -> JSONResponse:
    # One line per refused request: bad input is the caller's problem, not a server fault.
    log.info("%s %s -> %d: %s", request.method, request.url.path, err.status, err.message)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# --- one request ---------------------------------------------------------------------------------


async def _chat_completions(request: Request, settings: _Settings) -> Response:
    _check_key(request, settings.api_key)
    if settings.runner.pipeline() is None:
        raise _not_ready()
    chat = parse_request(
        await _read_json(request),
        max_images=settings.max_images,
        max_image_bytes=settings.max_image_bytes,
    )
    _check_model(chat.model, settings.model_name)
    images = await run_in_threadpool(
        _load_images, chat.images, settings.allow_remote_images, settings.max_image_bytes
    )
    events = _Events(settings.runner.start(_question(chat, images)), request, chat.image_params)
    try:
        first = await events.started()
    except _CallerGone:
        return Response(status_code=499)  # nobody reads it; the log shows why the request ended
    except APIError:
        events.cancel()
        raise
    answer = _Answer(chat, settings.model_name)
    if chat.stream:
        return StreamingResponse(
            _sse_events(events, first, answer),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        return JSONResponse(await _collect(events, first, answer))
    except _CallerGone:
        log.info("a caller left before its answer was complete")
        return Response(status_code=499)


def _check_model(asked: str | None, served: str) -> None:
    """A request for a model this server does not run is a 404, as OpenAI answers it."""
    if asked is not None and asked != served:
        raise APIError(
            404,
            f"the model `{asked}` is not served here; this server runs `{served}` "
            "(GET /v1/models lists it): send that name as `model`",
            param="model",
            code="model_not_found",
        )


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    right = hmac.compare_digest(given.strip().encode(), api_key.encode())  # in constant time
    if scheme.lower() != "bearer" or not right:
        raise APIError(
            401,
            "missing or wrong API key: send the key this server was started with "
            f"(--api-key or ${API_KEY_ENV}) as the header `Authorization: Bearer <key>` "
            "(the openai package sends its api_key that way)",
            code="invalid_api_key",
        )


async def _read_json(request: Request) -> object:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _body_too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _body_too_large()
    try:
        return json.loads(body)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON ({err})") from err


def _body_too_large() -> APIError:
    return APIError(
        413,
        f"the request body is larger than {MAX_BODY_BYTES // 1_000_000} MB; send fewer or "
        "smaller images",
        code="request_too_large",
    )


def _load_images(
    images: Sequence[bytes | RemoteImage], allow_remote: bool, max_bytes: int
) -> list[bytes]:
    """Every image as bytes: remote ones fetched (all refused unless ``allow_remote``)."""
    remote = [n for n, image in enumerate(images, 1) if isinstance(image, RemoteImage)]
    if remote and not allow_remote:
        raise APIError(
            400,
            f"image {remote[0]} is an http(s) URL, and this server does not fetch URLs; send the "
            "image inline as data:image/png;base64,... (or start the server with "
            "--allow-remote-images)",
            code="remote_images_disabled",
        )
    return [
        _fetch(image.url, n, max_bytes) if isinstance(image, RemoteImage) else image
        for n, image in enumerate(images, 1)
    ]


def _fetch(url: str, number: int, max_bytes: int) -> bytes:
    where = f"image {number}"
    deadline = time.monotonic() + REMOTE_DEADLINE_S
    data = bytearray()
    try:
        with requests.get(url, stream=True, timeout=REMOTE_TIMEOUT_S) as response:
            if response.status_code != 200:
                raise APIError(
                    400, f"fetching {where} from its URL gave HTTP {response.status_code}"
                )
            for chunk in response.iter_content(1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise too_large(where, max_bytes)
                if time.monotonic() > deadline:
                    raise APIError(
                        400, f"fetching {where} took over {REMOTE_DEADLINE_S} s; send it inline"
                    )
    except requests.RequestException as err:
        raise APIError(
            400, f"could not fetch {where} from its URL ({type(err).__name__}); send it inline"
        ) from err
    return bytes(data)


def _question(chat: ChatRequest, images: list[bytes]) -> runner.Question:
    """The runner's question for the request.

    The KV cache kept after an answer is continued by the next request with the same ``user``
    (a follow-up question does not read the images again). A request without one neither
    continues nor keeps a cache: anonymous callers cannot time what another sent, and one-off
    questions do not push kept conversations out of the memory budget.
    """
    return runner.Question(
        list(chat.messages),
        images,
        chat.generation_options(),
        conversation=("openai", chat.user),
        remember=chat.user is not None,
    )


# --- the runner's events, read from the server's event loop --------------------------------------


class _CallerGone(Exception):
    """The caller closed the connection."""


class _Events:
    """One answer's events (:mod:`phi3v_app.runner`), awaited between looks at the caller."""

    def __init__(self, answer: runner.Answer, request: Request, image_params: tuple[str, ...]):
        self.answer = answer
        self.request = request
        self.image_params = image_params  # where each image was, to name a bad one
        self._events = answer.events(tick=POLL_S)

    async def next(self) -> runner.Event:
        """The next event; raises _CallerGone (and cancels the answer) once the caller left."""
        if await self.request.is_disconnected():
            self.cancel()
            raise _CallerGone
        return await run_in_threadpool(next, self._events)

    async def started(self) -> runner.Event:
        """The first event after the wait in line: Reading or later. Raises APIError for a
        failure before any text (busy, bad input) and _CallerGone for a caller that left."""
        while isinstance(event := await self.next(), runner.Queued):
            pass
        if isinstance(event, runner.Failed):
            raise _failure_error(event, self.image_params)
        return event

    def cancel(self) -> None:
        self.answer.cancel()


def _failure_error(failed: runner.Failed, image_params: tuple[str, ...] = ()) -> APIError:
    """A failed answer as OpenAI's error: 429 busy, 503 not ready, 400 bad input (naming the
    image at fault from ``image_params``, where each image was), 500 else."""
    if failed.kind == "busy":
        return APIError(
            429,
            f"the model is busy and its queue is full ({failed.reason}); try again in a minute",
            type="rate_limit_error",
            code="queue_full",
        )
    if failed.kind == "not_ready":
        return _not_ready()
    if failed.kind == "too_large":
        return APIError(400, failed.reason, param="messages", code="context_length_exceeded")
    if failed.kind == "bad_image":
        return APIError(400, failed.reason, param=_bad_image_param(failed.reason, image_params))
    if failed.kind == "bad_input":
        return APIError(400, failed.reason)
    return APIError(
        500,
        f"the generation failed ({failed.reason}); the server log has details",
        type="server_error",
    )


def _bad_image_param(reason: str, image_params: tuple[str, ...]) -> str | None:
    """Where the image an ImageError is about was: the engine says "image N of M: ..." when
    there are several, nothing when there is one."""
    if len(image_params) == 1:
        return image_params[0]
    found = re.match(r"image (\d+) of \d+: ", reason)
    number = int(found[1]) if found else 0
    return image_params[number - 1] if 0 < number <= len(image_params) else None


def _not_ready() -> APIError:
    return APIError(
        503,
        "the model is not ready yet (still downloading or loading; the web page shows its "
        "progress); try again in a minute",
        type="server_error",
        code="model_not_ready",
    )


def _finish_reason(event: runner.Finished | runner.Stopped) -> str:
    """OpenAI's finish_reason: "length" at max tokens, "stop" otherwise."""
    return "length" if isinstance(event, runner.Finished) and event.reason == "length" else "stop"


class StopText:
    """Generated text cut before the first of the ``stops``, released as it becomes safe.

    Text that might be the start of a stop sequence is held back until the next delta shows
    whether it is, so a caller never receives any part of a stop sequence.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add ``delta``; the text that can be sent now."""
        if self.stopped:
            return ""
        self.text += delta
        found = [i for stop in self.stops if (i := self.text.find(stop, self.sent)) >= 0]
        if found:
            self.stopped = True
            self.text = self.text[: min(found)]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """The text held back, at the end of the generation."""
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest end of the unsent text that begins a stop sequence."""
        unsent = len(self.text) - self.sent
        for length in range(min(max(map(len, self.stops), default=1) - 1, unsent), 0, -1):
            if any(stop.startswith(self.text[-length:]) for stop in self.stops):
                return length
        return 0

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out


# --- the answer, in OpenAI's shapes --------------------------------------------------------------


class _Answer:
    """The fields every response of one request shares, and its chunk / completion objects."""

    def __init__(self, chat: ChatRequest, model_name: str):
        self.chat = chat
        self.model = model_name
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.usage = runner.Usage()  # the latest counts, from the runner's events
        self.finish_reason = "stop"  # OpenAI's, set when the answer ends

    def completion(self, text: str, finish_reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": self._usage()}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": self._usage()}

    def _usage(self) -> dict:
        usage = self.usage
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        }

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


async def _texts(
    events: _Events, first: runner.Event, answer: _Answer
) -> AsyncIterator[str | None]:
    """The answer's text, cut at the request's stop sequences, as it becomes safe to send;
    None at each tick without text. Sets ``answer.usage``; ends at the finish, whose reason
    it leaves in ``answer.finish_reason``. Leaving early cancels the answer."""
    cut = StopText(answer.chat.stop)
    event = first
    try:
        while True:
            if isinstance(event, runner.Delta):
                for piece in event.pieces:  # the tokens up to where a stop is found
                    answer.usage = replace(event.usage, completion_tokens=piece.tokens)
                    if text := cut.push(piece.text):
                        yield text
                    if cut.stopped:
                        answer.finish_reason = "stop"
                        return
            elif isinstance(event, (runner.Finished, runner.Stopped)):
                answer.usage = event.usage
                if tail := cut.flush():
                    yield tail
                answer.finish_reason = _finish_reason(event)
                return
            elif isinstance(event, runner.Failed):
                raise _failure_error(event)
            else:
                yield None
            event = await events.next()
    finally:
        events.cancel()  # a no-op after the end; frees the model when the caller left


async def _collect(events: _Events, first: runner.Event, answer: _Answer) -> dict:
    """The whole answer as one ``chat.completion`` object."""
    text = "".join([piece async for piece in _texts(events, first, answer) if piece])
    return answer.completion(text, answer.finish_reason)


async def _sse_events(events: _Events, first: runner.Event, answer: _Answer) -> AsyncIterator[str]:
    """The answer as server-sent events: a role chunk, text chunks, a finish chunk, (usage),
    ``data: [DONE]``. Leaving early (the caller went away) cancels the answer."""
    yield _sse(answer.chunk({"role": "assistant", "content": ""}))
    quiet_since = time.monotonic()
    try:
        async for text in _texts(events, first, answer):
            if text:
                quiet_since = time.monotonic()
                yield _sse(answer.chunk({"content": text}))
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": the model is still working\n\n"  # a comment: clients skip it
    except APIError as err:  # a failure after the stream began: its error object, then the end
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
        return
    except _CallerGone:
        log.info("a caller left while its answer streamed")
        return
    yield _sse(answer.chunk({}, answer.finish_reason))
    if answer.chat.include_usage:
        yield _sse(answer.usage_chunk())
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
