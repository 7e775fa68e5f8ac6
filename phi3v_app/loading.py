"""The model: downloaded if needed and loaded once per process, in a background thread.

The page comes up at once and polls :meth:`ModelLoader.status` for a :class:`ModelStatus`
snapshot: its phase (waiting, downloading, converting, loading, ready, failed) and that phase's
progress. Other parts of the app (the chat, the OpenAI endpoint) take the loaded
:class:`~phi3v.Pipeline` from :attr:`ModelLoader.pipeline`.

Once the model is ready, :meth:`ModelLoader.warm_examples` reads the example cards' pictures and
questions ahead of time (:meth:`~phi3v.Pipeline.warm`), so an example answers at once, and times
each one's first words (:attr:`ModelLoader.example_seconds`, shown on its card). It uses the
model only while no visitor holds or waits for it.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from phi3v import Phi3VError, Pipeline, Progress, Stream
from phi3v.download import (
    DEFAULT_MODEL,
    DownloadProgress,
    download_model,
    is_complete,
    model_folder,
)
from phi3v.huge_pages import wanted as huge_pages_wanted
from phi3v_app.history import conversation, user_message
from phi3v_app.turns import ModelTurns, QueueFull

log = logging.getLogger("phi3v.app")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # where model sets are downloaded

Phase = Literal["waiting", "downloading", "converting", "loading", "ready", "failed"]
# How often the warm-up looks whether a visitor wants the model: the longest a visitor waits
# behind it (plus the model call being aborted).
WARM_POLL_SECONDS = 0.1
WARM_STOP_SECONDS = 10.0  # at most this long at exit for an aborted model call to return
Example = tuple[str, Sequence[str | Path]]  # a question and its pictures, as on a card


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of the model's state for the page."""

    phase: Phase
    name: str
    folder: Path
    progress: DownloadProgress | None = None  # while downloading
    conversion: Progress | None = None  # while making the fast-precision copies
    error: str | None = None
    load_seconds: float = 0.0
    precision: str = ""  # "exact" or "fast" once loaded
    precision_reason: str = ""  # why, with the fast copies' self-check where there is one
    context_length: int = 0
    num_crops: int = 0


