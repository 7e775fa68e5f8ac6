"""From chat messages and images to ``input_ids`` with image placeholders.

The Phi-3 chat template renders each message as ``<|role|>\\n{content}<|end|>\\n`` and ends with
``<|assistant|>\\n``; a conversation that ends with an assistant message asks for that message to
be continued, so it is left open (no ``<|end|>``) and nothing follows it. Image tags
``<|image_N|>`` in user messages split the prompt into chunks; each chunk is tokenized on its own
with a leading BOS (as the Hugging Face processor does, docs/ARCHITECTURE.md#the-prompt-ids), and
each tag becomes ``num_image_tokens`` copies of ``-N``.

The template's own control tokens are inserted as ids. Text from a message is encoded with every
added token treated as plain text, so a user who types ``<|end|>`` or ``<s>`` gets those
characters, never the control token. Text between control tokens is tokenized exactly as the
reference tokenizes the whole rendered string (the normalizer runs per segment there too, and
``rstrip`` tokens such as ``<|assistant|>`` swallow the whitespace after them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from phi3v.errors import PromptError
from phi3v.tokenizer import PromptTokenizer

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
ROLES = ("system", "user", "assistant")
END = "<|end|>"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class _Special:
    token: str


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _ImageTag:
    number: int


def normalize_messages(prompt: str | Sequence[Mapping[str, str]]) -> list[Message]:
    """A user string or a list of ``{"role", "content"}`` dicts -> validated messages.

    Roles are system (first message only), user and assistant. The last message is the user's
    (to be answered) or the assistant's (to be continued, :func:`render`).
    """
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    if not isinstance(prompt, Sequence) or not prompt:
        raise PromptError(
            "prompt must be a string or a non-empty list of {'role': ..., 'content': ...} messages"
        )
    messages = []
    for index, item in enumerate(prompt):
        if not isinstance(item, Mapping) or not {"role", "content"} <= item.keys():
            raise PromptError(f"message {index} must be a dict with 'role' and 'content' keys")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise PromptError(f"message {index} has role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and index != 0:
            raise PromptError(f"message {index}: a system message may only come first")
        if not isinstance(content, str):
            raise PromptError(
                f"message {index} content must be a string (put images in `images` and refer to "
                f"them with <|image_N|> tags), got {type(content).__name__}"
            )
        messages.append(Message(role, content))
    if messages[-1].role == "system":
        raise PromptError(
            "the last message is the system's; end with a user message to answer, or an "
            "assistant message to continue"
        )
    return messages


def continues_reply(messages: Sequence[Message]) -> bool:
    """Whether the prompt asks to continue its last (assistant) message, not to answer."""
    return messages[-1].role == "assistant"


def tag_images(messages: list[Message], num_images: int) -> list[Message]:
    """Check the ``<|image_N|>`` tags against the images; add tags when there are none.

    Tags must number the images 1..n, each once. Untagged images are placed, in order, at the
    start of the last user message (as the reference examples write them).
    """
    numbers = [
        int(m) for msg in messages if msg.role == "user" for m in IMAGE_TAG.findall(msg.content)
    ]
    if not numbers:
        if num_images == 0:
            return messages
        users = [index for index, message in enumerate(messages) if message.role == "user"]
        if not users:
            raise PromptError("images go with a user message; the prompt has none")
        tags = "".join(f"<|image_{n}|>\n" for n in range(1, num_images + 1))
        last = users[-1]
        tagged = Message("user", tags + messages[last].content)
        return [*messages[:last], tagged, *messages[last + 1 :]]
    _check_tags(numbers, num_images)
    return messages


def _check_tags(numbers: list[int], num_images: int) -> None:
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise PromptError(
            f"<|image_{repeated[0]}|> appears more than once; each image can be placed only once"
        )
    if num_images == 0:
        raise PromptError(
            f"the prompt has image tags ({_tag_list(numbers)}) but no images were given"
        )
    expected = list(range(1, num_images + 1))
    if sorted(numbers) == expected:
        return
    if len(numbers) != num_images:
        raise PromptError(
            f"the prompt has {len(numbers)} image tag(s) ({_tag_list(numbers)}) but "
            f"{num_images} image(s) were given; use one tag per image, <|image_1|> to "
            f"<|image_{num_images}|>"
        )
    raise PromptError(
        f"image tags must number the images 1 to {num_images} without gaps; found "
        f"{_tag_list(numbers)}"
    )


def _tag_list(numbers: list[int]) -> str:
    return ", ".join(f"<|image_{n}|>" for n in numbers)


def render(messages: list[Message]) -> list[_Special | _Text | _ImageTag]:
    """The chat template as a flat list of control tokens, text and image tags. A last assistant
    message is left open, to be continued (vLLM's ``continue_final_message``): no ``<|end|>``
    after it and no new ``<|assistant|>``."""
    parts: list[_Special | _Text | _ImageTag] = []
    for number, message in enumerate(messages, 1):
        parts.append(_Special(f"<|{message.role}|>"))
        parts.append(_Text("\n"))
        if message.role == "user":
            parts.extend(_split_tags(message.content))
        else:
            parts.append(_Text(message.content))
        if number == len(messages) and continues_reply(messages):
            return _merge_text(parts)
        parts += [_Special(END), _Text("\n")]
    parts += [_Special("<|assistant|>"), _Text("\n")]
    return _merge_text(parts)


def _split_tags(content: str) -> list[_Text | _ImageTag]:
    pieces = IMAGE_TAG.split(content)  # text, number, text, number, ..., text
    parts: list[_Text | _ImageTag] = []
    for index, piece in enumerate(pieces):
        parts.append(_ImageTag(int(piece)) if index % 2 else _Text(piece))
    return parts


def _merge_text(parts: list) -> list:
    merged: list = []
    for part in parts:
        if isinstance(part, _Text) and merged and isinstance(merged[-1], _Text):
            merged[-1] = _Text(merged[-1].text + part.text)
        else:
            merged.append(part)
    return merged


def build_input_ids(
    tokenizer: PromptTokenizer,
    messages: list[Message],
    image_token_counts: Sequence[int],
) -> list[int]:
    """Token ids of the rendered prompt, each image tag replaced by ``-N`` placeholders.

    ``image_token_counts[N-1]`` is the number of feature rows of image N.
    """
    parts = render(tag_images(messages, len(image_token_counts)))
    ids: list[int] = []
    chunk: list[_Special | _Text] = []
    for part in parts:
        if isinstance(part, _ImageTag):
            ids += _encode_chunk(tokenizer, chunk)
            ids += [-part.number] * image_token_counts[part.number - 1]
            chunk = []
        else:
            chunk.append(part)
    ids += _encode_chunk(tokenizer, chunk)
    return ids


def _encode_chunk(tokenizer: PromptTokenizer, parts: Sequence[_Special | _Text]) -> list[int]:
    """BOS, then control tokens as ids and text segments as plain text."""
    ids = [tokenizer.bos_id]
    strip_next = False
    for part in parts:
        if isinstance(part, _Special):
            ids.append(tokenizer.token_id(part.token))
            strip_next = tokenizer.strips_after(part.token)
        else:
            text = part.text.lstrip() if strip_next else part.text
            ids.extend(tokenizer.encode_text(text))
            strip_next = False
    return ids
