"""What each control of the page does: one named method per event, over the chat's answers.

Every control (send, Stop, retry, undo, edit, clear, an example, page load, the model box's
refresh) runs outside Gradio's queue and returns at once; only :meth:`Handlers.answer` streams.
Each handler decides the state of the input and of Stop from the session's real state
(:meth:`Answers.pending`), whichever event ends first. The layout that wires them is
:mod:`phi3v_app.page`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from contextlib import closing
from pathlib import Path

import gradio as gr

from phi3v_app import view
from phi3v_app.chat import Answers, check_images, generation_options, too_large, unreadable
from phi3v_app.chat_api import file_paths
from phi3v_app.history import (
    REFUSED_UPLOAD,
    HistoryError,
    error_message,
    last_question,
    message_parts,
    refused_upload,
    reply_kind,
    upload_name,
    user_message,
    without_last_answer,
    without_last_turn,
)
from phi3v_app.transcript import from_openai, to_markdown, to_openai

log = logging.getLogger("phi3v.app")

# The Parameters sliders, in the order the page lists them as the answer's inputs.
PARAMETERS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_crops")

SAVED_CHATS = Path(tempfile.gettempdir()) / "phi3v-chats"  # downloads, and loaded pictures


def session_of(request: gr.Request | None) -> str:
    """The browser session a request comes from ("" for none)."""
    return (request.session_hash if request is not None else None) or ""


def _files_exist(message: dict) -> bool:
    _, files = message_parts(message.get("content"))
    return all(Path(path).is_file() for path in files)


def _saved_chat(text: str, suffix: str) -> str:
    """``text`` in a file named by its content, for a download button."""
    SAVED_CHATS.mkdir(exist_ok=True)
    path = SAVED_CHATS / f"chat-{hashlib.sha256(text.encode()).hexdigest()[:16]}{suffix}"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _unanswered(history: list[dict]) -> bool:
    """Whether the chat ends with a question that has no reply."""
    return bool(history) and history[-1].get("role") == "user"


def _check_loaded_pictures(history: list[dict]) -> None:
    """Raise :class:`HistoryError` for a picture of a loaded chat that cannot be read, named by
    its message (its file name is the server's own, never seen by the visitor)."""
    for number, message in enumerate(history, 1):
        for path in message_parts(message["content"])[1]:
            if (reason := unreadable(path)) is not None:
                raise HistoryError(
                    f"The picture in message {number} of the file could not be read: it {reason}."
                )


def _skip(value):
    return gr.skip() if value is None else value


def locked():
    """The input and Stop while an answer is on its way: the input waits, Stop works."""
    return gr.MultimodalTextbox(value=None, interactive=False), gr.Button(interactive=True)


class Handlers:
    """The page's event handlers over one :class:`Answers`."""

    def __init__(self, answers: Answers):
        self.answers = answers
        self.loader = answers.loader

    # --- the model box ---------------------------------------------------------------------

    def refresh(self, parameters, request: gr.Request):
        """The model box, the input's state, the crops default (unless this browser chose its
        own, ``parameters``), the poll timer, Try again."""
        status = self.loader.status()
        ready, failed = status.phase == "ready", status.phase == "failed"
        free = ready and not self.answers.pending(session_of(request))
        chosen = isinstance(parameters, dict) and "num_crops" in parameters
        return (
            view.model_panel(status),
            gr.MultimodalTextbox(
                interactive=free, placeholder=view.input_placeholder(status.phase)
            ),
            gr.Slider(value=status.num_crops) if ready and not chosen else gr.Slider(),
            gr.Timer(active=not (ready or failed)),
            gr.Button(visible=failed),
        )

    def example_times(self):
        """What the example cards say about their speed, and their own poll timer (on while
        the examples are read and timed)."""
        timing = self.loader.warming_examples
        return view.example_times(self.loader.example_seconds, timing), gr.Timer(active=timing)

    def restart_loading(self):
        """Try again after a failure: the model box says at once that it starts again."""
        self.loader.start()
        return (
            view.model_panel(self.loader.status()),
            gr.Timer(active=True),
            gr.Button(visible=False),
        )

    # --- around an answer ------------------------------------------------------------------

    def settle(self, history, request: gr.Request):
        """After an answer's event ended: the controls as the session really is (a newer
        answer, started by Retry, may be running), and the chat saved in the browser."""
        busy = self.answers.pending(session_of(request))
        return (
            gr.MultimodalTextbox(interactive=self.loader.ready and not busy),
            gr.Button(interactive=busy),
            gr.skip() if busy else list(history or []),
        )

    @staticmethod
    def restore(saved, shown):
        """The chat this browser had before a reload: (chat, input, status line). None if the
        server dropped its pictures (the conversation could not go on about them); a chat
        already going on is kept. A question the reload cut off before its answer ended (the
        chat is saved as each question is sent) goes back into the input, to send again."""
        if shown:
            return gr.skip(), gr.skip(), gr.skip()
        saved = [message for message in saved or [] if isinstance(message, dict)]
        if not all(_files_exist(message) for message in saved):
            return [], gr.skip(), gr.skip()
        if not _unanswered(saved):
            return saved, gr.skip(), gr.skip()
        answered = without_last_turn(saved)
        asked = [message_parts(message["content"]) for message in saved[len(answered) :]]
        question = {
            "text": "\n".join(text for text, _ in asked if text),
            "files": [path for _, files in asked for path in files],
        }
        return (
            answered,
            gr.MultimodalTextbox(value=question),
            view.status_line(
                "stopped",
                "Not answered",
                "the page was reloaded before the answer came: your question is back in the "
                "box, send it again",
            ),
        )

    @staticmethod
    def restore_parameters(saved):
        """The Parameters as this browser last set them (each one it never set as it is)."""
        saved = saved if isinstance(saved, dict) else {}
        return tuple(
            gr.Slider(value=value)
            if isinstance(value := saved.get(name), int | float) and not isinstance(value, bool)
            else gr.skip()
            for name in PARAMETERS
        )

    @staticmethod
    def save_parameters(*values):
        """The Parameters as set now, to keep in the browser."""
        return dict(zip(PARAMETERS, values, strict=True))

    def send(self, history, message, request: gr.Request):
        history = list(history or [])
        text = ((message or {}).get("text") or "").strip()
        files = file_paths((message or {}).get("files"))
        if not (text or files):  # said at once: Enter on an empty box is not ignored
            return gr.skip(), gr.skip(), gr.skip(), view.nothing_to_send()
        try:
            check_images(files)
        except HistoryError as err:  # shown in the chat; the file is not shown as a picture
            history += [*refused_upload(text, files), error_message(str(err), REFUSED_UPLOAD)]
            return history, gr.MultimodalTextbox(value=None), gr.skip(), view.error_status()
        self.answers.begin(session_of(request))
        history.append(user_message(text, files))
        return history, *locked(), view.status_line("busy", "Sending…")

    @staticmethod
    def check_upload(message, status):
        """A file that is not a picture is taken out of the input as it arrives, and the status
        line says so (a broken thumbnail would say nothing until the message was sent). Once
        the pictures in the input are all fine again, that line goes."""
        message = message or {}
        files = file_paths(message.get("files"))
        reasons = {path: reason for path in files if (reason := unreadable(path)) is not None}
        if not reasons:
            return gr.skip(), ("" if files and view.says_upload_refused(status) else gr.skip())
        names = ", ".join(upload_name(path) for path in reasons)
        reason = next(iter(reasons.values())) if len(reasons) == 1 else None
        kept = [path for path in files if path not in reasons]
        return (
            gr.MultimodalTextbox(value={"text": message.get("text") or "", "files": kept}),
            view.refused_upload(names, len(reasons), reason, bool(reason) and too_large(reason)),
        )

    def answer(
        self, history, max_new_tokens, temperature, top_p, top_k, num_crops, req: gr.Request
    ):
        """Stream the answer to the last question: (chat, status line) updates."""
        session = session_of(req)
        options = generation_options(max_new_tokens, temperature, top_p, top_k, num_crops)
        run = self.answers.run(self.answers.current(session), history, options, session)
        updated = False
        with closing(run):  # closed by a cancel: the runner stops the answer
            for chat, status in run:
                updated = True
                yield _skip(chat), _skip(status)
        if not updated:  # nothing to answer, or silenced: a generator without a yield would
            yield gr.skip(), gr.skip()  # empty the chat

    def stop(self, request: gr.Request):
        self.answers.stop(session_of(request))
        return gr.Button(interactive=False)

    # --- the chat's own icons --------------------------------------------------------------

    def retry(self, history, request: gr.Request):
        question, reply = last_question(history or [])
        if question is None:  # a loaded chat that starts with an answer, say
            return gr.skip(), gr.skip(), gr.skip(), view.status_line("note", "Nothing to retry")
        if reply is not None and reply_kind(reply) == REFUSED_UPLOAD:
            return self._attach_again(question)
        self.answers.begin(session_of(request))  # stops the answer still running, if any
        again = view.status_line("busy", "Asking again…")
        return without_last_answer(history or []), *locked(), again

    def _attach_again(self, question: dict):
        """Retry of a question whose file was refused: the file was not kept, so the question
        goes back into the input, and the status line asks for the picture again."""
        text = "" if question.get("metadata") else message_parts(question["content"])[0]
        return (
            gr.skip(),
            gr.MultimodalTextbox(value={"text": text, "files": []}, interactive=self.loader.ready),
            gr.Button(interactive=False),
            view.status_line(
                "error", "Not sent again", "attach the picture again (as PNG or JPEG), then send"
            ),
        )

    def undo(self, history, request: gr.Request):
        history = list(history or [])
        self.answers.forget(session_of(request), leave=without_last_turn(history))
        last_question = next((m for m in reversed(history) if m.get("role") == "user"), None)
        text, files = message_parts(last_question["content"]) if last_question else ("", [])
        return (
            without_last_turn(history),
            gr.MultimodalTextbox(
                value={"text": text, "files": files}, interactive=self.loader.ready
            ),
            gr.Button(interactive=False),
            "",
        )

    def edit(self, history, saved, event: gr.EditData, request: gr.Request):
        """Answer an edited question again, with its pictures; the later turns are dropped.

        The browser sends the chat with the edited message's content replaced by its new text,
        the pictures gone; they are taken back from the chat as saved when the last answer
        ended (``saved``, the same messages up to the edit)."""
        history = list(history or [])
        index = event.index if isinstance(event.index, int) else event.index[0]
        if not 0 <= index < len(history) or history[index].get("role") != "user":
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        _, files = message_parts(history[index]["content"])
        before = [m for m in saved or [] if isinstance(m, dict)]
        if not files and index < len(before) and before[index].get("role") == "user":
            files = message_parts(before[index]["content"])[1]
        self.answers.begin(session_of(request))
        edited = user_message(str(event.value or "").strip(), files)
        return [*history[:index], edited], *locked(), view.status_line("busy", "Asking again…")

    def clear(self, request: gr.Request):
        self.answers.forget(session_of(request), leave=[])
        return (
            [],
            gr.MultimodalTextbox(value=None, interactive=self.loader.ready),
            gr.Button(interactive=False),
            "",
        )

    def run_example(self, history, event: gr.SelectData, request: gr.Request):
        value = event.value if isinstance(event.value, dict) else {}
        files = file_paths(value.get("files"))
        text = str(value.get("text") or "")
        if not self.loader.ready or self.answers.pending(session_of(request)):
            busy = self.answers.pending(session_of(request))
            why = view.still_answering() if busy else view.not_ready(self.loader.status().phase)
            return gr.skip(), gr.skip(), gr.skip(), why
        self.answers.begin(session_of(request))
        history = [*(history or []), user_message(text, files)]
        return history, *locked(), view.status_line("busy", "Sending…")

    # --- the chat as a file ----------------------------------------------------------------

    @staticmethod
    def export(history):
        """The chat as files for the two download buttons: JSON of OpenAI messages, and
        Markdown; both buttons hidden while there is nothing to download."""
        messages = to_openai(history or [])
        if not messages:
            return (gr.DownloadButton(value=None, visible=False),) * 2
        text = json.dumps(messages, ensure_ascii=False, indent=1)
        return (
            gr.DownloadButton(value=_saved_chat(text, ".json"), visible=True),
            gr.DownloadButton(value=_saved_chat(to_markdown(history), ".md"), visible=True),
        )

    def load(self, upload, request: gr.Request):
        """A downloaded chat, loaded back to go on with it: (chat, status line)."""
        if self.answers.pending(session_of(request)):
            return gr.skip(), view.status_line("error", "Not loaded", "stop the answer first")
        pictures = SAVED_CHATS / "pictures"
        pictures.mkdir(parents=True, exist_ok=True)
        try:
            messages = json.loads(Path(str(upload)).read_text(encoding="utf-8"))
            history = from_openai(messages, pictures)
            _check_loaded_pictures(history)
        except (ValueError, OSError, HistoryError) as err:
            log.warning("refused a saved chat: %s", err)
            what = str(err) if isinstance(err, HistoryError) else "it is not a saved chat (JSON)"
            return gr.skip(), view.status_line("error", "Not loaded", what)
        return history, view.status_line("done", "Chat loaded", "ask your next question")
