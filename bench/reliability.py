"""Write docs/RELIABILITY.md: what a public link was put through, how often, and what held.

Runs ``tests/test_reliability.py`` (the app on 127.0.0.1 over the tiny model: concurrent users,
a soak of cancelled streams, path traversal, hostile uploads) with ``PHI3V_RELIABILITY_OUT`` set,
and adds the memory bound measured by ``bench/memory.py`` and the regression test of each defect
the hardening issue listed (checked to exist).

    python bench/reliability.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tables

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
OUT = REPO / "docs" / "RELIABILITY.md"
DEFECTS = (  # (what was found, the test that keeps it fixed: "file::name")
    (
        "one request could take the machine's memory (prompt length, images, repeated uploads)",
        [
            "test_generate.py::test_a_prompt_longer_than_the_context_is_refused_before_the_models_run",
            "test_generate.py::test_a_prompt_over_the_servers_limit_is_refused_with_what_to_do",
            "test_generate.py::test_the_default_prompt_limit_is_what_half_the_free_memory_holds",
            "test_app.py::test_too_many_images_in_one_message_are_refused_with_the_limit",
            "test_app.py::test_too_many_images_over_the_conversation_are_refused",
            "test_app.py::test_a_forged_history_that_repeats_one_upload_is_refused_by_its_name",
            "test_convert.py::test_chunked_prefill_equals_one_shot_prefill_in_exact",
        ],
    ),
    (
        "Stop, page load and unlocking queued behind answers and got 'queue full'",
        [
            "test_browser.py::test_a_full_line_is_said_in_the_chat_and_stop_and_reload_still_work",
            "test_app.py::test_a_full_line_is_told_in_the_chat_with_a_retry_hint",
        ],
    ),
    (
        "one kept KV cache shared by every visitor: a timing side channel",
        ["test_app.py::test_a_second_session_gets_no_cache_reuse_from_the_first"],
    ),
    (
        "HF_TOKEN sent to another host named by the tree API's next-page link",
        [
            "test_download.py::test_hf_token_is_not_sent_to_another_host_the_next_page_link_names",
            "test_download.py::test_hf_token_is_not_sent_along_a_redirect_to_another_host",
        ],
    ),
    (
        "credentials inside HF_ENDPOINT shown to visitors",
        [
            "test_download.py::test_error_messages_name_the_endpoint_without_its_password_or_the_token",
            "test_download.py::test_cli_failure_names_the_endpoint_without_its_password",
        ],
    ),
    (
        "server paths and library internals in public messages",
        [
            "test_app.py::test_a_damaged_picture_is_named_by_its_upload_name_and_the_next_call_works",
            "test_reliability.py::test_hostile_uploads_get_a_message_naming_them_and_the_server_keeps_serving",
        ],
    ),
    (
        "a typed image tag (`<\\|image_N\\|>`) read as an image tag",
        [
            "test_app.py::test_a_typed_image_tag_is_text_not_a_tag",
            "test_app.py::test_an_uploaded_image_still_gets_its_tag_beside_typed_text",
        ],
    ),
    (
        "a full traceback in the log for each malformed request",
        [
            "test_app.py::test_a_refused_upload_is_logged_in_one_line",
            "test_app.py::test_a_malformed_request_gets_a_message_and_the_log_one_line",
        ],
    ),
)


def run_scenarios() -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_reliability.py",
            ],
            cwd=REPO,
            env={**os.environ, "PHI3V_RELIABILITY_OUT": str(out)},
            capture_output=True,
            text=True,
        )
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "no output"
        if not out.exists():
            raise SystemExit(f"the reliability tests wrote no record: {summary}\n{done.stdout}")
        return json.loads(out.read_text()), summary


def test_exists(reference: str) -> bool:
    file, name = reference.split("::")
    path = REPO / "tests" / file
    return path.exists() and re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.M)


def memory_section() -> str:
    files = sorted(RESULTS.glob("memory-*.json"))
    if not files:
        return "No memory measurement in `bench/results/` yet: run `bench/memory.py`."
    parts = []
    for path in files:
        report = json.loads(path.read_text())
        source = f"`bench/results/{path.name}` ({report['date']}, `{report['model']}`):"
        parts.append(f"{source}\n\n{tables.memory(report)}")
    return "\n\n".join(parts)


def document(record: list[dict], summary: str) -> str:
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    tried = [
        "| scenario | what was tried | how many | what held | figures |",
        "|---|---|---|---|---|",
    ]
    for r in record:
        figures = ", ".join(
            f"{k.replace('_', ' ')} {v}"
            for k, v in r.items()
            if k not in ("scenario", "tried", "count", "held")
        )
        tried.append(f"| {r['scenario']} | {r['tried']} | {r['count']} | {r['held']} | {figures} |")
    defects = ["| defect found | regression tests |", "|---|---|"]
    for defect, tests in DEFECTS:
        names = "<br>".join(f"`{t}`" + ("" if test_exists(t) else " (**missing**)") for t in tests)
        defects.append(f"| {defect} | {names} |")
    return f"""# Reliability of a public demo link

Generated by `python bench/reliability.py` on {date} at commit {commit}; do not edit by hand.
The scenarios are `tests/test_reliability.py`, which CI runs as well (pytest: {summary}).

## What was tried, and what held

The app on 127.0.0.1 over the tiny random-weight model, driven through its public `/chat` API
with `gradio_client` and with plain HTTP requests.

{chr(10).join(tried)}

## The defects found, and the tests that keep them fixed

{chr(10).join(defects)}

## Limits, and memory per request

- **Prompt tokens per request:** at most what half of the memory available at load time holds
  as KV cache (`Pipeline.load(max_prompt_tokens=)` sets it), and never more than the context;
  a longer prompt is refused before any model runs, with a message saying how to shorten it.
- **Images:** 8 per message and 16 per conversation in the chat, 16 per request in the OpenAI
  endpoint, 20 MB per upload; a picture sent again counts again (the model reads it again),
  but its features are computed once.
- **Memory per request is bounded by construction:** the KV cache takes pages only as positions
  are computed (`phi3v/kv_cache.py`), the prompt is processed in chunks of 512 positions, so
  logits never exceed `[512, vocab]` (64 MB) and the fast decoder makes the last position's
  only; kept conversations' caches share a budget of a quarter of the memory available at load.
  Peak RSS = RSS after load + KV cache (0.75 MiB per position on the real model) + one chunk's
  attention workspace, measured:

{memory_section()}
"""


def main() -> None:
    record, summary = run_scenarios()
    OUT.write_text(document(record, summary))
    print(f"wrote {OUT.relative_to(REPO)} ({summary})")


if __name__ == "__main__":
    main()
