"""The model's tokenizer: prompt text to ids, generated ids to UTF-8-safe text deltas."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from phi3v.errors import ModelFolderError

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to


class PromptTokenizer:
    """The two encodings a chat prompt needs (control tokens as ids, user text as plain text)
    and the decoder."""

    def __init__(self, tokenizer_json: str | Path):
        path = Path(tokenizer_json)
        try:
            raw = path.read_text(encoding="utf-8")
            self._tokenizer = Tokenizer.from_str(raw)
            self._plain = _plain_text_tokenizer(raw)
        except (OSError, ValueError, Exception) as err:  # tokenizers raises bare Exception
            raise ModelFolderError(
                f"{path.name} is not a usable tokenizer.json ({err}); re-download the model set"
            ) from err
        added = self._tokenizer.get_added_tokens_decoder()
        self._ids = {token.content: tid for tid, token in added.items()}
        self._rstrip = {token.content for token in added.values() if token.rstrip}
        self.bos_id = self.token_id("<s>")
        self.vocab_size = self._tokenizer.get_vocab_size()  # ids with a token (32045 for Phi-3-V)

    def token_id(self, token: str) -> int:
        """The id of an added (control) token such as ``<|end|>``."""
        try:
            return self._ids[token]
        except KeyError:
            raise ModelFolderError(
                f"tokenizer.json has no {token!r} token; this is not a Phi-3 tokenizer"
            ) from None

    def strips_after(self, token: str) -> bool:
        """Whether the control token swallows the whitespace after it (``rstrip``)."""
        return token in self._rstrip

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary piece of an id, e.g. ``<0x0A>`` for a byte-fallback token."""
        return self._tokenizer.id_to_token(token_id)

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text, no BOS, every control-token spelling kept as literal text."""
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


def _plain_text_tokenizer(raw_json: str) -> Tokenizer:
    """A copy of the tokenizer in which no added token is ever matched in input text."""
    spec = json.loads(raw_json)
    for token in spec.get("added_tokens", []):
        token["special"] = True  # so encode_special_tokens also covers non-special ones like </s>
    plain = Tokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


class TextDeltas:
    """Turns generated token ids into text increments that are always whole UTF-8 characters.

    Decoding single tokens would break byte-fallback characters (an emoji is several byte tokens)
    and the leading-space rule (the decoder strips one leading space of the whole string). So we
    decode a window that starts a few tokens back and emit only what the new token added, holding
    it back while it ends in an incomplete character. The deltas add up to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: PromptTokenizer, context: Sequence[int] = ()):
        """``context``: ids the text goes on from (the end of a reply being continued), never
        emitted; with them the first token keeps its leading space."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)
        self._prefix = 0  # the window starts here
        self._read = len(self.ids)  # text up to here has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever was held back (an incomplete character at the very end)."""
        emitted = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(emitted) :]
