"""Reuse of a conversation's KV cache by its next turn: the whole reuse policy.

A chat re-sends the whole conversation each turn. Its start (the image placeholders above all:
1921 positions for one 4:3 photo) is the same as last time, so the keys and values computed then
are still right. After a generation its cache is checked in under the conversation's key; when
the next prompt of the same conversation starts with the same positions, only the rest is
prefilled. GroupQueryAttention continues from a cache exactly as from a one-shot prefill
(docs/ARCHITECTURE.md#the-kv-cache).

Two positions are "the same" when they hold the same token id, or placeholders of images with
the same pixel values (compared by :attr:`ProcessedImage.digest`). One more condition keeps reuse
exact: the decoder rotates keys with a short RoPE cache while the sequence is at most 4096 long
and with a long one beyond (an ``If`` inside the model), so a prefix computed under one regime is
only reused by a prompt under the same one.

Caches are kept per conversation, so one visitor's cache is never reused by (and its timing never
observable to) another. The one exception is made on purpose: a *shared* prefix (:meth:`share`,
the operator's precomputed examples) is read by any conversation whose prompt starts with it, as
far as the match holds at least one whole image. Such a conversation gets a copy of the positions
it reuses, never the shared buffers, so no conversation's writes reach the prefix or another
conversation. A shared prefix also keeps the logits of its last position, so a prompt that is
exactly the example needs no decoder run before its first token: those are the logits a run
without any cache computes, since the prefix was read the same way, in the same chunks. The
least recently used caches, shared or not, are released once the kept caches together exceed a
memory budget (the most recent one is always kept).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from phi3v.image import ProcessedImage
from phi3v.kv_cache import KVCache

# Phi-3's original_max_position_embeddings: the LongRoPE switch inside the decoder
# (docs/ARCHITECTURE.md#the-model-interface).
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


@dataclass(frozen=True)
class _Shared:
    """The key of a shared prefix among the kept caches: no conversation's key equals it."""

    keys: bytes


@dataclass
class _Entry:
    keys: np.ndarray  # what each cached position holds
    prompt_length: int  # of the generation that built it (its RoPE regime)
    cache: KVCache
    logits: np.ndarray | None = None  # of the last position, when it is the whole prompt's


