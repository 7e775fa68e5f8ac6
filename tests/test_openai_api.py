"""The OpenAI-compatible endpoint (phi3v_app.openai_api), spoken to with the official `openai`
package, on a real server (uvicorn on 127.0.0.1) over a real Pipeline on the tiny model set.

The tiny model's answers are gibberish, but deterministic at temperature 0, so every answer can
be compared with what ``Pipeline.generate`` gives for the equivalent messages and images.
"""

from __future__ import annotations

import base64
import http.server
import io
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import requests
import uvicorn
from fastapi import FastAPI
from PIL import Image

from phi3v import Pipeline
from phi3v_app.history import MAX_NEW_TOKENS, typed_text
from phi3v_app.openai_api import StopText, add_openai_routes
from phi3v_app.turns import ModelTurns
from tests.app_helpers import record_streams

REPO = Path(__file__).resolve().parent.parent
MODEL = "phi3v-tiny"
PROMPT_LIMIT = 5000  # tokens: two images (~1,930 each at 16 crops) fit, "word " * 5000 does not
SHORT = 24  # max_tokens of most questions
ENDLESS = MAX_NEW_TOKENS  # the longest answer a request may ask for: with each step slowed
STEP_DELAY_S = 0.005  # ... by this, the tiny model takes 20 s to write it: time to cancel
TIMEOUT_S = 60


# --- serving --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, precision="exact", max_prompt_tokens=PROMPT_LIMIT)


def wait_until(condition: Callable[[], object], timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not true within {timeout} s: {condition}")


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port; yield its URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)


@contextmanager
def api_server(pipeline: Pipeline | None, turns: ModelTurns | None = None, **options):
    """A plain FastAPI app with only the OpenAI routes; yields (base URL, its turns)."""
    turns = turns or ModelTurns(max_waiting=4)
    app = FastAPI()
    add_openai_routes(app, lambda: pipeline, turns, model_name=MODEL, **options)
    with serve(app) as url:
        yield url, turns


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture
def server(pipe) -> Iterator[tuple[str, ModelTurns]]:
    with api_server(pipe) as served:
        yield served


@pytest.fixture
def api(server) -> openai.OpenAI:
    return client(server[0])


# --- requests and what the pipeline says to the same question -------------------------------------


