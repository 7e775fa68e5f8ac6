"""The model: downloaded if needed and loaded once per process, in a background thread.

The page comes up at once and polls :meth:`ModelLoader.status` for a :class:`ModelStatus`
snapshot: its phase (waiting, downloading, converting, loading, ready, failed) and that phase's
progress. Other parts of the app (the chat, the OpenAI endpoint) take the loaded
:class:`~phi3v.Pipeline` from :attr:`ModelLoader.pipeline`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from phi3v import Phi3VError, Pipeline, Progress
from phi3v.download import (
    DEFAULT_MODEL,
    DownloadProgress,
    download_model,
    is_complete,
    model_folder,
)

log = logging.getLogger("phi3v.app")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # where model sets are downloaded

Phase = Literal["waiting", "downloading", "converting", "loading", "ready", "failed"]
PRECISIONS = ("auto", "exact", "fast")


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
            context_length=config.context_length if config else 0,
            num_crops=config.num_crops if config else 0,
        )

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
                self.folder, precision=self.precision, progress=self._on_conversion
            )
            self._load_seconds = time.perf_counter() - started
            self.pipeline = pipeline
            self._phase = "ready"
            log.info("model ready in %s precision (%.1f s)", pipeline.precision, self._load_seconds)
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
