"""The chat's side of the runner: whose answer is running, and its events as chat and status.

One answer, as the page and its ``/chat`` API run it::

    Answers.begin(session)  -> a Ticket (any earlier answer of the session is stopped)
    Answers.events(ticket, history, options)
        -> the checks of the chat history (limits, a model that is not ready)
        -> Runner.start: the runner's typed events (phi3v_app.runner)
    Answers.run(ticket, history, options)
        -> those events rendered: (chat history, status line) updates for the page
    Answers.stop(session)   -> the ticket's stop event: a waiting answer leaves the line, a
                               running one is cancelled

That is the only way an answer stops: Stop, Retry, Clear, Undo, Esc and a closed API call all
come here. Gradio's own ``cancels=`` is not used for the chat: answers never wait in Gradio's
queue (they wait in ModelTurns, where the line is shared with the API and Stop reaches them),
and a Gradio cancel would drop the answer's last update (its "Stopped" line and chat marker).
A gradio_client ``job.cancel()`` closes the generator, which stops the ticket the same way.

Nothing here imports Gradio: ``run`` yields ``None`` for "leave this output as it is".
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from phi3v import DEFAULT_MAX_NEW_TOKENS, ImageError, Timings
from phi3v.image import DOWNSCALE, describe_image, load_rgb
from phi3v.sampling import OFFERED_MAX_TEMPERATURE
from phi3v_app import view
from phi3v_app.history import (
    HistoryError,
    assistant_message,
    check_limits,
    conversation,
    error_message,
    is_image_name,
    message_parts,
    stopped_message,
    upload_name,
)
from phi3v_app.loading import ModelLoader
from phi3v_app.runner import (
    Answer,
    Delta,
    Event,
    Failed,
    Finished,
    Question,
    Queued,
    Reading,
    Runner,
    Stopped,
    Usage,
)
from phi3v_app.turns import ModelTurns

log = logging.getLogger("phi3v.app")

EMPTY_ANSWER = "_(The model ended its answer without any text.)_"
UPDATE_SECONDS = 0.1  # at least this long between page updates while text streams in

Update = tuple[list[dict] | None, str | None]  # (chat history, status HTML); None = unchanged


@dataclass
class Ticket:
    """One answer of one session, from the message sent until the answer ended."""

    session: Hashable
    stop: threading.Event = field(default_factory=threading.Event)
    superseded: bool = False  # a newer answer of the same session took over (Retry, Edit)
    leave: list[dict] | None = None  # the chat to show when it was dropped (Undo, Clear)
    answer: Answer | None = None

    def cancel(self) -> None:
        self.stop.set()
        if (answer := self.answer) is not None:
            answer.cancel()


def generation_options(
    max_new_tokens: float | None,
    temperature: float | None,
    top_p: float | None,
    top_k: float | None,
    num_crops: float | None,
) -> dict:
    """Slider values -> ``Pipeline.stream`` keyword arguments (0 / 1 mean "off" for top-k / -p).
    A temperature outside the page's range (``/chat`` takes any number) is a ValueError."""
    if temperature is not None and not 0 <= temperature <= OFFERED_MAX_TEMPERATURE:
        highest = f"{OFFERED_MAX_TEMPERATURE:g}"
        raise ValueError(f"temperature must be a number from 0 to {highest}, got {temperature!r}")
    return {
        "max_new_tokens": int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
        "temperature": float(temperature or 0.0),
        "top_p": float(top_p) if top_p and 0 < top_p < 1 else None,
        "top_k": int(top_k) if top_k and top_k >= 1 else None,
        "num_crops": int(num_crops) if num_crops else None,
    }


def check_images(paths: Sequence[str]) -> None:
    """Raise :class:`HistoryError` naming the first upload that is not a readable picture, by
    its own name and its place in the message, and saying what is wrong with it. The log gets
    the reason, in one line."""
    for number, path in enumerate(paths, 1):
        if (reason := unreadable(path)) is None:
            continue
        where = f" (image {number} of {len(paths)} in this message)" if len(paths) > 1 else ""
        if too_large(reason):
            raise HistoryError(f"{upload_name(path)}{where} is too large: it {reason}.")
        raise HistoryError(
            f"{upload_name(path)}{where} could not be read as a picture: it {reason}. Send it "
            "again as a PNG or JPEG file."
        )


def unreadable(path: str) -> str | None:
    """What is wrong with the uploaded file at ``path``, in a visitor's words, to follow "it"
    ("is empty (0 bytes)", "is damaged or cut short", ...); None when it is a picture the model
    can read. The log gets the full reason once, in one line."""
    try:
        stat = os.stat(path)
    except OSError:
        log.warning("refused upload %s: the file is gone", upload_name(path))
        return "is no longer on the server"
    return _unreadable(path, stat.st_mtime_ns, stat.st_size)