def png(color: str, size: tuple[int, int] = (60, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def ask(api: openai.OpenAI, messages: list[dict], **options):
    options = {"temperature": 0, "max_tokens": SHORT, **options}
    return api.chat.completions.create(model=MODEL, messages=messages, **options)


def ask_streaming(api: openai.OpenAI, messages: list[dict], **options) -> tuple[str, list]:
    """The text of a streamed answer, and its chunks."""
    chunks = list(ask(api, messages, stream=True, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def expected(pipe: Pipeline, messages: list[dict], images=(), max_new_tokens: int = SHORT):
    return pipe.generate(messages, list(images), max_new_tokens=max_new_tokens, temperature=0)


def finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "length" else "stop"


def assert_same_answer(response, generation) -> None:
    assert response.choices[0].message.content == generation.text
    assert response.choices[0].finish_reason == finish_reason(generation.stop_reason)
    assert response.usage.prompt_tokens == len(generation.input_ids)
    assert response.usage.completion_tokens == len(generation.token_ids)
    assert response.usage.total_tokens == len(generation.input_ids) + len(generation.token_ids)


# --- answers --------------------------------------------------------------------------------------


def test_only_requests_with_the_same_user_continue_each_others_kv_cache(api, pipe, monkeypatch):
    """Reuse makes a repeated prompt's first token faster; between anonymous callers that
    would tell one what another sent (issue 9's timing side channel)."""
    streams, remembered = [], []
    real_stream = pipe.stream

    def recording_stream(*args, **kwargs):
        remembered.append(kwargs["remember"])
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(pipe, "stream", recording_stream)
    question = [{"role": "user", "content": [image_part(png("teal")), text_part("And this?")]}]
    for _ in range(2):
        ask(api, question)
    for _ in range(2):
        ask(api, question, user="ada")
    assert remembered == [False, False, True, True]  # anonymous calls keep no cache either
    assert [s.reused_tokens > 0 for s in streams] == [False, False, False, True]


def test_a_text_question_gets_the_pipelines_answer_and_token_counts(api, pipe):
    response = ask(api, [{"role": "user", "content": "What is a rainbow?"}])
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert_same_answer(
        response, expected(pipe, [{"role": "user", "content": "What is a rainbow?"}])
    )


def test_an_image_question_as_a_data_url(api, pipe):
    red = png("red")
    response = ask(
        api, [{"role": "user", "content": [image_part(red), text_part("What colour is it?")]}]
    )
    generation = expected(
        pipe, [{"role": "user", "content": "<|image_1|>\nWhat colour is it?"}], [red]
    )
    assert_same_answer(response, generation)
    assert response.usage.prompt_tokens > 100  # the image's placeholders are in the prompt


def test_two_images_are_tagged_in_the_order_given(api, pipe):
    red, blue = png("red"), png("blue", (40, 60))
    content = [text_part("Compare"), image_part(red), image_part(blue)]
    response = ask(api, [{"role": "user", "content": content}])
    generation = expected(
        pipe, [{"role": "user", "content": "Compare\n<|image_1|>\n<|image_2|>"}], [red, blue]
    )
    assert_same_answer(response, generation)


def test_an_image_asked_for_at_low_detail_is_read_at_one_crop(api, pipe):
    """OpenAI's `detail`, per image: "low" is one crop (a few hundred positions, not ~2,000),
    "high" and "auto" the usual crops."""
    red, blue = png("red", (300, 400)), png("blue", (300, 400))
    low = image_part(red)
    low["image_url"]["detail"] = "low"
    high = image_part(blue)
    high["image_url"]["detail"] = "high"
    response = ask(api, [{"role": "user", "content": [low, high, text_part("Compare")]}])
    prompt = [{"role": "user", "content": "<|image_1|>\n<|image_2|>\nCompare"}]
    generation = pipe.generate(
        prompt, [red, blue], num_crops=[1, None], max_new_tokens=SHORT, temperature=0
    )
    assert_same_answer(response, generation)
    assert generation.input_ids.count(-1) < generation.input_ids.count(-2) // 4


def test_an_unknown_detail_is_a_400_naming_the_field(api):
    part = image_part(png("red"))
    part["image_url"]["detail"] = "ultra"
    refused = refusal(api, [{"role": "user", "content": [part, text_part("Hi")]}])
    assert refused.status_code == 400
    assert refused.body["param"] == "messages[0].content[0].image_url.detail"
    assert '"auto", "low" or "high"' in refused.body["message"]


def test_a_conversation_refers_back_to_an_image_of_an_earlier_turn(api, pipe):
    green, yellow = png("green"), png("yellow")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [image_part(green), text_part("What is this?")]},
        {"role": "assistant", "content": "A green square."},
        {"role": "user", "content": [text_part("And this one?"), image_part(yellow)]},
        {"role": "assistant", "content": [text_part("A yellow one.")]},
        {"role": "user", "content": "Which was first?"},
    ]
    response = ask(api, messages)
    generation = expected(
        pipe,
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "<|image_1|>\nWhat is this?"},
            {"role": "assistant", "content": "A green square."},
            {"role": "user", "content": "And this one?\n<|image_2|>"},
            {"role": "assistant", "content": "A yellow one."},
            {"role": "user", "content": "Which was first?"},
        ],
        [green, yellow],
    )
    assert_same_answer(response, generation)


def test_a_conversation_ending_with_an_assistant_message_continues_it(api, pipe):
    messages = [
        {"role": "user", "content": [image_part(png("red")), text_part("What colour is it?")]},
        {"role": "assistant", "content": "The colour is"},
    ]
    response = ask(api, messages)
    generation = expected(
        pipe,
        [
            {"role": "user", "content": "<|image_1|>\nWhat colour is it?"},
            {"role": "assistant", "content": "The colour is"},
        ],
        [png("red")],
    )
    assert_same_answer(response, generation)
    streamed, _ = ask_streaming(api, messages)
    assert streamed == response.choices[0].message.content