class PrefixCache:
    """Finished generations' caches, per conversation, within ``budget_bytes`` of memory."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def checkout(
        self,
        conversation: Hashable,
        keys: np.ndarray,
        needed: int,
        capacity: int,
        new_cache: Callable[[int], KVCache],
    ) -> tuple[KVCache, int, np.ndarray | None]:
        """A cache for a prompt with ``keys`` that will hold ``needed`` positions, how many of
        its leading positions it already holds, and, when that is the whole prompt, the logits
        of its last position (else None). The cache is the conversation's kept one or a copy of
        a shared prefix, whichever holds more of the prompt, else ``new_cache(capacity)``. A
        ``conversation`` of None has no cache of its own. The cache is the caller's until
        :meth:`checkin`."""
        with self._lock:
            entry = self._entries.pop(conversation, None)
            reused = _reusable_length(entry, keys) if entry else 0
            shared, from_shared = self._longest_shared(keys)
            if from_shared > reused:
                if entry:
                    entry.cache.close()  # before allocating the copy, not after
                # a copy: a sampler may scale its logits in place
                logits = shared.logits.copy() if from_shared == len(keys) else None
                # The prefix's own room where it suffices: then the copy is copy-on-write.
                room = shared.cache.capacity if shared.cache.capacity >= needed else capacity
                return shared.cache.copy(room, from_shared), from_shared, logits
        if not reused:
            if entry:
                entry.cache.close()  # before allocating the new cache, not after
            return new_cache(capacity), 0, None
        cache = entry.cache
        cache.rewind(reused)
        if cache.capacity < needed:
            cache = cache.grown_to(max(capacity, 2 * cache.capacity))
        return cache, reused, None

    def checkin(self, conversation: Hashable, keys: np.ndarray, cache: KVCache) -> None:
        """Keep ``cache`` (holding ``keys``) for the conversation's next turn."""
        self._keep(conversation, _Entry(keys[: cache.length], len(keys), cache))

    def share(self, keys: np.ndarray, cache: KVCache, logits: np.ndarray) -> None:
        """Keep ``cache`` (holding the whole prompt ``keys``) and the ``logits`` of its last
        position as a prefix that any conversation whose prompt starts the same way reuses.
        Public by design: a request's speed shows whether it matched, so share only what
        everyone may know (the app's own examples)."""
        if cache.length != len(keys):
            raise ValueError("a shared prefix holds its whole prompt")
        cache.freeze()
        entry = _Entry(keys.copy(), len(keys), cache, logits.copy())
        self._keep(_Shared(keys.tobytes()), entry)

    def _keep(self, key: Hashable, entry: _Entry) -> None:
        released = []
        with self._lock:
            if (previous := self._entries.pop(key, None)) is not None:
                released.append(previous)
            self._entries[key] = entry
            while len(self._entries) > 1 and self._resident() > self.budget_bytes:
                released.append(self._entries.popitem(last=False)[1])
        for old in released:
            old.cache.close()

    def release(self, conversation: Hashable) -> None:
        """Release the cache kept for ``conversation``, if any."""
        with self._lock:
            entry = self._entries.pop(conversation, None)
        if entry is not None:
            entry.cache.close()

    def clear(self) -> None:
        """Release every kept cache."""
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            entry.cache.close()

    def __len__(self) -> int:
        return len(self._entries)

    def _longest_shared(self, keys: np.ndarray) -> tuple[_Entry | None, int]:
        """The shared prefix holding most of a prompt with ``keys``, and how much; marked as
        just used. Called with the lock held."""
        longest, best = 0, None
        for key, entry in self._entries.items():
            if isinstance(key, _Shared) and (length := _shared_length(entry, keys)) > longest:
                longest, best = length, key
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        return self._entries[best], longest

    def _resident(self) -> int:
        return sum(entry.cache.resident_bytes for entry in self._entries.values())


def _reusable_length(entry: _Entry, keys: np.ndarray) -> int:
    """How many leading positions of a prompt with ``keys`` the entry's cache holds."""
    if uses_long_rope(entry.prompt_length) != uses_long_rope(len(keys)):
        return 0
    # At least the last prompt position must run again: its logits give the first token.
    limit = min(len(entry.keys), len(keys) - 1)
    differs = np.flatnonzero(entry.keys[:limit] != keys[:limit])
    length = int(differs[0]) if differs.size else limit
    return _image_run_start(keys, length)


def _shared_length(entry: _Entry, keys: np.ndarray) -> int:
    """How many leading positions of a prompt a shared prefix gives: all of them when the prompt
    is the prefix's own (its kept logits give the first token), else as many as match, when they
    hold at least one whole image. (Every prompt starts with the same few template tokens; those
    are not worth a copy, and a prompt about another picture reuses nothing.)"""
    if entry.logits is not None and np.array_equal(entry.keys, keys):
        return len(keys)
    length = _reusable_length(entry, keys)
    return length if (keys[:length] < 0).any() else 0


def _image_run_start(keys: np.ndarray, length: int) -> int:
    """``length``, moved back to the start of an image run it would cut in two."""
    if length == 0 or keys[length] >= 0 or keys[length - 1] != keys[length]:
        return length
    before = np.flatnonzero(keys[:length] != keys[length])
    return int(before[-1]) + 1 if before.size else 0


def _image_code(image: ProcessedImage) -> int:
    digest = image.digest or hashlib.blake2b(image.pixel_values.tobytes()).digest()
    return -1 - int.from_bytes(digest[:7], "little")  # negative, never equal to a token id