def _in_words(error: ImageError, path: str) -> str:
    """An ImageError about the file at ``path`` as a visitor would want it: no server path, no
    library names."""
    reason = str(error).removeprefix(describe_image(path)).strip()
    if reason.startswith("is empty"):
        return "is empty (0 bytes)"
    if reason.startswith("is corrupt or truncated"):
        return "is damaged or cut short"
    if too_large(reason):  # worded already: for pixels with its advice, for bytes without
        return reason.split(" (", 1)[0] if DOWNSCALE in reason else reason.split("; ", 1)[0]
    return "is not a PNG, JPEG, WebP or GIF image"


def too_large(reason: str) -> bool:
    """Whether an :func:`unreadable` reason is a picture's size, not its format: the advice is
    then to make it smaller, not to send another kind of file."""
    return "more than the limit" in reason  # phi3v.image's pixel and file-size refusals


@functools.lru_cache(maxsize=256)  # an upload is checked as it arrives and again when sent
def _unreadable(path: str, mtime_ns: int, size: int) -> str | None:
    try:
        if not is_image_name(path):
            raise ImageError(f"{describe_image(path)} is not a picture's file type")
        load_rgb(path)
    except ImageError as err:
        log.warning("refused upload %s: %s", upload_name(path), err)
        return _in_words(err, path)
    return None


def failure_text(failed: Failed, images: Sequence[str] = (), *, on_page: bool = True) -> str:
    """A failed answer, worded for the person in the chat (``images``: the conversation's), or
    for a caller of the ``/chat`` API (``on_page=False``: no buttons to press there)."""
    if failed.kind == "busy":
        retry = " (press ↻ on your message)" if on_page else ""
        return (
            "The server is busy: too many questions are waiting for the model. Your message "
            f"was not answered; try again in a minute{retry}."
        )
    if failed.kind == "too_large":
        reason = failed.reason
        if on_page:  # the package names its parameter; the page has a slider for it
            reason = reason.replace("num_crops", "Image detail (in Parameters)")
        return f"This is too much for the model at once: {_sentence(reason)}"
    if failed.kind == "bad_image":
        try:
            check_images(images)
        except HistoryError as named:
            return str(named)
        return "One of the pictures could not be read. Send it again as PNG or JPEG."
    if failed.kind == "bad_input":
        return f"The request could not be answered: {_sentence(failed.reason)}"
    if failed.kind == "internal":
        start_over = "clear the chat" if on_page else "use a new conversation_id"
        return (
            "Something went wrong on the server while answering (the server log has the "
            f"details). Try again, or {start_over} and start over."
        )
    return failed.reason  # not_ready, and the chat's own refusals: worded already


def _sentence(reason: str) -> str:
    """``reason`` ending in one full stop, whether or not it had one."""
    return reason.rstrip().rstrip(".") + "."


