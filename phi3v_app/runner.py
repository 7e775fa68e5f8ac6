"""The one answer runner: a question, through the model's turn, to typed events.

Every answer the server gives (the chat, its ``/chat`` API, the OpenAI-compatible endpoint) runs
here, the same way::

    Runner.start(Question)      -> an Answer; a worker thread:
        takes the model's turn (ModelTurns; its place in line is told as it changes)
        -> Pipeline.stream inside the turn (bad input is refused before any model runs)
        -> hands the text deltas over, and the end (or the error)
    Answer.events()             -> Queued(ahead) while it waits,
                                   Reading(progress) while the model reads the prompt,
                                   Delta(text) as words arrive,
                                   then one of Finished / Stopped / Failed
    Answer.cancel()             -> from any thread: a waiting answer leaves the line, a running
                                   one is cancelled (Stream.cancel aborts even the long first
                                   model call)

The events are plain frozen dataclasses: a consumer learns what happened from their type, never
from display text. The chat (:mod:`phi3v_app.chat`) renders them as chat history and the status
line; the OpenAI endpoint (:mod:`phi3v_app.openai_api`) as OpenAI's chunks and errors. Nothing
here imports Gradio or FastAPI.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from phi3v import ImageError, LimitError, Phi3VError, Pipeline, Progress, Stream, Timings
from phi3v_app.turns import ModelTurns, QueueFull, TurnCancelled

log = logging.getLogger("phi3v.app")

TICK_SECONDS = 0.25  # the longest an events() consumer waits without an event (clocks, polls)


@dataclass(frozen=True)
class Usage:
    """Tokens of the prompt and of the answer so far."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Queued:
    """The answer waits for the model: ``ahead`` requests are served first (0: about to start)."""

    ahead: int


@dataclass(frozen=True)
class Reading:
    """The model has the turn and reads the prompt (its images first); no word yet.

    ``elapsed`` counts from the turn; ``estimate`` is this machine's measured time to the first
    token for this prompt, once it has timed one."""

    progress: Progress
    elapsed: float
    estimate: float | None


