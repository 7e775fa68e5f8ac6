"""app.py: the pure parts (history -> model input, status lines) and the live app.

The live tests talk to a server on 127.0.0.1 through gradio_client, with the tiny random-weight
model (tests/tiny_model.py): its answers are gibberish, but they stream like real ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import requests
from gradio_client import Client, handle_file
from gradio_client.utils import Status

import app
from app import (
    ERROR_MARK,
    ModelLoader,
    ModelStatus,
    StopSwitches,
    answer_status,
    conversation,
    follow,
    generation_options,
    message_parts,
    model_panel,
    parse_args,
    reading_status,
    respond,
    without_last_answer,
)
from phi3v import Pipeline, Timings
from phi3v.download import DEFAULT_MODEL, DownloadProgress, is_complete
from tests.app_helpers import first_launch, free_port, ready_loader, serve, wait_until

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


def test_a_turn_answered_with_an_error_is_left_out_with_its_images():
    history = [
        user("First.", "good.png"),
        bot("Fine."),
        user("Second.", "broken.png"),
        bot(f"{ERROR_MARK} broken.png is corrupt"),
        user("Third."),
    ]
    messages, images = conversation(history)
    assert images == ["good.png"]
    assert [m["content"] for m in messages] == ["<|image_1|>\nFirst.", "Fine.", "Third."]


def test_notes_with_a_metadata_title_never_reach_the_model():
    history = [user("Hi."), {"role": "assistant", "content": "…", "metadata": {"title": "x"}}]
    assert conversation(history) == ([{"role": "user", "content": "Hi."}], [])


def test_retry_drops_everything_after_the_last_user_message():
    history = [user("One."), bot("A."), user("Two."), bot("B.")]
    assert without_last_answer(history) == history[:3]


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


# --- what the page says --------------------------------------------------------------------------


def test_the_status_line_shows_first_token_time_speed_and_context_use():
    timings = Timings(time_to_first_token=52.4, decode_tokens_per_second=9.43)
    line = answer_status(timings, 1934, 120, 131072, "eos")
    assert "Done" in line
    for part in ("first token 52 s", "9.4 tokens/s", "120 tokens", "prompt 1,934 tokens"):
        assert part in line
    assert "context 2,054 / 131,072 (1.6%)" in line
    assert "Stopped" in answer_status(timings, 10, 3, 4096, "cancelled")
    assert "max new tokens" in answer_status(timings, 10, 3, 4096, "length")


def test_while_the_image_is_read_the_status_line_counts_the_seconds():
    line = reading_status(2, 3860, 131072, 12.3)
    assert "Reading 2 images… 12 s" in line
    assert "prompt 3,860 tokens" in line


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
    panel = model_panel(ModelStatus("downloading", "phi-3-vision-cpu", Path("d"), progress))
    for part in ("1.21 GB of 3.22 GB (38%)", "12.3 MB/s", "about 2 min 05 s left"):
        assert part in panel
    assert "phi-3-v-128k-instruct-text.onnx.data: 1.00 GB of 2.33 GB" in panel
    assert 'value="1210000000" max="3220000000"' in panel


def test_a_failure_is_shown_escaped_with_what_to_do():
    panel = model_panel(ModelStatus("failed", "m", Path("d"), error="no <genai_config.json>"))
    assert "no &lt;genai_config.json&gt;" in panel
    assert "Try again" in panel


def test_auth_comes_from_the_command_line_or_the_environment(monkeypatch):
    monkeypatch.delenv(app.AUTH_ENV, raising=False)
    assert parse_args(["--auth", "ada:s3:cret"]).auth == ("ada", "s3:cret")
    monkeypatch.setenv(app.AUTH_ENV, "bob:pw")
    assert parse_args([]).auth == ("bob", "pw")
    with pytest.raises(SystemExit):
        parse_args(["--auth", "no-colon"])


# --- one answer, without a server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def loader(tiny_model_dir) -> ModelLoader:
    return ready_loader(tiny_model_dir)


def test_closing_follow_early_stops_the_worker_frees_the_stream_and_releases(tiny_model_dir):
    pipe = Pipeline.load(tiny_model_dir)
    stream = pipe.stream("Hello", max_new_tokens=LONG)
    released = threading.Event()
    deltas = follow(stream, released.set, tick=0.05)
    assert any(next(deltas) for _ in range(50))  # some text arrived
    deltas.close()
    assert released.wait(10)
    assert stream.stop_reason == "cancelled"
    assert len(stream.token_ids) < LONG


def test_stop_while_the_image_is_read_aborts_that_model_call(tiny_model_dir, monkeypatch):
    pipe = Pipeline.load(tiny_model_dir)
    stream = pipe.stream("What is this?", [str(CHART)], max_new_tokens=LONG)
    stopped, released = threading.Event(), threading.Event()
    run = pipe.sessions.decoder.run_with_iobinding

    def slow_prefill(binding, run_options=None):  # the real model spends ~50 s in here
        stopped.wait(10)
        return run(binding, run_options)

    monkeypatch.setattr(pipe.sessions.decoder, "run_with_iobinding", slow_prefill)
    deltas = follow(stream, released.set, tick=0.05)
    assert next(deltas) == ""  # a clock tick while the worker is inside the first call
    deltas.close()  # Stop
    stopped.set()
    assert released.wait(10)
    assert stream.stop_reason == "cancelled"
    assert stream.timings.prefill == 0  # the call was aborted, not run to its end


def test_a_stop_request_ends_the_answer_and_the_last_status_says_stopped(loader):
    stop = threading.Event()
    updates = []
    for history, status in respond(loader, [user("Tell me everything.")], LONG, stop=stop):
        updates.append((history, status))
        if len(history) == 2 and text_of(history[-1]):
            stop.set()
    history, status = updates[-1]
    assert "Stopped" in status
    assert history[-1]["role"] == "assistant"
    assert wait_until(lambda: not loader.busy.locked(), timeout=10)


def test_a_typed_image_tag_is_text_not_a_tag():
    messages, images = conversation([user("What does <|image_1|> mean?")])
    assert images == []
    assert not re.search(r"<\|image_\d+\|>", messages[0]["content"])
    assert "image_1" in messages[0]["content"]


def test_an_uploaded_image_still_gets_its_tag_beside_typed_text():
    messages, images = conversation([user("Is <|image_2|> here?", "a.png")])
    assert images == ["a.png"]
    assert re.findall(r"<\|image_\d+\|>", messages[0]["content"]) == ["<|image_1|>"]


def test_a_second_session_gets_no_cache_reuse_from_the_first(loader, monkeypatch):
    pipe = loader.pipeline
    streams = []
    real_stream = pipe.stream

    def recording_stream(*args, **kwargs):  # the real stream, kept so its reuse can be read
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(pipe, "stream", recording_stream)
    history = [user("What is the capital of France?")]
    for session in ("first", "first", "second"):
        for _ in respond(loader, history, 8, conversation_key=session):
            pass
    assert streams[1].reused_tokens > 0  # the same session reuses its own prompt
    assert streams[2].reused_tokens == 0  # another session does not


def test_a_stop_pressed_while_queued_leaves_the_chat_alone():
    stop = threading.Event()
    stop.set()
    ((history, status),) = respond(ModelLoader("unused"), [user("Hi.")], stop=stop)
    assert history is not None and "Stopped" in status  # history is gr.skip(): unchanged


def test_stop_switches_keep_a_stop_pressed_before_the_answer_starts():
    switches = StopSwitches()
    switches.arm("s")
    switches.stop("s")
    flag = switches.begin("s")
    assert flag.is_set()
    switches.end("s", flag)
    assert not switches.begin("s").is_set()  # the next answer starts fresh


def test_a_model_that_is_not_ready_is_explained_in_the_chat():
    loader = ModelLoader("/nonexistent/model-folder")
    ((history, _),) = respond(loader, [user("Hi.")])
    assert text_of(history[-1]).startswith(ERROR_MARK)
    assert "still loading" in text_of(history[-1])


# --- getting the model ready ---------------------------------------------------------------------


def test_a_bad_model_dir_fails_visibly_and_on_stderr(capsys, tmp_path):
    loader = ModelLoader(tmp_path / "missing").start()
    assert not loader.wait(30)
    status = loader.status()
    assert status.phase == "failed"
    assert "missing" in status.error
    assert "missing" in model_panel(status)
    assert "error:" in capsys.readouterr().err


def test_first_launch_downloads_with_progress_then_loads(tmp_path, monkeypatch):
    with first_launch(tmp_path, monkeypatch) as (hub, loader, files):
        assert hub.content_arrived.wait(10)
        assert loader.status().phase == "downloading"
        assert "Downloading" in model_panel(loader.status())
        hub.hold.set()
        assert loader.wait(60), loader.status().error
    status = loader.status()
    assert status.phase == "ready"
    assert status.progress.done == status.progress.total == sum(map(len, files.values()))
    assert is_complete(tmp_path / "data" / DEFAULT_MODEL)


# --- the live app, through gradio_client ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(loader) -> str:
    with serve(loader) as url:
        yield url


@pytest.fixture
def client(server) -> Client:
    return Client(server, download_files=False, verbose=False)


def send(client: Client, history: list, text: str, *files: Path) -> list:
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    history, _ = client.predict(history, message, api_name="/add_message")
    return history


def start_answer(client: Client, history: list, max_new_tokens: int = 64, num_crops: int = 2):
    return client.submit(history, max_new_tokens, 0.0, 1.0, 0, num_crops, api_name="/respond")


def finish(job) -> list[tuple[list, str]]:
    """Every (history, status) update of a job, once it is done."""
    job.result(timeout=ANSWER_TIMEOUT_S)
    wait_until(job.done, timeout=ANSWER_TIMEOUT_S)
    return job.outputs()


def prompt_tokens(status: str) -> int:
    return int(re.search(r"prompt ([\d,]+) tokens", status).group(1).replace(",", ""))


def test_an_image_and_a_prompt_stream_partial_answers_then_a_final_one(client):
    history = send(client, [], "What is in this chart?", CHART)
    updates = finish(start_answer(client, history, max_new_tokens=1000))
    answers = [text_of(h[-1]) for h, _ in updates if h[-1]["role"] == "assistant"]
    final_history, final_status = updates[-1]
    assert len(set(answers)) >= 3, "several partial updates before the final answer"
    assert len(answers[0]) < len(answers[-1]) == max(map(len, answers)), "the answer grows"
    assert "Done" in final_status and "tokens/s" in final_status
    assert [m["role"] for m in final_history] == ["user", "assistant"]


def test_a_second_turn_keeps_the_first_image_and_answer(client):
    history = send(client, [], "Describe this.", SCENE)
    first, first_status = finish(start_answer(client, history))[-1]
    history = send(client, first, "And what colour is the roof?")
    second, second_status = finish(start_answer(client, history))[-1]
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    assert message_parts(second[0]["content"])[1], "the first image is still in the chat"
    assert prompt_tokens(second_status) > prompt_tokens(first_status)  # image + answer kept
    assert "Done" in second_status


def test_a_cancelled_job_stops_and_the_model_is_free_again(client, loader):
    history = send(client, [], "Write a long story.", CHART)
    job = start_answer(client, history, max_new_tokens=LONG)
    wait_until(lambda: any(h[-1]["role"] == "assistant" for h, _ in job.outputs()), timeout=60)
    assert job.cancel()
    wait_until(job.done, timeout=30)
    wait_until(lambda: not loader.busy.locked(), timeout=30)
    count = len(job.outputs())
    time.sleep(0.3)
    assert len(job.outputs()) == count, "no updates after the cancel"
    final_text = text_of(job.outputs()[-1][0][-1])
    assert len(final_text) < LONG  # far from the end (each token is at least one character)
    after = finish(start_answer(client, send(client, [], "Still there?")))[-1]
    assert "Done" in after[1]


def test_a_corrupt_upload_gets_an_error_message_and_the_next_request_works(client, tmp_path):
    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a picture")
    history = send(client, [], "What is this?", broken)
    failed, status = finish(start_answer(client, history))[-1]
    reply = text_of(failed[-1])
    assert reply.startswith(ERROR_MARK) and "photo.png" in reply
    assert "Traceback" not in reply
    history = send(client, failed, "Then this one?", SCENE)
    answered, status = finish(start_answer(client, history))[-1]
    assert "Done" in status
    assert not text_of(answered[-1]).startswith(ERROR_MARK)


def test_answers_run_one_at_a_time_and_the_next_one_waits_in_the_queue(server, client):
    first = start_answer(client, send(client, [], "Long one.", CHART), max_new_tokens=LONG)
    wait_until(lambda: any(h[-1]["role"] == "assistant" for h, _ in first.outputs()), timeout=60)
    other = Client(server, download_files=False, verbose=False)
    second = start_answer(other, send(other, [], "Short one."))
    waiting = wait_until(lambda: second.status().code == Status.IN_QUEUE and second.status())
    assert waiting.rank is not None  # the page shows "queue: rank/size" from this
    assert not second.outputs()
    first.cancel()
    assert "Done" in finish(second)[-1][1]


def test_uploads_over_the_size_limit_are_refused(server):
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)
    upload = requests.post(
        f"{server}gradio_api/upload", files={"files": ("big.png", big)}, timeout=60
    )
    assert upload.status_code == 413
    assert "maximum allowed size" in upload.text


def test_the_page_is_served(server):
    with urllib.request.urlopen(server, timeout=10) as page:
        assert page.status == 200
        assert "Phi-3 Vision" in page.read().decode()


# --- the command line ----------------------------------------------------------------------------


def test_app_py_serves_a_model_dir_with_address_and_login_from_the_environment(
    tiny_legacy_model_dir,
):
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        app.AUTH_ENV: "ada:s3cret",
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
        history = send(client, [], "Hi", SCENE)
        assert "Done" in finish(start_answer(client, history))[-1][1]  # the legacy layout works
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"Running on http://127.0.0.1:{port}" in output


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as page:
            return page.status == 200
    except OSError:
        return False


def test_share_that_cannot_open_a_tunnel_fails_clearly(tiny_model_dir, monkeypatch, capsys):
    def no_tunnel(*args, **kwargs):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr("gradio.networking.setup_tunnel", no_tunnel)
    argv = ["--model-dir", str(tiny_model_dir), "--share", "--host", "127.0.0.1"]
    assert app.main([*argv, "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "--share could not open a public link" in err
    assert "Run without --share" in err
