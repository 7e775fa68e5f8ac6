"""The app in a real browser: Debian's headless Chromium, driven by Playwright for Python.

Uploads an image, asks about it, watches the answer stream in, presses Stop, and saves a
screenshot to test-artifacts/app.png. To refresh the README's screenshot as well:

    PHI3V_UPDATE_SCREENSHOT=1 python -m pytest tests/test_browser.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import playwright.sync_api as sync_api  # a declared test dependency: never skipped
import pytest

from app import ModelLoader
from tests.app_helpers import first_launch, serve, wait_until

expect = sync_api.expect

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOT = REPO / "docs" / "screenshot.png"
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


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 940})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def answer_text(page) -> str:
    answers = page.locator("#chat [data-testid='bot']")
    return answers.last.inner_text() if answers.count() else ""


def set_number(field, value: str) -> bool:
    """Type into a slider's number box; True once the page kept the value (a render that is
    still settling right after the page loaded can reset it)."""
    field.fill(value)
    field.press("Tab")
    field.page.wait_for_timeout(200)
    return field.input_value() == value


@pytest.fixture
def page(browser, tiny_model_dir):
    """The app as `python app.py` builds it: the page exists before the model is loaded."""
    loader = ModelLoader(tiny_model_dir)
    with serve(loader) as url:
        loader.start()
        page = open_page(browser, url)
        yield page
        page.close()


def test_upload_ask_watch_the_answer_stream_in_then_stop(page):
    prompt = page.locator("#chat-input textarea")
    expect(prompt).to_be_enabled()  # the model is loaded
    page.get_by_role("button", name="Parameters").click()
    max_tokens = page.locator("input[aria-label='number input for Max new tokens']")
    wait_until(lambda: set_number(max_tokens, "4096"), timeout=10)  # a long answer to stop

    page.locator("#chat-input input[type=file]").set_input_files(
        str(REPO / "data" / "examples" / "bar_chart.png")
    )
    expect(page.locator("#chat-input img")).to_have_count(1)  # the thumbnail in the input
    prompt.fill("Which month had the most rain, and how much was it?")
    prompt.press("Enter")

    expect(page.locator("#chat [data-testid='user'] img")).to_have_count(1)
    lengths: list[int] = []
    wait_until(lambda: lengths.append(len(answer_text(page))) or len(set(lengths) - {0}) >= 3)
    assert max(lengths) > min(set(lengths) - {0}), "the answer grows while it streams"
    expect(page.locator("#status")).to_contain_text("tokens/s")

    page.locator("#stop").click()
    expect(page.locator("#status")).to_contain_text("Stopped")
    stopped_at = answer_text(page)
    page.wait_for_timeout(500)
    assert answer_text(page) == stopped_at, "nothing is added after Stop"
    expect(prompt).to_be_enabled()  # ready for the next question

    page.get_by_role("button", name="Parameters").click()  # folded again, for the picture
    page.locator("#chat [role='log']").evaluate("log => log.scrollTo(0, 0)")  # the image
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("PHI3V_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_an_example_fills_the_box_and_can_be_sent(page):
    page.get_by_text("Describe this picture in two sentences.").first.click()
    prompt = page.locator("#chat-input textarea")
    expect(prompt).to_have_value("Describe this picture in two sentences.")
    expect(prompt).to_be_enabled()  # Gradio re-applies build-time props on example clicks
    prompt.press("Enter")
    expect(page.locator("#chat [data-testid='user'] img")).to_have_count(1)
    expect(page.locator("#status")).to_contain_text("Done")


def test_first_launch_shows_the_download_then_opens_the_chat(browser, tmp_path, monkeypatch):
    # The download holds after its first bytes until the page has been seen.
    with first_launch(tmp_path, monkeypatch) as (hub, loader, _files), serve(loader) as url:
        page = open_page(browser, url)
        expect(page.locator("#model-panel")).to_contain_text("Downloading")
        expect(page.locator("#chat-input textarea")).to_be_disabled()
        hub.hold.set()
        expect(page.locator("#model-panel")).to_contain_text("Model ready")
        expect(page.locator("#chat-input textarea")).to_be_enabled()
        page.close()
