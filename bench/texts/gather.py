"""Re-create the evaluation texts from documents on a Debian 12 machine with Python 3.11.

Each text is a permissively licensed document (see README.md), cut at a line boundary to
about TARGET_TOKENS SmolLM2 tokens. Run from the repository root:
``python bench/texts/gather.py`` (it needs the decoder proxy's tokenizer, so the registry).
"""

from __future__ import annotations

import gzip
import html
import inspect
import re
import subprocess
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer

from phi3v.testing.proxies import smollm2_decoder

HERE = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TARGET_TOKENS = 1100  # the texts are 700-1500 tokens; prompts of 640-1200 as issue 15
MIN_TOKENS, MAX_TOKENS = 700, 1500


def python_source(module: str, start: str = "", skip_lines: int = 0) -> str:
    text = (STDLIB / module).read_text(encoding="utf-8")
    if start:
        text = text[text.index(start) :]
    return "\n".join(text.splitlines()[skip_lines:])


def python_topic(name: str) -> str:
    from pydoc_data.topics import topics

    return topics[name]


def heapq_essay() -> str:
    import heapq

    return inspect.cleandoc(heapq.__about__)


def gz(path: str, start: str = "") -> str:
    text = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
    return text[text.index(start) :] if start else text


def man(page: str, start: str = "") -> str:
    rendered = subprocess.run(
        ["man", "--no-justification", "--no-hyphenation", "-P", "cat", page],
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    text = subprocess.run(["col", "-b"], input=rendered, capture_output=True, text=True).stdout
    text = text.replace("\u2010\n", "").replace("\t", "    ")
    return text[text.index(start) :] if start else text


def bzip2_manual() -> str:
    raw = Path("/usr/share/doc/bzip2/manual.html").read_text(encoding="utf-8")
    raw = raw[raw.index('<div class="titlepage"><div><div><h1 class="title">') :]
    raw = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", raw, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "", raw)).replace("\xa0", " ")
    return re.sub(r"\n{3,}", "\n\n", text)


TEXTS = {
    "tune/python-heapq-essay.txt": heapq_essay,
    "tune/python-reference-execmodel.txt": lambda: python_topic("execmodel"),
    "tune/xz-history.txt": lambda: gz("/usr/share/doc/xz-utils/history.txt.gz"),
    "tune/bzip2-manual.txt": bzip2_manual,
    "tune/python-textwrap-source.txt": lambda: python_source("textwrap.py", "class TextWrapper"),
    "tune/python-fractions-source.txt": lambda: python_source("fractions.py", "class Fraction"),
    "tune/curl-manpage.txt": lambda: man("curl", "OPTIONS"),
    "tune/expat-changelog.txt": lambda: gz("/usr/share/doc/libexpat1/changelog.gz", "Release"),
    "tune/sqlite3-manpage.txt": lambda: man("sqlite3", "DESCRIPTION"),
    "tune/python-reference-typesseq.txt": lambda: python_topic("typesseq"),
    "held_out/xz-faq.txt": lambda: gz("/usr/share/doc/xz-utils/faq.txt.gz"),
    "held_out/python-shlex-source.txt": lambda: python_source("shlex.py", "class shlex"),
    "held_out/zstd-manpage.txt": lambda: man("zstd", "DESCRIPTION"),
}


def cut(text: str, tokenizer: Tokenizer) -> str:
    """The first lines of ``text`` that hold about TARGET_TOKENS tokens."""
    lines, kept, count = text.splitlines(keepends=True), [], 0
    for line in lines:
        count += len(tokenizer.encode(line).ids)
        if count > TARGET_TOKENS and kept:
            break
        kept.append(line)
    return "".join(kept).rstrip() + "\n"


def main() -> None:
    tokenizer = Tokenizer.from_str(smollm2_decoder().tokenizer_json)
    for name, read in TEXTS.items():
        text = cut(read().expandtabs(4), tokenizer)
        tokens = len(tokenizer.encode(text).ids)
        if not MIN_TOKENS <= tokens <= MAX_TOKENS:
            raise SystemExit(f"{name}: {tokens} tokens, outside {MIN_TOKENS}-{MAX_TOKENS}")
        path = HERE / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{name}: {tokens} tokens")


if __name__ == "__main__":
    main()
