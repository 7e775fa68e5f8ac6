"""The app in a real browser: Debian's headless Chromium, driven by Playwright for Python.

Each test is one thing a visitor does (the cases of issue 10). Screenshots of the desktop and
phone layouts (and, from tests/test_browser_answers.py, of the example cards) go to
test-artifacts/; to refresh the ones in docs/ as well:

    PHI3V_UPDATE_SCREENSHOT=1 python -m pytest tests/test_browser.py tests/test_browser_answers.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import playwright.sync_api as sync_api  # a declared test dependency: never skipped
import pytest

from phi3v.kv_cache import KVCache
from phi3v_app.loading import ModelLoader
from tests.app_helpers import (
    first_launch,
    ready_loader,
    record_streams,
    serve,
    serve_demo,
    wait_until,
)

expect = sync_api.expect

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
DOCS = REPO / "docs"
CHART = REPO / "data" / "examples" / "bar_chart.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)  # a loaded machine streams slowly; never a timed check
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
LONG = "4096"  # max new tokens for an answer long enough to watch, retry and stop


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    """One server for the module, with room for one answer waiting in line."""
    with serve_demo(ready_loader(tiny_model_dir), queue_size=1) as (url, app):
        yield url, app


def open_page(browser, url: str, viewport=DESKTOP, clock=False, **options):
    page = browser.new_page(viewport=viewport, **options)
    page.set_default_timeout(TIMEOUT_MS)
    if clock:  # its timers on Playwright's clock: in real time, unless a test runs it ahead
        page.clock.install()
    page.goto(url)
    return page


@pytest.fixture
def slow_decode(monkeypatch):
    """Each decode step takes 5 ms more (the server runs in this process). The tiny model writes
    LONG tokens in about 2 s on a fast machine, which a test that watches or stops an answer
    can lose the race with; at this pace an answer streams for as long as it needs."""
    real_run = KVCache.run

    def slow_step(cache, session, embeds, run_options=None):
        if embeds.shape[1] == 1:
            time.sleep(0.005)
        return real_run(cache, session, embeds, run_options)

    monkeypatch.setattr(KVCache, "run", slow_step)


@pytest.fixture
def page(browser, live):
    page = open_page(browser, live[0])
    expect(page.locator("#chat-input textarea")).to_be_enabled()  # the model is loaded
    yield page
    page.close()


@pytest.fixture
def clocked_page(browser, live):
    """``page`` with its timers on Playwright's clock, for :func:`let_the_chat_settle`."""
    page = open_page(browser, live[0], clock=True)
    expect(page.locator("#chat-input textarea")).to_be_enabled()
    yield page
    page.close()


def prompt(page):
    return page.locator("#chat-input textarea")


def status(page):
    return page.locator("#status")


def answer_text(page) -> str:
    answers = page.locator("#chat [data-testid='bot']")
    return answers.last.inner_text() if answers.count() else ""


def download_one_answer(page, button: str, tmp_path: Path) -> Path:
    """Ask one short question about the chart, then save what ``button`` downloads."""
    set_max_new_tokens(page, "8")
    ask(page, "Which month had the most rain?", CHART)
    expect(status(page)).to_contain_text("Done")
    download_button = page.locator(button)
    expect(download_button).to_be_enabled()
    with page.expect_download() as downloading:
        download_button.click()
    saved = tmp_path / downloading.value.suggested_filename
    downloading.value.save_as(saved)
    return saved


def set_max_new_tokens(page, value: str) -> None:
    page.get_by_role("button", name="Parameters").click()
    field = page.locator("input[aria-label='number input for Max new tokens']")

    def kept() -> bool:  # a render still settling right after the page loaded can reset it
        field.fill(value)
        field.press("Tab")
        page.wait_for_timeout(200)
        return field.input_value() == value

    wait_until(kept, timeout=10)
    page.get_by_role("button", name="Parameters").click()


# After an update that finds the chat scrolled to its end, Gradio's chat scrolls to its end again
# this long after (Gradio 6's Chatbot: a render tick, then this timer), wherever it was since.
CHAT_AUTOSCROLL_MS = 300


def let_the_chat_settle(page) -> None:
    """Make the chat take, now, the scroll it still owes to the answer's last update.

    On a busy machine "Done" and the enabled input come within CHAT_AUTOSCROLL_MS of that
    update. A click on a question's button, which Playwright first scrolls into view, is lost
    if the chat jumps back to its end between the press and the release: the release lands
    beside the button. A ``clocked_page`` runs its timers on Playwright's clock; here the clock
    is run ahead past that timer instead of waited for."""
    page.clock.fast_forward(CHAT_AUTOSCROLL_MS)


def ask(page, text: str, *files: Path) -> None:
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(f) for f in files])
        expect(page.locator("#chat-input img")).to_have_count(len(files))  # the thumbnails
    prompt(page).fill(text)
    prompt(page).press("Enter")


def save_screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    page.screenshot(path=str(shot))
    if os.environ.get("PHI3V_UPDATE_SCREENSHOT"):
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / name)
        if name == "desktop.png":  # the README's picture
            shutil.copyfile(shot, DOCS / "screenshot.png")


