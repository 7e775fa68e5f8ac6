"""Reuse of the previous generation's KV cache for a follow-up turn.

A chat re-sends the whole conversation each turn. Its start (the image placeholders above all:
1921 positions for one 4:3 photo, about 50 s of vision + prefill on a 2-core CPU with the real
model) is the same as last time, so the keys and values computed then are still right. We keep
the last finished generation's cache and, when a new prompt starts with the same positions,
prefill only the rest. GroupQueryAttention continues from a cache exactly as from a one-shot
prefill (model-interfaces.md §8).

Two positions are "the same" when they hold the same token id, or placeholders of images with
the same pixel values (compared by :attr:`ProcessedImage.digest`). One more condition keeps reuse
exact: the decoder rotates keys with a short RoPE cache while the sequence is at most 4096 long
and with a long one beyond (an ``If`` inside the model), so a prefix computed under one regime is
only reused by a prompt under the same one.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phi3v.generate import KVDecoder
from phi3v.image import ProcessedImage

# Phi-3's original_max_position_embeddings: the LongRoPE switch inside the decoder (spec §2).
LONG_ROPE_FROM = 4096


def position_keys(input_ids: np.ndarray, images: Sequence[ProcessedImage]) -> np.ndarray:
    """One int64 key per prompt position: the token id, or a negative code derived from the
    pixel values of the image a placeholder belongs to."""
    keys = np.array(input_ids, dtype=np.int64).reshape(-1)
    for number, image in enumerate(images, start=1):
        keys[keys == -number] = _image_code(image)
    return keys


def uses_long_rope(length: int) -> bool:
    return length > LONG_ROPE_FROM


@dataclass
class CachedPrefix:
    """A finished generation's cache: what each position holds, and the decoder holding it."""

    keys: np.ndarray
    prompt_length: int
    decoder: KVDecoder

    def reusable_length(self, keys: np.ndarray) -> int:
        """How many leading positions of a prompt with ``keys`` this cache already holds."""
        if uses_long_rope(self.prompt_length) != uses_long_rope(len(keys)):
            return 0
        # At least the last prompt position must run again: its logits give the first token.
        limit = min(len(self.keys), len(keys) - 1)
        differs = np.flatnonzero(self.keys[:limit] != keys[:limit])
        length = int(differs[0]) if differs.size else limit
        return _image_run_start(keys, length)


class PrefixSlot:
    """Holds at most one :class:`CachedPrefix`; taking it makes it exclusive to one generation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: CachedPrefix | None = None

    def take(self) -> CachedPrefix | None:
        with self._lock:
            cached, self._cached = self._cached, None
        return cached

    def put(self, cached: CachedPrefix | None) -> None:
        """Keep ``cached`` (None: keep nothing), releasing what was kept before."""
        with self._lock:
            previous, self._cached = self._cached, cached
        if previous is not None:
            previous.decoder.close()


def _image_run_start(keys: np.ndarray, length: int) -> int:
    """``length``, moved back to the start of an image run it would cut in two."""
    if length == 0 or keys[length] >= 0 or keys[length - 1] != keys[length]:
        return length
    before = np.flatnonzero(keys[:length] != keys[length])
    return int(before[-1]) + 1 if before.size else 0


def _image_code(image: ProcessedImage) -> int:
    digest = image.digest or hashlib.blake2b(image.pixel_values.tobytes()).digest()
    return -1 - int.from_bytes(digest[:7], "little")  # negative, never equal to a token id
