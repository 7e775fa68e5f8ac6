"""Phi-3 Vision chat in the browser, on the CPU: the entry point (and a Hugging Face Space's).

    python app.py --help

The app itself is the ``phi3v_app`` package: history conversion (``history``), what the page
says (``view``), getting the model ready (``loading``), the answer runner (``answers``), the
page (``page``) and this command line (``cli``).
"""

import sys

from phi3v_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