# --- asking, streaming, stopping -----------------------------------------------------------------


def test_upload_ask_watch_the_answer_stream_in_then_esc_stops_it(page):
    set_max_new_tokens(page, LONG)
    ask(page, "Which month had the most rain, and how much was it?", CHART)
    expect(page.locator("#chat [data-testid='user'] img")).to_have_count(1)
    lengths: list[int] = []
    wait_until(lambda: lengths.append(len(answer_text(page))) or len(set(lengths) - {0}) >= 3)
    assert max(lengths) > min(set(lengths) - {0}), "the answer grows while it streams"
    expect(status(page)).to_contain_text("tokens/s")
    expect(page.locator("#stop")).to_be_enabled()

    page.keyboard.press("Escape")
    expect(status(page)).to_contain_text("Stopped")
    stopped_at = answer_text(page)
    page.wait_for_timeout(500)
    assert answer_text(page) == stopped_at, "nothing is added after Stop"
    expect(prompt(page)).to_be_enabled()  # ready for the next question
    expect(page.locator("#stop")).to_be_disabled()


CONTROLS_JS = """() => [document.querySelector('#status').innerText,
                         document.querySelector('#chat-input textarea').disabled,
                         document.querySelector('#stop').disabled,
                         [...document.querySelectorAll('#chat button[aria-label^=Retry]')]
                             .every(button => button.disabled)]"""


def watch_controls_until_done(page) -> int:
    """Sample the controls until the status says Done; every sample taken while the answer
    streams must show the input locked, Stop enabled and Retry disabled. Returns how many
    such samples were taken."""
    answering = 0
    while "Done" not in status(page).inner_text():
        text, input_locked, stop_disabled, retry_disabled = page.evaluate(CONTROLS_JS)
        if "Answering" in text:
            answering += 1
            assert input_locked, "the input stays locked while the answer streams"
            assert not stop_disabled, "Stop stays enabled while the answer streams"
            assert retry_disabled, "Retry cannot restart an answer that is still running"
        page.wait_for_timeout(50)
    return answering


def test_retry_keeps_stop_enabled_and_the_input_locked_until_the_new_answer_ends(page, slow_decode):
    set_max_new_tokens(page, "1000")  # about 5 s at slow_decode's pace, sampled every 50 ms
    ask(page, "Tell me a long story.")
    assert watch_controls_until_done(page) > 0, "the answer was seen streaming"
    first = answer_text(page)
    page.locator("#chat").get_by_role("button", name="Retry").click()
    expect(status(page)).not_to_contain_text("Done")  # the retry has begun
    assert watch_controls_until_done(page) > 0, "the retried answer was seen streaming"
    expect(prompt(page)).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    assert len(page.locator("#chat [data-testid='bot']").all()) == 1  # replaced, not added
    assert answer_text(page) == first  # greedy: the same answer again


def test_clear_during_an_answer_stops_it_and_nothing_comes_back(page, live):
    set_max_new_tokens(page, LONG)
    ask(page, "Tell me a long story.")
    expect(status(page)).to_contain_text("Answering")
    page.locator("#chat").get_by_role("button", name="Clear").click()
    expect(prompt(page)).to_be_enabled()
    wait_until(lambda: not live[1].turns.busy)  # the model was let go
    page.wait_for_timeout(300)
    assert page.locator("#chat [data-testid='bot']").count() == 0, "the chat stays empty"
    expect(page.locator("#stop")).to_be_disabled()


def test_stop_while_waiting_in_line_removes_the_question_from_the_line(page, live):
    turns = live[1].turns
    ask(page, "Hello?")
    expect(status(page)).to_contain_text("Done")
    with turns.turn():  # another visitor's answer has the model
        ask(page, "Are you there?")
        expect(status(page)).to_contain_text("In line: 1 request ahead of yours")  # not "Done"
        wait_until(lambda: turns.waiting == 1)
        page.get_by_role("button", name="Stop").click()
        expect(status(page)).to_contain_text("Stopped before the answer began")
        expect(page.locator("#chat [data-testid='bot']").last).to_contain_text("Stopped")
        expect(prompt(page)).to_be_enabled()
        assert turns.waiting == 0  # left the line while the answer ahead still runs


def test_a_full_line_is_said_in_the_chat_and_stop_and_reload_still_work(browser, live):
    url, app = live
    turns = app.turns  # one answer may wait
    first, second = open_page(browser, url), open_page(browser, url)
    with turns.turn():
        ask(first, "I wait.")
        wait_until(lambda: turns.waiting == 1)
        ask(second, "Me too?")
        expect(second.locator("#chat [data-testid='bot']").last).to_contain_text("busy")
        expect(second.locator("#chat [data-testid='bot']").last).to_contain_text("try again")
        expect(prompt(second)).to_be_enabled()
        second.reload()  # the page's own events never wait behind answers
        expect(second.locator("#model-panel")).to_contain_text("Ready")
        expect(prompt(second)).to_be_enabled()
        first.get_by_role("button", name="Stop").click()
        expect(status(first)).to_contain_text("Stopped before the answer began")
        assert turns.waiting == 0
    first.close()
    second.close()


