"""The page: its layout, and the wiring of every control to the answer runner.

Why Blocks and not ``gr.ChatInterface(multimodal=True)`` nested in it: ChatInterface would give
retry/undo/stop/examples, but it stops answers with Gradio's ``cancels=`` alone (which drops the
answer's last update and never reaches the model call in progress), puts its own public API on
the chat, and leaves no room for the model box and the live status line. The Chatbot's own
icons give retry, undo, edit, clear and example cards here, all routed through
:class:`~phi3v_app.answers.Answers`, the one owner of a session's answer.

Every control (send, Stop, retry, undo, edit, clear, page load, the model box's refresh) runs
outside Gradio's queue (``queue=False``): none of them waits behind an answer or meets "queue
full". Only the answers themselves go through the queue, without a Gradio limit: they wait for
the model in :class:`~phi3v_app.turns.ModelTurns`, in one line with the OpenAI endpoint, where
Stop reaches them. The input and Stop follow the session's real state
(:meth:`Answers.pending`), whichever event ends first.

The one public endpoint is ``/chat`` (text, images, parameters, optional conversation id ->
streamed text); every other event is private.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import gradio as gr

from phi3v import DEFAULT_MAX_NEW_TOKENS, MAX_CROPS
from phi3v.config import DEFAULT_NUM_CROPS
from phi3v_app import view
from phi3v_app.answers import Answers, check_images, generation_options
from phi3v_app.history import (
    ERROR_MARK,
    STOPPED_MARK,
    HistoryError,
    error_message,
    message_parts,
    upload_name,
    user_message,
    without_last_answer,
    without_last_turn,
)
from phi3v_app.loading import ModelLoader
from phi3v_app.turns import ModelTurns

log = logging.getLogger("phi3v.app")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "examples"
QUEUE_SIZE = 16  # answers waiting for the model; the next one is told to try again later
API_CONVERSATIONS = 64  # conversations the /chat endpoint remembers (least recently used go)

HEADER = """\
# Phi-3 Vision on CPU
Ask about pictures: charts, screenshots, photos, several at once. Microsoft's Phi-3 Vision runs
on this machine's CPU; your pictures stay on this server.
"""

PLACEHOLDER = """\
**Drop, paste or attach pictures below and ask about them**, or try an example.
Later questions can refer back to earlier pictures.
"""

# Under the chat: the same model for scripts (phi3v_app.openai_api, mounted by the cli).
API_NOTE = """\
Scripts and tools can ask this model too: the server speaks OpenAI's chat-completions protocol
at `/v1/chat/completions` (images as `data:` URLs; see the README's *OpenAI-compatible API*).
"""

EXAMPLES = [
    ("Which month had the most rain, and how much was it?", ["bar_chart.png"]),
    ("Describe this picture in two sentences.", ["scene.png"]),
    ("What can the user do on this screen? List the controls.", ["sign_in.png"]),
    ("What does each of these two images show?", ["scene.png", "bar_chart.png"]),
]


def _chat_examples() -> list[dict]:
    return [
        {"text": text, "files": [str(EXAMPLES_DIR / name) for name in files]}
        for text, files in EXAMPLES
    ]


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or ""


def _paths(files) -> list[str]:
    """File paths from what Gradio hands over (paths, FileData dicts)."""
    paths = []
    for item in files or []:
        if isinstance(item, dict):
            item = item.get("path") or (item.get("file") or {}).get("path")
        if item:
            paths.append(str(item))
    return paths


def _files_exist(message: dict) -> bool:
    _, files = message_parts(message.get("content"))
    return all(Path(path).is_file() for path in files)


def _skip(value):
    return gr.skip() if value is None else value


def build_demo(loader: ModelLoader, turns: ModelTurns | None = None) -> gr.Blocks:
    """The whole page over ``loader`` (start it before or after building). ``turns`` is the
    model's line, shared with other users of the pipeline (default: a new one)."""
    answers = Answers(loader, turns or ModelTurns(QUEUE_SIZE))
    api_histories: OrderedDict[str, list[dict]] = OrderedDict()

    # --- the model box -------------------------------------------------------------------

    def refresh(request: gr.Request):
        status = loader.status()
        ready, failed = status.phase == "ready", status.phase == "failed"
        free = ready and not answers.pending(_session(request))
        return (
            view.model_panel(status),
            gr.MultimodalTextbox(
                interactive=free, placeholder=view.input_placeholder(status.phase)
            ),
            gr.Slider(value=status.num_crops) if ready else gr.Slider(),
            gr.Timer(active=not (ready or failed)),
            gr.Button(visible=failed),
        )

    def restart_loading():
        loader.start()
        return gr.Timer(active=True), gr.Button(visible=False)

    # --- the controls: each decides the state of the input and Stop -----------------------

    def locked():  # an answer is on its way: the input waits, Stop works
        return gr.MultimodalTextbox(value=None, interactive=False), gr.Button(interactive=True)

    def settle(history, request: gr.Request):
        """After an answer's event ended: the controls as the session really is (a newer
        answer, started by Retry, may be running), and the chat saved in the browser."""
        busy = answers.pending(_session(request))
        return (
            gr.MultimodalTextbox(interactive=loader.ready and not busy),
            gr.Button(interactive=busy),
            gr.skip() if busy else list(history or []),
        )

    def restore(saved, shown):
        """The chat this browser had before a reload (none if the server dropped its pictures:
        the conversation could not go on about them). A chat already going on is kept."""
        if shown:
            return gr.skip()
        saved = [message for message in saved or [] if isinstance(message, dict)]
        return saved if all(_files_exist(message) for message in saved) else []

    def send(history, message, request: gr.Request):
        history = list(history or [])
        text = ((message or {}).get("text") or "").strip()
        files = _paths((message or {}).get("files"))
        if not (text or files):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            check_images(files)
        except HistoryError as err:  # shown in the chat; the file is not shown as a picture
            names = ", ".join(upload_name(path) for path in files)
            shown = f"{text}\n\n(attached: {names})" if text else f"(attached: {names})"
            history += [user_message(shown, []), error_message(str(err))]
            return history, gr.MultimodalTextbox(value=None), gr.skip(), view.error_status()
        answers.begin(_session(request))
        history.append(user_message(text, files))
        return history, *locked(), view.status_line("busy", "Sending…")

    def answer(history, max_new_tokens, temperature, top_p, top_k, num_crops, req: gr.Request):
        session = _session(req)
        options = generation_options(max_new_tokens, temperature, top_p, top_k, num_crops)
        run = answers.run(answers.current(session), history, options, session)
        updated = False
        with closing(run):  # closed by a cancel: the runner stops the answer
            for chat, status in run:
                updated = True
                yield _skip(chat), _skip(status)
        if not updated:  # nothing to answer, or silenced: a generator without a yield would
            yield gr.skip(), gr.skip()  # empty the chat

    def request_stop(request: gr.Request):
        answers.stop(_session(request))
        return gr.Button(interactive=False)

    def retry(history, request: gr.Request):
        answers.begin(_session(request))  # stops the answer still running, if any
        again = view.status_line("busy", "Asking again…")
        return without_last_answer(history or []), *locked(), again

    def undo(history, request: gr.Request):
        history = list(history or [])
        answers.forget(_session(request), leave=without_last_turn(history))
        last_question = next((m for m in reversed(history) if m.get("role") == "user"), None)
        text = message_parts(last_question["content"])[0] if last_question else ""
        files = message_parts(last_question["content"])[1] if last_question else []
        return (
            without_last_turn(history),
            gr.MultimodalTextbox(value={"text": text, "files": files}, interactive=loader.ready),
            gr.Button(interactive=False),
            "",
        )

    def edit(history, event: gr.EditData, request: gr.Request):
        history = list(history or [])
        index = event.index if isinstance(event.index, int) else event.index[0]
        if not 0 <= index < len(history) or history[index].get("role") != "user":
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        _, files = message_parts(history[index]["content"])
        answers.begin(_session(request))
        edited = user_message(str(event.value or "").strip(), files)
        return [*history[:index], edited], *locked(), view.status_line("busy", "Asking again…")

    def clear(request: gr.Request):
        answers.forget(_session(request), leave=[])
        return (
            [],
            gr.MultimodalTextbox(value=None, interactive=loader.ready),
            gr.Button(interactive=False),
            "",
        )

    def run_example(history, event: gr.SelectData, request: gr.Request):
        value = event.value if isinstance(event.value, dict) else {}
        files = _paths(value.get("files"))
        text = str(value.get("text") or "")
        if not loader.ready or answers.pending(_session(request)):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        answers.begin(_session(request))
        history = [*(history or []), user_message(text, files)]
        return history, *locked(), view.status_line("busy", "Sending…")

    # --- the API -------------------------------------------------------------------------

    def chat(
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
        files = _paths(images)
        try:
            if not (text or "").strip() and not files:
                raise HistoryError("Send a question, a picture, or both.")
            check_images(files)
            options = generation_options(max_new_tokens, temperature, top_p, top_k, num_crops)
        except (HistoryError, TypeError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None
        key = conversation_id or uuid.uuid4().hex
        previous = api_histories.get(key, []) if conversation_id else []
        history = [*previous, user_message((text or "").strip(), files)]
        session = ("api", key)
        final: list[dict] = history
        run = answers.run(answers.begin(session), history, options, session)
        with closing(run):  # job.cancel() closes this generator, and so the run
            for update, _ in run:
                if update is None:
                    continue
                final = update
                if update[-1]["role"] == "assistant":
                    reply = message_parts(update[-1]["content"])[0]
                    if not reply.startswith((ERROR_MARK, STOPPED_MARK)):
                        yield reply
        reply = message_parts(final[-1]["content"])[0] if final[-1]["role"] == "assistant" else ""
        if reply.startswith(ERROR_MARK):
            raise gr.Error(reply.removeprefix(ERROR_MARK).strip(), print_exception=False)
        pipeline = loader.pipeline
        if not (conversation_id and reply and not reply.startswith(STOPPED_MARK)):
            if pipeline is not None and not conversation_id:
                pipeline.forget(session)  # a one-off call: its cache helps no one
            return
        api_histories[key] = final
        api_histories.move_to_end(key)
        while len(api_histories) > API_CONVERSATIONS:
            gone, _ = api_histories.popitem(last=False)
            if pipeline is not None:
                pipeline.forget(("api", gone))

    # --- the layout ----------------------------------------------------------------------

    start = loader.status()
    with gr.Blocks(title="Phi-3 Vision on CPU", analytics_enabled=False) as demo:
        gr.Markdown(HEADER, elem_id="header")
        panel = gr.HTML(view.model_panel(start), elem_id="model-panel")
        load_again = gr.Button("Try again", size="sm", visible=False)
        chatbot = gr.Chatbot(
            show_label=False,
            height=None,
            placeholder=PLACEHOLDER,
            examples=_chat_examples(),
            buttons=["copy", "copy_all"],
            feedback_options=None,
            editable="user",
            elem_id="chat",
        )
        status = gr.HTML("", elem_id="status")
        with gr.Row(elem_id="input-row", equal_height=True):
            chat_input = gr.MultimodalTextbox(
                show_label=False,
                placeholder=view.input_placeholder(start.phase),
                file_types=["image"],
                file_count="multiple",
                sources=["upload"],
                interactive=start.phase == "ready",
                max_plain_text_length=100_000,  # long pasted text stays text, not a .txt file
                scale=1,
                min_width=120,
                elem_id="chat-input",
            )
            stop_button = gr.Button(
                "Stop", variant="stop", scale=0, min_width=72, interactive=False, elem_id="stop"
            )
        with gr.Accordion("Parameters", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(
                    1,
                    4096,
                    value=DEFAULT_MAX_NEW_TOKENS,
                    step=1,
                    label="Max new tokens",
                    info="The answer stops after this many tokens.",
                )
                num_crops = gr.Slider(
                    1,
                    MAX_CROPS,
                    value=start.num_crops or DEFAULT_NUM_CROPS,  # until the model says its own
                    step=1,
                    label="Image detail (crops)",
                    info="Tiles of 336 px the model reads per image: fewer is faster, coarser.",
                )
            with gr.Row():
                temperature = gr.Slider(
                    0,
                    2,
                    value=0,
                    step=0.05,
                    label="Temperature",
                    info="0 = greedy: the same answer every time.",
                )
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p", info="1 = off.")
                top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k", info="0 = off.")
        gr.Markdown(API_NOTE, elem_id="api-note")
        # The chat survives a reload: kept in this browser (encrypted with a key of this
        # server process), saved whenever an answer ends.
        saved = gr.BrowserState([], storage_key="phi3v-chat")
        timer = gr.Timer(1.0, active=start.phase not in ("ready", "failed"))
        with gr.Group(visible=False):  # the /chat endpoint's inputs and output
            api_text = gr.Textbox(label="text")
            api_images = gr.File(label="images", file_count="multiple")  # checked in chat()
            api_conversation = gr.Textbox(label="conversation_id")
            api_answer = gr.Textbox(label="answer")
            api_trigger = gr.Button("chat")

        # --- the wiring ------------------------------------------------------------------

        private = dict(api_visibility="private", show_progress="hidden")
        control = dict(queue=False, **private)
        params = [max_new_tokens, temperature, top_p, top_k, num_crops]
        controls = [chat_input, stop_button]
        started_answer = [chatbot, *controls, status]

        def then_answer(event):
            answered = event.then(
                answer, [chatbot, *params], [chatbot, status], concurrency_limit=None, **private
            )
            answered.then(settle, chatbot, [*controls, saved], **control)

        then_answer(chat_input.submit(send, [chatbot, chat_input], started_answer, **control))
        then_answer(chatbot.retry(retry, [chatbot], started_answer, **control))
        then_answer(chatbot.edit(edit, [chatbot], started_answer, **control))
        then_answer(chatbot.example_select(run_example, [chatbot], started_answer, **control))
        chatbot.undo(undo, [chatbot], started_answer, **control).then(
            lambda history: history, chatbot, saved, **control
        )
        chatbot.clear(clear, None, started_answer, **control).then(
            lambda: [], None, saved, **control
        )
        stop_button.click(request_stop, None, stop_button, **control)

        watched = [panel, chat_input, num_crops, timer, load_again]
        timer.tick(refresh, None, watched, **control)
        demo.load(refresh, None, watched, **control)
        demo.load(restore, [saved, chatbot], chatbot, **control)
        load_again.click(restart_loading, None, [timer, load_again], **control)

        api_trigger.click(
            chat,
            [api_text, api_images, *params, api_conversation],
            api_answer,
            api_name="chat",
            concurrency_limit=None,  # calls wait for the model in ModelTurns, not here
        )
    demo.queue(default_concurrency_limit=None)
    _quiet_malformed_requests(demo)
    demo.answers = answers  # for the tests and the launch code: the runner of this page
    return demo


def _quiet_malformed_requests(demo: gr.Blocks) -> None:
    """A request Gradio cannot even parse (too few values, a wrong type, a file path that was
    never uploaded) gets a message saying what to send, and the log one line; not a traceback
    on the console and Gradio's internal exception text to the caller."""
    parse = demo.preprocess_data

    async def preprocess_data(block_fn, inputs, state, explicit_call=False):
        try:
            return await parse(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            log.warning("malformed request to %s: %s", block_fn.name, reason)
            raise gr.Error(
                "The request does not fit this endpoint: send the parameters that "
                "client.view_api() lists, with pictures uploaded through handle_file().",
                print_exception=False,
            ) from None

    demo.preprocess_data = preprocess_data
