"""phi3v_app without a browser: the history, what the page says, the answer runner, the /chat
API of a live server (through gradio_client) and the command line.

The live tests use the tiny random-weight model: its answers are gibberish, but they stream
like real ones.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
import requests
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from phi3v import Progress, Timings
from phi3v.download import DEFAULT_MODEL, DownloadProgress, is_complete
from phi3v_app import cli, view
from phi3v_app.chat import Answers, check_images, failure_text, generation_options
from phi3v_app.chat_api import ChatAPI
from phi3v_app.handlers import Handlers
from phi3v_app.history import (
    ERROR_MARK,
    MAX_IMAGES_PER_MESSAGE,
    STOPPED_MARK,
    HistoryError,
    check_limits,
    conversation,
    error_message,
    message_parts,
    stopped_message,
    without_last_answer,
    without_last_turn,
)
from phi3v_app.loading import ModelLoader, ModelStatus
from phi3v_app.runner import Failed
from phi3v_app.transcript import from_openai, to_markdown, to_openai
from phi3v_app.turns import ModelTurns
from tests.app_helpers import ask, first_launch, free_port, ready_loader, serve_demo, wait_until

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "data" / "examples" / "bar_chart.png"
SCENE = REPO / "data" / "examples" / "scene.png"
LONG = 4096  # the tiny model writes ~1 token/ms: long answers leave time to watch and to stop
ANSWER_TIMEOUT_S = 120

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # its pandas use


def text_of(message: dict) -> str:
    return message_parts(message["content"])[0]


def user(text: str, *files: str) -> dict:
    return {"role": "user", "content": [*({"path": f} for f in files), text]}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- chat history -> model input -----------------------------------------------------------------


def test_images_are_tagged_in_order_over_the_whole_conversation():
    history = [
        user("Compare these.", "a.png", "b.png"),
        bot("They differ."),
        user("And this one?", "c.png"),
    ]
    messages, images = conversation(history)
    assert images == ["a.png", "b.png", "c.png"]
    assert messages == [
        {"role": "user", "content": "<|image_1|>\n<|image_2|>\nCompare these."},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "<|image_3|>\nAnd this one?"},
    ]


def test_gradio_6_message_blocks_are_read_as_text_and_files():
    content = [
        {"type": "file", "file": {"path": "/tmp/x.png", "mime_type": "image/png"}},
        {"type": "text", "text": "What is it?"},
    ]
    assert message_parts(content) == ("What is it?", ["/tmp/x.png"])
    assert message_parts("plain") == ("plain", [])
    assert message_parts({"path": "/tmp/y.png"}) == ("", ["/tmp/y.png"])


def test_a_turn_answered_with_an_error_or_stopped_early_is_left_out_with_its_images():
    history = [
        user("First.", "good.png"),
        bot("Fine."),
        user("Second.", "broken.png"),
        error_message("broken.png is corrupt"),
        user("Third.", "late.png"),
        stopped_message(),
        user("Fourth."),
    ]
    messages, images = conversation(history)
    assert images == ["good.png"]
    assert [m["content"] for m in messages] == ["<|image_1|>\nFirst.", "Fine.", "Fourth."]


def test_an_answer_that_merely_starts_like_an_error_is_still_an_answer():
    history = [user("Draw a warning sign."), bot(f"{ERROR_MARK} here it is"), user("Thanks.")]
    messages, _ = conversation(history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]


def test_notes_with_a_metadata_title_never_reach_the_model():
    history = [user("Hi."), {"role": "assistant", "content": "…", "metadata": {"title": "x"}}]
    assert conversation(history) == ([{"role": "user", "content": "Hi."}], [])


def test_retry_drops_the_answer_and_undo_drops_the_whole_last_turn():
    history = [user("One."), bot("A."), user("Two."), bot("B.")]
    assert without_last_answer(history) == history[:3]
    assert without_last_turn(history) == history[:2]


def test_a_typed_image_tag_is_text_not_a_tag():
    messages, images = conversation([user("What does <|image_1|> mean?")])
    assert images == []
    assert not re.search(r"<\|image_\d+\|>", messages[0]["content"])
    assert "image_1" in messages[0]["content"]


def test_an_uploaded_image_still_gets_its_tag_beside_typed_text():
    messages, images = conversation([user("Is <|image_2|> here?", "a.png")])
    assert images == ["a.png"]
    assert re.findall(r"<\|image_\d+\|>", messages[0]["content"]) == ["<|image_1|>"]


def test_too_many_images_in_one_message_are_refused_with_the_limit():
    many = [f"/cache/{n}/p{n}.png" for n in range(MAX_IMAGES_PER_MESSAGE + 1)]
    with pytest.raises(HistoryError, match=f"limit is {MAX_IMAGES_PER_MESSAGE} per message"):
        check_limits([user("All of them?", *many)])


def test_too_many_images_over_the_conversation_are_refused():
    history = []
    for turn in range(3):
        names = [f"/cache/{turn}-{n}/p.png" for n in range(MAX_IMAGES_PER_MESSAGE)]
        history += [user("More.", *names), bot("Ok.")]
    with pytest.raises(HistoryError, match="Clear the chat"):
        check_limits(history[:-1])


def test_a_picture_sent_again_is_taken_and_read_each_time_it_was_sent():
    """Gradio keeps one file per content, so the same picture sent twice is the same path."""
    history = [user("One.", "/tmp/gradio/abc/cat.png"), bot("A cat."), user("Again?")]
    history[-1] = user("Again, with a dog?", "/tmp/gradio/abc/cat.png", "/tmp/gradio/d/dog.png")
    check_limits(history)
    messages, images = conversation(history)
    assert images == ["/tmp/gradio/abc/cat.png"] * 2 + ["/tmp/gradio/d/dog.png"]
    assert messages[-1]["content"].startswith("<|image_2|>\n<|image_3|>\n")


def test_a_failure_reads_as_one_sentence_whatever_its_reason_ends_with():
    for reason in ("send each picture once.", "send each picture once"):
        text = failure_text(Failed("bad_input", reason))
        assert text == "The request could not be answered: send each picture once."


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"", "is empty (0 bytes)"),
        (None, "is damaged or cut short"),  # the first half of a real PNG
        (b"%PDF-1.7", "is not a PNG, JPEG, WebP or GIF image"),
    ],
    ids=["empty", "damaged", "another-kind"],
)
def test_an_unreadable_upload_is_told_what_is_wrong_with_it(tmp_path, content, said):
    upload = tmp_path / "holiday.png"
    whole = SCENE.read_bytes()
    upload.write_bytes(whole[: len(whole) // 2] if content is None else content)
    with pytest.raises(HistoryError) as refused:
        check_images([str(upload)])
    assert str(refused.value).startswith(f"holiday.png could not be read as a picture: it {said}")
    assert str(tmp_path) not in str(refused.value) and "Pillow" not in str(refused.value)


def test_a_picture_with_too_many_pixels_is_told_to_shrink_not_to_change_format(tmp_path):
    """30000 x 30000 pixels: beyond Pillow's own limit, so it refuses before reading the size."""
    from tests.test_image import png_header_only

    upload = tmp_path / "panorama.png"
    upload.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(HistoryError) as refused:
        check_images([str(upload)])
    told = str(refused.value)
    assert told.startswith("panorama.png is too large: it has 900,000,000 pixels")
    assert "downscale it first" in told and "PNG or JPEG" not in told and "Pillow" not in told
    # The same file attached on the page: taken out of the input, and the line says why.
    _, line = Handlers.check_upload({"text": "Look", "files": [str(upload)]}, "")
    assert "panorama.png is too large" in line and "downscale it first" in line
    assert "not a picture" not in line and "PNG, JPEG" not in line
    assert view.says_upload_refused(line)


