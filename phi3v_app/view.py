"""What the page says: the status line under the chat, the model box, and the page's CSS.

Every function here takes plain values and returns HTML (escaped), so the wording can be
tested without a server. The numbers shown are the ones measured: nothing is promised that
this machine has not timed.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

from phi3v.download import DownloadProgress
from phi3v.results import Progress, Timings
from phi3v_app.history import ERROR_MARK
from phi3v_app.loading import ModelStatus

ESTIMATE_CEILING = 0.99  # a share estimated from the clock never claims the prompt is read

# How the precision the model runs in is said to a visitor (Pipeline.precision).
PRECISION_WORDS = {
    "exact": "exact mode (the same numbers as Microsoft's runtime)",
    "fast": "fast mode (quicker picture reading, nearly identical answers)",
}


# How a status line of refused files ends (refused_upload), which also marks it as one.
NOT_ATTACHED = "not attached"
FILE_TYPES = "send pictures as PNG, JPEG, WebP or GIF"


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _rate(tokens_per_second: float) -> str:
    return f"{tokens_per_second:.0f}" if tokens_per_second >= 100 else f"{tokens_per_second:.1f}"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def duration(s: float) -> str:
    """ "45 s", "2 min 05 s", "1 h 03 min"."""
    if s < 60:
        return f"{s:.0f} s"
    minutes, seconds = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def status_line(kind: str, headline: str, *details: str) -> str:
    """The HTML of the line under the chat: an icon for ``kind``, a headline and details.

    kind: "busy" (animated), "live", "done", "stopped", "error" or "note" (an action that
    cannot be done now, and why).
    """
    icons = {
        "busy": "",
        "live": "●",
        "done": "✓",
        "stopped": "■",
        "error": ERROR_MARK,
        "note": "ℹ",
    }
    parts = [f"<b>{html.escape(headline)}</b>", *(html.escape(d) for d in details)]
    return (
        f'<div class="status {kind}" role="status"><span class="icon" aria-hidden="true">'
        f"{icons[kind]}</span>" + " · ".join(parts) + "</div>"
    )


def refused_upload(names: str, count: int, reason: str | None, too_large: bool = False) -> str:
    """Files taken out of the input as they arrived: ``names``, ``count`` of them, and the
    ``reason`` when there is one file; ``too_large``: a picture with more pixels than the model
    can use (its reason says what to do), not a file of another kind."""
    if too_large:
        return status_line("error", f"{names} is too large", f"it {reason}", NOT_ATTACHED)
    what = "is not a picture" if count == 1 else "are not pictures"
    why = f"it {reason}; " if reason else ""
    return status_line("error", f"{names} {what}", f"{why}{NOT_ATTACHED}: {FILE_TYPES}")


def says_upload_refused(status: object) -> bool:
    """Whether the status line ``status`` (its HTML) is a :func:`refused_upload`."""
    return isinstance(status, str) and html.escape(NOT_ATTACHED) in status


def waiting_status(ahead: int) -> str:
    """While the answer waits for the model (others are answered first)."""
    if ahead <= 0:
        return status_line("busy", "Waiting for the model…")
    others = "1 request" if ahead == 1 else f"{ahead} requests"
    return status_line("busy", f"In line: {others} ahead of yours", "Stop leaves the line")


def preparing_status(images: int) -> str:
    what = f"Preparing {_count(images, 'image')}…" if images else "Preparing your question…"
    return status_line("busy", what)


def reading_status(progress: Progress, elapsed: float, estimate: float | None) -> str:
    """Before the first token: the images being read, then the prompt, with a percentage.

    ``elapsed`` counts from the start of the answer (the same origin as "first token N s");
    ``estimate`` is this machine's measured time to the first token, when it has one.
    """
    clock = _seconds(elapsed)
    if estimate is not None and estimate >= 2:
        clock += f" of about {duration(max(estimate, elapsed))}"
    if progress.stage == "preprocess":
        return status_line("busy", "Preparing your question…", clock)
    if progress.stage == "vision" and progress.total > 0:
        what = "the image" if progress.total == 1 else _count(progress.total, "image")
        return status_line("busy", f"Reading {what}…", clock)
    if progress.stage == "prefill" and progress.total > 0:
        return status_line(
            "busy",
            f"Reading your question… {_prefill_share(progress, elapsed, estimate):.0%}",
            clock,
        )
    return status_line("busy", "Thinking…", clock)


def _prefill_share(progress: Progress, elapsed: float, estimate: float | None) -> float:
    """How much of the prompt has been read. The engine reports it per chunk, and a long
    prompt's first chunk is long (it must cross 4096 positions at once): between reports the
    clock against this machine's measured time moves it on, short of 100 %."""
    if estimate is None or estimate <= 0:
        return progress.fraction
    return max(progress.fraction, min(elapsed / estimate, ESTIMATE_CEILING))