def test_undo_takes_the_last_question_back_into_the_input(page):
    ask(page, "First question.")
    expect(status(page)).to_contain_text("Done")
    ask(page, "Second question.")
    expect(page.locator("#chat [data-testid='bot']")).to_have_count(2)
    expect(prompt(page)).to_be_enabled()
    page.locator("#chat").get_by_role("button", name="Undo").last.click()
    expect(page.locator("#chat [data-testid='user']")).to_have_count(1)
    expect(prompt(page)).to_have_value("Second question.")


def test_editing_a_question_answers_it_again(clocked_page):
    page = clocked_page
    ask(page, "First question.")
    expect(status(page)).to_contain_text("Done")
    expect(prompt(page)).to_be_enabled()
    let_the_chat_settle(page)
    page.locator("#chat").get_by_role("button", name="Edit").click()
    page.locator("#chat textarea").fill("Changed question.")
    page.locator("#chat").get_by_role("button", name="Save the edit").click()
    expect(page.locator("#chat [data-testid='user']")).to_have_text("Changed question.")
    expect(status(page)).to_contain_text("Done")
    expect(page.locator("#chat [data-testid='bot']")).to_have_count(1)
    expect(prompt(page)).to_be_enabled()


def test_editing_a_question_with_a_picture_answers_it_again_without_rereading_it(
    clocked_page, live, monkeypatch
):
    page = clocked_page
    streams = record_streams(live[1].loader.pipeline, monkeypatch)
    ask(page, "First question.", CHART)
    expect(status(page)).to_contain_text("Done")
    expect(prompt(page)).to_be_enabled()
    let_the_chat_settle(page)
    page.locator("#chat").get_by_role("button", name="Edit").click()
    page.locator("#chat textarea").fill("Changed question.")
    page.locator("#chat").get_by_role("button", name="Save the edit").click()
    expect(page.locator("#chat [data-testid='user']").last).to_have_text("Changed question.")
    expect(status(page)).to_contain_text("Done")
    expect(page.locator("#chat [data-testid='user'] img")).to_have_count(1)  # the picture stays
    expect(page.locator("#chat [data-testid='bot']")).to_have_count(1)
    assert len(streams) == 2, "the edited question was answered again"
    image_positions = sum(1 for token in streams[0].input_ids if token < 0)
    assert streams[1].reused_tokens >= image_positions, "the picture was not read again"


def test_a_follow_up_after_stop_does_not_read_the_picture_again(page, live, monkeypatch):
    streams = record_streams(live[1].loader.pipeline, monkeypatch)
    set_max_new_tokens(page, LONG)
    ask(page, "Which month had the most rain?", CHART)
    expect(status(page)).to_contain_text("Answering")
    page.keyboard.press("Escape")
    expect(status(page)).to_contain_text("Stopped")
    expect(prompt(page)).to_be_enabled()
    set_max_new_tokens(page, "8")
    ask(page, "And the least?")
    expect(status(page)).to_contain_text("Done")
    assert len(streams) == 2
    prompt_before_stop = len(streams[0].input_ids)
    assert streams[1].reused_tokens >= prompt_before_stop, "only the new turn was read"


def test_the_reading_progress_moves_through_a_long_first_chunk(page, monkeypatch):
    """On a slow CPU a long prompt's first prefill chunk (past 4096 positions) takes seconds;
    here every prefill chunk takes 1 ms per position, and the long one is held open until the
    status line has moved three times (it would sit at 0 % until the chunk ended)."""
    real_run = KVCache.run
    inside, moved = threading.Event(), threading.Event()

    def slow_run(cache, session, embeds, run_options=None):
        positions = embeds.shape[1]
        if positions > 2048:  # the long first chunk
            inside.set()
            moved.wait(60)
        elif positions >= 256:  # enough for the pipeline to time a prefill
            time.sleep(positions / 1000)
        return real_run(cache, session, embeds, run_options)

    monkeypatch.setattr(KVCache, "run", slow_run)
    set_max_new_tokens(page, "2")
    ask(page, "word " * 600)  # timed: this machine's prefill speed, for the estimate
    expect(status(page)).to_contain_text("Done")
    expect(prompt(page)).to_be_enabled()
    ask(page, "word " * 6000)
    assert inside.wait(60)
    shown: set[str] = set()

    def moved_three_times() -> bool:
        found = re.search(r"Reading your question… (\d+)%", status(page).inner_text())
        shown.update([found.group(1)] if found else [])
        return len(shown) >= 3

    try:
        wait_until(moved_three_times, timeout=30, every=0.1)
    finally:
        moved.set()
    expect(status(page)).to_contain_text("Done")


def test_an_example_runs_on_a_click(page):
    page.get_by_text("Describe this picture in two sentences.").first.click()
    expect(page.locator("#chat [data-testid='user'] img")).to_have_count(1)
    expect(status(page)).to_contain_text("Done")
    expect(prompt(page)).to_be_enabled()