def test_while_the_pictures_are_prepared_the_status_says_so_not_waiting():
    line = view.reading_status(Progress("preprocess"), 0.4, None)
    assert "Preparing your question" in line and "Waiting" not in line


def test_slider_values_become_stream_options_with_zero_and_one_meaning_off():
    assert generation_options(100.0, 0.0, 1.0, 0.0, 4.0) == {
        "max_new_tokens": 100,
        "temperature": 0.0,
        "top_p": None,
        "top_k": None,
        "num_crops": 4,
    }
    assert generation_options(8, 0.7, 0.9, 40, None) == {
        "max_new_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "num_crops": None,
    }


@pytest.mark.parametrize("temperature", [2.5, 100.0, -0.1])
def test_a_temperature_outside_the_pages_range_is_refused_as_the_openai_api_refuses_it(
    temperature,
):
    # the page's slider stops at 2; /chat takes any number and must say so, not sample at 100
    with pytest.raises(ValueError, match=rf"from 0 to 2, got {temperature}"):
        generation_options(100, temperature, 1.0, 0, None)
    assert generation_options(100, 2.0, 1.0, 0, None)["temperature"] == 2.0


# --- what the page says --------------------------------------------------------------------------


def test_the_status_line_shows_first_word_time_speed_and_prompt_size():
    timings = Timings(time_to_first_token=52.4, decode_tokens_per_second=9.43)
    line = view.answer_status(timings, 120, 1934, "eos")
    assert "Done" in line
    for part in ("first word after 52 s", "9.4 tokens/s", "120 tokens", "prompt 1,934 tokens"):
        assert part in line
    assert "Stopped" in view.answer_status(timings, 3, 10, "cancelled")
    assert "Max new tokens" in view.answer_status(timings, 3, 10, "length")


def test_a_one_token_answer_shows_no_speed():
    line = view.answer_status(Timings(time_to_first_token=0.4), 1, 12, "eos")
    assert "tokens/s" not in line
    assert "1 token ·" in line


def test_a_text_question_is_not_announced_as_zero_images():
    assert "0 images" not in view.preparing_status(0)
    assert "Preparing your question" in view.preparing_status(0)
    assert "Preparing 2 images" in view.preparing_status(2)


