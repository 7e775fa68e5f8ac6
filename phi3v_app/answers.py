"""The answer runner: the one owner of "is an answer running (or waiting) for this session".

One answer, as the chat and the API run it::

    Answers.begin(session)  -> a Ticket (any earlier answer of the session is stopped)
    Answers.run(ticket, history, options)
        -> a worker thread takes the model's turn (ModelTurns, shared with the OpenAI
           endpoint), starts Pipeline.stream and reads its text deltas
        -> this generator yields (chat history, status line) while the answer waits in line,
           while the model reads the images (progress, clock), and as text arrives
    Answers.stop(session)   -> the ticket's stop event: a waiting answer leaves the line
                               (ModelTurns' ``cancelled=``), a running one is cancelled
                               (Stream.cancel aborts even the long first model call)

That is the only way an answer stops: Stop, Retry, Clear, Undo, Esc and a closed API call all
come here. Gradio's own ``cancels=`` is not used for the chat: answers never wait in Gradio's
queue (they wait in ModelTurns, where the line is shared with the API and Stop reaches them),
and a Gradio cancel would drop the answer's last update (its "Stopped" line and chat marker).
A gradio_client ``job.cancel()`` closes the generator, which stops the ticket the same way.

Nothing here imports Gradio: ``run`` yields ``None`` for "leave this output as it is".
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from phi3v import DEFAULT_MAX_NEW_TOKENS, ImageError, LimitError, Phi3VError, Stream
from phi3v.image import load_rgb
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
from phi3v_app.turns import ModelTurns, QueueFull, TurnCancelled

log = logging.getLogger("phi3v.app")

TICK_SECONDS = 0.25  # how often the status line moves while no text arrives
UPDATE_SECONDS = 0.1  # at least this long between page updates while text streams in

Update = tuple[list[dict] | None, str | None]  # (chat history, status HTML); None = unchanged


@dataclass
class Ticket:
    """One answer of one session, from the message sent until the answer ended."""

    session: Hashable
    stop: threading.Event = field(default_factory=threading.Event)
    superseded: bool = False  # a newer answer of the same session took over (Retry, Edit)
    leave: list[dict] | None = None  # the chat to show when it was dropped (Undo, Clear)
    stream: Stream | None = None

    def cancel(self) -> None:
        self.stop.set()
        if (stream := self.stream) is not None:
            stream.cancel()  # thread-safe; aborts the model call in progress


def generation_options(
    max_new_tokens: float | None,
    temperature: float | None,
    top_p: float | None,
    top_k: float | None,
    num_crops: float | None,
) -> dict:
    """Slider values -> ``Pipeline.stream`` keyword arguments (0 / 1 mean "off" for top-k / -p)."""
    return {
        "max_new_tokens": int(max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
        "temperature": float(temperature or 0.0),
        "top_p": float(top_p) if top_p and 0 < top_p < 1 else None,
        "top_k": int(top_k) if top_k and top_k >= 1 else None,
        "num_crops": int(num_crops) if num_crops else None,
    }


def check_images(paths: Sequence[str]) -> None:
    """Raise :class:`HistoryError` naming the first upload that is not a readable picture, by
    its own name and its place in the message. The log gets the reason, in one line."""
    for number, path in enumerate(paths, 1):
        where = f" (image {number} of {len(paths)} in this message)" if len(paths) > 1 else ""
        name = upload_name(path)
        try:
            if not is_image_name(path):
                raise ImageError("not an image file type")
            load_rgb(path)
        except ImageError as err:
            log.warning("refused upload %s: %s", name, err)
            raise HistoryError(
                f"{name}{where} could not be read as a picture: it is not a PNG, JPEG, WebP or "
                "GIF image, or it is damaged. Send it again as a PNG or JPEG file."
            ) from None


class Answers:
    """Every session's current answer, and the runner that takes it through the model."""

    def __init__(self, loader: ModelLoader, turns: ModelTurns):
        self.loader, self.turns = loader, turns
        self._lock = threading.Lock()
        self._current: dict[Hashable, Ticket] = {}
        self._in_line: list[Ticket] = []  # answers waiting for the model, in arrival order

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

    def ahead_of(self, ticket: Ticket) -> int:
        """Requests the model serves before ``ticket``: the one it is on, chat answers that
        came earlier, and API calls waiting (counted as earlier: an upper bound)."""
        with self._lock:
            if ticket not in self._in_line:
                return 0
            earlier = self._in_line.index(ticket)
            others = max(0, self.turns.waiting - len(self._in_line))
        return 1 + earlier + others

    # --- one answer ------------------------------------------------------------------------

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
        one of its session (Retry) leaves the page to the newer one. ``conversation_key``
        scopes the engine's KV-cache reuse, so one visitor's cached prompt never speeds up
        (and so never reveals itself to) another.
        """
        if ticket is None:  # nothing was sent (or it was stopped and forgotten already)
            return
        try:
            yield from self._run(ticket, list(history or []), options, conversation_key)
            if ticket.leave is not None:
                yield ticket.leave, ""
        finally:
            ticket.cancel()  # a no-op after a normal end; stops the worker if we were closed
            self._end(ticket)

    def _run(self, ticket: Ticket, history, options, key) -> Iterator[Update]:
        if ticket.stop.is_set():
            yield from self._stopped(ticket, history, "")
            return
        messages, images = conversation(history)
        if not messages or messages[-1]["role"] != "user":
            yield history, ""
            return
        pipe = self.loader.pipeline
        if pipe is None:
            phase = self.loader.status().phase
            reason = {"downloading": "is still downloading", "failed": "could not be loaded"}
            text = f"The model {reason.get(phase, 'is still loading')}; see the box at the top."
            yield [*history, error_message(text)], view.error_status()
            return
        try:
            check_limits(history)
        except HistoryError as err:
            log.warning("refused request: %s", err)
            yield [*history, error_message(str(err))], view.error_status()
            return
        _, brought = message_parts(history[-1]["content"])
        yield history, view.preparing_status(len(brought))

        arrived: queue.SimpleQueue = queue.SimpleQueue()
        worker = threading.Thread(
            target=self._work,
            args=(ticket, messages, images, options, key, arrived),
            name="phi3v-answer",
            daemon=True,
        )
        with self._lock:
            self._in_line.append(ticket)
        worker.start()
        yield from self._follow(ticket, history, arrived)

    def _work(self, ticket, messages, images, options, key, arrived: queue.SimpleQueue) -> None:
        """The worker thread: wait for the model's turn, then run the stream into ``arrived``."""
        stream = None
        try:
            with self.turns.turn(cancelled=ticket.stop):
                self._leave_line(ticket)
                started = time.monotonic()
                stream = self.loader.pipeline.stream(messages, images, conversation=key, **options)
                ticket.stream = stream
                if ticket.stop.is_set():
                    stream.cancel()
                arrived.put(("stream", stream, started))
                for delta in stream:
                    arrived.put(delta)
            arrived.put(("end",))
        except BaseException as err:  # handed over to the generator, which says what happened
            arrived.put(("error", err))
        finally:
            self._leave_line(ticket)
            ticket.stream = None
            if stream is not None:
                stream.close()  # frees its KV cache at once

    def _leave_line(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._in_line:
                self._in_line.remove(ticket)

    def _follow(self, ticket, history, arrived: queue.SimpleQueue) -> Iterator[Update]:
        stream: Stream | None = None
        started = time.monotonic()
        text = ""
        last_update = 0.0
        while True:
            batch = _gather(arrived, TICK_SECONDS, until=last_update + UPDATE_SECONDS)
            fresh = "".join(item for item in batch if isinstance(item, str))
            text += fresh
            event = next((item for item in batch if not isinstance(item, str)), None)
            if event is not None and event[0] == "stream":  # the turn came; the model runs
                _, stream, started = event
                event = None
            if event is not None and event[0] == "error":
                yield from self._failed(ticket, history, event[1])
                return
            if event is not None:  # the end
                break
            if ticket.superseded:
                continue  # the worker ends soon; the newer answer owns the page
            last_update = time.monotonic()
            if stream is None:
                yield None, view.waiting_status(self.ahead_of(ticket))
            elif not stream.token_ids:
                elapsed = time.monotonic() - started
                estimate = stream.estimated_first_token
                yield None, view.reading_status(stream.progress, elapsed, estimate)
            elif fresh or text:
                status = view.answer_status(
                    stream.timings, len(stream.token_ids), len(stream.input_ids), None
                )
                yield [*history, assistant_message(text)], status
        if ticket.superseded:
            return
        if stream is None or (ticket.stop.is_set() and not text):
            yield from self._stopped(ticket, history, text)
            return
        reason = "cancelled" if ticket.stop.is_set() else stream.stop_reason
        answer = text or "_(The model ended its answer without any text.)_"
        status = view.answer_status(
            stream.timings, len(stream.token_ids), len(stream.input_ids), reason
        )
        yield [*history, assistant_message(answer)], status

    def _stopped(self, ticket: Ticket, history, text: str) -> Iterator[Update]:
        if ticket.superseded:
            return
        if text:
            yield [*history, assistant_message(text)], view.status_line("stopped", "Stopped")
        else:
            yield [*history, stopped_message()], view.stopped_status()

    def _failed(self, ticket: Ticket, history, error: BaseException) -> Iterator[Update]:
        if isinstance(error, TurnCancelled) or ticket.stop.is_set():
            yield from self._stopped(ticket, history, "")
            return
        if isinstance(error, QueueFull):
            log.warning("turned away: %s", error)
            text = (
                "The server is busy: too many questions are waiting for the model. Your "
                "message was not answered; try again in a minute (press ↻ on your message)."
            )
        elif isinstance(error, LimitError):
            log.warning("refused request: %s", error)
            text = f"This is too much for the model at once: {error}."
        elif isinstance(error, ImageError):
            _, images = conversation(history)
            try:
                check_images(images)
                text = "One of the pictures could not be read. Send it again as PNG or JPEG."
            except HistoryError as named:
                text = str(named)
            log.warning("refused request: %s", error)
        elif isinstance(error, Phi3VError):
            log.warning("refused request: %s", error)
            text = f"The request could not be answered: {error}."
        else:
            log.error("answer failed: %s: %s", type(error).__name__, error, exc_info=error)
            text = (
                "Something went wrong on the server while answering (the server log has the "
                "details). Try again, or clear the chat and start over."
            )
        yield [*history, error_message(text)], view.error_status()


def _gather(arrived: queue.SimpleQueue, tick: float, until: float) -> list:
    """The items that arrive within ``tick`` seconds and then up to time ``until``; the wait
    ends early at a non-text item (the stream, its end or its error)."""
    try:
        batch = [arrived.get(timeout=tick)]
    except queue.Empty:
        return []
    while isinstance(batch[-1], str):
        try:
            batch.append(arrived.get(timeout=max(until - time.monotonic(), 0)))
        except queue.Empty:
            break
    return batch
