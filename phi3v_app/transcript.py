"""A chat as a file: the conversation in OpenAI's message format, to download and load back.

    to_openai(history)            -> [{"role": "user", "content": [image_url parts, text part]},
                                      {"role": "assistant", "content": "..."}, ...]
    from_openai(messages, folder) -> chat history, the pictures written into ``folder``

Pictures travel inline as ``data:`` URLs, so the file stands alone (and can be sent as it is to
``/v1/chat/completions``). Turns the model did not answer (an error, a stop before the first
word) are left out, as the model never saw them.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
from collections.abc import Sequence
from pathlib import Path

from phi3v_app.history import (
    MAX_IMAGES_PER_CONVERSATION,
    MAX_UPLOAD_BYTES,
    HistoryError,
    assistant_message,
    is_unanswered_reply,
    message_parts,
    user_message,
)
from phi3v_app.openai_schema import APIError, decode_data_url


def to_openai(history: Sequence[dict]) -> list[dict]:
    """The answered part of a chat history as OpenAI chat messages, pictures inline."""
    messages: list[dict] = []
    for message in history:
        role = message.get("role")
        if is_unanswered_reply(message):
            if messages and messages[-1]["role"] == "user":
                messages.pop()  # the question it did not answer goes too
            continue
        text, files = message_parts(message.get("content"))
        if role == "assistant":
            messages.append({"role": "assistant", "content": text})
        elif role == "user":
            parts = [_image_part(path) for path in files]
            parts += [{"type": "text", "text": text}] if text else []
            messages.append({"role": "user", "content": parts})
    return messages


def from_openai(messages: object, folder: Path) -> list[dict]:
    """OpenAI chat messages (as :func:`to_openai` writes them) -> chat history; the pictures are
    written into ``folder``. Raises :class:`HistoryError` saying what is wrong with the file."""
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
    media = mimetypes.guess_type(path)[0] or "image/png"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


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