def test_reading_shows_the_stage_the_percentage_and_the_measured_estimate():
    vision = view.reading_status(Progress("vision", 0, 1), 12.3, 41.0)
    assert "Reading the image" in vision and "12 s of about 41 s" in vision
    assert "Reading 2 images" in view.reading_status(Progress("vision", 0, 2), 1.0, None)
    prefill = view.reading_status(Progress("prefill", 1024, 1935), 10.0, 41.0)
    assert "53%" in prefill
    unmeasured = view.reading_status(Progress("vision", 0, 1), 3.0, None)
    assert "about" not in unmeasured and "3.0 s" in unmeasured


def test_a_long_first_chunk_moves_on_with_the_clock_short_of_done():
    progress = Progress("prefill", 0, 6000)  # the engine reports once the first chunk is read
    assert "Reading your question… 25%" in view.reading_status(progress, 10.0, 40.0)
    assert "Reading your question… 50%" in view.reading_status(progress, 20.0, 40.0)
    assert "Reading your question… 99%" in view.reading_status(progress, 60.0, 40.0)
    assert "Reading your question… 0%" in view.reading_status(progress, 10.0, None)


def test_an_estimate_that_ran_out_grows_with_the_clock():
    assert "50 s of about 50 s" in view.reading_status(Progress("prefill", 1, 2), 50.0, 41.0)


def test_the_place_in_line_is_said_in_words():
    assert "1 request ahead of yours" in view.waiting_status(1)
    assert "3 requests ahead" in view.waiting_status(3)


def card_texts(markup: str) -> list[str]:
    """The texts view.example_times hands the page script for the example cards."""
    return json.loads(html.unescape(re.search(r'data-times="([^"]*)"', markup).group(1)))


def test_an_example_card_says_timing_until_measured_then_its_measured_first_words():
    assert card_texts(view.example_times([None, 0.0421, 2.46], warming=True)) == [
        "Timing it on this machine…",
        "First words in 42 ms on this machine (measured)",
        "First words in 2.5 s on this machine (measured)",
    ]


def test_an_example_that_could_not_be_timed_says_nothing_about_its_speed():
    assert card_texts(view.example_times([None, 0.5], warming=False)) == [
        "",
        "First words in 500 ms on this machine (measured)",
    ]


def test_the_download_panel_shows_bytes_speed_time_left_and_the_current_file():
    progress = DownloadProgress(
        filename="phi-3-v-128k-instruct-text.onnx.data",
        file_done=1_000_000_000,
        file_total=2_330_000_000,
        done=1_210_000_000,
        total=3_220_000_000,
        speed=12_300_000,
        eta=125,
    )
    panel = view.model_panel(ModelStatus("downloading", "phi-3-vision-cpu", Path("d"), progress))
    for part in ("1.21 GB of 3.22 GB (38%)", "12.3 MB/s", "about 2 min 05 s left"):
        assert part in panel
    assert "phi-3-v-128k-instruct-text.onnx.data: 1.00 GB of 2.33 GB" in panel
    assert 'value="1210000000" max="3220000000"' in panel


def test_the_model_box_shows_the_fast_copy_being_made():
    status = ModelStatus(
        "converting", "m", Path("d"), conversion=Progress("converting the vision model", 3, 12)
    )
    panel = view.model_panel(status)
    assert "Preparing fast mode" in panel and "3 of 12 (25%)" in panel
    assert 'value="3" max="12"' in panel


def test_the_ready_model_says_its_precision_in_words_and_no_jargon():
    for precision, words in (("exact", "exact mode"), ("fast", "fast mode")):
        panel = view.model_panel(ModelStatus("ready", "m", Path("d"), precision=precision))
        assert words in panel
        assert "layout" not in panel and "context" not in panel
        assert "up to a minute" not in panel


def test_the_ready_model_says_why_it_runs_in_its_precision_with_the_self_check():
    reason = "fast: 95.9% top-1 agreement with fp32, KL 0.0044 (exact: 96.1%, 0.0034): passed"
    status = ModelStatus("ready", "m", Path("d"), precision="fast", precision_reason=reason)
    assert f"Why this mode: {reason}." in view.model_panel(status)


def test_a_failure_is_shown_escaped_with_what_to_do():
    panel = view.model_panel(ModelStatus("failed", "m", Path("d"), error="no <genai_config.json>"))
    assert "no &lt;genai_config.json&gt;" in panel
    assert "Try again" in panel


def test_the_failure_box_takes_its_colours_from_the_theme():
    rule = re.search(r"\.model\.failed \{[^}]*\}", view.CSS).group(0)
    assert "var(--error-background-fill)" in rule and "var(--error-text-color)" in rule
    assert "#" not in rule  # no fixed colour that a dark theme cannot change


# --- the command line ----------------------------------------------------------------------------


def test_auth_comes_from_the_command_line_or_the_environment(monkeypatch):
    monkeypatch.delenv(cli.AUTH_ENV, raising=False)
    assert cli.parse_args(["--auth", "ada:s3:cret"]).auth == ("ada", "s3:cret")
    monkeypatch.setenv(cli.AUTH_ENV, "bob:pw")
    assert cli.parse_args([]).auth == ("bob", "pw")
    with pytest.raises(SystemExit):
        cli.parse_args(["--auth", "no-colon"])


