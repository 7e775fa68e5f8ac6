"""``python app.py``: the command line, and serving the page (and any other routes).

python app.py                          # first launch downloads the model into data/
python app.py --model-dir DIR          # a model folder you already have (either layout)
python app.py --share --auth me:secret # a public link, behind a password
python app.py --precision exact        # the model files' own arithmetic, bit for bit
python app.py --api-key KEY            # the OpenAI-compatible API (/v1) requires this key
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections.abc import Sequence

import gradio as gr

from phi3v.download import DEFAULT_MODEL, MODELS
from phi3v.precision import PRECISIONS
from phi3v_app.history import MAX_UPLOAD_BYTES
from phi3v_app.loading import DATA_DIR, ModelLoader
from phi3v_app.openai_api import API_KEY_ENV, add_openai_routes
from phi3v_app.page import EXAMPLES, EXAMPLES_DIR, QUEUE_SIZE, ChatApp, build_app
from phi3v_app.page_script import HEAD
from phi3v_app.turns import ModelTurns
from phi3v_app.view import CSS

AUTH_ENV = "PHI3V_AUTH"  # "user:password", the same as --auth
PRECISION_ENV = "PHI3V_PRECISION"  # the same as --precision


def create_app(loader: ModelLoader, queue_size: int = QUEUE_SIZE) -> ChatApp:
    """The page over ``loader``, with one :class:`ModelTurns` line of ``queue_size`` waiting
    answers (``app.turns``)."""
    return build_app(loader, ModelTurns(queue_size))


def add_routes(
    server, app: ChatApp, *, api_key: str | None = None, allow_remote_images: bool = False
) -> None:
    """The one place where more HTTP routes join the app's FastAPI ``server`` once it runs.

    Whatever is mounted here shares the page's model: ``app.loader.pipeline`` and its line,
    ``app.turns`` (every answer goes through :class:`phi3v_app.runner.Runner` over that line).
    Here: the OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``
    (:mod:`phi3v_app.openai_api`).
    """
    loader = app.loader
    add_openai_routes(
        server,
        lambda: loader.pipeline,
        app.turns,
        model_name=loader.status().name,
        api_key=api_key,
        allow_remote_images=allow_remote_images,
    )


def launch(
    app: ChatApp, *, api_key: str | None = None, allow_remote_images: bool = False, **options
):
    """``demo.launch`` with the app's look, upload limit and error display, without blocking;
    then :func:`add_routes` (the API's options go there). Returns (FastAPI app, local URL, share
    URL)."""
    server, local_url, share_url = app.demo.launch(
        max_file_size=MAX_UPLOAD_BYTES,
        theme=gr.themes.Soft(primary_hue="indigo"),
        css=CSS,
        head=HEAD,
        allowed_paths=[str(EXAMPLES_DIR)],
        show_error=True,
        prevent_thread_lock=True,
        **options,
    )
    add_routes(server, app, api_key=api_key, allow_remote_images=allow_remote_images)
    return server, local_url, share_url


EPILOG = f"""\
environment:
  GRADIO_SERVER_NAME  the address to listen on, as --host (0.0.0.0 for every interface)
  GRADIO_SERVER_PORT  the port, as --port
  {AUTH_ENV}          user:password for basic auth, as --auth
  {PRECISION_ENV}     auto, exact or fast, as --precision
  {API_KEY_ENV}       the key of the OpenAI-compatible API, as --api-key
  HF_ENDPOINT, HF_TOKEN  where the model is downloaded from (see download_models.py)

Without --model-dir the model set is downloaded into data/<NAME> on first launch (resumable,
sha256-verified); the page shows the progress and opens the chat when the model is loaded.
"""


def parse_auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD, for example --auth ada:s3cret")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Chat with Phi-3 Vision about images, in the browser, on the CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir",
        metavar="DIR",
        help="a model folder to load as it is (either export layout); nothing is downloaded",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=sorted(MODELS),
        metavar="NAME",
        help=f"the model set to download and use: {', '.join(MODELS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=os.environ.get(PRECISION_ENV) or "auto",
        help="exact: the model files' own arithmetic; fast: integer copies made once per folder "
        "(much faster picture reading on CPUs with VNNI/AMX, slightly different numbers); "
        f"auto: fast where this CPU favours it (default: ${PRECISION_ENV} or auto)",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="also serve on a temporary public *.gradio.live link (needs internet access)",
    )
    parser.add_argument(
        "--host", help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, help="port (default: $GRADIO_SERVER_PORT or the first free from 7860)"
    )
    parser.add_argument(
        "--auth",
        type=parse_auth,
        metavar="USER:PASSWORD",
        default=os.environ.get(AUTH_ENV) or None,
        help=f"require this login (default: ${AUTH_ENV}); recommended with --share",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV) or None,
        help="the OpenAI-compatible API (/v1/chat/completions) requires `Authorization: Bearer "
        f"KEY` (default: ${API_KEY_ENV}; with --auth and no key, one is made up and printed)",
    )
    parser.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let API requests give images as http(s) URLs, fetched by this server (off: "
        "images come inline as data: URLs, so nobody can make the server fetch other hosts)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(args.auth, str):  # came from the environment, unparsed
        try:
            args.auth = parse_auth(args.auth)
        except argparse.ArgumentTypeError as err:
            parser.error(f"{AUTH_ENV}: {err}")
    if args.precision not in PRECISIONS:  # came from the environment, unchecked
        parser.error(f"{PRECISION_ENV}: expected one of {', '.join(PRECISIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("phi3v").setLevel(logging.INFO)
    loader = ModelLoader(args.model_dir, args.model, DATA_DIR, args.precision).start()
    app = create_app(loader)
    # The example cards' pictures and questions are read once the model is ready, in the
    # background and never ahead of a visitor, so a click on one answers at once.
    loader.warm_examples(
        app.turns, [(t, [EXAMPLES_DIR / n for n in names]) for t, names in EXAMPLES]
    )
    if args.share and not args.auth:
        print("note: anyone with the public link can use this app; add --auth USER:PASSWORD")
    api_key = args.api_key
    if args.auth and not api_key:  # the API must not be open while the page needs a login
        api_key = secrets.token_urlsafe(24)
        print(f"* API key (made up for this run; choose one with --api-key): {api_key}", flush=True)
    _, local_url, share_url = launch(
        app,
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        quiet=True,
        api_key=api_key,
        allow_remote_images=args.allow_remote_images,
    )
    if args.share and share_url is None and not os.environ.get("SPACE_ID"):
        print(
            "error: --share could not open a public link (no internet, or Gradio's frpc tunnel "
            "binary could not be downloaded: see the message above for where to put it by "
            f"hand). Run without --share to serve only at {local_url}",
            file=sys.stderr,
        )
        app.demo.close()
        return 1
    print(f"* Running on {local_url}", flush=True)
    print(f"* OpenAI-compatible API: {local_url.rstrip('/')}/v1/chat/completions", flush=True)
    if share_url:
        print(f"* Public link: {share_url} (valid for up to a week)", flush=True)
    app.demo.block_thread()
    return 0
