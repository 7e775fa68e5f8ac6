"""A chat as a file: the conversation in OpenAI's message format, to download and load back,
or as Markdown, to read.

    to_openai(history)            -> [{"role": "user", "content": [image_url parts, text part]},
                                      {"role": "assistant", "content": "..."}, ...]
    from_openai(messages, folder) -> chat history, the pictures written into ``folder``
    to_markdown(history)          -> "### You\n\n![name](data:image/png;base64,...)\n\n..."

Pictures travel inline as ``data:`` URLs, so each file stands alone (the JSON one is the
``messages`` list of a ``/v1/chat/completions`` request, to which the next question is added: a
list that ends with the assistant's message asks for that message to be continued; the Markdown
one shows its pictures in any viewer that shows ``data:`` images). Turns the model did not
answer (an error, a stop before the first word) are left out of both, as the model never saw
them.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
from collections.abc import Sequence
from pathlib import Path

from phi3v_app.history import (
    MAX_IMAGES_PER_CONVERSATION,
    MAX_UPLOAD_BYTES,
    HistoryError,
    assistant_message,
    is_unanswered_reply,
    message_parts,
    upload_name,
    user_message,
)
from phi3v_app.openai_schema import APIError, decode_data_url

# Who said it, as the Markdown file's headings say it.
SPEAKERS = {"user": "You", "assistant": "Phi-3 Vision"}


def to_openai(history: Sequence[dict]) -> list[dict]:
    """The answered part of a chat history as OpenAI chat messages, pictures inline."""
    messages: list[dict] = []
    for role, text, files in _answered(history):
        if role == "assistant":
            messages.append({"role": "assistant", "content": text})
        else:
            parts = [_image_part(path) for path in files]
            parts += [{"type": "text", "text": text}] if text else []
            messages.append({"role": "user", "content": parts})
    return messages


def to_markdown(history: Sequence[dict]) -> str:
    """The answered part of a chat history as Markdown: a heading for each speaker, then the
    pictures inline as ``data:`` URLs (named as uploaded) and the text. "" for no answered
    turn."""
    blocks: list[str] = []
    speaker = None
    for role, text, files in _answered(history):
        if role != speaker:  # a picture and its question, sent as two messages, stay together
            speaker = role
            blocks.append(f"### {SPEAKERS[role]}")
        blocks += [f"![{_alt_text(path)}]({_data_url(path)})" for path in files]
        blocks += [text] if text else []
    return "\n\n".join(blocks) + "\n" if blocks else ""


def _answered(history: Sequence[dict]) -> list[tuple[str, str, list[str]]]:
    """(role, text, picture paths) of each user and assistant message the model answered or
    wrote: an unanswered reply goes with the question it did not answer."""
    answered: list[tuple[str, str, list[str]]] = []
    for message in history:
        role = message.get("role")
        if is_unanswered_reply(message):
            while answered and answered[-1][0] == "user":
                answered.pop()
            continue
        if role in SPEAKERS:
            answered.append((role, *message_parts(message.get("content"))))
    return answered


def from_openai(messages: object, folder: Path) -> list[dict]:
    """OpenAI chat messages (as :func:`to_openai` writes them) -> chat history; the pictures are
    written into ``folder``; a whole request body (``{"messages": [...], ...}``) is read too.
    Raises :class:`HistoryError` saying what is wrong with the file."""
    if isinstance(messages, dict) and isinstance(messages.get("messages"), list):
        messages = messages["messages"]
    if not isinstance(messages, list):
        raise HistoryError("This file is not a saved chat: it must hold a list of messages.")
    history: list[dict] = []
    pictures = 0
    for number, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise HistoryError(f"Message {number} of the file is not a user or assistant message.")
        texts, files = _read_content(message.get("content"), number, folder)
        pictures += len(files)
        if pictures > MAX_IMAGES_PER_CONVERSATION:
            raise HistoryError(
                f"The saved chat has more than {MAX_IMAGES_PER_CONVERSATION} pictures, the most "
                "a conversation takes here."
            )
        text = "\n".join(texts)
        history.append(user_message(text, files) if role == "user" else assistant_message(text))
    return history


def _image_part(path: str) -> dict:
    return {"type": "image_url", "image_url": {"url": _data_url(path)}}


def _data_url(path: str) -> str:
    media = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{media};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def _alt_text(path: str) -> str:
    """The picture's upload name, its brackets and backslashes escaped for Markdown."""
    return re.sub(r"([\\\[\]])", r"\\\1", upload_name(path))


def _read_content(content: object, number: int, folder: Path) -> tuple[list[str], list[str]]:
    if isinstance(content, str):
        return [content], []
    texts: list[str] = []
    files: list[str] = []
    for part in content if isinstance(content, list) else [None]:  # None: not a message
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            files.append(_write_picture(part["image_url"].get("url") or "", number, folder))
        else:
            raise HistoryError(
                f"Message {number} of the file has a part that is not text or a picture."
            )
    return texts, files


def _write_picture(url: str, number: int, folder: Path) -> str:
    try:
        data = decode_data_url(url, f"message {number}", MAX_UPLOAD_BYTES)
    except APIError as err:
        raise HistoryError(f"A picture in the file could not be read: {err.message}.") from None
    media = url[5 : url.index(";")] if url.startswith("data:") and ";" in url else "image/png"
    suffix = mimetypes.guess_extension(media) or ".png"
    path = folder / f"picture-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    path.write_bytes(data)
    return str(path)
