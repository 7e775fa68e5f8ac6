"""The one answer runner (phi3v_app.runner): a question in, typed events out, on the tiny model.

Every consumer (the chat, /chat, the OpenAI endpoint) learns what happened from these events'
types alone, so each kind of ending is specified here once.
"""

from __future__ import annotations

import threading

import pytest

from phi3v import Pipeline
from phi3v_app import gradio_private
from phi3v_app.runner import Delta, Failed, Finished, Question, Queued, Reading, Runner, Stopped
from phi3v_app.turns import ModelTurns
from tests.app_helpers import wait_until

SHORT = 16
ENDLESS = 20_000  # more tokens than the tiny model writes before a test stops it


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, precision="exact")


def question(text: str, max_new_tokens: int = SHORT) -> Question:
    options = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    return Question([{"role": "user", "content": text}], [], options, remember=False)


def test_an_answer_is_its_deltas_then_finished_with_the_pipelines_text_and_counts(pipe):
    expected = pipe.generate("Hello there.", max_new_tokens=SHORT, temperature=0.0)
    events = list(Runner(lambda: pipe, ModelTurns(4)).start(question("Hello there.")).events())
    *middle, end = events
    deltas = [event for event in middle if isinstance(event, Delta)]
    assert "".join(delta.text for delta in deltas) == expected.text
    assert all(isinstance(event, (Queued, Reading, Delta)) for event in middle)
    assert isinstance(end, Finished)
    assert end.reason == expected.stop_reason
    assert end.usage.prompt_tokens == len(expected.input_ids)
    assert end.usage.completion_tokens == len(expected.token_ids)


def test_an_answer_waiting_in_line_is_told_its_place_and_a_cancel_takes_it_out(pipe):
    turns = ModelTurns(4)
    with turns.turn():  # someone else has the model
        answer = Runner(lambda: pipe, turns).start(question("Wait."))
        events = answer.events()
        assert next(events) == Queued(1)
        answer.cancel()
        end = next(event for event in events if not isinstance(event, Queued))
    assert isinstance(end, Stopped)
    assert end.usage.completion_tokens == 0
    assert turns.waiting == 0


def test_a_cancel_while_answering_stops_with_the_tokens_so_far(pipe):
    turns = ModelTurns(4)
    answer = Runner(lambda: pipe, turns).start(question("Go on.", ENDLESS))
    events = answer.events()
    first = next(event for event in events if isinstance(event, Delta))
    answer.cancel()
    end = next(event for event in events if not isinstance(event, Delta))
    assert isinstance(end, Stopped)
    assert first.usage.completion_tokens <= end.usage.completion_tokens < ENDLESS
    assert wait_until(lambda: not turns.busy, timeout=10)


def test_a_full_line_fails_as_busy_at_once(pipe):
    turns = ModelTurns(0)  # nobody may wait
    with turns.turn():
        events = list(Runner(lambda: pipe, turns).start(question("Hi.")).events())
    assert events == [Failed("busy", events[-1].reason)]
    assert "waiting" in events[-1].reason


def test_a_prompt_over_the_limit_fails_as_too_large_and_frees_the_model(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "max_prompt_tokens", 5)
    turns = ModelTurns(4)
    *_, end = Runner(lambda: pipe, turns).start(question("A question of many words.")).events()
    assert end.kind == "too_large"
    assert "this server takes at most 5" in end.reason
    assert not turns.busy


def test_a_model_that_is_not_loaded_fails_as_not_ready():
    events = list(Runner(lambda: None, ModelTurns(4)).start(question("Hi.")).events())
    assert [event.kind for event in events] == ["not_ready"]


def test_a_stop_set_before_the_start_never_runs_the_model(pipe):
    stop = threading.Event()
    stop.set()
    *_, end = Runner(lambda: pipe, ModelTurns(4)).start(question("Hi."), stop).events()
    assert isinstance(end, Stopped)
    assert end.usage.completion_tokens == 0


def test_the_wrapped_private_gradio_method_still_has_the_signature_it_was_written_for():
    """If this fails, Gradio changed Blocks.preprocess_data: rewrite gradio_private.py."""
    assert gradio_private.wrapped_signature_holds()
