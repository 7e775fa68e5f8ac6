"""Phi-3 Vision chat in the browser, on the CPU: the entry point (and a Hugging Face Space's).

    python app.py --help

The app itself is the ``phi3v_app`` package: getting the model ready (``loading``), the answer
runner (``runner``) and the chat's side of it (``chat``), the page (``page``, ``handlers``,
``view``), the APIs (``chat_api``, ``openai_api``) and this command line (``cli``); the README's
module table lists them all.
"""

import sys

from phi3v_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
