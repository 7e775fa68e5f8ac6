"""The chat's history (Gradio's messages) -> what the model reads, and the limits on it.

The chat keeps Gradio 6 messages. :func:`conversation` turns them into phi3v messages with
``<|image_N|>`` tags and the list of image paths, numbered over the whole conversation. A turn
the model did not answer (an error, or a Stop before the first token) is left out with its
images, so one bad upload does not break the rest of the chat.

Everything a visitor sees about a file names it by its own upload name: Gradio keeps that name
as the last part of the cached path, so :func:`upload_name` never shows a server folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

ERROR_MARK = "⚠"  # what an error reply starts with, for the eye
STOPPED_MARK = "■"  # ... and the note of an answer stopped before its first word
# What a reply the app wrote itself is, kept in the message's metadata "id" (Gradio shows a
# message with an id and no title like any other, and sends it back): the app reads what a
# reply was from there, never from its wording.
ERROR = "phi3v-error"
STOPPED = "phi3v-stopped"
REFUSED_UPLOAD = "phi3v-refused-upload"  # a file that is not a picture; it was not kept
MAX_IMAGES_PER_MESSAGE = 8
MAX_IMAGES_PER_CONVERSATION = 16  # each image is up to ~2,000 prompt tokens at full detail
# The longest answer a request may ask for, in the chat, /chat and the OpenAI API alike: one
# caller cannot hold the model, which answers one request at a time, for much longer than others.
MAX_NEW_TOKENS = 4096
# Per uploaded file, in the chat (Gradio's max_file_size) and per image in the OpenAI API: 20 MiB,
# room for a full-resolution phone photo as PNG.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic"}
)


class HistoryError(Exception):
    """The history cannot be answered as it is; the message is for the visitor."""


def message_parts(content: object) -> tuple[str, list[str]]:
    """The text and the file paths of one Chatbot message, whatever shape Gradio gave it.

    Gradio 6 hands handlers ``[{"type": "text", "text": ...}, {"type": "file", "file":
    {"path": ...}}]``; values built in Python may also be a string or ``{"path": ...}``.
    """
    items = content if isinstance(content, list) else [content]
    texts: list[str] = []
    files: list[str] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(item.get("text") or "")
        elif isinstance(item, dict) and isinstance(item.get("file"), dict):
            files.append(item["file"]["path"])
        elif isinstance(item, dict) and "path" in item:
            files.append(item["path"])
    return "\n".join(text for text in texts if text), files


def upload_name(path: str | Path) -> str:
    """The name a visitor gave the file (Gradio caches uploads as ``<folder>/<their name>``)."""
    return Path(path).name


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _is_note(message: dict) -> bool:
    """A message with a metadata title is shown to the visitor, never given to the model."""
    return bool((message.get("metadata") or {}).get("title"))


def reply_kind(message: dict) -> str | None:
    """ERROR, STOPPED or REFUSED_UPLOAD for a reply the app wrote itself; None for an answer."""
    if message.get("role") != "assistant":
        return None
    return (message.get("metadata") or {}).get("id")


def is_unanswered_reply(message: dict) -> bool:
    """An error, or the note of an answer stopped before its first word."""
    return reply_kind(message) in (ERROR, STOPPED, REFUSED_UPLOAD)


def _turns(history: Sequence[dict]) -> list[tuple[list[dict], list[dict]]]:
    """Group the history into (user messages, assistant messages) turns, notes left out."""
    turns: list[tuple[list[dict], list[dict]]] = []
    for message in history:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if _is_note(message) or role not in ("user", "assistant"):
            continue
        if role == "user" and (not turns or turns[-1][1]):
            turns.append(([], []))
        if not turns:  # an assistant message before any user message: nothing to pair it with
            continue
        turns[-1][0 if role == "user" else 1].append(message)
    return turns


def conversation(history: Sequence[dict]) -> tuple[list[dict[str, str]], list[str]]:
    """Chatbot history -> (phi3v messages, the image paths of the whole conversation).

    Images are numbered in the order they were sent, over the whole conversation; each user
    turn starts with the tags of the images it brought (``<|image_3|>\\n<|image_4|>\\n...``).
    Unanswered turns are left out, their images too.
    """
    messages: list[dict[str, str]] = []
    images: list[str] = []
    for user, replies in _turns(history):
        if any(is_unanswered_reply(reply) for reply in replies):
            continue
        parts = [message_parts(message["content"]) for message in user]
        text = "\n".join(part_text for part_text, _ in parts if part_text)
        files = [path for _, part_files in parts for path in part_files]
        if not text and not files:
            continue
        first = len(images) + 1
        tags = "".join(f"<|image_{n}|>\n" for n in range(first, first + len(files)))
        images.extend(files)
        messages.append({"role": "user", "content": tags + typed_text(text)})
        answer = "\n".join(message_parts(reply["content"])[0] for reply in replies)
        if answer:
            messages.append({"role": "assistant", "content": answer})
    return messages, images


def check_limits(
    history: Sequence[dict], start_over: str = "Clear the chat to start a new one"
) -> None:
    """Raise :class:`HistoryError` when the last message or the conversation brings more images
    than the server takes. A picture sent again (the same upload: Gradio keeps one file per
    content) counts each time it was sent, as the model reads it each time; its features are
    computed once (:mod:`phi3v.feature_cache`). ``start_over`` says how to begin a new
    conversation where the caller is (the chat's button, the API's ``conversation_id``)."""
    turns = _turns(history)
    if not turns:
        return
    last = [path for message in turns[-1][0] for path in message_parts(message["content"])[1]]
    if len(last) > MAX_IMAGES_PER_MESSAGE:
        raise HistoryError(
            f"This message has {len(last)} images; the limit is {MAX_IMAGES_PER_MESSAGE} per "
            "message. Send them in smaller groups."
        )
    _, images = conversation(history)
    if len(images) > MAX_IMAGES_PER_CONVERSATION:
        raise HistoryError(
            f"This conversation has {len(images)} images; the limit is "
            f"{MAX_IMAGES_PER_CONVERSATION}. {start_over}."
        )


# A zero-width space after "<|" keeps a typed "<|image_N|>" from being read as an image tag:
# in the app, tags come from the uploads only (issue 9 item 7).
_TYPED_TAG = re.compile(r"<\|(?=image_\d+\|>)")


def typed_text(text: str) -> str:
    """A visitor's text with any typed ``<|image_N|>`` made plain text for the model."""
    return _TYPED_TAG.sub("<|\u200b", text)