def test_streaming_gives_the_same_text_as_one_answer_and_as_the_pipeline(api, pipe):
    messages = [{"role": "user", "content": [image_part(png("red")), text_part("Describe it.")]}]
    whole = ask(api, messages)
    streamed, chunks = ask_streaming(api, messages, stream_options={"include_usage": True})
    generation = expected(
        pipe, [{"role": "user", "content": "<|image_1|>\nDescribe it."}], [png("red")]
    )
    assert streamed == whole.choices[0].message.content == generation.text
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == finish_reason(generation.stop_reason)
    assert set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []  # stream_options.include_usage: a last chunk with the usage
    assert chunks[-1].usage.prompt_tokens == len(generation.input_ids)
    assert chunks[-1].usage.completion_tokens == len(generation.token_ids)


def test_the_event_stream_is_server_sent_events_ending_in_done(server):
    url, _ = server
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "stream": True,
    }
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert '"object": "chat.completion.chunk"' in events[0]


def test_a_stop_sequence_cuts_the_text_before_it(api, pipe):
    question = [{"role": "user", "content": "Tell me a story."}]
    full = expected(pipe, question, max_new_tokens=60).text
    assert len(full) > 20, "the tiny model stopped too soon for this test"
    stop = full[12:15]
    cut = full[: full.find(stop)]
    response = ask(api, question, max_tokens=60, stop=stop)
    assert response.choices[0].message.content == cut
    assert response.choices[0].finish_reason == "stop"
    streamed, chunks = ask_streaming(api, question, max_tokens=60, stop=["\x00never", stop])
    assert streamed == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_an_answer_cut_at_a_stop_sequence_counts_its_tokens_up_to_the_stop(api, pipe):
    """completion_tokens counts the tokens up to the one that completes the stop sequence,
    never those the model went on to make while the text was being read."""
    question = [{"role": "user", "content": "Tell me a story."}]
    full = expected(pipe, question, max_new_tokens=60)
    stop = full.text[12:15]
    needed = next(
        count
        for count in range(1, len(full.token_ids) + 1)
        if stop in pipe.tokenizer.decode(full.token_ids[:count])
    )
    assert needed < len(full.token_ids), "the stop is in the last token: this proves nothing"
    for _ in range(3):  # the model runs ahead of the reader by a varying number of tokens
        response = ask(api, question, max_tokens=60, stop=stop)
        assert response.usage.completion_tokens == needed
        _, chunks = ask_streaming(
            api, question, max_tokens=60, stop=stop, stream_options={"include_usage": True}
        )
        assert chunks[-1].usage.completion_tokens == needed


def test_stop_text_holds_back_what_may_begin_a_stop_sequence():
    text = StopText(["END", "xyz"])
    assert text.push("abcE") == "abc"
    assert text.push("Nd") == "ENd"  # "EN" then "d": not "END" after all
    assert text.push("xy") == ""
    assert text.push("w") == "xyw"
    assert text.push("--EN") == "--"
    assert text.push("D and more") == ""
    assert text.stopped
    assert text.text == "abcENdxyw--"
    assert text.flush() == ""


def test_stop_text_releases_the_held_back_end_when_the_answer_ends():
    text = StopText(["</s>"])
    assert text.push("done </") == "done "
    assert text.flush() == "</"
    assert not text.stopped


def test_a_typed_image_tag_stays_text(api, pipe):
    typed = "What does <|image_1|> mean?"
    as_text = typed_text(typed)  # what the chat gives the model for the same typing
    alone = ask(api, [{"role": "user", "content": typed}])
    assert_same_answer(alone, expected(pipe, [{"role": "user", "content": as_text}]))
    red = png("red")
    parts = [image_part(red), text_part(typed)]
    beside = ask(api, [{"role": "user", "content": parts}])
    generation = expected(pipe, [{"role": "user", "content": f"<|image_1|>\n{as_text}"}], [red])
    assert_same_answer(beside, generation)