def test_a_damaged_picture_is_named_at_the_input_and_never_shown_broken(page, tmp_path):
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a picture")
    page.locator("#chat-input input[type=file]").set_input_files(str(broken))
    expect(status(page)).to_contain_text("holiday.png is not a picture")
    expect(status(page)).not_to_contain_text(str(tmp_path))
    expect(page.locator("#chat-input img")).to_have_count(0)
    assert page.locator("img").evaluate_all(
        "images => images.every(image => image.complete && image.naturalWidth > 0)"
    ), "no broken picture on the page"
    expect(prompt(page)).to_be_enabled()
    page.locator("#chat-input input[type=file]").set_input_files(str(CHART))  # a good one now
    expect(page.locator("#chat-input img")).to_have_count(1)
    expect(status(page)).not_to_contain_text("not a picture")  # the old complaint went


def test_retry_after_a_refused_upload_asks_for_the_file_again(page, tmp_path):
    picture = tmp_path / "holiday.png"
    shutil.copyfile(CHART, picture)
    prompt(page).fill("What is this?")
    page.locator("#chat-input input[type=file]").set_input_files(str(picture))
    thumbnail = page.locator("#chat-input img")
    expect(thumbnail).to_have_count(1)
    page.wait_for_timeout(2000)  # the input's own check of the upload is over (it passed)
    uploaded = unquote(thumbnail.get_attribute("src").split("file=", 1)[1])
    Path(uploaded).unlink()  # the server lost the upload (its cache was cleaned) before sending
    prompt(page).press("Enter")
    expect(page.locator("#chat [data-testid='bot']").last).to_contain_text("holiday.png")
    page.locator("#chat").get_by_role("button", name="Retry").click()
    expect(status(page)).to_contain_text("attach the picture again")
    expect(prompt(page)).to_have_value("What is this?")  # the question waits for the file
    page.wait_for_timeout(300)
    expect(page.locator("#chat [data-testid='bot']")).to_have_count(1)  # nothing answered
    expect(prompt(page)).to_be_enabled()