def user_message(text: str, files: Sequence[str]) -> dict:
    """One chat message holding everything a visitor sent at once: images first, then text."""
    content: list[dict] = [{"path": path} for path in files]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def refused_upload(text: str, files: Sequence[str]) -> list[dict]:
    """The user message of a send whose files were refused: the text alone (the refusal names
    the files), or, with no text, the files' names, marked so that Retry knows it had none."""
    if text:
        return [user_message(text, [])]
    names = ", ".join(upload_name(path) for path in files)
    return [{**user_message(f"(attached: {names})", []), "metadata": {"id": REFUSED_UPLOAD}}]


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": text}


def error_message(text: str, kind: str = ERROR) -> dict:
    """The reply of a question that was not answered, saying why."""
    return {"role": "assistant", "content": f"{ERROR_MARK} {text}", "metadata": {"id": kind}}


def stopped_message() -> dict:
    text = f"{STOPPED_MARK} _Stopped before the answer began._"
    return {"role": "assistant", "content": text, "metadata": {"id": STOPPED}}


def last_question(history: Sequence[dict]) -> tuple[dict | None, dict | None]:
    """The last user message and the first reply to it (None where there is none)."""
    for index in range(len(history) - 1, -1, -1):
        if history[index].get("role") == "user":
            reply = history[index + 1] if index + 1 < len(history) else None
            return history[index], reply
    return None, None


def without_last_answer(history: Sequence[dict]) -> list[dict]:
    """The history up to the last user message (for Retry)."""
    history = list(history)
    while history and history[-1].get("role") != "user":
        history.pop()
    return history


def without_last_turn(history: Sequence[dict]) -> list[dict]:
    """The history before the last user message (for Undo)."""
    history = without_last_answer(history)
    while history and history[-1].get("role") == "user":
        history.pop()
    return history