def test_models_lists_the_loaded_model_set(api):
    assert [model.id for model in api.models.list().data] == [MODEL]


def test_models_says_which_precision_runs_and_why(api):
    (model,) = api.models.list().data
    assert model.phi3v == {"precision": "exact", "reason": "asked for", "self_check": None}


def test_the_answer_names_the_model_that_runs(api):
    assert ask(api, [{"role": "user", "content": "Hi"}]).model == MODEL


def test_a_model_that_is_not_served_is_a_404_model_not_found(api):
    with pytest.raises(openai.NotFoundError) as refused:
        api.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
    assert refused.value.body["code"] == "model_not_found"
    assert f"this server runs `{MODEL}`" in refused.value.body["message"]


def test_the_served_model_is_found_by_its_id_and_another_is_a_404(api):
    found = api.models.retrieve(MODEL)
    assert found.id == MODEL and found.phi3v["precision"] == "exact"
    with pytest.raises(openai.NotFoundError) as refused:
        api.models.retrieve("gpt-4o")
    assert refused.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("method", "path", "status", "said"),
    [
        ("GET", "/v1/chat/completions", 405, "use POST"),
        ("POST", "/v1/models", 405, "use GET"),
        ("POST", "/v1/completions", 404, "serves POST /v1/chat/completions and GET /v1/models"),
        ("GET", "/v1/embeddings", 404, "/v1/embeddings is not an endpoint of this server"),
    ],
)
def test_other_v1_requests_get_openais_error_shape(server, method, path, status, said):
    answer = requests.request(method, server[0] + path, json={}, timeout=30)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert said in error["message"] and error["type"] == "invalid_request_error"


# --- the turn: one generation at a time, shared with the chat -------------------------------------


def test_a_request_waits_while_the_chat_holds_the_turn(pipe):
    with api_server(pipe, ModelTurns(max_waiting=1)) as (url, turns):
        answers = []
        with turns.turn():  # the chat is answering
            thread = threading.Thread(
                target=lambda: answers.append(ask(client(url), [{"role": "user", "content": "Hi"}]))
            )
            thread.start()
            wait_until(lambda: turns.waiting == 1)
            assert answers == []
        thread.join(TIMEOUT_S)
        assert answers[0].choices[0].finish_reason in ("stop", "length")


def test_a_full_queue_answers_429_and_the_next_request_after_it_is_served(pipe):
    with api_server(pipe, ModelTurns(max_waiting=0)) as (url, turns):
        api = client(url)
        with turns.turn(), pytest.raises(openai.RateLimitError) as refused:
            ask(api, [{"role": "user", "content": "Hi"}])
        assert refused.value.status_code == 429
        assert "queue is full" in refused.value.body["message"]
        assert refused.value.response.headers["retry-after"]
        assert ask(api, [{"role": "user", "content": "Hi"}]).choices


def test_a_caller_that_leaves_mid_stream_cancels_the_generation_and_frees_the_turn(
    pipe, monkeypatch
):
    streams = record_streams(pipe, monkeypatch)
    step = pipe.sessions.embed_token
    monkeypatch.setattr(
        pipe.sessions, "embed_token", lambda *args: time.sleep(STEP_DELAY_S) or step(*args)
    )
    with api_server(pipe, ModelTurns(max_waiting=0)) as (url, turns):
        api = client(url)
        question = [{"role": "user", "content": "Go on forever."}]
        stream = ask(api, question, stream=True, max_tokens=ENDLESS)
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)
        assert first.choices[0].delta.content
        stream.close()  # the caller goes away
        wait_until(lambda: streams[0].stop_reason is not None)
        assert streams[0].stop_reason == "cancelled"
        assert len(streams[0].token_ids) < ENDLESS
        wait_until(lambda: not turns.busy)
        assert ask(api, question).choices  # with no room to wait: the turn is free


# --- refused requests: status, OpenAI's error shape, a message saying what to do, one log line ----