def test_precision_comes_from_the_command_line_or_the_environment(monkeypatch):
    monkeypatch.delenv(cli.PRECISION_ENV, raising=False)
    assert cli.parse_args([]).precision == "auto"
    assert cli.parse_args(["--precision", "exact"]).precision == "exact"
    monkeypatch.setenv(cli.PRECISION_ENV, "fast")
    assert cli.parse_args([]).precision == "fast"
    monkeypatch.setenv(cli.PRECISION_ENV, "turbo")
    with pytest.raises(SystemExit):
        cli.parse_args([])


# --- the answer runner, without a server ---------------------------------------------------------


@pytest.fixture(scope="module")
def loader(tiny_model_dir) -> ModelLoader:
    return ready_loader(tiny_model_dir)


def run_in_thread(runner: Answers, session: str, history: list, max_new_tokens: int = LONG):
    """Start an answer for ``session`` in a thread; returns (its updates, the thread)."""
    updates: list = []
    ticket = runner.begin(session)
    options = generation_options(max_new_tokens, 0, 1, 0, 2)

    def consume():
        for update in runner.run(ticket, history, options, session):
            updates.append(update)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return updates, thread


def last_chat(updates: list) -> list:
    return next(chat for chat, _ in reversed(updates) if chat is not None)


def test_stop_while_waiting_in_line_leaves_the_line_and_marks_the_question(loader):
    turns = ModelTurns(4)
    runner = Answers(loader, turns)
    with turns.turn():  # someone else has the model
        updates, thread = run_in_thread(runner, "s", [user("Hi.")])
        wait_until(lambda: turns.waiting == 1)
        wait_until(lambda: any("1 request ahead" in (status or "") for _, status in updates))
        assert runner.stop("s")
        thread.join(10)
        assert not thread.is_alive()  # it left the line while the model was still taken
        assert turns.waiting == 0
    assert text_of(last_chat(updates)[-1]).startswith(STOPPED_MARK)
    assert not runner.pending("s")


def test_a_stop_ends_a_running_answer_and_frees_the_model(loader):
    turns = ModelTurns(4)
    runner = Answers(loader, turns)
    updates, thread = run_in_thread(runner, "s", [user("Tell me everything.")])
    wait_until(lambda: any(chat and chat[-1]["role"] == "assistant" for chat, _ in updates))
    runner.stop("s")
    thread.join(30)
    assert not thread.is_alive()
    assert "Stopped" in updates[-1][1]
    assert len(text_of(last_chat(updates)[-1])) < LONG
    assert wait_until(lambda: not turns.busy, timeout=10)


def test_stop_while_the_image_is_read_aborts_that_model_call(tiny_model_dir, monkeypatch):
    loader = ready_loader(tiny_model_dir)  # a pipeline of its own, to slow down
    pipe = loader.pipeline
    streams = []
    real_stream, real_run = pipe.stream, pipe.sessions.decoder.run_with_iobinding
    inside, release = threading.Event(), threading.Event()

    def recording_stream(*args, **kwargs):
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    def slow_prefill(binding, run_options=None):  # the real model spends minutes in here
        inside.set()
        release.wait(10)
        return real_run(binding, run_options)

    monkeypatch.setattr(pipe, "stream", recording_stream)
    monkeypatch.setattr(pipe.sessions.decoder, "run_with_iobinding", slow_prefill)
    runner = Answers(loader, ModelTurns(4))
    updates, thread = run_in_thread(runner, "s", [user("What is this?", str(CHART))])
    assert inside.wait(10)
    wait_until(lambda: any("Reading your question… 0%" in (s or "") for _, s in updates))
    runner.stop("s")
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert streams[0].stop_reason == "cancelled"
    assert streams[0].timings.prefill == 0  # the call was aborted, not run to its end
    assert text_of(last_chat(updates)[-1]).startswith(STOPPED_MARK)


def test_a_newer_answer_of_the_session_silences_the_older_one(loader):
    turns = ModelTurns(4)
    runner = Answers(loader, turns)
    first, first_thread = run_in_thread(runner, "s", [user("One.")])
    wait_until(lambda: any(chat and chat[-1]["role"] == "assistant" for chat, _ in first))
    second, second_thread = run_in_thread(runner, "s", [user("One.")], max_new_tokens=8)
    first_thread.join(30)
    count = len(first)
    assert "Stopped" not in (first[-1][1] or "")  # it did not report its end over the newer
    second_thread.join(30)
    assert len(first) == count
    assert "Done" in second[-1][1]
    assert not runner.pending("s")


def test_a_full_line_is_told_in_the_chat_with_a_retry_hint(loader):
    turns = ModelTurns(0)  # nobody may wait
    runner = Answers(loader, turns)
    with turns.turn():
        updates, thread = run_in_thread(runner, "s", [user("Hi.")])
        thread.join(10)
    reply = text_of(last_chat(updates)[-1])
    assert reply.startswith(ERROR_MARK)
    assert "busy" in reply and "try again" in reply


