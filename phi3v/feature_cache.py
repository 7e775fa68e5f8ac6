"""Vision features kept per image, so the vision model reads a picture once.

The features of an image depend on its pixel values alone (:meth:`Sessions.encode_images` runs
each image in a call of its own), so features kept from one run are, bit for bit, what the vision
model would compute again: a later prompt holding the same image at the same crop count skips the
vision run and gives the same tokens.

An image is known by :func:`image_key`: the digest of the HD image its pixel values are cut from
(:attr:`ProcessedImage.digest`, 256-bit BLAKE2b salted with the crop count), with the crop count
and the HD size beside it. Pixel values are a function of exactly those, so two different images
never share an entry (short of a BLAKE2b collision).

A file or bytes seen before are known before they are decoded: each entry also remembers the
:attr:`ProcessedImage.source` it was read from (a hash of the input's bytes and crop count), and
:meth:`FeatureCache.recall` turns a later request's source back into the image, pixel values left
uncomputed. So a second conversation about the same upload, and every later turn of a
conversation that holds it, skips the decoding and the HD transform as well as the vision model.

**Privacy.** A hit skips seconds of work, which anyone can time. So entries are kept per *scope*,
and a request sees only its own scope and the public one: visitor A can never learn from a fast
answer that visitor B sent the same picture. The scope is the caller's ``owner`` key (a visitor,
an API user: one owner may hold several conversations), else the conversation, else none (a
one-off call keeps nothing). The public scope holds only what the operator put there on purpose
(:meth:`Pipeline.warm`: the app's example pictures), so a hit on it tells nothing private. We
scope rather than equalise (answer a hit only after the time a miss would take) because
equalising would throw away the saving for everyone, while scoping keeps it where it is wanted:
a visitor's own next conversation and everyone's examples. The scopes share one memory budget,
least recently used first out; an eviction tells another visitor at most that the server was
busy, never which picture.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from phi3v.image import ProcessedImage, num_image_tokens

# Ten full-detail photos of the real model (1,921 rows x 3,072 float32 = 23.6 MB each).
DEFAULT_BUDGET_BYTES = 256 * 2**20


class _Public:
    """The scope of the operator's precomputed examples; no caller-given key equals it."""

    def __repr__(self) -> str:
        return "PUBLIC"


PUBLIC = _Public()


def request_scope(owner: Hashable | None, conversation: Hashable | None) -> Hashable | None:
    """The private scope of a request: its ``owner``, else its ``conversation`` (None for a
    one-off call), else None (such a request reads the public scope only and keeps nothing)."""
    if owner is not None:
        return ("owner", owner)  # tagged: an owner and a conversation never share a scope
    return None if conversation is None else ("conversation", conversation)


def image_key(image: ProcessedImage) -> tuple[bytes, int, tuple[int, int]]:
    """What identifies an image's features: its digest, crop count and HD size."""
    digest = image.digest or hashlib.blake2b(image.pixel_values.tobytes()).digest()
    return digest, image.num_crops, image.image_size


class FeatureCache:
    """Vision features per (scope, image), least recently used out beyond ``budget_bytes``.

    Safe to use from several threads. A budget of 0 keeps nothing; None is the default.
    """

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Hashable, tuple], np.ndarray] = OrderedDict()
        self._bytes = 0
        # (scope, source digest) -> the image key of an entry read from that source
        self._sources: dict[tuple[Hashable, bytes], tuple] = {}

    def get_or_encode(
        self,
        scope: Hashable | None,
        images: Sequence[ProcessedImage],
        encode: Callable[[list[ProcessedImage]], list[np.ndarray]],
    ) -> list[np.ndarray]:
        """The features of each image: kept ones from ``scope`` or the public scope, the rest
        from ``encode(missing images)``, which are then kept under ``scope`` (unless None)."""
        found = [self._get(scope, image) for image in images]
        missing: dict[tuple, ProcessedImage] = {}  # one encoding per image, however often sent
        for image, hit in zip(images, found, strict=True):
            if hit is None:
                missing.setdefault(image_key(image), image)
        encoded = dict(zip(missing, encode(list(missing.values())) if missing else [], strict=True))
        if scope is not None:
            for key, features in encoded.items():
                self._put(scope, missing[key], features)
        return [
            encoded[image_key(image)] if hit is None else hit
            for image, hit in zip(images, found, strict=True)
        ]

    def recall(
        self, scope: Hashable | None, source: bytes, pixels: Callable[[], np.ndarray]
    ) -> ProcessedImage | None:
        """The image made from ``source`` (:func:`~phi3v.image.source_digest`) if ``scope`` or
        the public scope holds its features, else None. Its pixel values are left to
        ``pixels()``, called only if a model reads them after all (the features may be pushed
        out before the request runs)."""
        if not source:
            return None
        with self._lock:
            for where in (scope, PUBLIC):
                key = self._sources.get((where, source)) if where is not None else None
                if key is not None and (where, key) in self._entries:
                    digest, num_crops, (height, width) = key
                    return ProcessedImage(
                        pixels,
                        (height, width),
                        num_image_tokens(height, width),
                        digest,
                        num_crops=num_crops,
                        source=source,
                    )
        return None

    def holds(self, scope: Hashable | None, image: ProcessedImage) -> bool:
        """Whether a request in ``scope`` would find ``image``'s features."""
        key = image_key(image)
        with self._lock:
            return (scope, key) in self._entries or (PUBLIC, key) in self._entries

    def release(self, scope: Hashable) -> None:
        """Drop every entry of ``scope``."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == scope]:
                self._bytes -= self._entries.pop(key).nbytes
            self._forget_sources(lambda entry: entry[0] == scope)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._sources.clear()
            self._bytes = 0

    def _get(self, scope: Hashable | None, image: ProcessedImage) -> np.ndarray | None:
        key = image_key(image)
        with self._lock:
            for entry in ((scope, key), (PUBLIC, key)):
                if entry[0] is not None and entry in self._entries:
                    self._entries.move_to_end(entry)
                    return self._entries[entry]
        return None

    def _put(self, scope: Hashable, image: ProcessedImage, features: np.ndarray) -> None:
        if features.nbytes > self.budget_bytes:
            return
        kept = np.array(features)  # our own copy, read-only: no caller can change a later hit
        kept.flags.writeable = False
        with self._lock:
            entry = (scope, image_key(image))
            if (old := self._entries.pop(entry, None)) is not None:
                self._bytes -= old.nbytes
            self._entries[entry] = kept
            self._bytes += kept.nbytes
            if image.source:
                self._sources[scope, image.source] = entry[1]
            gone = set()
            while self._bytes > self.budget_bytes:
                old_entry, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                gone.add(old_entry)
            if gone:
                self._forget_sources(lambda entry: entry in gone)

    def _forget_sources(self, dropped: Callable[[tuple[Hashable, tuple]], bool]) -> None:
        """Forget the sources of the entries ``dropped`` says are gone (lock held)."""
        for key in [key for key, image in self._sources.items() if dropped((key[0], image))]:
            del self._sources[key]
