"""The page answers everything a visitor does, in a real browser (issue 18, beyond the defects).

Every action has a visible answer: an empty send, an example clicked too early and Try again
each say something at once, and a disabled control says why in its tooltip. The chat downloads
as Markdown, the example cards say how long they take on this machine (measured), and the
status line stays steady while a long prompt is read (defect 6's clock).

The browser, the server and the helpers are those of ``tests/test_browser.py``.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from phi3v.kv_cache import KVCache
from phi3v_app.loading import ModelLoader
from phi3v_app.page import EXAMPLES, EXAMPLES_DIR
from tests import test_browser as shared
from tests.app_helpers import serve
from tests.test_browser import (
    ask,
    download_one_answer,
    expect,
    open_page,
    paste_text_file,
    prompt,
    save_screenshot,
    set_max_new_tokens,
    status,
)

browser, live, page = shared.browser, shared.live, shared.page  # the same fixtures

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]

# Every disabled control on the page with its tooltip, by its accessible name.
DISABLED_JS = """() => [...document.querySelectorAll('button, textarea')]
    .filter(control => control.disabled && control.offsetParent !== null)
    .map(control => [control.getAttribute('aria-label') || control.innerText.trim() ||
                     control.tagName, control.title])"""


def disabled_controls(page) -> dict[str, str]:
    """Each visible disabled control's name and tooltip, once the page script has caught up
    with the last render (it explains controls on the next animation frame after a change)."""
    page.wait_for_function(f"() => ({DISABLED_JS})().every(([name, why]) => why)")
    return dict(page.evaluate(DISABLED_JS))


@pytest.fixture(scope="module")
def loading(tiny_model_dir):
    """A server whose model is still loading (its loader is never started)."""
    with serve(ModelLoader(tiny_model_dir)) as url:
        yield url


# --- every action has an answer ------------------------------------------------------------------


def test_enter_on_an_empty_box_says_there_is_nothing_to_send(page):
    prompt(page).press("Enter")
    expect(status(page)).to_contain_text("Nothing to send")
    expect(page.locator("#chat [data-testid='user']")).to_have_count(0)


def test_the_status_line_still_follows_the_answer_after_a_refused_paste(page):
    paste_text_file(page)
    expect(status(page)).to_contain_text("notes.txt is not a picture")
    set_max_new_tokens(page, "8")
    ask(page, "Hello?")
    expect(status(page)).to_contain_text("Done")
    expect(status(page)).not_to_contain_text("notes.txt")


def test_an_example_clicked_while_the_model_loads_says_so(browser, loading):
    page = open_page(browser, loading)
    page.locator("#chat button.example").first.click()
    expect(status(page)).to_contain_text("The model is still loading")
    expect(page.locator("#chat [data-testid='user']")).to_have_count(0)
    page.close()


def test_while_the_model_loads_every_disabled_control_says_why(browser, loading):
    page = open_page(browser, loading)
    expect(prompt(page)).to_have_attribute("title", re.compile("still loading"))
    disabled = disabled_controls(page)
    assert "Send" in disabled and "Stop" in disabled, disabled
    assert all(disabled.values()), f"a disabled control without a reason: {disabled}"
    page.close()


def test_while_an_answer_runs_every_disabled_control_says_why(page):
    set_max_new_tokens(page, "4096")
    for _ in range(3):
        ask(page, "Tell me a long story.")
        expect(status(page)).to_contain_text("Answering")
        disabled = disabled_controls(page)
        # Still answering now, so it was answering when the controls were read. The tiny random
        # model can end an answer early (it samples an end token): then look again.
        if "Answering" in status(page).inner_text():
            break
        expect(prompt(page)).to_be_enabled()
    else:
        pytest.fail("three answers in a row ended before their controls could be read")
    assert "Send" in disabled, disabled
    assert all("press Stop" in why for why in disabled.values()), disabled
    page.keyboard.press("Escape")
    expect(prompt(page)).to_be_enabled()


PANEL_JS = """() => { window.panelTexts = [];
  new MutationObserver(() => window.panelTexts.push(
      document.querySelector('#model-panel').innerText))
    .observe(document.querySelector('#model-panel'),
             {subtree: true, childList: true, characterData: true}); }"""


def test_try_again_after_a_failed_load_says_at_once_that_it_loads_again(
    browser, tiny_model_dir, tmp_path
):
    folder = tmp_path / "model"  # missing: the first load fails
    loader = ModelLoader(folder).start()
    with serve(loader) as url:
        page = open_page(browser, url)
        expect(page.locator("#model-panel .model.failed")).to_be_visible()
        shutil.copytree(tiny_model_dir, folder)  # the problem is fixed
        page.evaluate(PANEL_JS)
        page.get_by_role("button", name="Try again").click()
        expect(page.locator("#model-panel")).to_contain_text("Ready")
        shown = page.evaluate("window.panelTexts")
        assert any(re.search("Preparing|Loading", text) for text in shown), shown
        expect(prompt(page)).to_be_enabled()
        page.close()


# --- the chat as a file, the examples' times -----------------------------------------------------


def test_the_chat_downloads_as_markdown_with_its_picture_inline(page, tmp_path):
    expect(page.locator("#download-md")).to_be_hidden()  # nothing to download yet
    saved = download_one_answer(page, "#download-md", tmp_path)
    assert saved.suffix == ".md"
    markdown = saved.read_text(encoding="utf-8")
    assert "Which month had the most rain?" in markdown
    assert markdown.split("### Phi-3 Vision", 1)[1].strip(), "the answer follows its heading"
    assert re.search(r"!\[[^\]]*\]\(data:image/png;base64,[A-Za-z0-9+/=]+\)", markdown)


def test_the_example_cards_say_how_long_their_first_words_take_here_measured(browser, live):
    url, app = live
    cards = [(text, [EXAMPLES_DIR / name for name in names]) for text, names in EXAMPLES]
    with app.turns.turn():  # another visitor has the model: nothing can be timed yet
        warming = app.loader.warm_examples(app.turns, cards)
        page = open_page(browser, url)
        card = page.locator("#chat button.example")
        expect(card).to_have_count(len(cards))
        expect(card.first).to_contain_text("Timing it on this machine…")
    measured = re.compile(r"First words in [\d.]+ m?s on this machine \(measured\)")
    for number in range(len(cards)):
        expect(card.nth(number)).to_contain_text(measured)
    warming.join()
    save_screenshot(page, "examples.png")
    page.close()


# --- a steady status line ------------------------------------------------------------------------

# Each frame: the status line's text as shown (its own element, empty when it is gone), how
# opaque it is (with every box up to #status), and how many of Gradio's progress overlays show
# over it.
FRAMES_JS = """() => { window.statusFrames = []; const frame = () => {
  const block = document.querySelector('#status');
  const line = block.querySelector('.status');
  let opacity = 1;
  for (let box = line; box && box !== block.parentElement; box = box.parentElement)
    opacity *= parseFloat(getComputedStyle(box).opacity);
  const overlays = [...block.querySelectorAll('[data-testid=status-tracker]')].filter(
    overlay => overlay.offsetParent !== null && parseFloat(getComputedStyle(overlay).opacity) > 0);
  window.statusFrames.push([line ? line.innerText.trim() : '', line ? opacity : 0,
                            overlays.length]);
  requestAnimationFrame(frame); }; requestAnimationFrame(frame); }"""


def test_the_status_line_stays_steady_while_a_long_prompt_is_read(page, monkeypatch):
    """Issue 18, defect 6: the clock must not flash at its ticks. Every prefill chunk takes
    1 ms per position, so the prompt takes seconds to read while the clock ticks; every frame
    the browser draws meanwhile must show the line, whole and opaque, and no overlay."""
    real_run = KVCache.run

    def slow_run(cache, session, embeds, run_options=None):
        if embeds.shape[1] >= 256:
            time.sleep(embeds.shape[1] / 1000)
        return real_run(cache, session, embeds, run_options)

    monkeypatch.setattr(KVCache, "run", slow_run)
    set_max_new_tokens(page, "2")
    page.evaluate(FRAMES_JS)
    ask(page, "word " * 3000)
    expect(status(page)).to_contain_text("Done")
    frames = page.evaluate("window.statusFrames")
    texts = [text for text, _, _ in frames]
    start = next(n for n, text in enumerate(texts) if "Reading your question" in text)
    end = next(n for n, text in enumerate(texts) if n > start and "Reading" not in text)
    reading = frames[start:end]
    clocks = {re.search(r"[\d.]+ s$", text).group(0) for text, _, _ in reading}
    assert len(clocks) >= 3, f"the clock ticked while the prompt was read: {clocks}"
    for text, opacity, overlays in reading:
        assert "Reading your question" in text, f"the line blinked: {text!r}"
        assert opacity == 1, f"the line faded ({opacity}) at {text!r}"
        assert overlays == 0, f"a progress overlay covered the line at {text!r}"