def test_a_file_that_is_not_a_picture_is_refused_at_the_input_before_sending(page, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("a text file renamed as a picture")
    prompt(page).fill("What is this?")
    page.locator("#chat-input input[type=file]").set_input_files([str(fake), str(CHART)])
    expect(status(page)).to_contain_text("notes.png is not a picture")
    expect(page.locator("#chat-input img")).to_have_count(1)  # the chart stays, nothing broken
    assert page.locator("#chat-input img").evaluate_all(
        "images => images.every(image => image.complete && image.naturalWidth > 0)"
    ), "no broken thumbnail in the input"
    expect(prompt(page)).to_have_value("What is this?")
    expect(page.locator("#chat [data-testid='user']")).to_have_count(0)  # nothing was sent


def test_a_file_over_the_upload_limit_replaces_an_older_complaint(page, tmp_path):
    """Gradio refuses it in the browser with a pop-up; the line must not keep the last one."""
    fake = tmp_path / "notes.png"
    fake.write_text("a text file renamed as a picture")
    page.locator("#chat-input input[type=file]").set_input_files([str(fake)])
    expect(status(page)).to_contain_text("notes.png is not a picture")
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG" + bytes(21 * 2**20))
    page.locator("#chat-input input[type=file]").set_input_files([str(huge)])
    expect(status(page)).to_contain_text("huge.png is larger than 20 MB")
    expect(status(page).get_by_text("notes.png is not a picture")).to_be_hidden()
    expect(page.locator("#chat-input img")).to_have_count(0)


def drop_file(page, name: str, size: int) -> dict:
    """Drag a picture file ``name`` of ``size`` bytes onto the question box and drop it there;
    return whether the page took the drop (cancelled the browser's own handling of it:
    ``taken``) and whether the status line showed a note of the page's own right after it
    (``noted``: checked in the same task, before Gradio can write the line again)."""
    return prompt(page).evaluate(
        """(box, [name, size]) => {
          const files = new DataTransfer();
          files.items.add(new File([new Uint8Array(size)], name, {type: "image/png"}));
          const send = (kind) => box.dispatchEvent(
            new DragEvent(kind, {dataTransfer: files, bubbles: true, cancelable: true}));
          send("dragenter");
          send("dragover");
          const taken = !send("drop");
          return {taken, noted: document.querySelector("#status .page-note") !== null};
        }""",
        [name, size],
    )


def test_a_dropped_file_over_the_upload_limit_is_named_as_a_chosen_one_is(page):
    assert drop_file(page, "huge.png", 21 * 2**20)["taken"], "the chat's input took the drop"
    expect(status(page)).to_contain_text("huge.png is larger than 20 MB")
    expect(page.locator("#chat-input img")).to_have_count(0)


def test_pictures_chosen_with_one_over_the_limit_are_named_as_not_attached_too(page, tmp_path):
    """Gradio refuses the whole choice; the line must not suggest the chart got in."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG" + bytes(21 * 2**20))
    page.locator("#chat-input input[type=file]").set_input_files([str(huge), str(CHART)])
    expect(status(page)).to_contain_text("huge.png is larger than 20 MB")
    expect(status(page)).to_contain_text(f"Not attached with it either: {CHART.name}")
    expect(page.locator("#chat-input img")).to_have_count(0)


def test_a_file_dropped_on_the_locked_input_leaves_the_status_line_to_the_answer(page, slow_decode):
    set_max_new_tokens(page, "1000")
    ask(page, "Tell me a long story.")
    expect(prompt(page)).to_be_disabled()
    assert not drop_file(page, "huge.png", 21 * 2**20)["noted"], "no note over the answer's line"
    page.locator("#stop").click()
    expect(prompt(page)).to_be_enabled()


def paste_text_file(page) -> None:
    """Paste a file "notes.txt" (text, not a picture) into the message box."""
    prompt(page).evaluate(
        """box => {
          const files = new DataTransfer();
          files.items.add(new File(["hello"], "notes.txt", {type: "text/plain"}));
          box.dispatchEvent(new ClipboardEvent("paste", {clipboardData: files, bubbles: true}));
        }"""
    )


def test_a_pasted_file_that_is_not_a_picture_is_named_not_ignored(page):
    paste_text_file(page)
    expect(status(page)).to_contain_text("notes.txt is not a picture")


def paste_text(page, text: str) -> None:
    """Paste ``text`` into the question box as a person does: clipboard, then Ctrl+V."""
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.evaluate("text => navigator.clipboard.writeText(text)", text)
    prompt(page).focus()
    page.keyboard.press("Control+V")


def test_a_long_paste_stays_text_and_over_the_limit_is_told_in_the_chat(
    page, live, monkeypatch, capfd
):
    monkeypatch.setattr(live[1].loader.pipeline, "max_prompt_tokens", 1000)
    paste_text(page, "word " * 30_000)  # 150,000 characters
    wait_until(lambda: len(prompt(page).input_value()) > 100_000)  # text, not an attachment
    prompt(page).press("Enter")
    reply = page.locator("#chat [data-testid='bot']").last
    expect(reply).to_contain_text("too much for the model at once")
    expect(reply).to_contain_text("this server takes at most 1,000")
    expect(status(page)).to_contain_text("Not answered")
    expect(prompt(page)).to_be_enabled()
    assert "Traceback" not in capfd.readouterr().err


def test_a_downloaded_chat_loads_back_and_goes_on_with_its_picture(page, browser, live, tmp_path):
    saved = download_one_answer(page, "#download", tmp_path)
    assert saved.suffix == ".json"
    messages = json.loads(Path(saved).read_text())
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    other = open_page(browser, live[0])  # another browser: a new session, an empty chat
    expect(prompt(other)).to_be_enabled()
    with other.expect_file_chooser() as choosing:
        other.locator("#load").click()
    choosing.value.set_files(saved)
    expect(status(other)).to_contain_text("Chat loaded")
    expect(other.locator("#chat [data-testid='user'] img")).to_have_count(1)
    expect(other.locator("#chat [data-testid='bot']")).to_have_count(1)
    ask(other, "And the least?")
    expect(status(other)).to_contain_text("Done")
    expect(other.locator("#chat [data-testid='bot']")).to_have_count(2)
    other.close()


def test_the_chat_survives_a_reload(page):
    ask(page, "Which month had the most rain?", CHART)
    expect(status(page)).to_contain_text("Done")
    expect(prompt(page)).to_be_enabled()  # the answer's event is over: the chat was saved
    answer = answer_text(page)
    page.reload()
    expect(page.locator("#chat [data-testid='user'] img")).to_have_count(1)
    expect(page.locator("#chat [data-testid='bot']")).to_have_count(1)
    assert _squeezed(answer_text(page)) == _squeezed(answer)


def test_two_tabs_keep_their_own_chats_and_a_new_tab_takes_over_a_closed_ones(browser, live):
    """One browser (one context: the same storage), two tabs with a question each."""
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)

    def new_tab():
        tab = context.new_page()
        tab.goto(live[0])
        expect(prompt(tab)).to_be_enabled()
        return tab

    def ask_and_wait(tab, question: str) -> None:
        ask(tab, question)
        expect(status(tab)).to_contain_text("Done")
        expect(prompt(tab)).to_be_enabled()  # the answer's event is over: the chat was saved

    def questions(tab):
        return tab.locator("#chat [data-testid='user']")

    tabs = []
    for question in ("Alpha, in the first tab?", "Beta, in the second tab?"):
        tabs.append(new_tab())
        expect(questions(tabs[-1])).to_have_count(0)  # the other tab, open, keeps its chat
        set_max_new_tokens(tabs[-1], "4")
        ask_and_wait(tabs[-1], question)
    for tab, question in zip(tabs, ("Alpha", "Beta"), strict=True):
        tab.reload()
        expect(questions(tab)).to_have_count(1)
        expect(questions(tab)).to_contain_text(question)
    tabs[1].locator("#chat").get_by_role("button", name="Clear").click()
    expect(questions(tabs[1])).to_have_count(0)
    tabs[0].reload()  # the other tab's Clear is not this tab's
    expect(questions(tabs[0])).to_contain_text("Alpha")
    # The first tab saves last, then closes: a new tab takes its chat over.
    ask_and_wait(tabs[0], "Gamma, still in the first tab?")
    seen = "phi3v-tab-seen:" + tabs[0].evaluate("sessionStorage.getItem('phi3v-tab')")
    tabs[0].close()
    wait_until(
        lambda: (
            tabs[1].evaluate(f"Date.now() - Number(localStorage.getItem('{seen}') || 0)") > 6000
        ),
        timeout=30,
    )
    third = new_tab()
    expect(questions(third)).to_have_count(2)
    expect(questions(third).last).to_contain_text("Gamma")
    # A tab opened from this one (window.open: it gets a copy of this tab's sessionStorage, as
    # a duplicated tab does) starts with a copy of the chat and then goes its own way.
    with context.expect_page() as opened:
        third.evaluate("window.open(location.href)")
    copy = opened.value
    copy.set_default_timeout(TIMEOUT_MS)
    expect(prompt(copy)).to_be_enabled()
    expect(questions(copy)).to_have_count(2)
    assert copy.evaluate("sessionStorage.getItem('phi3v-tab')") != third.evaluate(
        "sessionStorage.getItem('phi3v-tab')"
    )
    ask_and_wait(copy, "Delta, in the copy?")
    third.reload()
    expect(questions(third)).to_have_count(2)  # the copy's question is the copy's alone
    copy.reload()
    expect(questions(copy)).to_have_count(3)
    context.close()


def test_a_reload_during_an_answer_gives_the_question_back(browser, live):
    url, app = live
    page = open_page(browser, url)
    set_max_new_tokens(page, LONG)
    ask(page, "Which month had the most rain?", CHART)
    expect(page.locator("#chat [data-testid='bot']")).to_have_count(1)  # the answer streams
    page.reload()
    expect(status(page)).to_contain_text("Not answered")
    expect(prompt(page)).to_have_value("Which month had the most rain?")
    expect(page.locator("#chat-input img")).to_have_count(1)  # its picture, attached again
    expect(page.locator("#chat [data-testid='user']")).to_have_count(0)
    wait_until(lambda: not app.turns.busy)  # the answer nobody watches any more was stopped
    expect(prompt(page)).to_be_enabled()
    prompt(page).press("Enter")
    expect(page.locator("#chat [data-testid='user'] img")).to_have_count(1)
    expect(status(page)).to_contain_text("Answering")
    page.get_by_role("button", name="Stop").click()
    expect(status(page)).to_contain_text("Stopped")
    page.close()


def test_the_parameters_survive_a_reload(page):
    set_max_new_tokens(page, "77")
    page.reload()
    page.get_by_role("button", name="Parameters").click()
    field = page.locator("input[aria-label='number input for Max new tokens']")
    expect(field).to_have_value("77")
    crops = page.locator("input[aria-label='number input for Image detail (crops)']")
    expect(crops).not_to_have_value("")  # the model's own default, untouched


def _squeezed(text: str) -> str:
    return "".join(text.split())


def test_every_button_has_an_accessible_name(page):
    ask(page, "Hi", CHART)
    expect(status(page)).to_contain_text("Done")
    names = page.locator("button:visible").evaluate_all(
        """buttons => buttons.map(b => (b.getAttribute('aria-label') || b.innerText ||
                                       b.title || '').trim())"""
    )
    assert names and all(re.match(r"\w", name) for name in names), names  # not "(question 1)"
    assert "Picture bar_chart.png (question 1)" in names


CONTROL = re.compile(r'- (button|textbox|slider|spinbutton|checkbox) "([^"]*)"')


def control_names(page) -> list[tuple[str, str]]:
    """(role, accessible name) of every control in the page's accessibility tree."""
    return CONTROL.findall(page.locator("body").aria_snapshot())


def test_every_control_has_a_unique_meaningful_name_also_while_editing(page):
    set_max_new_tokens(page, "8")
    page.get_by_role("button", name="Parameters").click()  # its sliders in the tree too
    for question in ("First question.", "Second question."):
        ask(page, question)
        expect(page.locator("#chat [data-testid='bot']")).to_have_count(
            1 if question.startswith("First") else 2
        )
        expect(prompt(page)).to_be_enabled()
    page.locator("#chat").get_by_role("button", name=re.compile("^Edit")).last.click()
    expect(page.locator("#chat textarea")).to_have_count(1)
    page.wait_for_timeout(300)  # the names follow Gradio's render
    controls = control_names(page)
    names = [name for _, name in controls]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    for meaningless in ("", "Submit", "MultimodalTextbox", "Reset to default value"):
        assert meaningless not in names, controls
    assert ("textbox", "Edit question 2") in controls  # the edit box says what it edits
    assert page.locator("#chat textarea").bounding_box()["width"] >= 200


def test_a_disabled_control_says_why_in_its_tooltip(page):
    expect(page.locator("#stop")).to_have_attribute("title", re.compile("no answer is running"))
    set_max_new_tokens(page, LONG)
    ask(page, "Tell me a long story.")
    expect(page.locator("#stop")).to_be_enabled()
    expect(page.locator("#stop")).to_have_attribute("title", "")
    expect(prompt(page)).to_have_attribute("title", re.compile("press Stop"))
    page.keyboard.press("Escape")
    expect(prompt(page)).to_be_enabled()
    expect(prompt(page)).to_have_attribute("title", "")


def tab_to(page, name: str, limit: int = 120) -> None:
    """Press Tab until the focused control's accessible name starts with ``name``."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            """() => { const e = document.activeElement;
                       return (e.getAttribute('aria-label') || e.placeholder || e.innerText ||
                               '').trim(); }"""
        )
        if focused.startswith(name):
            return
    raise AssertionError(f"Tab never reached {name!r}")


def test_a_keyboard_alone_sends_stops_retries_edits_and_undoes(page, slow_decode):
    # Tabbing to Stop takes the browser a second or two: with slow_decode an answer still runs
    # when Stop is reached (the test stops every one it starts).
    set_max_new_tokens(page, LONG)
    tab_to(page, "Ask about your pictures")
    page.keyboard.type("Tell me a long story.")
    page.keyboard.press("Enter")
    expect(status(page)).to_contain_text("Answering")
    tab_to(page, "Stop")
    page.keyboard.press("Enter")
    expect(status(page)).to_contain_text("Stopped")
    expect(prompt(page)).to_be_enabled()
    expect(prompt(page)).to_be_focused()  # Stop was locked under the focus: back to the input
    tab_to(page, "Retry (answer 1)")
    page.keyboard.press("Enter")
    expect(status(page)).to_contain_text("Answering")
    page.keyboard.press("Escape")
    expect(status(page)).to_contain_text("Stopped")
    expect(prompt(page)).to_be_enabled()
    tab_to(page, "Edit (question 1)")
    page.keyboard.press("Enter")
    expect(page.locator("#chat textarea")).to_be_focused()  # the question's own box
    page.keyboard.press("Control+A")
    page.keyboard.type("A short one.")
    tab_to(page, "Save the edit (question 1)")
    page.keyboard.press("Enter")
    expect(page.locator("#chat [data-testid='user']").last).to_have_text("A short one.")
    expect(status(page)).to_contain_text("Answering")
    page.keyboard.press("Escape")
    expect(prompt(page)).to_be_enabled()
    tab_to(page, "Undo (answer 1)")
    page.keyboard.press("Enter")
    expect(prompt(page)).to_have_value("A short one.")
    expect(page.locator("#chat [data-testid='user']")).to_have_count(0)
    expect(prompt(page)).to_be_focused()  # the question to edit, where Undo was


# --- layouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("viewport", "name"), [(DESKTOP, "desktop.png"), (PHONE, "phone.png")])
def test_the_layout_fits_the_screen(browser, live, viewport, name):
    page = open_page(browser, live[0], viewport)
    expect(prompt(page)).to_be_enabled()
    ask(page, "Which month had the most rain, and how much was it?", CHART)
    expect(status(page)).to_contain_text("Done")
    expect(prompt(page)).to_be_enabled()  # the answer's event is over
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.get_by_role("button", name="Retry (answer 1)")).to_be_visible()  # named
    page.wait_for_timeout(500)  # the last renders (which scroll the chat down) are done
    page.locator("#chat").evaluate(  # back to the top of the chat, where the picture is
        """chat => [chat, ...chat.querySelectorAll('*')]
                    .filter(e => e.scrollHeight > e.clientHeight + 1)
                    .forEach(e => { e.scrollTop = 0; })"""
    )
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    save_screenshot(page, name)

    box = page.locator("#chat-input").bounding_box()
    assert box["y"] + box["height"] <= viewport["height"], "the input is visible without scrolling"
    assert box["width"] >= 200
    stop = page.locator("#stop").bounding_box()
    assert stop["height"] <= 80, "a button of sane height"
    assert abs(stop["y"] - box["y"]) < box["height"], "Stop sits beside the input"
    chat = page.locator("#chat").bounding_box()
    assert chat["height"] >= 0.4 * viewport["height"], "the chat takes most of the screen"
    for selector in ("#status .status", "#model-panel .model", "#chat-input textarea"):
        width = page.locator(selector).bounding_box()["width"]
        assert width >= 100, f"{selector} is a column of {width} px"
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    page.close()


def test_an_empty_chat_on_a_phone_opens_at_its_instructions_and_first_example(browser, live):
    page = open_page(browser, live[0], PHONE, is_mobile=True, has_touch=True)
    expect(prompt(page)).to_be_enabled()
    first = page.locator("#chat button.example").first
    expect(first).to_be_visible()
    page.wait_for_timeout(1000)  # Gradio's own scrolling after its renders
    chat = page.locator("#chat").bounding_box()
    card = first.bounding_box()
    assert card["y"] >= chat["y"] - 1, "the first example is not scrolled out above the chat"
    assert card["y"] + card["height"] <= chat["y"] + chat["height"] + 1
    page.close()


# --- the model box -------------------------------------------------------------------------------


LUMINANCE_JS = """
const rgb = s => s.match(/[\\d.]+/g).slice(0, 3).map(Number);
const channel = c => { c /= 255; return c <= 0.03928 ? c / 12.92
                                                     : Math.pow((c + 0.055) / 1.055, 2.4); };
const luminance = s => { const [r, g, b] = rgb(s);
                         return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b); };