def refusal(api: openai.OpenAI, messages: list[dict], **options) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as refused:
        ask(api, messages, **options)
    return refused.value


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            [image_part(png("red")), text_part("hi")],
            None,  # the control: the same request with a good image is answered
        ),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}],
            "base64 data is invalid",
        ),
        (
            [{"type": "image_url", "image_url": {"url": data_url(b"just some text")}}],
            "not an image Pillow can read",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}],
            "--allow-remote-images",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
            "data:image/...;base64",
        ),
        ([{"type": "input_audio", "input_audio": {}}], "must be {'type': 'text'"),
    ],
    ids=["good image", "bad base64", "not an image", "http URL", "file URL", "unknown part"],
)
def test_a_bad_image_part_is_a_400_that_says_what_is_wrong(api, content, message, caplog):
    messages = [{"role": "user", "content": content}]
    if message is None:
        assert ask(api, messages).choices
        return
    with caplog.at_level(logging.INFO):
        refused = refusal(api, messages)
    assert refused.status_code == 400
    assert refused.body["type"] == "invalid_request_error"
    assert message in refused.body["message"]
    assert_one_log_line_without_traceback(caplog, refused.body["message"])


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([text_part("What is it?"), image_part(b"just some text")], "messages[1].content[1]"),
        (
            [image_part(png("red")), text_part("and"), image_part(png("blue")[:40])],
            "messages[1].content[2]",
        ),
    ],
    ids=["the only image", "the second of two"],
)
def test_an_image_that_cannot_be_read_is_named_by_where_it_was(api, content, param):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    refused = refusal(api, messages)
    assert refused.status_code == 400
    assert refused.body["param"] == param


def assert_one_log_line_without_traceback(caplog, message: str) -> None:
    lines = [r for r in caplog.records if r.name == "phi3v.app.openai"]
    assert len(lines) == 1 and message in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_an_unknown_role_is_a_400_naming_the_roles_this_server_takes(api):
    refused = refusal(api, [{"role": "tool", "content": "42", "tool_call_id": "x"}])
    assert refused.status_code == 400
    assert refused.body["param"] == "messages[0].role"
    assert "role 'tool'" in refused.body["message"]
    assert "system, developer, user and assistant" in refused.body["message"]


def test_too_many_images_is_a_400(pipe):
    with api_server(pipe, max_images=2) as (url, _):
        api = client(url)
        two = [image_part(png("red")), image_part(png("blue"))]
        assert ask(api, [{"role": "user", "content": two}]).choices
        refused = refusal(api, [{"role": "user", "content": [*two, image_part(png("green"))]}])
    assert refused.status_code == 400
    assert refused.body["code"] == "too_many_images"
    assert "more than 2 images" in refused.body["message"]


def test_an_image_over_the_size_limit_is_a_413(pipe):
    small, big = png("red", (8, 8)), png("red", (8, 8)) + bytes(4000)
    with api_server(pipe, max_image_bytes=1000) as (url, _):
        api = client(url)
        assert ask(api, [{"role": "user", "content": [image_part(small)]}]).choices
        refused = refusal(api, [{"role": "user", "content": [image_part(big)]}])
    assert refused.status_code == 413
    assert "larger than this server takes" in refused.body["message"]


def test_a_prompt_over_the_servers_limit_is_a_400_context_length_exceeded(api, caplog):
    with caplog.at_level(logging.INFO):
        refused = refusal(api, [{"role": "user", "content": "word " * PROMPT_LIMIT}])
    assert refused.status_code == 400
    assert refused.body["code"] == "context_length_exceeded"
    assert f"at most {PROMPT_LIMIT:,}" in refused.body["message"]
    assert_one_log_line_without_traceback(caplog, refused.body["message"])


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 4097}, "max_tokens"),
        ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
        ({"extra_body": {"num_crops": 17}}, "num_crops"),
    ],
)
def test_a_bad_setting_is_a_400_naming_the_field(api, options, param):
    refused = refusal(api, [{"role": "user", "content": "Hi"}], **options)
    assert refused.status_code == 400
    assert refused.body["param"] == param