def answer_status(
    timings: Timings, answer_tokens: int, prompt_tokens: int, stop_reason: str | None
) -> str:
    """While the answer streams (``stop_reason`` None) and once it is complete."""
    details = [f"first word after {_seconds(timings.time_to_first_token)}"]
    if answer_tokens >= 2 and timings.decode_tokens_per_second > 0:
        details.append(f"{_rate(timings.decode_tokens_per_second)} tokens/s")
    details.append(_count(answer_tokens, "token"))
    details.append(f"prompt {prompt_tokens:,} tokens")
    if stop_reason is None:
        return status_line("live", "Answering", *details)
    if stop_reason == "length":
        return status_line("done", "Done (reached Max new tokens)", *details)
    if stop_reason == "cancelled":
        return status_line("stopped", "Stopped", *details)
    return status_line("done", "Done", *details)


def stopped_status() -> str:
    return status_line("stopped", "Stopped before the answer began")


def nothing_to_send() -> str:
    return status_line("note", "Nothing to send", "type a question or attach a picture first")


def still_answering() -> str:
    return status_line("note", "Wait for the answer to finish", "or press Stop (Esc)")


def not_ready(phase: str) -> str:
    """An example clicked before the model can answer it."""
    if phase == "failed":
        return status_line("note", "The model is not available", "see the message above")
    return status_line(
        "note", "The model is still loading", "click the example again once the chat opens"
    )


def error_status() -> str:
    return status_line("error", "Not answered", "see the message in the chat")


# --- the model box -------------------------------------------------------------------------------


def model_panel(status: ModelStatus) -> str:
    """The HTML of the model box at the top of the page."""
    name = html.escape(status.name)
    if status.phase == "ready":
        mode = PRECISION_WORDS.get(status.precision, html.escape(status.precision))
        return (
            f'<div class="model ready"><b>✓ Ready:</b> {name}, {mode}, '
            f"loaded in {duration(status.load_seconds)}."
            f'<div class="hint">Why this mode: {html.escape(status.precision_reason)}.</div>'
            '<div class="hint">The first answer about a picture is the slow one: the model '
            "reads the whole image first (on a small CPU that takes minutes; the line under "
            "the chat shows how far it got). Follow-up questions start in seconds. Lower "
            "<i>Image detail</i> under Parameters for faster, coarser reading.</div></div>"
        )
    if status.phase == "failed":
        return (
            f'<div class="model failed" role="alert"><b>{ERROR_MARK} The model is not '
            f"available.</b> {html.escape(status.error or '')}"
            '<div class="hint">The page keeps running: fix the problem, then press '
            "<i>Try again</i> or restart the app.</div></div>"
        )
    if status.phase == "downloading":
        return _download_panel(name, status.progress)
    if status.phase == "converting":
        return _converting_panel(name, status.conversion)
    if status.phase == "loading":
        return (
            f'<div class="model busy"><b>Loading {name}…</b> '
            "this takes a few seconds; the chat opens when the model is ready.</div>"
        )
    return f'<div class="model busy"><b>Preparing {name}…</b></div>'


def _converting_panel(name: str, progress: Progress | None) -> str:
    head = (
        f'<div class="model busy"><b>Preparing fast mode for {name}</b> (once per model '
        "folder): making a copy of the model that reads pictures faster on this CPU"
    )
    if progress is None or progress.total <= 0:
        return head + ".<progress></progress></div>"
    return (
        head + f" · {html.escape(progress.stage)}: {progress.done:,} of {progress.total:,} "
        f"({progress.fraction:.0%})"
        + f'<progress value="{progress.done}" max="{progress.total}"></progress>'
        + '<div class="hint">The chat opens when the model is ready.</div></div>'
    )


def _download_panel(name: str, progress: DownloadProgress | None) -> str:
    if progress is None or progress.total <= 0:
        return (
            f'<div class="model busy"><b>Downloading {name}…</b> (first launch only) '
            "starting. The chat opens when the model is ready.<progress></progress></div>"
        )
    share = progress.done / progress.total
    details = [f"{_bytes(progress.done)} of {_bytes(progress.total)} ({share:.0%})"]
    if progress.speed > 0:
        details.append(f"{_bytes(progress.speed)}/s")
    if progress.eta is not None:
        details.append(f"about {duration(progress.eta)} left")
    current = (
        f"{html.escape(progress.filename)}: {_bytes(progress.file_done)} of "
        f"{_bytes(progress.file_total)}"
    )
    return (
        f'<div class="model busy"><b>Downloading {name}</b> (first launch only) · '
        + " · ".join(details)
        + f'<progress value="{progress.done}" max="{progress.total}"></progress>'
        + f'<div class="hint">{current}. The chat opens when the model is ready.</div></div>'
    )


