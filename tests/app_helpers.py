"""Serving the app (phi3v_app) in the test process, on 127.0.0.1 only, and talking to it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gradio_client import Client, handle_file

from phi3v.download import DEFAULT_MODEL, MODELS
from phi3v.testing import build_model as build_tiny_model
from phi3v_app.cli import create_app, launch
from phi3v_app.loading import ModelLoader
from phi3v_app.page import QUEUE_SIZE, ChatApp
from tests.fakehub import FakeHub

LOAD_TIMEOUT_S = 60


def ask(client: Client, text: str, *files: Path, max_new_tokens=64, conversation_id=""):
    """Submit a question (and pictures) to the app's public /chat endpoint at low detail;
    returns the gradio_client job."""
    return client.submit(
        text=text,
        images=[handle_file(str(f)) for f in files],
        max_new_tokens=max_new_tokens,
        num_crops=2,
        conversation_id=conversation_id,
        api_name="/chat",
    )


def record_streams(pipe, monkeypatch) -> list:
    """The pipeline's streams from now on, kept so their public counters can be read."""
    streams = []
    real_stream = pipe.stream

    def recording_stream(*args, **kwargs):
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(pipe, "stream", recording_stream)
    return streams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_demo(loader: ModelLoader, queue_size: int = QUEUE_SIZE) -> Iterator[tuple[str, ChatApp]]:
    """Launch the app for ``loader`` on a free 127.0.0.1 port with ``queue_size`` answers
    allowed to wait; yield (its URL, the app: its page and its line); close it after."""
    app = create_app(loader, queue_size)
    _, url, _ = launch(app, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        yield url, app
    finally:
        app.demo.close()


@contextmanager
def serve(loader: ModelLoader) -> Iterator[str]:
    """Launch the app for ``loader`` on a free 127.0.0.1 port; yield its URL; close it after."""
    with serve_demo(loader) as (url, _):
        yield url


def ready_loader(model_dir: Path) -> ModelLoader:
    loader = ModelLoader(model_dir).start()
    assert loader.wait(LOAD_TIMEOUT_S), loader.status().error
    return loader


def wait_until(condition: Callable[[], object], timeout: float = 30.0, every: float = 0.05):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"not true within {timeout} s: {condition}")


@contextmanager
def first_launch(tmp_path: Path, monkeypatch) -> Iterator[tuple[FakeHub, ModelLoader, dict]]:
    """A loader downloading the default model set from a fake Hub on 127.0.0.1 that serves the
    tiny model in its layout; the download holds after its first bytes until ``hub.hold`` is set.
    Yields (hub, loader started on an empty data folder, the served files)."""
    spec = MODELS[DEFAULT_MODEL]
    source = build_tiny_model(tmp_path / "source", layout=spec.layout)
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    with FakeHub(spec.repo, spec.folder, spec.revision, files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        hub.hold = threading.Event()
        yield hub, ModelLoader(None, DEFAULT_MODEL, tmp_path / "data").start(), files
