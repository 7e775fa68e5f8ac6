"""The page: its layout, and the wiring of every control to its handler.

Why Blocks and not ``gr.ChatInterface(multimodal=True)`` nested in it: ChatInterface would give
retry/undo/stop/examples, but it stops answers with Gradio's ``cancels=`` alone (which drops the
answer's last update and never reaches the model call in progress), puts its own public API on
the chat, and leaves no room for the model box and the live status line. The Chatbot's own
icons give retry, undo, edit, clear and example cards here, all routed through
:class:`~phi3v_app.chat.Answers`, the one owner of a session's answer; what each control does
is a named method of :class:`~phi3v_app.handlers.Handlers`.

Every control (send, Stop, retry, undo, edit, clear, page load, the model box's refresh) runs
outside Gradio's queue (``queue=False``): none of them waits behind an answer or meets "queue
full". Only the answers themselves go through the queue, without a Gradio limit: they wait for
the model in :class:`~phi3v_app.turns.ModelTurns`, in one line with the OpenAI endpoint, where
Stop reaches them. The input and Stop follow the session's real state
(:meth:`Answers.pending`), whichever event ends first.

The one public endpoint is ``/chat`` (:mod:`phi3v_app.chat_api`: text, images, parameters,
optional conversation id -> streamed text); every other event is private. The OpenAI-compatible
routes join the same server in :mod:`phi3v_app.cli`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from phi3v import DEFAULT_MAX_NEW_TOKENS, MAX_CROPS
from phi3v.config import DEFAULT_NUM_CROPS
from phi3v_app import view
from phi3v_app.chat import Answers
from phi3v_app.chat_api import ChatAPI
from phi3v_app.gradio_private import quiet_malformed_requests
from phi3v_app.handlers import Handlers
from phi3v_app.history import MAX_NEW_TOKENS
from phi3v_app.loading import ModelLoader
from phi3v_app.turns import ModelTurns

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "examples"
QUEUE_SIZE = 16  # answers waiting for the model; the next one is told to try again later
# Pasted text stays text up to this length (Gradio would turn a longer paste into a .txt
# attachment, which the picture-only input refuses): the prompt limit says what is too long.
MAX_PASTED_CHARS = 10_000_000

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


@dataclass(frozen=True)
class ChatApp:
    """The page and what serves it: the model's loader and its one line (ModelTurns), which
    every other user of the pipeline (the OpenAI endpoint) must share."""

    demo: gr.Blocks
    loader: ModelLoader
    turns: ModelTurns


def build_app(loader: ModelLoader, turns: ModelTurns | None = None) -> ChatApp:
    """The whole page over ``loader`` (start it before or after building). ``turns`` is the
    model's line, shared with other users of the pipeline (default: a new one)."""
    answers = Answers(loader, turns or ModelTurns(QUEUE_SIZE))
    demo = build_demo(Handlers(answers), ChatAPI(answers))
    return ChatApp(demo, loader, answers.turns)


