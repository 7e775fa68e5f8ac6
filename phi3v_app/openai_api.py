"""An OpenAI-compatible ``/v1/chat/completions`` over the same pipeline and turn as the chat.

    add_openai_routes(demo_app, lambda: loader.pipeline, turns, model_name="phi-3-vision-cpu")

adds ``POST /v1/chat/completions`` and ``GET /v1/models`` to a FastAPI app: Gradio's own, so the
page's port, a Space and a share link serve them too. Tools that speak OpenAI's protocol (the
``openai`` package, Open WebUI, curl scripts) can then ask about images.

One request: the key -> the body (:func:`~phi3v_app.openai_schema.parse_request`) -> the images
(``data:`` URLs decoded; ``http(s)`` ones fetched only with ``allow_remote_images``) ->
``Pipeline.stream`` (every ``Phi3VError`` there is the caller's 400) -> the model's turn, as a
chat visitor waits for it (429 when the queue is full) -> a worker thread reads the stream and
cuts the text at stop sequences -> one JSON answer, or server-sent events ending in
``data: [DONE]``. A caller that goes away cancels its generation and frees the turn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from phi3v import Phi3VError, Pipeline, Stream
from phi3v.errors import LimitError
from phi3v_app.history import MAX_IMAGES_PER_CONVERSATION
from phi3v_app.openai_schema import (
    APIError,
    ChatRequest,
    RemoteImage,
    parse_request,
    too_large,
)
from phi3v_app.turns import ModelTurns, QueueFull, TurnCancelled

log = logging.getLogger("phi3v.app.openai")

API_KEY_ENV = "PHI3V_API_KEY"  # the same as the app's --api-key
MAX_IMAGES = MAX_IMAGES_PER_CONVERSATION  # per request, over the whole conversation
MAX_IMAGE_BYTES = 20_000_000  # per image, as the chat's uploads
MAX_BODY_BYTES = 100_000_000  # a few large images, base64-encoded
REMOTE_TIMEOUT_S = 20  # to connect, and between two reads, when fetching an image URL
REMOTE_DEADLINE_S = 60  # for a whole image download
POLL_S = 0.25  # how often a waiting request looks whether its caller is still there
KEEPALIVE_S = 15  # an SSE comment after this long without text (proxies close idle streams)
RETRY_AFTER_S = 10  # suggested to callers told that the model is busy or not ready


@dataclass(frozen=True)
class _Settings:
    pipeline: Callable[[], Pipeline | None]
    turns: ModelTurns
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
    """Serve ``POST /v1/chat/completions`` and ``GET /v1/models`` on ``app``.

    ``pipeline()`` gives the loaded model, or None while it is still downloading or loading
    (requests then get 503). ``turns`` is the one-at-a-time turn the chat takes too. With
    ``api_key`` every request must send ``Authorization: Bearer <api_key>``. ``http(s)`` image
    URLs are fetched only with ``allow_remote_images`` (a server fetching URLs for anyone can be
    made to reach hosts behind its firewall).
    """
    settings = _Settings(
        pipeline, turns, model_name, api_key, allow_remote_images, max_images, max_image_bytes
    )

    async def chat_completions(request: Request) -> Response:
        try:
            return await _chat_completions(request, settings)
        except APIError as err:
            return _error_response(request, err)

    async def models(request: Request) -> Response:
        try:
            _check_key(request, settings.api_key)
        except APIError as err:
            return _error_response(request, err)
        model = {
            "id": settings.model_name,
            "object": "model",
            "created": settings.created,
            "owned_by": "phi3v",
        }
        return JSONResponse({"object": "list", "data": [model]})

    app.add_api_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], include_in_schema=False
    )
    app.add_api_route("/v1/models", models, methods=["GET"], include_in_schema=False)


def _error_response(request: Request, err: APIError) -> JSONResponse:
    # One line per refused request: bad input is the caller's problem, not a server fault.
    log.info("%s %s -> %d: %s", request.method, request.url.path, err.status, err.message)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# --- one request ---------------------------------------------------------------------------------


async def _chat_completions(request: Request, settings: _Settings) -> Response:
    _check_key(request, settings.api_key)
    pipe = settings.pipeline()
    if pipe is None:
        raise APIError(
            503,
            "the model is not ready yet (still downloading or loading; the web page shows its "
            "progress); try again in a minute",
            type="server_error",
            code="model_not_ready",
        )
    chat = parse_request(
        await _read_json(request),
        max_images=settings.max_images,
        max_image_bytes=settings.max_image_bytes,
    )
    images = await run_in_threadpool(
        _load_images, chat.images, settings.allow_remote_images, settings.max_image_bytes
    )
    stream = await run_in_threadpool(_start, pipe, chat, images)
    generation = _Generation(stream, settings.turns, chat.stop, asyncio.get_running_loop())
    try:
        await generation.wait_for_turn(request)
    except _CallerGone:
        return Response(status_code=499)  # nobody reads it; the log shows why the request ended
    answer = _Answer(chat, settings.model_name, stream)
    if chat.stream:
        return StreamingResponse(
            _events(generation, answer, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        return JSONResponse(await _collect(generation, answer, request))
    except _CallerGone:
        log.info("a caller left before its answer was complete")
        return Response(status_code=499)


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


def _start(pipe: Pipeline, chat: ChatRequest, images: list[bytes]) -> Stream:
    """``Pipeline.stream`` for the request: checks everything before any model runs.

    The KV cache kept after an answer is continued by the next request with the same ``user``
    (a follow-up question does not read the images again). A request without one neither
    continues nor keeps a cache: anonymous callers cannot time what another sent, and one-off
    questions do not push kept conversations out of the memory budget.
    """
    try:
        return pipe.stream(
            list(chat.messages),
            images,
            conversation=("openai", chat.user),
            remember=chat.user is not None,
            **chat.generation_options(),
        )
    except LimitError as err:
        raise APIError(400, str(err), param="messages", code="context_length_exceeded") from err
    except Phi3VError as err:
        raise APIError(400, str(err)) from err


# --- the generation, in a worker thread ----------------------------------------------------------


@dataclass(frozen=True)
class _Finished:
    reason: str  # "stop" / "length" as OpenAI's finish_reason; "cancelled" when the caller left


_TURN = object()  # the model's turn has come


class _CallerGone(Exception):
    """The caller closed the connection."""


class _Generation:
    """One generation in a worker thread: wait for the turn, read the stream, cut at stops.

    The thread hands over, in order: ``_TURN``, text (already cut at the stop sequences), then
    a ``_Finished`` or an exception (QueueFull at once when the queue is full).
    """

    def __init__(
        self,
        stream: Stream,
        turns: ModelTurns,
        stops: Sequence[str],
        loop: asyncio.AbstractEventLoop,
    ):
        self.stream = stream
        self.turns = turns
        self.stops = stops
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.gone = threading.Event()
        self._next_check = 0.0
        threading.Thread(target=self._work, name="phi3v-openai", daemon=True).start()

    def cancel(self) -> None:
        """End the generation (or the wait for the turn) as soon as it can; safe to repeat."""
        self.gone.set()
        self.stream.cancel()

    async def wait_for_turn(self, request: Request) -> None:
        """Returns when the model is this request's; raises APIError 429 when the queue is full,
        _CallerGone when the caller left while waiting."""
        event = await self.next(request)
        if isinstance(event, QueueFull):
            raise APIError(
                429,
                f"the model is busy and its queue is full ({event}); try again in a minute",
                type="rate_limit_error",
                code="queue_full",
            )
        if isinstance(event, BaseException):
            raise _internal_error(event)

    async def next(self, request: Request, idle: float | None = None) -> object:
        """The next event from the worker; None after ``idle`` seconds without one. Raises
        _CallerGone (and cancels) once the caller has closed the connection."""
        waited = 0.0
        while True:
            if time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + POLL_S
                if await request.is_disconnected():
                    self.cancel()
                    raise _CallerGone
            try:
                return self.events.get_nowait()
            except asyncio.QueueEmpty:
                pass
            try:
                return await asyncio.wait_for(self.events.get(), POLL_S)
            except asyncio.TimeoutError:
                waited += POLL_S
                if idle is not None and waited >= idle:
                    return None

    def _work(self) -> None:
        try:
            with self.turns.turn(cancelled=self.gone):
                try:
                    self._put(_TURN)
                    self._put(self._read())
                finally:
                    self.stream.close()  # frees the KV cache before the next turn starts
        except TurnCancelled:
            log.info("a caller left while waiting for the model")
        except BaseException as err:  # QueueFull, or a failure: the request answers it
            self._put(err)
        finally:
            self.stream.close()  # when the turn never came

    def _read(self) -> _Finished:
        text = StopText(self.stops)
        for delta in self.stream:
            if cut := text.push(delta):
                self._put(cut)
            if text.stopped:
                return _Finished("stop")
            if self.gone.is_set():
                return _Finished("cancelled")
        if tail := text.flush():
            self._put(tail)
        reason = self.stream.stop_reason
        return _Finished("stop" if reason == "eos" else reason or "stop")

    def _put(self, event: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop has closed; nobody is listening
            self.cancel()


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

    def __init__(self, chat: ChatRequest, model_name: str, stream: Stream):
        self.chat = chat
        self.model = model_name
        self.stream = stream
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self) -> dict:
        prompt, completion = len(self.stream.input_ids), len(self.stream.token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def completion(self, text: str, finish_reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage()}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


async def _collect(generation: _Generation, answer: _Answer, request: Request) -> dict:
    """The whole answer as one ``chat.completion`` object."""
    text = ""
    try:
        while True:
            event = await generation.next(request)
            if isinstance(event, str):
                text += event
            elif isinstance(event, _Finished):
                return answer.completion(text, event.reason)
            elif isinstance(event, BaseException):
                raise _internal_error(event)
    finally:
        generation.cancel()


async def _events(generation: _Generation, answer: _Answer, request: Request) -> AsyncIterator[str]:
    """The answer as server-sent events: a role chunk, text chunks, a finish chunk, (usage),
    ``data: [DONE]``. Leaving early (the caller went away) cancels the generation."""
    try:
        yield _sse(answer.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await generation.next(request, idle=KEEPALIVE_S)
            if event is None:
                yield ": the model is still working\n\n"  # a comment: clients skip it
            elif isinstance(event, str):
                yield _sse(answer.chunk({"content": event}))
            elif isinstance(event, _Finished):
                yield _sse(answer.chunk({}, event.reason))
                if answer.chat.include_usage:
                    yield _sse(answer.usage_chunk())
                yield "data: [DONE]\n\n"
                return
            elif isinstance(event, BaseException):
                yield _sse(_internal_error(event).body())
                yield "data: [DONE]\n\n"
                return
    except _CallerGone:
        log.info("a caller left while its answer streamed")
    finally:
        generation.cancel()


def _internal_error(err: BaseException) -> APIError:
    log.error("generation failed", exc_info=err)
    return APIError(
        500,
        f"the generation failed ({type(err).__name__}: {err}); the server log has details",
        type="server_error",
    )


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