"""


def _contrast(page, selector: str) -> float:
    """WCAG contrast ratio of an element's text colour against the background behind it."""
    return page.locator(selector).evaluate(
        f"""element => {{ {LUMINANCE_JS}
          let painted = element;  // the nearest box with a background of its own
          while (getComputedStyle(painted).backgroundColor === 'rgba(0, 0, 0, 0)')
            painted = painted.parentElement;
          const text = getComputedStyle(element).color;
          const [a, b] = [luminance(text), luminance(getComputedStyle(painted).backgroundColor)];
          return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        }}"""
    )


BUTTONS_JS = f"""() => {{ {LUMINANCE_JS}
  const parse = s => {{ const v = s.match(/[\\d.]+/g).map(Number); return [v[0], v[1], v[2],
                                                                       v.length > 3 ? v[3] : 1]; }};
  const over = (top, alpha, under) => under.map((c, i) => alpha * top[i] + (1 - alpha) * c);
  const css = c => `rgb(${{c[0]}}, ${{c[1]}}, ${{c[2]}})`;
  const ratio = (x, y) => {{ const [a, b] = [luminance(css(x)), luminance(css(y))];
                            return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); }};
  return [...document.querySelectorAll("button")].filter(b => b.offsetParent !== null)
    .map(button => {{
      let behind = button.parentElement;  // the nearest box painted below the button
      while (parse(getComputedStyle(behind).backgroundColor)[3] === 0)
        behind = behind.parentElement;
      const under = parse(getComputedStyle(behind).backgroundColor).slice(0, 3);
      const style = getComputedStyle(button), opacity = Number(style.opacity);
      const fill = parse(style.backgroundColor), ink = parse(style.color);
      const own = over(fill.slice(0, 3), fill[3], under);
      const painted = over(own, opacity, under);
      const text = over(over(ink.slice(0, 3), ink[3], own), opacity, under);
      return {{name: (button.getAttribute("aria-label") || button.innerText || "").trim(),
               disabled: button.disabled, words: button.innerText.trim() !== "",
               text: ratio(text, painted), stands_out: ratio(painted, under)}};
    }});
}}"""