@dataclass(frozen=True)
class Piece:
    """Text as the stream gave it, and the number of answer tokens generated with it."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Delta:
    """New text of the answer (possibly several tokens' worth), with the counts so far.

    ``pieces`` are the parts of ``text`` as the model gave them, each with the number of answer
    tokens generated once it was there (so a stop sequence found in the middle of a Delta is
    counted up to its own token, not to the Delta's last)."""

    text: str
    usage: Usage
    timings: Timings
    pieces: tuple[Piece, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The answer is complete: ``reason`` "eos" (the model ended it) or "length" (max tokens)."""

    reason: Literal["eos", "length"]
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Stopped:
    """The answer was cancelled (Stop, a caller gone) after ``usage.completion_tokens`` tokens."""

    usage: Usage
    timings: Timings


FailureKind = Literal["not_ready", "busy", "too_large", "bad_image", "bad_input", "internal"]


@dataclass(frozen=True)
class Failed:
    """The question was not answered. ``reason`` is the cause in words (a library's message,
    fit to show); each consumer words the failure for its audience by ``kind``."""

    kind: FailureKind
    reason: str


Event = Queued | Reading | Delta | Finished | Stopped | Failed
END_EVENTS = (Finished, Stopped, Failed)


@dataclass(frozen=True)
class Question:
    """What to answer: phi3v messages, their images (paths or bytes), ``Pipeline.stream``
    options, and the conversation whose KV cache it may continue (and keep, with ``remember``)."""

    messages: list[dict[str, str]]
    images: Sequence[Any]
    options: dict[str, Any] = field(default_factory=dict)
    conversation: Hashable | None = None
    remember: bool = True


class Runner:
    """Starts answers over the loaded pipeline, one at a time through ``turns``."""

    def __init__(self, pipeline: Callable[[], Pipeline | None], turns: ModelTurns):
        self.pipeline, self.turns = pipeline, turns

    def start(self, question: Question, stop: threading.Event | None = None) -> Answer:
        """Start answering ``question`` in a worker thread; setting ``stop`` (or
        :meth:`Answer.cancel`) ends it."""
        return Answer(self, question, stop or threading.Event())


_TURN = object()  # the worker's note: the model's turn has come
_END = object()  # ... the stream has ended


class Answer:
    """One answer in progress: read :meth:`events`, :meth:`cancel` from any thread."""

    def __init__(self, runner: Runner, question: Question, stop: threading.Event):
        self.stop = stop
        self._stream: Stream | None = None
        self._arrived: queue.SimpleQueue = queue.SimpleQueue()
        pipe = runner.pipeline()
        if pipe is None:
            self._arrived.put(Failed("not_ready", "the model is not loaded yet"))
            return
        worker = threading.Thread(
            target=self._work, args=(pipe, runner.turns, question), name="phi3v-answer"
        )
        worker.daemon = True
        worker.start()

    def cancel(self) -> None:
        """End the answer as soon as it can: it leaves the line, or its model call is aborted."""
        self.stop.set()
        if (stream := self._stream) is not None:
            stream.cancel()  # thread-safe; aborts the model call in progress

    def events(self, tick: float = TICK_SECONDS, every: float = 0.0) -> Iterator[Event]:
        """The answer's events, until one of Finished / Stopped / Failed.

        At least every ``tick`` seconds an event comes (Queued or Reading while no text
        arrives), so a consumer can keep a clock and look whether its caller is still there.
        Text arriving within ``every`` seconds of the last Delta joins the next one.
        """
        ahead, turn_at, last_delta = 0, None, 0.0
        while True:
            try:
                item = self._arrived.get(timeout=tick)
            except queue.Empty:
                yield self._progress(ahead, turn_at)
                continue
            if isinstance(item, Queued):
                ahead = item.ahead
                yield item
            elif item is _TURN:
                turn_at = time.monotonic()
            elif isinstance(item, Piece):
                pieces = (item, *self._more_text(until=last_delta + every))
                last_delta = time.monotonic()
                text = "".join(piece.text for piece in pieces)
                usage = Usage(len(self._stream.input_ids), pieces[-1].tokens)
                yield Delta(text, usage, self._stream.timings, pieces)
            else:
                yield self._end(item)
                return

    # --- the worker thread -------------------------------------------------------------------

    def _work(self, pipe: Pipeline, turns: ModelTurns, question: Question) -> None:
        try:
            with turns.turn(cancelled=self.stop, waiting=self._queued):
                self._arrived.put(_TURN)
                self._stream = pipe.stream(
                    question.messages,
                    list(question.images),
                    conversation=question.conversation,
                    remember=question.remember,
                    **question.options,
                )
                if self.stop.is_set():
                    self._stream.cancel()
                try:
                    for delta in self._stream:  # counted here: the stream is ahead later
                        self._arrived.put(Piece(delta, len(self._stream.token_ids)))
                finally:
                    self._stream.close()  # frees or keeps its KV cache before the next turn
            self._arrived.put(_END)
        except BaseException as err:  # handed to the consumer, which says what happened
            self._arrived.put(err)

    def _queued(self, ahead: int) -> None:
        self._arrived.put(Queued(ahead))

    # --- reading what the worker handed over --------------------------------------------------

    def _more_text(self, until: float) -> list[Piece]:
        """Text that arrives before time ``until`` (stops early at a non-text item)."""
        more: list[Piece] = []
        while (wait := until - time.monotonic()) > 0:
            try:
                item = self._arrived.get(timeout=wait)
            except queue.Empty:
                break
            if not isinstance(item, Piece):
                self._arrived.put(item)  # nothing else is queued behind an end
                break
            more.append(item)
        return more

    def _progress(self, ahead: int, turn_at: float | None) -> Event:
        stream = self._stream
        if turn_at is None:
            return Queued(ahead)
        elapsed = time.monotonic() - turn_at
        if stream is None:  # the turn is ours: the prompt and its pictures are being prepared
            return Reading(Progress("preprocess"), elapsed, None)
        return Reading(stream.progress, elapsed, stream.estimated_first_token)

    def _usage(self) -> Usage:
        stream = self._stream
        if stream is None:
            return Usage()
        return Usage(len(stream.input_ids), len(stream.token_ids))

    def _end(self, item: object) -> Event:
        stream = self._stream
        timings = stream.timings if stream is not None else Timings()
        if item is _END and stream is not None and stream.stop_reason in ("eos", "length"):
            return Finished(stream.stop_reason, self._usage(), timings)
        if item is _END or isinstance(item, TurnCancelled) or self.stop.is_set():
            return Stopped(self._usage(), timings)
        return failure(item)


def failure(error: BaseException) -> Failed:
    """What went wrong, as a :class:`Failed` event; the log gets one line for bad input, a
    traceback for a fault of the server."""
    if isinstance(error, Failed):
        return error
    if isinstance(error, QueueFull):
        log.warning("turned away: %s", error)
        return Failed("busy", str(error))
    if isinstance(error, Phi3VError):
        log.warning("refused request: %s", error)
        if isinstance(error, LimitError):
            return Failed("too_large", str(error))
        return Failed("bad_image" if isinstance(error, ImageError) else "bad_input", str(error))
    log.error("answer failed: %s: %s", type(error).__name__, error, exc_info=error)
    return Failed("internal", f"{type(error).__name__}: {error}")