class Answers:
    """Every session's current answer; the chat's way into the runner."""

    def __init__(self, loader: ModelLoader, turns: ModelTurns):
        self.loader, self.turns = loader, turns
        self.runner = Runner(lambda: loader.pipeline, turns)
        self._lock = threading.Lock()
        self._current: dict[Hashable, Ticket] = {}

    # --- who is answering ------------------------------------------------------------------

    def begin(self, session: Hashable) -> Ticket:
        """A new answer for ``session``; the one it may still have running is stopped."""
        ticket = Ticket(session)
        with self._lock:
            previous = self._current.get(session)
            self._current[session] = ticket
        if previous is not None:
            previous.superseded = True
            previous.cancel()
        return ticket

    def current(self, session: Hashable) -> Ticket | None:
        with self._lock:
            return self._current.get(session)

    def pending(self, session: Hashable) -> bool:
        """True from a message sent until its answer ended: the input stays locked."""
        return self.current(session) is not None

    def stop(self, session: Hashable) -> bool:
        """Stop the session's answer, waiting or running; False when it has none."""
        ticket = self.current(session)
        if ticket is None:
            return False
        ticket.cancel()
        return True

    def forget(self, session: Hashable, leave: list[dict]) -> None:
        """Stop the session's answer and drop it (Undo, Clear): its last update shows ``leave``,
        so no update of it still on its way can bring the answer back."""
        with self._lock:
            ticket = self._current.pop(session, None)
        if ticket is not None:
            ticket.leave, ticket.superseded = leave, True
            ticket.cancel()

    def _end(self, ticket: Ticket) -> None:
        with self._lock:
            if self._current.get(ticket.session) is ticket:
                del self._current[ticket.session]

    # --- one answer ------------------------------------------------------------------------

    def events(
        self,
        ticket: Ticket,
        history: Sequence[dict],
        options: dict[str, Any],
        conversation_key: Hashable | None = None,
        remember: bool = True,
        on_page: bool = True,
    ) -> Iterator[Event]:
        """The runner's events answering the last user message of ``history``; nothing when
        there is none. ``conversation_key`` scopes the engine's KV-cache reuse, so one visitor's
        cached prompt never speeds up (and so never reveals itself to) another. A refusal is
        worded for the page, or (``on_page=False``) for a caller of the ``/chat`` API."""
        try:
            if ticket.stop.is_set():
                yield Stopped(Usage(), Timings())
                return
            messages, images = conversation(history)
            if not messages or messages[-1]["role"] != "user":
                return
            if (refused := self._refusal(history, on_page)) is not None:
                yield refused
                return
            ticket.answer = self.runner.start(
                Question(messages, images, options, conversation_key, remember), ticket.stop
            )
            yield from ticket.answer.events(every=UPDATE_SECONDS)
        finally:
            ticket.cancel()  # a no-op after a normal end; stops the worker if we were closed
            self._end(ticket)

    def _refusal(self, history: Sequence[dict], on_page: bool) -> Failed | None:
        if self.loader.pipeline is None:
            status = self.loader.status()
            reason = {
                "downloading": "is still downloading",
                "converting": "is still making its fast copies",
                "failed": "could not be loaded",
            }.get(status.phase, "is still loading")
            if on_page:
                advice = "see the box at the top"
            elif status.phase == "failed":
                advice = status.error or "the server log says why"
            else:
                advice = "try again in a minute (the web page shows its progress)"
            return Failed("not_ready", f"The model {reason}; {advice}.")
        start_over = "Clear the chat" if on_page else "Use a new conversation_id"
        try:
            check_limits(history, start_over=f"{start_over} to start a new one")
        except HistoryError as err:
            log.warning("refused request: %s", err)
            return Failed("bad_input", str(err))
        return None

    def run(
        self,
        ticket: Ticket | None,
        history: list[dict] | None,
        options: dict[str, Any],
        conversation_key: Hashable | None = None,
    ) -> Iterator[Update]:
        """Answer the last user message of ``history``; yields (chat history, status line).

        The last update says how the answer ended: done, stopped (with a marker in the chat
        when no word came), or an error message in the chat. An answer superseded by a newer
        one of its session (Retry) leaves the page to the newer one.
        """
        if ticket is None:  # nothing was sent (or it was stopped and forgotten already)
            return
        history = list(history or [])
        _, brought = message_parts(history[-1]["content"]) if history else ("", [])
        yield None, view.preparing_status(len(brought))
        render = ChatRendering(history)
        answered = False
        for event in self.events(ticket, history, options, conversation_key):
            answered = True
            update = render.event(event)
            if update is not None and not ticket.superseded:
                yield update
        if ticket.leave is not None:
            yield ticket.leave, ""
        elif not answered:  # nothing to answer: the status line says nothing more
            yield None, ""


class ChatRendering:
    """One answer's events -> (chat history, status line) updates below ``history``."""

    def __init__(self, history: list[dict]):
        self.history = history
        self.text = ""

    def event(self, event: Event) -> Update | None:
        """The page update for ``event``; None when the page stays as it is."""
        if isinstance(event, Queued):
            return None, view.waiting_status(event.ahead)
        if isinstance(event, Reading):
            if self.text or event.progress.stage == "decode":
                return None
            return None, view.reading_status(event.progress, event.elapsed, event.estimate)
        if isinstance(event, Delta):
            self.text += event.text
            usage = event.usage
            status = view.answer_status(
                event.timings, usage.completion_tokens, usage.prompt_tokens, None
            )
            return self._with(assistant_message(self.text)), status
        if isinstance(event, Finished):
            answer = self.text or EMPTY_ANSWER
            usage = event.usage
            status = view.answer_status(
                event.timings, usage.completion_tokens, usage.prompt_tokens, event.reason
            )
            return self._with(assistant_message(answer)), status
        if isinstance(event, Stopped):
            if not self.text:
                return self._with(stopped_message()), view.stopped_status()
            usage = event.usage
            status = view.answer_status(
                event.timings, usage.completion_tokens, usage.prompt_tokens, "cancelled"
            )
            return self._with(assistant_message(self.text)), status
        _, images = conversation(self.history)
        return self._with(error_message(failure_text(event, images))), view.error_status()

    def _with(self, reply: dict) -> list[dict]:
        return [*self.history, reply]
