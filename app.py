"""Phi-3 Vision chat: a Gradio web app over ``phi3v.Pipeline.stream``, on the CPU.

    python app.py                          # first launch downloads the model into data/
    python app.py --model-dir DIR          # a model folder you already have (either layout)
    python app.py --share --auth me:secret # a public link, behind a password

The page comes up at once; the model downloads (with progress) and loads in a background thread,
once per process, and the chat opens when it is ready. One model serves everyone: answers run
one at a time and the others wait in a bounded queue, seeing their place.

The flow of one answer: the chat history (Gradio's messages) -> :func:`conversation` (phi3v
messages with ``<|image_N|>`` tags + the image paths) -> ``Pipeline.stream`` -> text deltas,
read in a worker thread (:func:`follow`) so the page can show a live clock while the model reads
the images -> the chat and the status line. Everything the package rejects arrives as a
``Phi3VError`` whose message is shown in the chat; the app keeps serving.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from phi3v import Phi3VError, Pipeline, Stream, Timings
from phi3v.download import (
    DEFAULT_MODEL,
    MODELS,
    DownloadProgress,
    download_model,
    is_complete,
    model_folder,
)

log = logging.getLogger("phi3v.app")

APP_DIR = Path(__file__).resolve().parent
DATA_DIR = APP_DIR / "data"
EXAMPLES_DIR = DATA_DIR / "examples"
AUTH_ENV = "PHI3V_AUTH"  # "user:password", the same as --auth

MAX_FILE_SIZE = "20mb"  # per upload; bigger files are refused before they reach the model
QUEUE_SIZE = 16  # requests waiting for the model; more are turned away with a message
TICK_SECONDS = 0.5  # how often the status line moves while no text arrives
UPDATE_SECONDS = 0.1  # at least this long between page updates while text streams in
DEFAULT_MAX_NEW_TOKENS = 512
ERROR_MARK = "⚠"  # an assistant message starting with this is an error, not an answer
GENERIC_NUM_CROPS = 16  # the slider's value until a model tells its own


# --- chat history -> model input -----------------------------------------------------------------


def message_parts(content: object) -> tuple[str, list[str]]:
    """The text and the file paths of one Chatbot message, whatever shape Gradio gave it.

    Gradio 6 hands handlers ``[{"type": "text", "text": ...}, {"type": "file", "file":
    {"path": ...}}]``; values built in Python may also be a string or ``{"path": ...}``.
    """
    items = content if isinstance(content, list) else [content]
    texts: list[str] = []
    files: list[str] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(item.get("text") or "")
        elif isinstance(item, dict) and isinstance(item.get("file"), dict):
            files.append(item["file"]["path"])
        elif isinstance(item, dict) and "path" in item:
            files.append(item["path"])
    return "\n".join(text for text in texts if text), files


def _is_note(message: dict) -> bool:
    """A message with a metadata title is shown to the user, never given to the model."""
    return bool((message.get("metadata") or {}).get("title"))


def is_error_reply(message: dict) -> bool:
    if message.get("role") != "assistant":
        return False
    text, _ = message_parts(message["content"])
    return text.startswith(ERROR_MARK)


def _turns(history: Sequence[dict]) -> list[tuple[list[dict], list[dict]]]:
    """Group the history into (user messages, assistant messages) turns, notes left out."""
    turns: list[tuple[list[dict], list[dict]]] = []
    for message in history:
        role = message.get("role")
        if _is_note(message) or role not in ("user", "assistant"):
            continue
        if role == "user" and (not turns or turns[-1][1]):
            turns.append(([], []))
        if not turns:  # an assistant message before any user message: nothing to pair it with
            continue
        turns[-1][0 if role == "user" else 1].append(message)
    return turns


def conversation(history: Sequence[dict]) -> tuple[list[dict[str, str]], list[str]]:
    """Chatbot history -> (phi3v messages, the image paths of the whole conversation).

    Images are numbered in the order they were sent, over the whole conversation; each user
    turn starts with the tags of the images it brought (``<|image_3|>\\n<|image_4|>\\n...``).
    A turn answered with an error is left out, its images too, so one bad upload does not
    break the rest of the chat.
    """
    messages: list[dict[str, str]] = []
    images: list[str] = []
    for user, replies in _turns(history):
        if any(is_error_reply(reply) for reply in replies):
            continue
        parts = [message_parts(message["content"]) for message in user]
        text = "\n".join(part_text for part_text, _ in parts if part_text)
        files = [path for _, part_files in parts for path in part_files]
        if not text and not files:
            continue
        first = len(images) + 1
        tags = "".join(f"<|image_{n}|>\n" for n in range(first, first + len(files)))
        images.extend(files)
        messages.append({"role": "user", "content": tags + typed_text(text)})
        answer = "\n".join(message_parts(reply["content"])[0] for reply in replies)
        if answer:
            messages.append({"role": "assistant", "content": answer})
    return messages, images


# A zero-width space after "<|" keeps a typed "<|image_N|>" from being read as an image tag:
# in the app, tags come from the uploads only (issue 9 item 7).
_TYPED_TAG = re.compile(r"<\|(?=image_\d+\|>)")


def typed_text(text: str) -> str:
    """A visitor's text with any typed ``<|image_N|>`` made plain text for the model."""
    return _TYPED_TAG.sub("<|\u200b", text)