def button_colours(page) -> dict[tuple[str, bool], dict]:
    """Every visible button's contrasts, by (name, disabled): its text or icon against its own
    background, and that background against what is behind it (opacity and alpha included)."""
    return {(b["name"], b["disabled"]): b for b in page.evaluate(BUTTONS_JS)}


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_every_button_state_is_readable_and_stop_looks_like_what_it_is(browser, live, theme):
    page = open_page(browser, f"{live[0]}?__theme={theme}", color_scheme=theme)
    expect(prompt(page)).to_be_enabled()
    assert (_page_luminance(page) < 0.2) == (theme == "dark"), "the theme is in use"
    ask(page, "Hello?")
    expect(status(page)).to_contain_text("Done")
    expect(page.locator("#stop")).to_be_disabled()
    idle = button_colours(page)
    set_max_new_tokens(page, LONG)
    ask(page, "Tell me a long story.")
    expect(page.locator("#stop")).to_be_enabled()
    answering = button_colours(page)
    page.keyboard.press("Escape")
    page.close()
    for (name, disabled), button in {**idle, **answering}.items():
        least = 4.5 if button["words"] else 3.0  # WCAG AA: text, and icons (non-text)
        if disabled:
            least = 3.0 if button["words"] else 1.5  # still legible, visibly inactive
        assert button["text"] >= least, f"{theme}: {name} (disabled={disabled}) {button}"
    stop_on, stop_off = answering[("Stop", False)], idle[("Stop", True)]
    assert stop_on["stands_out"] >= 3.0, f"{theme}: enabled Stop looks like an action"
    assert stop_off["stands_out"] < stop_on["stands_out"], f"{theme}: disabled Stop recedes"
    assert stop_off["text"] < stop_on["text"], f"{theme}: disabled Stop reads as inactive"


