"""The app reads its example cards ahead of time, and never keeps a visitor waiting for that;
then it times each card's first words on this machine."""

import subprocess
import sys
import threading
from pathlib import Path

from phi3v_app.chat import Answers, generation_options
from phi3v_app.history import user_message
from phi3v_app.loading import ModelLoader
from phi3v_app.page import EXAMPLES, EXAMPLES_DIR
from phi3v_app.turns import ModelTurns
from tests.app_helpers import LOAD_TIMEOUT_S, ready_loader, wait_until

REPO = Path(__file__).resolve().parent.parent
CARDS = [(text, [str(EXAMPLES_DIR / name) for name in names]) for text, names in EXAMPLES]


def recorded_streams(pipe, monkeypatch) -> list:
    """Every stream the app starts on ``pipe``, kept so its reuse can be read."""
    streams, real_stream = [], pipe.stream

    def recording_stream(*args, **kwargs):
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(pipe, "stream", recording_stream)
    return streams


def click_card(runner: Answers, session: str, card) -> None:
    """What the page does when ``session`` clicks ``card``, at the page's default settings."""
    text, pictures = card
    crops = runner.loader.status().num_crops  # the image-detail slider's value once loaded
    options = generation_options(8, 0, 1, 0, crops)
    ticket = runner.begin(session)
    for _ in runner.events(ticket, [user_message(text, pictures)], options, session):
        pass


def test_an_examples_first_answer_reuses_the_prefix_warmed_after_start_up(
    tiny_model_dir, monkeypatch
):
    turns = ModelTurns(4)
    loader = ModelLoader(tiny_model_dir).start()
    warming = loader.warm_examples(turns, CARDS)
    warming.join(LOAD_TIMEOUT_S)
    assert not warming.is_alive()
    streams = recorded_streams(loader.pipeline, monkeypatch)
    click_card(Answers(loader, turns), "a visitor", CARDS[0])
    (stream,) = streams
    assert stream.stop_reason is not None and stream.stop_reason != "cancelled"
    assert stream.reused_tokens == len(stream.input_ids)  # the whole prompt, logits and all


def test_a_visitor_who_comes_during_the_warm_up_gets_the_model_first(tiny_model_dir, monkeypatch):
    loader = ready_loader(tiny_model_dir)
    pipe = loader.pipeline
    turns = ModelTurns(4)
    real_run = pipe.sessions.decoder.run_with_iobinding
    inside = threading.Event()

    def long_first_prefill(binding, run_options=None):  # a model call that only a cancel ends
        if not inside.is_set():
            inside.set()
            wait_until(lambda: run_options.terminate, timeout=LOAD_TIMEOUT_S)
        return real_run(binding, run_options)

    monkeypatch.setattr(pipe.sessions.decoder, "run_with_iobinding", long_first_prefill)
    warming = loader.warm_examples(turns, CARDS[:1])
    assert inside.wait(LOAD_TIMEOUT_S)  # the warm-up holds the model, in a long call
    served = threading.Event()
    visitor = threading.Thread(target=take_turn, args=(turns, served), daemon=True)
    visitor.start()
    assert served.wait(LOAD_TIMEOUT_S)  # the warm-up gave the model up
    visitor.join(LOAD_TIMEOUT_S)
    warming.join(LOAD_TIMEOUT_S)  # and read the example once the visitor was done
    assert not warming.is_alive()
    streams = recorded_streams(pipe, monkeypatch)
    click_card(Answers(loader, turns), "a visitor", CARDS[0])
    assert streams[0].reused_tokens == len(streams[0].input_ids)


def take_turn(turns: ModelTurns, served: threading.Event) -> None:
    with turns.turn():
        served.set()


def test_examples_are_untimed_until_read_then_each_has_its_measured_first_token_time(
    tiny_model_dir,
):
    turns = ModelTurns(4)
    loader = ModelLoader(tiny_model_dir)  # not started: no model to read them with
    loader.warm_examples(turns, CARDS).join(LOAD_TIMEOUT_S)
    assert loader.example_seconds == [None] * len(CARDS)
    loader.start()
    warming = loader.warm_examples(turns, CARDS)
    warming.join(LOAD_TIMEOUT_S)
    assert not loader.warming_examples
    assert all(seconds is not None and seconds > 0 for seconds in loader.example_seconds)


def test_an_examples_time_is_that_of_a_real_first_token_from_its_warmed_prefix(
    tiny_model_dir, monkeypatch
):
    loader = ready_loader(tiny_model_dir)
    streams = recorded_streams(loader.pipeline, monkeypatch)
    loader.warm_examples(ModelTurns(4), CARDS[:1]).join(LOAD_TIMEOUT_S)
    (timed,) = streams  # asked once, as a click on the card asks it
    assert timed.reused_tokens == len(timed.input_ids)  # after the warm-up
    assert loader.example_seconds == [timed.timings.time_to_first_token]


EXIT_WHILE_WARMING = """
import sys, time
from phi3v_app.loading import ModelLoader
from phi3v_app.turns import ModelTurns
from tests.test_warm_examples import CARDS

loader = ModelLoader(sys.argv[1]).start()
assert loader.wait(120), loader.status().error
loader.warm_examples(ModelTurns(1), CARDS * 50)  # long enough to be mid-call at exit
time.sleep(1.0)
assert loader.warming_examples, "the examples were read before the exit: nothing was tried"
print("exiting while the examples are read", flush=True)
"""


def test_the_process_exits_cleanly_while_the_examples_are_read(tiny_model_dir):
    """A server stopped during start-up (Ctrl+C while the examples are read ahead) exits with
    its own status. A model call still running as onnxruntime unloads aborts the process
    ("terminate called without an active exception"), so the exit stops the reading first."""
    for _ in range(3):  # each exit lands at another point of the reading
        done = subprocess.run(
            [sys.executable, "-c", EXIT_WHILE_WARMING, str(tiny_model_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert "exiting while" in done.stdout, done.stderr[-2000:]
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
