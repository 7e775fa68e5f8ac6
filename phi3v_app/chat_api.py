"""The page's one public Gradio endpoint, ``/chat``: a question and pictures in, the answer out.

With a ``conversation_id`` of the caller's choosing the server remembers the conversation (its
pictures too), so the next call with the same id is a follow-up question whose KV cache is
continued; without one, the call neither continues nor keeps a cache. Answers go through the
chat's :class:`~phi3v_app.chat.Answers` (so a newer call with the same id stops the older one)
and the runner's typed events: text deltas are streamed as the answer so far, a failure is a
``gr.Error`` worded as in the chat.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import closing

import gradio as gr

from phi3v import DEFAULT_MAX_NEW_TOKENS
from phi3v_app.chat import EMPTY_ANSWER, Answers, check_images, failure_text, generation_options
from phi3v_app.history import HistoryError, assistant_message, conversation, user_message
from phi3v_app.runner import Delta, Failed, Finished, Stopped

API_CONVERSATIONS = 64  # conversations the /chat endpoint remembers (least recently used go)


def file_paths(files) -> list[str]:
    """File paths from what Gradio hands over (paths, FileData dicts)."""
    paths = []
    for item in files or []:
        if isinstance(item, dict):
            item = item.get("path") or (item.get("file") or {}).get("path")
        if item:
            paths.append(str(item))
    return paths


class ChatAPI:
    """``/chat`` over ``answers``, remembering up to API_CONVERSATIONS conversations."""

    def __init__(self, answers: Answers):
        self.answers = answers
        self.histories: OrderedDict[str, list[dict]] = OrderedDict()

    def chat(
        self,
        text: str,
        images: list[str] | None,
        max_new_tokens: float = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: float = 0,
        num_crops: float | None = None,
        conversation_id: str | None = "",
    ) -> Iterator[str]:
        """Answer ``text`` about ``images``; streams the answer so far. With a
        ``conversation_id`` the server remembers the conversation (its images too), so the
        next call with the same id is a follow-up question."""
        files = file_paths(images)
        try:
            if not (text or "").strip() and not files:
                raise HistoryError("Send a question, a picture, or both.")
            check_images(files)
            options = generation_options(max_new_tokens, temperature, top_p, top_k, num_crops)
        except (HistoryError, TypeError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None
        key = conversation_id or uuid.uuid4().hex
        previous = self.histories.get(key, []) if conversation_id else []
        history = [*previous, user_message((text or "").strip(), files)]
        session = ("api", key)
        ticket = self.answers.begin(session)
        events = self.answers.events(
            ticket, history, options, session, bool(conversation_id), on_page=False
        )
        reply = ""
        with closing(events):  # job.cancel() closes this generator, and so the answer
            for event in events:
                if isinstance(event, Delta):
                    reply += event.text
                    yield reply
                elif isinstance(event, Failed):
                    _, paths = conversation(history)
                    raise gr.Error(failure_text(event, paths, on_page=False), print_exception=False)
                elif isinstance(event, Stopped):
                    raise gr.Error(_stopped_text(event, ticket.superseded), print_exception=False)
                elif isinstance(event, Finished) and not reply:
                    yield EMPTY_ANSWER
                elif isinstance(event, Finished) and conversation_id:
                    self._remember(key, [*history, assistant_message(reply)])

    def _remember(self, key: str, history: list[dict]) -> None:
        self.histories[key] = history
        self.histories.move_to_end(key)
        pipeline = self.answers.loader.pipeline
        while len(self.histories) > API_CONVERSATIONS:
            gone, _ = self.histories.popitem(last=False)
            if pipeline is not None:
                pipeline.forget(("api", gone))


def _stopped_text(stopped: Stopped, superseded: bool) -> str:
    """Why a /chat answer ended before its end, for its caller: the text streamed so far is
    incomplete, and the conversation does not keep this turn."""
    tokens = stopped.usage.completion_tokens
    why = (
        "a newer call with the same conversation_id took over"
        if superseded
        else "the server stopped it"
    )
    return (
        f"This answer was stopped after {tokens} token{'s' if tokens != 1 else ''}: {why}. "
        "The text so far is incomplete, and the conversation does not keep this question."
    )