def test_a_body_that_is_not_json_is_a_400_in_openais_error_shape(server):
    url, _ = server
    response = requests.post(
        f"{url}/v1/chat/completions", data=b"{not json", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "not valid JSON" in error["message"]


def test_a_wrong_or_missing_key_is_a_401(pipe):
    with api_server(pipe, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError) as refused:
            ask(client(url, api_key="guess"), [{"role": "user", "content": "Hi"}])
        assert refused.value.status_code == 401
        assert "Authorization: Bearer" in refused.value.body["message"]
        assert requests.get(f"{url}/v1/models").status_code == 401
        assert ask(client(url, api_key="s3cret"), [{"role": "user", "content": "Hi"}]).choices


def test_a_model_still_loading_is_a_503_saying_to_try_again():
    with api_server(None) as (url, _), pytest.raises(openai.InternalServerError) as refused:
        ask(client(url), [{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 503
    assert "try again" in refused.value.body["message"]
    assert refused.value.response.headers["retry-after"]


# --- remote images: only when the server allows them ----------------------------------------------


@contextmanager
def file_server(files: dict[str, bytes]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_http_image_is_fetched_only_with_allow_remote_images(pipe):
    blue = png("blue")
    with (
        file_server({"/blue.png": blue}) as files,
        api_server(pipe, allow_remote_images=True) as (url, _),
    ):
        api = client(url)
        content = [{"type": "image_url", "image_url": {"url": f"{files}/blue.png"}}, text_part("?")]
        response = ask(api, [{"role": "user", "content": content}])
        missing = [{"type": "image_url", "image_url": {"url": f"{files}/gone.png"}}]
        refused = refusal(api, [{"role": "user", "content": missing}])
    assert_same_answer(
        response, expected(pipe, [{"role": "user", "content": "<|image_1|>\n?"}], [blue])
    )
    assert refused.status_code == 400
    assert "HTTP 404" in refused.body["message"]


# --- the app: the README's example, verbatim, against `python app.py` -----------------------------


def readme_block(language: str, after: str) -> str:
    """The first ```language block of README.md after the heading ``after``."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(after) :]
    return re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_app_takes_its_api_options_from_the_command_line_or_the_environment(monkeypatch):
    from phi3v_app.cli import parse_args

    monkeypatch.delenv("PHI3V_API_KEY", raising=False)
    assert parse_args([]).api_key is None
    assert not parse_args([]).allow_remote_images
    assert parse_args(["--api-key", "k1", "--allow-remote-images"]).allow_remote_images
    monkeypatch.setenv("PHI3V_API_KEY", "k2")
    assert parse_args([]).api_key == "k2"
    assert parse_args(["--api-key", "k1"]).api_key == "k1"


def test_the_readme_openai_example_runs_against_the_app_with_a_login(tiny_model_dir):
    """`python app.py --auth ...` without --api-key prints a made-up key the API requires; the
    README's example, extracted verbatim, runs with it; the page mentions the endpoint."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if key != "PHI3V_API_KEY"}
    command = [sys.executable, "app.py", "--model-dir", str(tiny_model_dir), "--port", str(port)]
    app = subprocess.Popen(
        [*command, "--auth", "ada:s3cret", "--precision", "exact"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        printed = []
        for line in app.stdout:
            printed.append(line)
            if line.startswith("* Running on"):
                break
        key = next(line.split()[-1] for line in printed if line.startswith("* API key"))
        probe = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        chat = f"{url}/v1/chat/completions"
        assert requests.post(chat, json=probe).status_code == 401

        def answered() -> bool:  # 503 until the model has loaded
            headers = {"Authorization": f"Bearer {key}"}
            return requests.post(chat, json=probe, headers=headers).status_code == 200

        wait_until(answered)
        code = readme_block("python", "## OpenAI-compatible API")
        example = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**env, "OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert example.returncode == 0, example.stderr
        visitor = requests.Session()
        visitor.post(f"{url}/login", data={"username": "ada", "password": "s3cret"})
        assert "/v1/chat/completions" in visitor.get(f"{url}/config").text
    finally:
        app.terminate()
        app.wait(TIMEOUT_S)