def user_message(text: str, files: Sequence[str]) -> dict:
    """One chat message holding everything a user sent at once: images first, then text."""
    content: list[dict] = [{"path": path} for path in files]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": text}


def error_message(error: BaseException | str) -> dict:
    return assistant_message(f"{ERROR_MARK} {error}")


def without_last_answer(history: Sequence[dict]) -> list[dict]:
    """The history up to the last user message (for Retry)."""
    history = list(history)
    while history and history[-1].get("role") != "user":
        history.pop()
    return history


def generation_options(
    max_new_tokens: float | None,
    temperature: float | None,
    top_p: float | None,
    top_k: float | None,
    num_crops: float | None,
) -> dict:
    """Slider values -> ``Pipeline.stream`` keyword arguments (0 / 1 mean "off" for top-k / -p)."""
    return {
        "max_new_tokens": int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
        "temperature": float(temperature or 0.0),
        "top_p": float(top_p) if top_p and 0 < top_p < 1 else None,
        "top_k": int(top_k) if top_k and top_k >= 1 else None,
        "num_crops": int(num_crops) if num_crops else None,
    }


# --- what the page says --------------------------------------------------------------------------


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"


def _rate(tokens_per_second: float) -> str:
    return f"{tokens_per_second:.0f}" if tokens_per_second >= 100 else f"{tokens_per_second:.1f}"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    minutes, seconds = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def status_line(kind: str, headline: str, *details: str) -> str:
    """The HTML of the line under the chat: an icon for ``kind``, a headline and details.

    kind: "busy" (animated), "live", "done", "stopped" or "error".
    """
    icons = {"busy": "", "live": "●", "done": "✓", "stopped": "■", "error": ERROR_MARK}
    parts = [f"<b>{html.escape(headline)}</b>", *(html.escape(d) for d in details)]
    return (
        f'<div class="status {kind}"><span class="icon">{icons[kind]}</span>'
        + " · ".join(parts)
        + "</div>"
    )


def context_detail(prompt_tokens: int, answer_tokens: int, context: int) -> str:
    used = prompt_tokens + answer_tokens
    return (
        f"prompt {prompt_tokens:,} tokens · context {used:,} / {context:,} ({used / context:.1%})"
    )


def reading_status(images: int, prompt_tokens: int, context: int, elapsed: float) -> str:
    """While the model reads the images and the prompt, before the first token."""
    what = f"Reading {_count(images, 'image')}" if images else "Reading the prompt"
    return status_line(
        "busy", f"{what}… {_seconds(elapsed)}", context_detail(prompt_tokens, 0, context)
    )


def answer_status(
    timings: Timings, prompt_tokens: int, answer_tokens: int, context: int, stop_reason: str | None
) -> str:
    """While the answer streams (``stop_reason`` None) and once it is complete."""
    details = [
        f"first token {_seconds(timings.time_to_first_token)}",
        f"{_rate(timings.decode_tokens_per_second)} tokens/s",
        f"{_count(answer_tokens, 'token')}",
        context_detail(prompt_tokens, answer_tokens, context),
    ]
    if stop_reason is None:
        return status_line("live", "Answering", *details)
    if stop_reason == "length":
        return status_line("done", "Done (reached the max new tokens)", *details)
    if stop_reason == "cancelled":
        return status_line("stopped", "Stopped", *details)
    return status_line("done", "Done", *details)