def _page_luminance(page) -> float:
    """Luminance of the page's background (the body's, as the theme paints it)."""
    return page.evaluate(
        f"""() => {{ {LUMINANCE_JS}
          return luminance(getComputedStyle(document.body).backgroundColor); }}"""
    )


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_a_failed_model_is_readable_in_light_and_dark_mode(browser, tmp_path, theme):
    loader = ModelLoader(tmp_path / "missing").start()
    with serve(loader) as url:
        page = open_page(browser, f"{url}?__theme={theme}", color_scheme=theme)
        expect(page.locator("#model-panel .model.failed")).to_contain_text("not available")
        assert (_page_luminance(page) < 0.2) == (theme == "dark"), "the theme is in use"
        assert _contrast(page, "#model-panel .model.failed") >= 4.5
        assert _contrast(page, "#model-panel .model.failed b") >= 4.5
        page.close()


def test_first_launch_shows_the_download_then_opens_the_chat(browser, tmp_path, monkeypatch):
    # The download holds after its first bytes until the page has been seen.
    with first_launch(tmp_path, monkeypatch) as (hub, loader, _files), serve(loader) as url:
        page = open_page(browser, url)
        expect(page.locator("#model-panel")).to_contain_text("Downloading")
        expect(prompt(page)).to_be_disabled()
        hub.hold.set()
        expect(page.locator("#model-panel")).to_contain_text("Ready")
        expect(prompt(page)).to_be_enabled()
        page.close()