def test_a_second_session_gets_no_cache_reuse_from_the_first(loader, monkeypatch):
    pipe = loader.pipeline
    streams = []
    real_stream = pipe.stream

    def recording_stream(*args, **kwargs):  # the real stream, kept so its reuse can be read
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(pipe, "stream", recording_stream)
    runner = Answers(loader, ModelTurns(4))
    history = [user("What is the capital of France?")]
    for session in ("first", "first", "second"):
        _, thread = run_in_thread(runner, session, history, max_new_tokens=8)
        thread.join(30)
    assert streams[1].reused_tokens > 0  # the same session reuses its own prompt
    assert streams[2].reused_tokens == 0  # another session does not


def test_a_prompt_over_the_servers_limit_is_refused_with_the_pipelines_message(loader, monkeypatch):
    monkeypatch.setattr(loader.pipeline, "max_prompt_tokens", 50)
    runner = Answers(loader, ModelTurns(4))
    updates, thread = run_in_thread(runner, "s", [user("What is this?", str(CHART))])
    thread.join(30)
    reply = text_of(last_chat(updates)[-1])
    assert reply.startswith(ERROR_MARK)
    assert "this server takes at most 50" in reply
    assert not runner.turns.busy


def test_a_damaged_upload_is_numbered_within_its_own_message(tmp_path):
    broken = tmp_path / "second.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    with pytest.raises(HistoryError) as refused:
        check_images([str(CHART), str(broken)])
    message = str(refused.value)
    assert message.startswith("second.png (image 2 of 2 in this message)")
    assert str(tmp_path) not in message
    with pytest.raises(HistoryError) as alone:
        check_images([str(broken)])
    assert "image 1 of" not in str(alone.value)


def test_a_model_that_is_not_ready_is_explained_in_the_chat():
    runner = Answers(ModelLoader("/nonexistent/model-folder"), ModelTurns(4))
    updates = list(runner.run(runner.begin("s"), [user("Hi.")], {}))
    history = last_chat(updates)
    assert text_of(history[-1]).startswith(ERROR_MARK)
    assert "still loading" in text_of(history[-1])


# --- getting the model ready ---------------------------------------------------------------------


def test_a_bad_model_dir_fails_visibly_and_on_stderr(capsys, tmp_path):
    loader = ModelLoader(tmp_path / "missing").start()
    assert not loader.wait(30)
    status = loader.status()
    assert status.phase == "failed"
    assert "missing" in status.error
    assert "missing" in view.model_panel(status)
    assert "error:" in capsys.readouterr().err


def test_first_launch_downloads_with_progress_then_loads(tmp_path, monkeypatch):
    with first_launch(tmp_path, monkeypatch) as (hub, loader, files):
        assert hub.content_arrived.wait(10)
        assert loader.status().phase == "downloading"
        assert "Downloading" in view.model_panel(loader.status())
        hub.hold.set()
        assert loader.wait(60), loader.status().error
    status = loader.status()
    assert status.phase == "ready"
    assert status.precision == "exact"  # the tiny model has no int4 layers to convert
    assert status.progress.done == status.progress.total == sum(map(len, files.values()))
    assert is_complete(tmp_path / "data" / DEFAULT_MODEL)


def test_fast_precision_shows_the_conversion_then_says_fast_mode(tiny_int4_model_dir, tmp_path):
    folder = tmp_path / "int4"
    shutil.copytree(tiny_int4_model_dir, folder, ignore=shutil.ignore_patterns(".phi3v-cache"))
    loader = ModelLoader(folder, precision="fast").start()
    seen: list[ModelStatus] = []
    while not seen or seen[-1].phase not in ("ready", "failed"):  # as the page polls, faster
        seen.append(loader.status())
    assert loader.wait(120), loader.status().error
    converting = [status for status in seen if status.phase == "converting"]
    assert converting and any(s.conversion.total > 0 for s in converting)
    assert "Preparing fast mode" in view.model_panel(converting[-1])
    assert loader.status().precision == "fast"
    assert "fast mode" in view.model_panel(loader.status())


# --- the live app's /chat API, through gradio_client ---------------------------------------------


@pytest.fixture(scope="module")
def live(loader):
    with serve_demo(loader, queue_size=1) as (url, app):
        yield url, app


@pytest.fixture
def client(live) -> Client:
    return Client(live[0], download_files=False, verbose=False)


def test_the_only_public_endpoint_is_chat(client):
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == [
        "/chat"
    ]


def test_chat_streams_a_growing_answer_then_the_final_one(client):
    job = ask(client, "What is in this chart?", CHART, max_new_tokens=1000)
    final = job.result(timeout=ANSWER_TIMEOUT_S)
    wait_until(job.done)
    answers = job.outputs()
    assert len(set(answers)) >= 3, "several partial answers before the final one"
    assert len(answers[0]) < len(final) == max(map(len, answers))


