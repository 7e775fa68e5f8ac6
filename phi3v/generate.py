"""Token-by-token generation: prefill, decode steps with the KV cache, sampling, text deltas.

The KV cache never leaves onnxruntime: past and present tensors are OrtValues bound through
IOBinding. With ``past_present_share_buffer`` (the released configs' setting) each layer's key and
value live in one buffer [1, kv_heads, max_length, head_size] bound as both the past input and the
present output, and GroupQueryAttention writes the new position in place; otherwise each step's
``present.*`` outputs are bound as the next step's ``past_key_values.*`` inputs. ``max_length``
is the prompt plus the new tokens of this request, never the whole context.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.random  # noqa: F401 - imported here, not at the first token (~40 ms)
import onnxruntime as ort

from phi3v.config import DecoderConfig
from phi3v.errors import PromptError
from phi3v.prompt import PromptTokenizer

REPLACEMENT_CHAR = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise PromptError(
                f"temperature must be a number from 0 to 100, got {self.temperature!r}"
            )
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise PromptError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and (
            not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1
        ):
            raise PromptError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise PromptError(f"seed must be a non-negative integer or None, got {self.seed!r}")


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick a token id from one row of logits: argmax, or temperature / top-k / top-p sampling."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.size:
        kth = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled[scaled < kth] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


def lazy_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array whose pages take memory only once written, so a cache can reserve room.

    Not ``np.empty``: numpy asks the kernel for transparent huge pages on large arrays, and a
    2 MB page is resident as soon as one byte of it is written. Each head's block of a Phi-3-V
    cache is only ~1.2 MB at 3k positions, so with huge pages the unwritten room would be
    resident too (+0.7 GB measured for 1024 reserved positions). Anonymous mmap memory with huge
    pages declined is what onnxruntime's own allocations get.
    """
    count = math.prod(shape)
    memory = mmap.mmap(-1, max(count * 4, 1))  # anonymous, zero pages until written
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=np.float32, count=count).reshape(shape)


class KVDecoder:
    """One generation's decoder state: the KV cache, the attention mask and the IOBinding."""

    def __init__(
        self,
        session: ort.InferenceSession,
        config: DecoderConfig,
        max_length: int,
        share_buffer: bool,
        vocab_size: int,
    ):
        self.session, self.config, self.share_buffer = session, config, share_buffer
        self.vocab_size = vocab_size
        self.length = 0  # positions in the cache
        self.binding = session.io_binding()
        self._mask = np.ones((1, max_length), dtype=np.int64)
        self._logits: np.ndarray | None = None
        if share_buffer:
            # One numpy-backed buffer per tensor, bound as both past and present: GQA writes each
            # new position in place, and we can rewind or move the cache without onnxruntime.
            shape = (1, config.num_key_value_heads, max_length, config.head_size)
            self._buffers = [lazy_buffer(shape) for _ in self._past_names()]
            self._past = [ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
            for name, value in zip(self._present_names(), self._past, strict=True):
                self.binding.bind_ortvalue_output(name, value)
        else:
            empty = (1, config.num_key_value_heads, 0, config.head_size)
            self._buffers = []
            self._past = [
                ort.OrtValue.ortvalue_from_shape_and_type(empty, np.float32)
                for _ in self._past_names()
            ]
        for name, value in zip(self._past_names(), self._past, strict=True):
            self.binding.bind_ortvalue_input(name, value)

    @property
    def capacity(self) -> int:
        """How many positions the cache can hold."""
        return self._mask.shape[1]

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` positions; later steps overwrite the rest."""
        if not self.share_buffer or not 0 <= length <= self.length:
            raise ValueError("only a shared-buffer cache can be rewound, and only backwards")
        self.length = length

    def moved_to(self, max_length: int) -> KVDecoder:
        """A decoder with room for ``max_length`` positions, holding this one's cache.

        Closes this one."""
        bigger = KVDecoder(self.session, self.config, max_length, True, self.vocab_size)
        for old, new in zip(self._buffers, bigger._buffers, strict=True):
            new[:, :, : self.length] = old[:, :, : self.length]
        bigger.length = self.length
        self.close()
        return bigger

    def step(self, embeds: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Run the decoder on ``embeds`` [1, S, hidden] after the cached positions; return the
        logits of the last position. ``run_options.terminate`` aborts the run."""
        new = embeds.shape[1]
        if self.length + new > self._mask.shape[1]:
            raise RuntimeError("KV cache is full: the generation outgrew its max_length")
        self.length += new
        cfg, binding = self.config, self.binding
        binding.bind_ortvalue_input(cfg.inputs_embeds, ort.OrtValue.ortvalue_from_numpy(embeds))
        binding.bind_ortvalue_input(
            cfg.attention_mask, ort.OrtValue.ortvalue_from_numpy(self._mask[:, : self.length])
        )
        # Logits land straight in a numpy buffer we own: no copy of the [1, S, vocab] prefill rows.
        if self._logits is None or self._logits.shape[1] != new:
            self._logits = np.empty((1, new, self.vocab_size), np.float32)
        binding.bind_ortvalue_output(cfg.logits, ort.OrtValue.ortvalue_from_numpy(self._logits))
        if not self.share_buffer:
            for name in self._present_names():
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, run_options)
        if not self.share_buffer:
            # Outputs come back in bind order: logits first, then the presents in our order.
            self._past = binding.get_outputs()[1:]
            for name, value in zip(self._past_names(), self._past, strict=True):
                binding.bind_ortvalue_input(name, value)
        return self._logits[0, -1]

    def close(self) -> None:
        """Release the KV cache and the binding now rather than at garbage collection."""
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._past, self._buffers = [], []
        self._logits = None

    def _past_names(self) -> list[str]:
        return [
            n
            for layer in range(self.config.num_hidden_layers)
            for n in self.config.past_names(layer)
        ]

    def _present_names(self) -> list[str]:
        return [
            n
            for layer in range(self.config.num_hidden_layers)
            for n in self.config.present_names(layer)
        ]


class TextDeltas:
    """Turns generated token ids into text increments that are always whole UTF-8 characters.

    Decoding single tokens would break byte-fallback characters (an emoji is several byte tokens)
    and the leading-space rule (the decoder strips one leading space of the whole string). So we
    decode a window that starts a few tokens back and emit only what the new token added, holding
    it back while it ends in an incomplete character. The deltas add up to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: PromptTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # text up to here has been emitted

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


def decode_tokens(
    feed: Callable[[int], np.ndarray],
    first_logits: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: frozenset[int],
    vocab_limit: int,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` ids, starting from the prompt's last logits; ``feed(id)``
    runs the model on a chosen id and returns the next logits. Stops after a stop id (which is
    yielded, so the caller can tell why it ended, but never fed back)."""
    rng = np.random.default_rng(sampling.seed)
    logits = first_logits
    for produced in range(1, max_new_tokens + 1):
        token = sample(logits[:vocab_limit], sampling, rng)  # ids past the tokenizer have no text
        yield token
        if token in stop_ids or produced == max_new_tokens:
            return
        logits = feed(token)
