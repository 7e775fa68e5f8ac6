"""`python -m phi3v`: streams to stdout, prints JSON, and fails with one readable line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phi3v.cli import build_parser
from phi3v.huge_pages import NOT_ASKED

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phi3v", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), np.uint8)).save(path)
    return path


def test_streams_an_answer_about_an_image(tiny_model_dir, picture):
    done = run_cli("--model", str(tiny_model_dir), "--image", str(picture),
                   "--prompt", "Describe it", "--max-new-tokens", "24")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 10
    assert done.stderr == ""


def test_json_prints_the_result_object(tiny_model_dir, picture):
    done = run_cli("--model", str(tiny_model_dir), "--image", str(picture), "--prompt", "Hi",
                   "--max-new-tokens", "8", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {
        "text",
        "token_ids",
        "input_ids",
        "stop_reason",
        "timings",
        "reused_tokens",
    }
    assert len(result["token_ids"]) == 8 and result["stop_reason"] == "length"
    assert result["input_ids"].count(-1) == 1921
    assert set(result["timings"]) == {
        "preprocess", "vision", "prefill", "time_to_first_token", "decode_tokens_per_second",
    }  # fmt: skip


def test_sampling_options_are_passed_through(tiny_model_dir):
    def tokens(seed: str) -> list[int]:
        done = run_cli("--model", str(tiny_model_dir), "--prompt", "Hi", "--json", "--seed", seed,
                       "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9",
                       "--max-new-tokens", "12")  # fmt: skip
        return json.loads(done.stdout)["token_ids"]

    assert tokens("1") == tokens("1") != tokens("2")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "model folder /nonexistent/model does not exist"),
        (["--image", "/nonexistent.png"], "image file /nonexistent.png does not exist"),
        (["--image", "FOLDER"], "is a folder; give the path of an image file"),
        (["--model", "CONFIG"], "genai_config.json is a file; pass the model folder that holds"),
        (["--num-crops", "99"], "num_crops must be an integer from 1 to 16"),
        (["--prompt", "<|image_2|> what?", "--image", "IMAGE"], "without gaps"),
    ],
)
def test_errors_are_one_line_without_traceback(tiny_model_dir, picture, args, message):
    base = {"--model": str(tiny_model_dir), "--prompt": "Hi"}
    paths = {
        "IMAGE": picture,
        "FOLDER": picture.parent,
        "CONFIG": tiny_model_dir / "genai_config.json",
    }
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = str(paths.get(value, value))
    done = run_cli(*[item for pair in base.items() for item in pair])
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize("value", ["-1", "2.5", "100", "nan", "warm"])
def test_a_temperature_outside_0_to_2_is_refused_as_on_the_web_page_and_the_api(value):
    """The library's ``Sampling`` takes up to 100; the program takes OpenAI's range, 0 to 2."""
    done = run_cli("--model", "unused", "--prompt", "Hi", "--temperature", value)
    assert done.returncode == 2  # argparse's, before any model is loaded
    assert "Traceback" not in done.stderr
    refusal = f"error: argument --temperature: {value!r} is not a number from 0 to 2"
    assert done.stderr.strip().splitlines()[-1] == f"python -m phi3v: {refusal}"


@pytest.mark.parametrize("value", ["0", "0.7", "2"])
def test_a_temperature_from_0_to_2_is_taken(value):
    args = build_parser().parse_args(["--model", "unused", "--temperature", value])
    assert args.temperature == float(value)


def test_help_documents_every_option():
    done = run_cli("--help")
    for option in ("--model", "--image", "--prompt", "--max-new-tokens", "--temperature",
                   "--top-k", "--top-p", "--seed", "--num-crops", "--json"):  # fmt: skip
        assert option in done.stdout
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert "(default: 512)" in text  # a real default is shown ...
    for empty in ("(default: None)", "(default: [])", "(default: False)"):  # ... nothing else
        assert empty not in text
    assert text.count("(default: one per physical core)") == 1
    assert "--temperature TEMPERATURE 0 to 2: 0 is greedy decoding" in text


def test_a_reader_that_stops_early_ends_it_quietly(tiny_model_dir):
    """``python -m phi3v ... | head -c 20``: the pipe closes while the answer streams."""
    command = [sys.executable, "-m", "phi3v", "--model", str(tiny_model_dir), "--prompt", "Hi",
               "--max-new-tokens", "2000"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                          env=env) as cli:  # fmt: skip
        assert cli.stdout.read(20)
        cli.stdout.close()  # as head does once it has its bytes
        errors = cli.stderr.read().decode()
        assert cli.wait(timeout=120) == 1
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors


def test_check_says_which_precision_runs_and_the_self_check(tiny_int4_model_dir):
    done = run_cli("--model", str(tiny_int4_model_dir), "--precision", "fast", "--check", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["precision"] == "fast"
    assert report["self_check"]["passed"] is True
    assert 0 <= report["self_check"]["fast"]["top1"] <= 1
    assert report["prompt_attention"].startswith(("fused causal fp32", "GroupQueryAttention"))
    assert report["vision_attention"].startswith(("fused fp32", "MultiHeadAttention"))
    # one question per process: the weights are not moved to 2 MB pages unless asked
    assert report["memory_pages"] == "weights on 4 KB pages: " + NOT_ASKED
    plain = run_cli("--model", str(tiny_int4_model_dir), "--precision", "exact", "--check")
    lines = plain.stdout.splitlines()
    assert lines[0] == "precision: exact (asked for)"
    assert lines[1].startswith("memory pages: ") and len(lines) == 2


def test_a_prompt_is_required_unless_checking(tiny_model_dir):
    done = run_cli("--model", str(tiny_model_dir))
    assert done.returncode == 2
    assert "--prompt is required (or --check)" in done.stderr