def example_times(seconds: Sequence[float | None], warming: bool) -> str:
    """What each example card says about its speed (:attr:`ModelLoader.example_seconds`), as
    a hidden element the page script copies onto the cards: "Timing it…" while the warm-up has
    yet to time it, then the measured time to the first words; nothing for a card that could
    not be timed. Empty when the examples are not timed at all."""
    texts = [
        f"First words in {_short_time(s)} on this machine (measured)"
        if s is not None
        else "Timing it on this machine…"
        if warming
        else ""
        for s in seconds
    ]
    return f'<div data-times="{html.escape(json.dumps(texts, ensure_ascii=False))}"></div>'


def _short_time(s: float) -> str:
    return f"{s * 1000:.0f} ms" if round(s * 1000) < 1000 else _seconds(s)


def input_placeholder(phase: str) -> str:
    if phase == "ready":
        return "Ask about your pictures…"
    if phase == "failed":
        return "The model is not available: see the message above."
    return "The chat opens when the model is ready…"


# Colours come from the theme's variables, so light and dark mode both read well.
CSS = """
#header h1 { margin: 0 0 4px; font-size: 1.5em; }
#header p { margin: 0; }
#model-panel .model { padding: 8px 12px; border-radius: 8px; font-size: 0.92em; }
#model-panel .model.busy { background: var(--color-accent-soft); }
#model-panel .model.ready { background: var(--background-fill-secondary); }
#model-panel .model.failed { background: var(--error-background-fill);
                             color: var(--error-text-color);
                             border: 1px solid var(--error-border-color); }
#model-panel .hint { margin-top: 4px; font-size: 0.92em; opacity: 0.85; }
#model-panel progress { display: block; width: 100%; height: 10px; margin-top: 8px;
                        accent-color: var(--color-accent); }
#chat { height: calc(100dvh - 440px) !important; min-height: 260px; }
#chat img { max-height: 220px; width: auto; object-fit: contain; }
#status { min-height: 1.6em; }
#status.noted > :not(.page-note) { display: none; }  /* the page script's own note shows */
/* The status line and the model box say themselves what is going on: Gradio's own progress
   overlay (a clock that fades in and out over them at each update) never shows there. */
#status [data-testid="status-tracker"], #model-panel [data-testid="status-tracker"],
#example-times [data-testid="status-tracker"] { display: none !important; }
#status .status { font-size: 0.9em; color: var(--body-text-color-subdued);
                  font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
#status .status b { color: var(--body-text-color); }
#status .icon { display: inline-block; width: 1.2em; }
#status .live .icon, #status .done .icon { color: var(--color-green-500, #16a34a); }
#status .note .icon { color: var(--color-accent); }
#status .stopped .icon { color: var(--color-orange-500, #d97706); }
#status .error .icon { color: var(--error-icon-color, #dc2626); }
#status .busy .icon::before {
  content: ""; display: inline-block; width: 0.75em; height: 0.75em;
  border: 2px solid currentColor; border-right-color: transparent; border-radius: 50%;
  animation: phi3v-spin 0.8s linear infinite; vertical-align: -1px;
}
@keyframes phi3v-spin { to { transform: rotate(360deg); } }
#chat .example-time { display: block; margin-top: 4px; font-size: 0.85em;
                      color: var(--body-text-color); opacity: 0.8; }
#input-row { align-items: stretch; flex-wrap: nowrap; gap: 8px; }
#input-row > * { min-width: 0; }
#stop { align-self: stretch; max-height: 64px; transition: none; }  /* its state, at once */
/* Stop is red while it can stop an answer and quiet while there is none, in both themes
   (Gradio's "stop" variant is grey in the light theme and indigo in the dark one, and its
   disabled state is the brighter). White on red-700 in light mode, near-black on red-400 in
   dark mode: both WCAG AA, and both stand out from the page behind. */
#stop:enabled { background: #b91c1c; border-color: #b91c1c; color: #ffffff; opacity: 1; }
#stop:enabled:hover { background: #991b1b; border-color: #991b1b; }
.dark #stop:enabled { background: #f87171; border-color: #f87171; color: #1c0606; }
.dark #stop:enabled:hover { background: #fca5a5; border-color: #fca5a5; }
#stop:disabled { background: var(--button-secondary-background-fill);
                 border-color: var(--border-color-primary);
                 color: #6b7280; opacity: 1; box-shadow: none; }
.dark #stop:disabled { color: #d1d5db; }
/* Gradio's footer links are faint (2.4:1 in the light theme): readable at WCAG AA. */
footer .show-api, footer .built-with, footer .settings { color: var(--body-text-color) !important;
                                                        opacity: 1 !important; }
#chat .edit-textarea { width: 100% !important; min-height: 4.5em !important; }
@media (max-width: 640px) {
  #header p { display: none; }
  #chat { height: calc(100dvh - 420px) !important; }
  #model-panel .hint { display: none; }
}
"""