def build_demo(handlers: Handlers, api: ChatAPI) -> gr.Blocks:
    """The layout, each control wired to its handler, and the ``/chat`` endpoint."""
    start = handlers.loader.status()
    with gr.Blocks(title="Phi-3 Vision on CPU", analytics_enabled=False) as demo:
        gr.Markdown(HEADER, elem_id="header")
        panel = gr.HTML(view.model_panel(start), elem_id="model-panel")
        load_again = gr.Button("Try again", size="sm", visible=False)
        chatbot = gr.Chatbot(
            label="Chat",
            show_label=False,
            height=None,
            placeholder=PLACEHOLDER,
            examples=_chat_examples(),
            buttons=["copy", "copy_all"],
            feedback_options=None,
            editable="user",
            # Each part of a message in a bubble of its own: Gradio's edit of a bubble holding a
            # picture and text throws in the browser (it copies the picture as if it were text)
            # and never reaches the server; alone, the text is edited and the picture kept.
            group_consecutive_messages=False,
            elem_id="chat",
        )
        status = gr.HTML("", elem_id="status")
        # What each example card says about its speed, copied onto the cards by the page
        # script (phi3v_app.page_script).
        example_times = gr.HTML(
            view.example_times([], warming=False), visible="hidden", elem_id="example-times"
        )
        with gr.Row(elem_id="input-row", equal_height=True):
            chat_input = gr.MultimodalTextbox(
                label="Your question",  # read out by screen readers only
                show_label=False,
                placeholder=view.input_placeholder(start.phase),
                file_types=["image"],
                file_count="multiple",
                sources=["upload"],
                interactive=start.phase == "ready",
                max_plain_text_length=MAX_PASTED_CHARS,
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
                    MAX_NEW_TOKENS,
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
        with gr.Row(elem_id="transcript"):
            download = gr.DownloadButton(
                "Download the chat (JSON)", size="sm", visible=False, elem_id="download"
            )
            download_md = gr.DownloadButton(
                "Download the chat (Markdown)", size="sm", visible=False, elem_id="download-md"
            )
            upload = gr.UploadButton(
                "Load a chat (JSON)", file_types=[".json"], size="sm", elem_id="load"
            )
        gr.Markdown(API_NOTE, elem_id="api-note")
        # The chat survives a reload: kept in this browser (encrypted with a key of this
        # server process), saved as each question is sent and whenever an answer ends.
        saved = gr.BrowserState([], storage_key="phi3v-chat")  # kept per tab: page_script
        # The Parameters this browser set, kept the same way (as each one is set).
        saved_parameters = gr.BrowserState({}, storage_key="phi3v-parameters")
        timer = gr.Timer(1.0, active=start.phase not in ("ready", "failed"))
        examples_timer = gr.Timer(1.0, active=False)  # on at page load while they are timed
        with gr.Group(visible=False):  # the /chat endpoint's inputs and output
            # A value makes the parameter optional in the API (view_api(), the clients):
            # a one-off text question needs neither pictures nor a conversation id.
            api_text = gr.Textbox(label="text")
            api_images = gr.File(label="images", file_count="multiple", value=[])  # see chat()
            api_conversation = gr.Textbox(label="conversation_id", value="")
            api_answer = gr.Textbox(label="answer")
            api_trigger = gr.Button("chat")

        # --- the wiring ------------------------------------------------------------------

        private = dict(api_visibility="private", show_progress="hidden")
        control = dict(queue=False, **private)
        params = [max_new_tokens, temperature, top_p, top_k, num_crops]  # handlers.PARAMETERS
        controls = [chat_input, stop_button]
        started_answer = [chatbot, *controls, status]
        downloads = [download, download_md]

        ask = dict(fn=handlers.answer, inputs=[chatbot, *params], outputs=[chatbot, status])

        def then_answer(event):
            event.then(lambda history: history, chatbot, saved, **control)  # the question
            answered = event.then(**ask, concurrency_limit=None, **private)
            settled = answered.then(handlers.settle, chatbot, [*controls, saved], **control)
            settled.then(handlers.export, chatbot, downloads, **control)

        then_answer(
            chat_input.submit(handlers.send, [chatbot, chat_input], started_answer, **control)
        )
        then_answer(chatbot.retry(handlers.retry, [chatbot], started_answer, **control))
        then_answer(chatbot.edit(handlers.edit, [chatbot, saved], started_answer, **control))
        then_answer(
            chatbot.example_select(handlers.run_example, [chatbot], started_answer, **control)
        )
        chatbot.undo(handlers.undo, [chatbot], started_answer, **control).then(
            lambda history: history, chatbot, saved, **control
        ).then(handlers.export, chatbot, downloads, **control)
        chatbot.clear(handlers.clear, None, started_answer, **control).then(
            lambda: [], None, saved, **control
        ).then(handlers.export, chatbot, downloads, **control)
        upload.upload(handlers.load, upload, [chatbot, status], **control).then(
            lambda history: history, chatbot, saved, **control
        ).then(handlers.export, chatbot, downloads, **control)
        stop_button.click(handlers.stop, None, stop_button, **control)
        chat_input.change(
            handlers.check_upload,
            [chat_input, status],
            [chat_input, status],
            trigger_mode="always_last",  # typing sends changes too: only the latest is checked
            **control,
        )

        watched = [panel, chat_input, num_crops, timer, load_again]
        timer.tick(handlers.refresh, saved_parameters, watched, **control)
        demo.load(handlers.refresh, saved_parameters, watched, **control)
        timed = [example_times, examples_timer]
        examples_timer.tick(handlers.example_times, None, timed, **control)
        demo.load(handlers.example_times, None, timed, **control)
        demo.load(handlers.restore, [saved, chatbot], [chatbot, chat_input, status], **control)
        demo.load(handlers.restore_parameters, saved_parameters, params, **control)
        for slider in params:
            slider.input(handlers.save_parameters, params, saved_parameters, **control)
        load_again.click(handlers.restart_loading, None, [panel, timer, load_again], **control)

        api_trigger.click(
            api.chat,
            [api_text, api_images, *params, api_conversation],
            api_answer,
            api_name="chat",
            concurrency_limit=None,  # calls wait for the model in ModelTurns, not here
        )
    demo.queue(default_concurrency_limit=None)
    quiet_malformed_requests(demo)
    return demo