def test_a_conversation_id_makes_the_next_call_a_follow_up(client, loader, monkeypatch):
    streams = []
    real_stream = loader.pipeline.stream

    def recording_stream(messages, images, **kwargs):
        streams.append((messages, images, real_stream(messages, images, **kwargs)))
        return streams[-1][2]

    monkeypatch.setattr(loader.pipeline, "stream", recording_stream)
    ask(client, "Describe this.", SCENE, conversation_id="c-1").result(timeout=ANSWER_TIMEOUT_S)
    ask(client, "And the roof?", conversation_id="c-1").result(timeout=ANSWER_TIMEOUT_S)
    messages, images, stream = streams[-1]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert len(images) == 1  # the first call's picture is still in the conversation
    assert stream.reused_tokens > 0  # and its KV cache was reused


def test_only_a_call_with_a_conversation_id_keeps_a_kv_cache(client, loader, monkeypatch):
    remembered = []
    real_stream = loader.pipeline.stream

    def recording_stream(*args, **kwargs):
        remembered.append(kwargs["remember"])
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(loader.pipeline, "stream", recording_stream)
    ask(client, "A one-off question.").result(timeout=ANSWER_TIMEOUT_S)
    ask(client, "A question to follow up.", conversation_id="c-2").result(timeout=ANSWER_TIMEOUT_S)
    assert remembered == [False, True]


def test_a_call_cut_off_by_a_newer_one_of_its_conversation_says_so(client):
    first = ask(client, "Write a long story.", max_new_tokens=LONG, conversation_id="race")
    wait_until(lambda: first.outputs(), timeout=60)
    second = ask(client, "Never mind: a short one.", conversation_id="race")
    with pytest.raises(AppError, match="a newer call with the same conversation_id took over"):
        first.result(timeout=ANSWER_TIMEOUT_S)
    assert second.result(timeout=ANSWER_TIMEOUT_S)


def test_a_cancelled_call_stops_and_the_model_is_free_again(client, live):
    turns = live[1].turns
    job = ask(client, "Write a long story.", max_new_tokens=LONG)
    wait_until(lambda: job.outputs(), timeout=60)
    assert job.cancel()
    wait_until(lambda: not turns.busy, timeout=30)
    assert len(job.outputs()[-1]) < LONG
    assert ask(client, "Still there?").result(timeout=ANSWER_TIMEOUT_S)


def test_a_damaged_picture_is_named_by_its_upload_name_and_the_next_call_works(
    client, tmp_path, capfd
):
    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a picture")
    with pytest.raises(AppError) as refused:
        ask(client, "What is this?", broken).result(timeout=ANSWER_TIMEOUT_S)
    message = str(refused.value)
    assert "photo.png" in message and "PNG or JPEG" in message
    for leak in (str(tmp_path), "/tmp/", "Pillow", "PIL", "Traceback"):
        assert leak not in message
    assert ask(client, "Then this one?", SCENE).result(timeout=ANSWER_TIMEOUT_S)
    assert "Traceback" not in capfd.readouterr().err  # bad input is logged in one line


def test_a_chat_call_over_the_conversations_picture_limit_is_told_to_use_a_new_id(client):
    for _ in range(2):  # 8 pictures each: 16, the limit
        eight = ask(client, "And these?", *[CHART] * 8, max_new_tokens=1, conversation_id="full")
        eight.result(timeout=ANSWER_TIMEOUT_S)
    with pytest.raises(AppError) as refused:
        ask(client, "One more?", CHART, conversation_id="full").result(timeout=ANSWER_TIMEOUT_S)
    assert "Use a new conversation_id to start a new one." in str(refused.value)
    assert "Clear the chat" not in str(refused.value)  # a button the caller does not have


def test_a_chat_call_before_the_model_is_ready_is_told_to_try_again(tiny_model_dir):
    api = ChatAPI(Answers(ModelLoader(tiny_model_dir), ModelTurns(1)))  # never started
    with pytest.raises(gr.Error, match="still loading; try again in a minute") as refused:
        next(api.chat("Hello?", []))
    assert "box at the top" not in str(refused.value)  # the page's words


def test_failures_told_to_an_api_caller_name_no_button_of_the_page():
    for kind in ("busy", "internal"):
        on_page = failure_text(Failed(kind, "x"))
        by_api = failure_text(Failed(kind, "x"), on_page=False)
        assert ("↻" in on_page or "clear the chat" in on_page) and on_page != by_api
        assert "↻" not in by_api and "clear the chat" not in by_api
    too_large = Failed("too_large", "Use fewer images, lower num_crops or a shorter conversation")
    assert "lower Image detail (in Parameters)" in failure_text(too_large)
    assert "lower num_crops" in failure_text(too_large, on_page=False)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"num_crops": 0}, "num_crops must be from 1 to 16, got 0."),
        ({"max_new_tokens": 5000}, "max_new_tokens must be from 1 to 4096, got 5000."),
    ],
)
def test_a_chat_call_with_a_value_out_of_range_is_told_which_parameter(client, options, said):
    call = {"text": "Hi", "images": [], "conversation_id": "", **options}
    with pytest.raises(AppError, match=re.escape(said)):
        client.submit(**call, api_name="/chat").result(timeout=ANSWER_TIMEOUT_S)
    assert ask(client, "Still there?").result(timeout=ANSWER_TIMEOUT_S)