# --- the model: downloaded if needed and loaded once per process, in the background --------------


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of the model's state for the page."""

    phase: str  # "waiting" | "downloading" | "loading" | "ready" | "failed"
    name: str
    folder: Path
    progress: DownloadProgress | None = None
    error: str | None = None
    load_seconds: float = 0.0
    layout: str = ""
    context_length: int = 0
    num_crops: int = 0


class ModelLoader:
    """Gets a model ready once per process, in a background thread, and serves it to handlers.

    With ``model_dir`` the folder is loaded as it is; without, ``root/<model>`` is downloaded
    first when it is incomplete. ``busy`` is held while the model runs an answer, so two
    answers never share the CPU (a stopped answer's model call takes a moment to abort).
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        model: str = DEFAULT_MODEL,
        root: str | Path = DATA_DIR,
    ):
        self.name = model
        self.root = Path(root)
        self.download = model_dir is None
        self.folder = Path(model_dir) if model_dir is not None else model_folder(model, root)
        self.pipeline: Pipeline | None = None
        self.busy = threading.Lock()
        self._phase = "waiting"
        self._progress: DownloadProgress | None = None
        self._error: str | None = None
        self._load_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def start(self) -> ModelLoader:
        """Start (or, after a failure, restart) getting the model ready; returns at once."""
        with self._start_lock:
            if self.ready or (self._thread is not None and self._thread.is_alive()):
                return self
            self._phase, self._error, self._progress = "waiting", None, None
            self._thread = threading.Thread(target=self._run, name="phi3v-load", daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the model is ready or failed; True when it is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.pipeline is not None

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    def status(self) -> ModelStatus:
        pipe = self.pipeline
        config = pipe.config if pipe is not None else None
        return ModelStatus(
            phase="ready" if pipe is not None else self._phase,
            name=self.name if self.download else self.folder.name,
            folder=self.folder,
            progress=self._progress,
            error=self._error,
            load_seconds=self._load_seconds,
            layout=config.layout if config else "",
            context_length=config.context_length if config else 0,
            num_crops=config.num_crops if config else 0,
        )

    def _run(self) -> None:
        try:
            if self.download and not is_complete(self.folder):
                self._phase = "downloading"
                log.info("downloading %s into %s", self.name, self.folder)
                download_model(self.name, self.root, progress=self._on_progress)
            self._phase = "loading"
            log.info("loading the model from %s", self.folder)
            started = time.perf_counter()
            pipeline = Pipeline.load(self.folder)
            self._load_seconds = time.perf_counter() - started
            self.pipeline = pipeline
            self._phase = "ready"
            log.info("model ready (%.1f s)", self._load_seconds)
        except Phi3VError as err:
            self._fail(str(err))
        except Exception as err:  # the page must stay up and say what happened
            log.exception("loading the model failed")
            self._fail(f"{type(err).__name__}: {err}")

    def _fail(self, message: str) -> None:
        print(f"error: the model is not available: {message}", file=sys.stderr, flush=True)
        self._error = message
        self._phase = "failed"

    def _on_progress(self, progress: DownloadProgress) -> None:
        self._progress = progress


def model_panel(status: ModelStatus) -> str:
    """The HTML of the model box at the top of the page."""
    name = html.escape(status.name)
    if status.phase == "ready":
        return (
            '<div class="model ready"><b>✓ Model ready:</b> '
            f"{name} · {html.escape(status.layout)} layout · "
            f"{status.context_length:,}-token context · loaded in {status.load_seconds:.1f} s"
            '<div class="hint">On a small CPU the first answer about an image takes up to a '
            "minute while the model reads it; lower <i>Image detail</i> under Parameters for "
            "faster, coarser reading.</div></div>"
        )
    if status.phase == "failed":
        return (
            f'<div class="model failed"><b>{ERROR_MARK} The model is not available.</b> '
            f"{html.escape(status.error or '')}"
            '<div class="hint">The page keeps running: fix the problem, then press '
            "<i>Try again</i> or restart the app.</div></div>"
        )
    if status.phase == "downloading":
        return _download_panel(name, status.progress)
    if status.phase == "loading":
        return (
            f'<div class="model busy"><b>Loading {name}…</b> '
            "this takes a few seconds; the chat opens when the model is ready.</div>"
        )
    return f'<div class="model busy"><b>Preparing {name}…</b></div>'


def _download_panel(name: str, progress: DownloadProgress | None) -> str:
    if progress is None or progress.total <= 0:
        return (
            f'<div class="model busy"><b>Downloading {name}…</b> (first launch only) '
            "starting. The chat opens when the model is ready.<progress></progress></div>"
        )
    share = progress.done / progress.total
    details = [f"{_bytes(progress.done)} of {_bytes(progress.total)} ({share:.0%})"]
    if progress.speed > 0:
        details.append(f"{_bytes(progress.speed)}/s")
    if progress.eta is not None:
        details.append(f"about {_duration(progress.eta)} left")
    current = (
        f"{html.escape(progress.filename)}: {_bytes(progress.file_done)} of "
        f"{_bytes(progress.file_total)}"
    )
    return (
        f'<div class="model busy"><b>Downloading {name}</b> (first launch only) · '
        + " · ".join(details)
        + f'<progress value="{progress.done}" max="{progress.total}"></progress>'
        + f'<div class="hint">{current}. The chat opens when the model is ready.</div></div>'
    )


# --- one answer ----------------------------------------------------------------------------------


def follow(
    stream: Stream,
    release: Callable[[], None],
    tick: float = TICK_SECONDS,
    stop: threading.Event | None = None,
    min_interval: float = UPDATE_SECONDS,
) -> Iterator[str]:
    """Run ``stream`` in a worker thread; yield the text that arrived since the last yield.

    Yields "" when ``tick`` seconds pass without text, so the caller can refresh a clock during
    the long wait for the first token (the vision model and the prompt run in one call), and
    so Gradio, which cancels a handler between two yields, never waits on that call. Text that
    arrives faster than one yield per ``min_interval`` is gathered into one (a browser
    re-renders the whole answer on each update). Setting ``stop`` or closing this generator
    ends it at once and cancels the stream, which aborts the model call the worker is in (even
    the long first one); the worker then closes the stream (freeing its KV cache) and calls
    ``release``. Errors from the stream are raised here.
    """
    stop = stop or threading.Event()
    gone = threading.Event()  # this generator was closed
    arrived: queue.SimpleQueue = queue.SimpleQueue()
    finished = object()

    def pump() -> None:
        try:
            for delta in stream:
                arrived.put(delta)
                if stop.is_set() or gone.is_set():
                    break
            arrived.put(finished)
        except BaseException as err:  # handed over to the consumer
            arrived.put(err)
        finally:
            stream.close()
            release()

    threading.Thread(target=pump, name="phi3v-answer", daemon=True).start()
    last_yield = 0.0
    try:
        while not stop.is_set():
            batch = _gather(arrived, tick, until=last_yield + min_interval)
            text = "".join(item for item in batch if isinstance(item, str))
            end = next((item for item in batch if not isinstance(item, str)), None)
            if text or end is None:
                last_yield = time.monotonic()
                yield text
            if isinstance(end, BaseException):
                raise end
            if end is not None:
                return
    finally:
        gone.set()
        stream.cancel()  # thread-safe; a no-op for a stream that has already ended


def _gather(arrived: queue.SimpleQueue, tick: float, until: float) -> list:
    """The items that arrive within ``tick`` seconds and then up to time ``until``; the wait
    ends early at a non-text item (the end of the stream or its error)."""
    try:
        batch = [arrived.get(timeout=tick)]
    except queue.Empty:
        return []
    while isinstance(batch[-1], str):
        try:
            batch.append(arrived.get(timeout=max(until - time.monotonic(), 0)))
        except queue.Empty:
            break
    return batch


def respond(
    loader: ModelLoader,
    history: list[dict] | None,
    max_new_tokens: float | None = DEFAULT_MAX_NEW_TOKENS,
    temperature: float | None = 0.0,
    top_p: float | None = 1.0,
    top_k: float | None = 0,
    num_crops: float | None = None,
    stop: threading.Event | None = None,
    conversation_key: str | None = None,
) -> Iterator[tuple[list[dict], str]]:
    """Answer the last user message of ``history``; yields (chat history, status line).

    Setting ``stop`` ends the answer within a token; the last yield then says "Stopped".
    ``conversation_key`` (the browser session) scopes the engine's KV-cache reuse, so one
    visitor's cached prompt never speeds up (and so never reveals itself to) another.
    """
    stop = stop or threading.Event()
    if stop.is_set():  # stopped (or cleared) while waiting in the queue: leave the chat alone
        yield gr.skip(), status_line("stopped", "Stopped")
        return
    history = list(history or [])
    messages, images = conversation(history)
    if not messages or messages[-1]["role"] != "user":
        yield history, ""
        return
    pipe = loader.pipeline
    if pipe is None:
        reason = {"downloading": "is still downloading", "failed": "could not be loaded"}
        phase = loader.status().phase
        text = f"The model {reason.get(phase, 'is still loading')}; see the box at the top."
        yield [*history, error_message(text)], status_line("error", "Not answered")
        return
    yield history, status_line("busy", f"Preparing {_count(len(images), 'image')}…")
    options = generation_options(max_new_tokens, temperature, top_p, top_k, num_crops)
    try:
        stream = pipe.stream(messages, images, conversation=conversation_key, **options)
    except Phi3VError as err:
        yield [*history, error_message(err)], status_line("error", "Not answered")
        return
    yield from _stream_answer(loader, stream, history, len(images), stop)


def _stream_answer(
    loader: ModelLoader, stream: Stream, history: list[dict], images: int, stop: threading.Event
) -> Iterator[tuple[list[dict], str]]:
    context = loader.pipeline.config.context_length
    prompt_tokens = len(stream.input_ids)
    started = time.monotonic()
    while not loader.busy.acquire(timeout=TICK_SECONDS):  # only after a Stop: see ModelLoader
        if stop.is_set():
            stream.close()
            yield history, status_line("stopped", "Stopped before the first token")
            return
        waited = _seconds(time.monotonic() - started)
        yield history, status_line("busy", f"Waiting for the previous answer to stop… {waited}")
    text = ""
    try:
        with closing(follow(stream, loader.busy.release, TICK_SECONDS, stop)) as deltas:
            for delta in deltas:
                text += delta
                if not stream.token_ids:
                    elapsed = time.monotonic() - started
                    yield history, reading_status(images, prompt_tokens, context, elapsed)
                    continue
                status = answer_status(
                    stream.timings, prompt_tokens, len(stream.token_ids), context, None
                )
                yield [*history, assistant_message(text)], status
    except Phi3VError as err:
        yield [*history, error_message(err)], status_line("error", "Not answered")
        return
    except Exception as err:  # never a traceback in the chat; the log has it
        log.exception("generation failed")
        message = f"Internal error ({type(err).__name__}: {err}); the server log has details."
        yield [*history, error_message(message)], status_line("error", "Not answered")
        return
    if stop.is_set() and not text:
        yield history, status_line("stopped", "Stopped before the first token")
        return
    reason = "cancelled" if stop.is_set() else stream.stop_reason
    answer = text or "_(The model ended its answer without any text.)_"
    status = answer_status(stream.timings, prompt_tokens, len(stream.token_ids), context, reason)
    yield [*history, assistant_message(answer)], status


class StopSwitches:
    """Stop requests per browser session, and a way to wait until that session's answer ended.

    Stop sets a flag the answer checks between tokens, so the answer itself shows the final
    "Stopped" line (a Gradio cancel would race with it). A flag is armed when a message is
    sent, so a Stop pressed while the answer still waits in the queue is not lost.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}
        self._running: dict[str, threading.Event] = {}

    def arm(self, session: str) -> None:
        with self._lock:
            self._stops[session] = threading.Event()

    def begin(self, session: str) -> threading.Event:
        """An answer starts: returns its stop flag (already set if Stop came first)."""
        with self._lock:
            self._running[session] = threading.Event()
            return self._stops.setdefault(session, threading.Event())

    def end(self, session: str, stop: threading.Event) -> None:
        with self._lock:
            if self._stops.get(session) is stop:
                del self._stops[session]
            if (done := self._running.pop(session, None)) is not None:
                done.set()

    def pending(self, session: str) -> bool:
        """True from a message sent until its answer ended."""
        with self._lock:
            return session in self._stops

    def stop(self, session: str) -> None:
        with self._lock:
            if (flag := self._stops.get(session)) is not None:
                flag.set()

    def stop_and_wait(self, session: str, timeout: float = 10.0) -> None:
        """Stop the session's answer and wait (at most ``timeout``) until it sent its last words."""
        self.stop(session)
        with self._lock:
            done = self._running.get(session)
        if done is not None:
            done.wait(timeout)


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or ""