class ModelLoader:
    """Gets a model ready once per process, in a background thread, and serves it to handlers.

    With ``model_dir`` the folder is loaded as it is; without, ``root/<model>`` is downloaded
    first when it is incomplete. ``precision`` is passed to :meth:`Pipeline.load`.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        model: str = DEFAULT_MODEL,
        root: str | Path = DATA_DIR,
        precision: str = "auto",
    ):
        self.name = model
        self.root = Path(root)
        self.download = model_dir is None
        self.folder = Path(model_dir) if model_dir is not None else model_folder(model, root)
        self.precision = precision
        self.pipeline: Pipeline | None = None
        self._phase: Phase = "waiting"
        self._progress: DownloadProgress | None = None
        self._conversion: Progress | None = None
        self._error: str | None = None
        self._load_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Per example given to warm_examples: its measured time to the first token once read
        # ahead (None until timed, or when it could not be read).
        self.example_seconds: list[float | None] = []
        self._warming: threading.Thread | None = None
        self._closing = threading.Event()  # set at exit: the examples' reading stops

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
            conversion=self._conversion,
            error=self._error,
            load_seconds=self._load_seconds,
            precision=pipe.precision if pipe is not None else "",
            precision_reason=pipe.precision_choice.reason if pipe is not None else "",
            context_length=config.context_length if config else 0,
            num_crops=config.num_crops if config else 0,
        )

    def warm_examples(self, turns: ModelTurns, examples: Sequence[Example]) -> threading.Thread:
        """Once the model is ready, read each example's pictures and question ahead of time
        (:meth:`Pipeline.warm`) in a background thread, so that its first answer starts at once;
        then time that first answer.

        The time is measured, not estimated: once every example is read, each is asked once,
        exactly as a click on its card asks it (same prompt, same pictures, the model's default
        detail; a one-off question that keeps nothing), for one token. The pipeline's time to
        that token (preparing the pictures, taking up the warmed cache, reading what is left of
        the prompt, the first step) goes into :attr:`example_seconds`. It leaves out the page's
        own round trip to the server; it is one measurement per example and start, taken after
        all of them were read, so a card whose warmed cache the memory budget dropped again is
        timed as a click on it would find it.

        Visitors never wait behind it: it takes the model's turn in ``turns`` only while nobody
        holds or waits for it, and gives it up (the example is read again later) as soon as
        someone starts waiting. The examples are public, so what is warmed serves everyone.
        Call it after :meth:`start`. Returns the thread; it ends once every example is ready and
        timed, or at once when the model could not be loaded.
        """
        self.example_seconds = [None] * len(examples)
        self._warming = threading.Thread(
            target=self._warm, args=(turns, list(examples)), name="phi3v-warm", daemon=True
        )
        self._warming.start()
        _stop_at_exit(self)
        return self._warming

    def stop_warming(self, timeout: float = WARM_STOP_SECONDS) -> None:
        """Stop reading the examples ahead: the model call in progress is aborted. The process
        calls it as it exits; a model call still running as the runtime's libraries unload ends
        the process with an abort ("terminate called without an active exception")."""
        self._closing.set()
        if self._warming is not None:
            self._warming.join(timeout)

    @property
    def warming_examples(self) -> bool:
        """True while :meth:`warm_examples` still reads or times an example."""
        return self._warming is not None and self._warming.is_alive()

    def _warm(self, turns: ModelTurns, examples: list[Example]) -> None:
        if not self.wait():
            return
        pipe = self.pipeline
        # Each prompt exactly as the chat sends it when the card is clicked.
        prompts = [
            (text, *conversation([user_message(text, [str(path) for path in pictures])]))
            for text, pictures in examples
        ]
        closing = self._closing
        for text, messages, images in prompts:
            _when_free(turns, closing, text, pipe.warm, messages, images)
        for number, (text, messages, images) in enumerate(prompts):
            one_token = dict(max_new_tokens=1, remember=False)
            timed = _when_free(turns, closing, text, pipe.stream, messages, images, **one_token)
            if timed is not None:
                self.example_seconds[number] = timed.timings.time_to_first_token

    def _run(self) -> None:
        try:
            if self.download and not is_complete(self.folder):
                self._phase = "downloading"
                log.info("downloading %s into %s", self.name, self.folder)
                download_model(self.name, self.root, progress=self._on_download)
            self._phase = "loading"
            log.info("loading the model from %s (precision %s)", self.folder, self.precision)
            started = time.perf_counter()
            pipeline = Pipeline.load(
                self.folder,
                precision=self.precision,
                progress=self._on_conversion,
                # a server answers for hours: seconds at start-up for faster decoding
                huge_pages=huge_pages_wanted(default=True),
            )
            self._load_seconds = time.perf_counter() - started
            self.pipeline = pipeline
            self._phase = "ready"
            log.info(
                "model ready in %s precision (%.1f s; %s)",
                pipeline.precision,
                self._load_seconds,
                pipeline.sessions.huge_pages.describe(),
            )
        except Phi3VError as err:
            self._fail(str(err))
        except Exception as err:  # the page must stay up and say what happened
            log.exception("loading the model failed")
            self._fail(f"{type(err).__name__}: {err}")

    def _fail(self, message: str) -> None:
        print(f"error: the model is not available: {message}", file=sys.stderr, flush=True)
        self._error = message
        self._phase = "failed"

    def _on_download(self, progress: DownloadProgress) -> None:
        self._progress = progress

    def _on_conversion(self, progress: Progress) -> None:
        self._conversion = progress
        self._phase = "converting"


def _stop_at_exit(loader: ModelLoader) -> None:
    """Have the process stop ``loader``'s reading of the examples as it exits (it holds no
    reference: a loader that is gone needs nothing)."""
    stop = weakref.WeakMethod(loader.stop_warming)
    atexit.register(lambda: (method := stop()) is not None and method())


def _when_free(
    turns: ModelTurns,
    closing: threading.Event,
    text: str,
    start: Callable[..., Stream],
    *args,
    **options,
) -> Stream | None:
    """Run the stream ``start(*args, **options)`` makes for the example ``text`` to its end
    while nobody holds or waits for the model, again as often as a visitor comes first; None
    when the example cannot be read (it is skipped, not retried) or ``closing`` is set."""
    while not closing.is_set():
        while turns.busy and not closing.is_set():
            time.sleep(WARM_POLL_SECONDS)
        try:
            with turns.turn():
                if closing.is_set():
                    return None
                stream = start(*args, **options)
                if _run_until_wanted(stream, turns, closing):
                    return stream
        except QueueFull:
            pass
        except Exception as err:
            log.warning("example %r not prepared: %s", text, err)
            return None
    return None


def _run_until_wanted(stream: Stream, turns: ModelTurns, closing: threading.Event) -> bool:
    """Run ``stream`` to its end unless someone starts waiting for the model or ``closing`` is
    set: then cancel it (a model call in progress is aborted). True when it ran to its end."""
    done = threading.Event()
    watcher = threading.Thread(
        target=_cancel_when_wanted, args=(stream, turns, closing, done), name="phi3v-warm-watch"
    )
    watcher.start()
    try:
        stream.result()
    finally:
        done.set()
        watcher.join()
    return stream.stop_reason != "cancelled"


def _cancel_when_wanted(
    stream: Stream, turns: ModelTurns, closing: threading.Event, done: threading.Event
) -> None:
    while not done.wait(WARM_POLL_SECONDS):
        if turns.waiting or closing.is_set():
            stream.cancel()
            return