def test_a_one_off_text_question_needs_only_its_text(client):
    parameters = {
        p["parameter_name"]: p
        for p in client.view_api(return_format="dict")["named_endpoints"]["/chat"]["parameters"]
    }
    assert not parameters["text"]["parameter_has_default"]
    assert parameters["images"]["parameter_has_default"]
    assert parameters["conversation_id"]["parameter_has_default"]
    assert client.predict(text="Hello?", max_new_tokens=8, api_name="/chat")


def test_the_same_picture_twice_in_one_conversation_is_answered(client):
    first = ask(client, "What is this?", SCENE, conversation_id="twice")
    assert first.result(timeout=ANSWER_TIMEOUT_S)
    again = ask(client, "And now?", SCENE, conversation_id="twice")
    assert again.result(timeout=ANSWER_TIMEOUT_S)


def test_a_refused_upload_is_logged_in_one_line(client, tmp_path, caplog):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with caplog.at_level(logging.WARNING, logger="phi3v.app"), pytest.raises(AppError):
        ask(client, "Read this.", notes).result(timeout=ANSWER_TIMEOUT_S)
    lines = [r for r in caplog.records if "notes.txt" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


@pytest.mark.parametrize(
    "data",
    [
        ["too few values"],
        ["hi", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], 8, 0, 1, 0, 2, ""],
        [1, "not a list of files", 8, 0, 1, 0, 2, ""],
    ],
    ids=["too-few-values", "a-path-never-uploaded", "wrong-types"],
)
def test_a_malformed_request_gets_a_message_and_the_log_one_line(live, data, capfd, caplog):
    url = live[0]
    with caplog.at_level(logging.WARNING, logger="phi3v.app"):
        posted = requests.post(f"{url}gradio_api/call/chat", json={"data": data}, timeout=30)
        events = requests.get(
            f"{url}gradio_api/call/chat/{posted.json()['event_id']}", timeout=60
        ).text
    assert "event: error" in events
    assert "does not fit this endpoint" in events
    assert "passwd" not in events and "object at 0x" not in events
    assert "Traceback" not in capfd.readouterr().err
    assert len([r for r in caplog.records if "malformed request" in r.getMessage()]) == 1


def test_a_full_line_refuses_the_next_call_with_a_message(live):
    url, app = live
    turns = app.turns  # queue_size=1: one call may wait
    with turns.turn():
        waiting = ask(Client(url, download_files=False, verbose=False), "Wait for me.")
        wait_until(lambda: turns.waiting == 1)
        with pytest.raises(AppError, match="busy"):
            ask(Client(url, download_files=False, verbose=False), "And me?").result(timeout=60)
    assert waiting.result(timeout=ANSWER_TIMEOUT_S)


def test_uploads_over_the_size_limit_are_refused(live):
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)
    upload = requests.post(
        f"{live[0]}gradio_api/upload", files={"files": ("big.png", big)}, timeout=60
    )
    assert upload.status_code == 413
    assert "maximum allowed size" in upload.text


def test_the_readme_api_example_runs_as_written(live, capsys, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The chat's API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Client("http://127.0.0.1:7860/")' in code
    namespace: dict = {}
    monkeypatch.chdir(REPO)  # the example's picture path is relative to the repository
    exec(code.replace("http://127.0.0.1:7860/", live[0]), namespace)  # noqa: S102
    assert namespace["answer"] and namespace["follow_up"]
    assert namespace["answer"] in capsys.readouterr().out


def test_the_page_is_served(live):
    with urllib.request.urlopen(live[0], timeout=10) as page:
        assert page.status == 200
        assert "Phi-3 Vision" in page.read().decode()


# --- app.py --------------------------------------------------------------------------------------


def test_app_py_serves_a_model_dir_with_address_and_login_from_the_environment(
    tiny_legacy_model_dir,
):
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        cli.AUTH_ENV: "ada:s3cret",
        cli.PRECISION_ENV: "exact",
    }
    command = [sys.executable, str(REPO / "app.py"), "--model-dir", str(tiny_legacy_model_dir)]
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: _answers(url), timeout=60, every=0.2)
        assert requests.get(f"{url}config", timeout=10).status_code == 401  # login first
        client = Client(url, auth=("ada", "s3cret"), download_files=False, verbose=False)
        wait_until(lambda: _ready(client), timeout=60, every=0.2)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"Running on http://127.0.0.1:{port}" in output


def _ready(client: Client) -> bool:
    """True once the legacy-layout model answers (before that, /chat says it is loading)."""
    try:
        return bool(ask(client, "Hi", SCENE).result(timeout=ANSWER_TIMEOUT_S))
    except AppError:
        return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as page:
            return page.status == 200
    except OSError:
        return False


def test_app_py_is_only_the_entry_point():
    assert app.main is cli.main
    assert len((REPO / "app.py").read_text().splitlines()) < 20