# --- the page ------------------------------------------------------------------------------------

HEADER = """\
# Phi-3 Vision on CPU
Ask questions about pictures: charts, screenshots, photos, several at once. Microsoft's
Phi-3 Vision runs here on this machine's CPU with onnxruntime; your images stay on this server.
"""

PLACEHOLDER = """\
**Drop, paste or attach one or more images below and ask about them**, or pick an example.
Later questions can refer back to earlier images.
"""

CSS = """
#model-panel .model { padding: 10px 14px; border-radius: 8px; font-size: 0.95em; }
#model-panel .model.busy { background: var(--color-accent-soft); }
#model-panel .model.ready { background: var(--background-fill-secondary); }
#model-panel .model.failed { background: #fdecea; color: #8a1c12; }
#model-panel .hint { margin-top: 4px; font-size: 0.9em; opacity: 0.8; }
#model-panel progress { display: block; width: 100%; height: 10px; margin-top: 8px;
                       accent-color: var(--color-accent); }
#status { min-height: 1.7em; }
#chat img { max-height: 220px; width: auto; object-fit: contain; }
#status .status { font-size: 0.9em; color: var(--body-text-color-subdued);
                  font-variant-numeric: tabular-nums; }
#status .status b { color: var(--body-text-color); }
#status .icon { display: inline-block; width: 1.2em; }
#status .live .icon { color: #16a34a; }
#status .done .icon { color: #16a34a; }
#status .stopped .icon { color: #b45309; }
#status .error .icon { color: #b91c1c; }
#status .busy .icon::before {
  content: ""; display: inline-block; width: 0.75em; height: 0.75em;
  border: 2px solid currentColor; border-right-color: transparent; border-radius: 50%;
  animation: phi3v-spin 0.8s linear infinite; vertical-align: -1px;
}
@keyframes phi3v-spin { to { transform: rotate(360deg); } }
"""