def test_share_that_cannot_open_a_tunnel_fails_clearly(tiny_model_dir, monkeypatch, capsys):
    def no_tunnel(*args, **kwargs):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr("gradio.networking.setup_tunnel", no_tunnel)
    argv = ["--model-dir", str(tiny_model_dir), "--share", "--host", "127.0.0.1"]
    assert cli.main([*argv, "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "--share could not open a public link" in err
    assert "Run without --share" in err


# --- the chat as a file --------------------------------------------------------------------------


def test_a_saved_chat_holds_the_answered_turns_with_pictures_inline():
    history = [user("What is this?", str(CHART)), bot("A chart."), user("Hi."), stopped_message()]
    (question, answer) = to_openai(history)
    assert question["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert question["content"][1] == {"type": "text", "text": "What is this?"}
    assert answer == {"role": "assistant", "content": "A chart."}


def test_a_saved_chat_loads_back_as_the_same_conversation(tmp_path):
    history = [user("What is this?", str(CHART)), bot("A chart.")]
    loaded = from_openai(to_openai(history), tmp_path)
    messages, images = conversation(loaded)
    assert messages == conversation(history)[0]
    assert Path(images[0]).read_bytes() == CHART.read_bytes()
    request = {"model": "phi-3-vision-cpu", "messages": to_openai(history), "stream": True}
    assert conversation(from_openai(request, tmp_path))[0] == messages  # a request body too


@pytest.mark.parametrize(
    "saved",
    [{"not": "a list"}, [{"role": "tool", "content": "x"}], [{"role": "user", "content": [1]}]],
    ids=["not-a-list", "a-tool-message", "a-part-that-is-not-text"],
)
def test_a_file_that_is_not_a_saved_chat_is_refused_with_a_reason(saved, tmp_path):
    with pytest.raises(HistoryError, match="saved chat|Message 1"):
        from_openai(saved, tmp_path)


def test_a_markdown_chat_says_who_said_what_in_order_with_the_pictures_inline():
    history = [user("What is this?", str(CHART)), bot("A **chart**.")]
    markdown = to_markdown(history)
    picture = re.search(r"!\[bar_chart\.png\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert picture, markdown[:200]
    assert base64.b64decode(picture.group(1)) == CHART.read_bytes()
    order = ["### You", picture.group(0), "What is this?", "### Phi-3 Vision", "A **chart**."]
    assert [markdown.index(part) for part in order] == sorted(markdown.index(p) for p in order)


def test_a_markdown_chat_keeps_a_picture_and_its_question_sent_apart_under_one_heading():
    history = [user("", str(CHART)), user("What is this?"), bot("A chart.")]
    assert to_markdown(history).count("### You") == 1


def test_a_markdown_chat_leaves_out_the_turns_the_model_did_not_answer():
    history = [user("Hi."), bot("Hello."), user("And?", str(CHART)), stopped_message()]
    assert to_markdown(history) == "### You\n\nHi.\n\n### Phi-3 Vision\n\nHello.\n"
    assert to_markdown([user("Hi."), error_message("busy")]) == ""


def test_a_picture_name_with_brackets_cannot_break_the_markdown(tmp_path):
    picture = tmp_path / "odd] name[.png"
    shutil.copyfile(CHART, picture)
    markdown = to_markdown([user("", str(picture)), bot("A chart.")])
    assert "![odd\\] name\\[.png](data:image/png;base64," in markdown


def test_retry_with_no_question_to_retry_says_so_in_the_status_line(tiny_model_dir):
    """Gradio's page sends no Retry for a chat without a question; a request that does is
    answered, not ignored."""
    handlers = Handlers(Answers(ModelLoader(tiny_model_dir), ModelTurns(1)))
    chat, _, _, status = handlers.retry([bot("Hello.")], None)
    assert "Nothing to retry" in status


def test_a_reloaded_chat_gives_back_a_question_left_without_an_answer(tmp_path):
    """What the page's load does with the chat this browser saved: the answered part comes back;
    questions after the last answer (a loaded chat may hold two in a row) go back into the
    input, their texts joined and their pictures attached."""
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    for picture in (first, second):
        shutil.copyfile(CHART, picture)
    answered = [user("Hi"), bot("Hello.")]
    saved = [*answered, user("Look:", str(first)), user("and this", str(second))]
    chat, box, status = Handlers.restore(saved, [])
    assert chat == answered
    assert box.value["text"] == "Look:\nand this"
    assert [file["orig_name"] for file in box.value["files"]] == ["first.png", "second.png"]
    assert "Not answered" in status
    assert Handlers.restore(answered, [])[0] == answered  # nothing unanswered: as it was
    skipped = Handlers.restore(saved, [user("A chat already going on")])
    assert all(update == gr.skip() for update in skipped)


def test_a_saved_chat_with_a_damaged_picture_names_its_message_not_a_server_file(
    tiny_model_dir, tmp_path
):
    handlers = Handlers(Answers(ModelLoader(tiny_model_dir), ModelTurns(1)))
    good = "data:image/png;base64," + base64.b64encode(CHART.read_bytes()).decode()
    saved = tmp_path / "chat.json"
    saved.write_text(
        json.dumps(
            [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": good}}]},
                {"role": "assistant", "content": "A chart."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ]},
            ]
        )
    )  # fmt: skip
    chat, status = handlers.load(str(saved), None)
    assert chat == gr.skip()
    assert "The picture in message 3 of the file could not be read" in status
    assert "picture-" not in status  # the name the server gave the file it wrote