EXAMPLES = [
    {
        "text": "Which month had the most rain, and how much was it?",
        "files": [str(EXAMPLES_DIR / "bar_chart.png")],
    },
    {"text": "Describe this picture in two sentences.", "files": [str(EXAMPLES_DIR / "scene.png")]},
    {
        "text": "What can the user do on this screen? List the controls.",
        "files": [str(EXAMPLES_DIR / "sign_in.png")],
    },
    {
        "text": "What does each of these two images show?",
        "files": [str(EXAMPLES_DIR / "scene.png"), str(EXAMPLES_DIR / "bar_chart.png")],
    },
]


def add_message(history: list[dict] | None, message: dict | None) -> tuple[list[dict], dict]:
    """Put what the user sent into the chat and lock the input until the answer is done."""
    history = list(history or [])
    text = ((message or {}).get("text") or "").strip()
    files = list((message or {}).get("files") or [])
    if text or files:
        history.append(user_message(text, files))
    return history, gr.MultimodalTextbox(value=None, interactive=False)


def build_demo(loader: ModelLoader) -> gr.Blocks:
    """The whole page. ``loader`` provides the model (start it before or after building)."""

    def refresh():
        status = loader.status()
        ready, failed = status.phase == "ready", status.phase == "failed"
        return (
            model_panel(status),
            gr.MultimodalTextbox(interactive=ready, placeholder=_input_placeholder(status)),
            gr.Slider(value=status.num_crops) if ready else gr.Slider(),
            gr.Timer(active=not (ready or failed)),
            gr.Button(visible=failed),
        )

    def restart_loading():
        loader.start()
        return gr.Timer(active=True), gr.Button(visible=False)

    switches = StopSwitches()

    def send(history, message, request: gr.Request):
        switches.arm(_session(request))
        return add_message(history, message)

    def answer(history, max_new_tokens, temperature, top_p, top_k, num_crops, request: gr.Request):
        session = _session(request)
        stop = switches.begin(session)
        try:
            yield from respond(
                loader,
                history,
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                num_crops,
                stop,
                conversation_key=session,
            )
        finally:
            switches.end(session, stop)

    def answering_controls():  # the input is locked and Stop works while an answer runs
        return gr.Button(interactive=True)

    def idle_controls():
        return gr.MultimodalTextbox(interactive=loader.ready), gr.Button(interactive=False)

    def after_example(request: gr.Request):
        # Filling the box from an example re-applies its build-time props (Gradio 6); undo that.
        status = loader.status()
        free = loader.ready and not switches.pending(_session(request))
        return gr.MultimodalTextbox(interactive=free, placeholder=_input_placeholder(status))

    def request_stop(request: gr.Request):
        switches.stop(_session(request))

    def retry(history, request: gr.Request):
        session = _session(request)
        switches.stop_and_wait(session)
        switches.arm(session)
        history = without_last_answer(history or [])
        return history, gr.MultimodalTextbox(interactive=False), gr.Button(interactive=True)

    def clear(request: gr.Request):
        switches.stop_and_wait(_session(request))
        return [], "", *idle_controls()

    start = loader.status()
    with gr.Blocks(title="Phi-3 Vision on CPU", analytics_enabled=False) as demo:
        gr.Markdown(HEADER)
        panel = gr.HTML(model_panel(start), elem_id="model-panel")
        load_again = gr.Button("Try again", size="sm", visible=False)
        chatbot = gr.Chatbot(
            show_label=False,
            height=520,
            placeholder=PLACEHOLDER,
            buttons=["copy", "copy_all"],
            feedback_options=None,
            elem_id="chat",
        )
        chat_input = gr.MultimodalTextbox(
            show_label=False,
            placeholder=_input_placeholder(start),
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            interactive=start.phase == "ready",
            max_plain_text_length=100_000,  # long pasted text stays text, not a .txt upload
            elem_id="chat-input",
        )
        with gr.Row(equal_height=True):
            status = gr.HTML("", elem_id="status", scale=1)
            stop_button = gr.Button(
                "■ Stop", size="sm", scale=0, min_width=90, interactive=False, elem_id="stop"
            )
            retry_button = gr.Button("↻ Retry", size="sm", scale=0, min_width=90, elem_id="retry")
            clear_button = gr.Button("✕ Clear", size="sm", scale=0, min_width=90, elem_id="clear")
        with gr.Accordion("Parameters", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(
                    1,
                    4096,
                    value=DEFAULT_MAX_NEW_TOKENS,
                    step=1,
                    label="Max new tokens",
                    info="The answer stops after this many tokens.",
                )
                num_crops = gr.Slider(
                    1,
                    16,
                    value=start.num_crops or GENERIC_NUM_CROPS,
                    step=1,
                    label="Image detail (crops)",
                    info="Tiles of 336 px the model reads per image: fewer is faster, coarser.",
                )
            with gr.Row():
                temperature = gr.Slider(
                    0,
                    2,
                    value=0,
                    step=0.05,
                    label="Temperature",
                    info="0 = greedy: the same answer every time.",
                )
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p", info="1 = off.")
                top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k", info="0 = off.")
        examples = gr.Examples(EXAMPLES, inputs=[chat_input], label="Examples", examples_per_page=8)
        timer = gr.Timer(1.0, active=start.phase not in ("ready", "failed"))

        params = [max_new_tokens, temperature, top_p, top_k, num_crops]
        answering = dict(
            fn=answer,
            inputs=[chatbot, *params],
            outputs=[chatbot, status],
            concurrency_limit=1,  # one model: answers run one at a time, the rest queue
            concurrency_id="model",
            show_progress="full",
            show_progress_on=[chatbot],  # where a waiting user sees their place in the queue
        )
        quiet = dict(api_visibility="private", show_progress="hidden", concurrency_limit=None)
        controls = [chat_input, stop_button]

        sent = chat_input.submit(
            send,
            [chatbot, chat_input],
            [chatbot, chat_input],
            api_name="add_message",
            concurrency_limit=None,
            show_progress="hidden",
        )
        sent.then(answering_controls, None, stop_button, **quiet)
        answer_sent = sent.then(api_name="respond", **answering)
        answer_sent.then(idle_controls, None, controls, **quiet)

        retried = gr.on(
            [retry_button.click, chatbot.retry], retry, [chatbot], [chatbot, *controls], **quiet
        )
        answer_retried = retried.then(api_visibility="private", **answering)
        answer_retried.then(idle_controls, None, controls, **quiet)

        stop_button.click(request_stop, None, None, **quiet)
        gr.on(
            [clear_button.click, chatbot.clear], clear, None, [chatbot, status, *controls], **quiet
        )

        examples.load_input_event.then(after_example, None, chat_input, **quiet)

        watched = [panel, chat_input, num_crops, timer, load_again]
        timer.tick(refresh, None, watched, **quiet)
        demo.load(refresh, None, watched, **quiet)
        load_again.click(restart_loading, None, [timer, load_again], **quiet)
    demo.queue(max_size=QUEUE_SIZE)
    return demo


def _input_placeholder(status: ModelStatus) -> str:
    if status.phase == "ready":
        return "Ask about your images… (drop, paste or attach pictures; Enter sends)"
    if status.phase == "failed":
        return "The model is not available: see the message above."
    return "The chat opens when the model is ready…"


def launch(demo: gr.Blocks, **options):
    """``demo.launch`` with the app's look and upload limit; returns (app, local URL, share URL)."""
    return demo.launch(
        max_file_size=MAX_FILE_SIZE,
        theme=gr.themes.Soft(primary_hue="indigo"),
        css=CSS,
        allowed_paths=[str(EXAMPLES_DIR)],
        **options,
    )


# --- command line --------------------------------------------------------------------------------

EPILOG = f"""\
environment:
  GRADIO_SERVER_NAME  the address to listen on, as --host (0.0.0.0 for every interface)
  GRADIO_SERVER_PORT  the port, as --port
  {AUTH_ENV}          user:password for basic auth, as --auth
  HF_ENDPOINT, HF_TOKEN  where the model is downloaded from (see download_models.py)

Without --model-dir the model set is downloaded into data/<NAME> on first launch (resumable,
sha256-verified); the page shows the progress and opens the chat when the model is loaded.
"""


def parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD, for example --auth ada:s3cret")
    return user, password


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Chat with Phi-3 Vision about images, in the browser, on the CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        metavar="DIR",
        help="a model folder to load as it is (either export layout); nothing is downloaded",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=sorted(MODELS),
        metavar="NAME",
        help=f"the model set to download and use: {', '.join(MODELS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="also serve on a temporary public *.gradio.live link (needs internet access)",
    )
    parser.add_argument(
        "--host", help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, help="port (default: $GRADIO_SERVER_PORT or the first free from 7860)"
    )
    parser.add_argument(
        "--auth",
        type=parse_auth,
        metavar="USER:PASSWORD",
        default=os.environ.get(AUTH_ENV) or None,
        help=f"require this login (default: ${AUTH_ENV}); recommended with --share",
    )
    args = parser.parse_args(argv)
    if isinstance(args.auth, str):  # came from the environment, unparsed
        try:
            args.auth = parse_auth(args.auth)
        except argparse.ArgumentTypeError as err:
            parser.error(f"{AUTH_ENV}: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("phi3v").setLevel(logging.INFO)
    loader = ModelLoader(args.model_dir, args.model).start()
    demo = build_demo(loader)
    if args.share and not args.auth:
        print("note: anyone with the public link can use this app; add --auth USER:PASSWORD")
    _, local_url, share_url = launch(
        demo,
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        prevent_thread_lock=True,
        quiet=True,
    )
    if args.share and share_url is None and not os.environ.get("SPACE_ID"):
        print(
            "error: --share could not open a public link (no internet, or Gradio's frpc tunnel "
            "binary could not be downloaded: see the message above for where to put it by "
            f"hand). Run without --share to serve only at {local_url}",
            file=sys.stderr,
        )
        demo.close()
        return 1
    print(f"* Running on {local_url}", flush=True)
    if share_url:
        print(f"* Public link: {share_url} (valid for up to a week)", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
