"""The public entry point: load a model folder, then generate or stream answers.

    pipe = Pipeline.load("data/phi-3-vision-cpu")
    for delta in pipe.stream("What is in this picture?", images=["cat.png"]):
        print(delta, end="", flush=True)

Everything that can be wrong with a request (messages, image tags, images, settings, context
length) is checked when ``stream``/``generate`` is called, before any model runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from phi3v.cache import CachedPrefix, PrefixSlot, position_keys
from phi3v.config import ModelConfig, load_config
from phi3v.errors import ImageError, PromptError
from phi3v.generate import KVDecoder, Sampling, TextDeltas, decode_tokens
from phi3v.image import ImageInput, ProcessedImage, check_num_crops, preprocess_image
from phi3v.model import Model, check_placeholders, image_order
from phi3v.prompt import (
    END,
    END_OF_TEXT,
    PromptTokenizer,
    build_input_ids,
    normalize_messages,
    tag_images,
)

DEFAULT_MAX_NEW_TOKENS = 512
# KV positions reserved beyond a request, so the next turn of the conversation fits in the same
# cache. They are address space, not memory: pages nobody writes are never made resident. (Moving
# a 2k-position cache of the real model into a bigger one costs seconds of page faults.)
FOLLOW_UP_ROOM = 1024
Prompt = str | Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Timings:
    """Where the time went, in seconds (and the decode rate in tokens per second)."""

    preprocess: float = 0.0  # images decoded and transformed, prompt tokenized
    vision: float = 0.0  # the vision model
    prefill: float = 0.0  # embedding + decoder over the whole prompt
    time_to_first_token: float = 0.0  # from the call to the first generated token
    decode_tokens_per_second: float = 0.0  # after the first token


@dataclass(frozen=True)
class Generation:
    """A finished answer."""

    text: str
    token_ids: list[int]  # generated ids, the stop token excluded
    input_ids: list[int]  # the prompt, image placeholders as -N
    stop_reason: str  # "eos" or "length"
    timings: Timings
    reused_tokens: int = 0  # prompt positions whose KV cache came from the previous generation

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Request:
    input_ids: np.ndarray  # [1, L] int64
    images: tuple[ProcessedImage, ...]
    max_new_tokens: int
    sampling: Sampling

    @property
    def max_length(self) -> int:
        return self.input_ids.shape[1] + self.max_new_tokens


class Pipeline:
    """A loaded Phi-3 Vision model set: tokenizer, config and the three onnxruntime sessions."""

    def __init__(
        self,
        config: ModelConfig,
        model: Model,
        tokenizer: PromptTokenizer,
        *,
        reuse_prefix: bool = True,
    ):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        # Reusing the last generation's cache needs a cache we can rewind: the shared buffer.
        self.reuse_prefix = reuse_prefix and config.past_present_share_buffer
        self._prefix = PrefixSlot()
        self.stop_ids = frozenset(
            (*config.eos_token_ids, tokenizer.token_id(END), tokenizer.token_id(END_OF_TEXT))
        )
        # Logit rows past the tokenizer's last id (32045..32063) have no text; never pick them.
        self.vocab_limit = min(config.vocab_size, tokenizer.tokenizer.get_vocab_size())

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        providers: Sequence[str] | None = None,
        *,
        num_threads: int | None = None,
        reuse_prefix: bool = True,
    ) -> Pipeline:
        """Load a model folder (either export layout). ``num_threads`` defaults to onnxruntime's
        choice, one per physical core. With ``reuse_prefix`` the KV cache of the last finished
        generation is kept, so a follow-up turn prefills only what is new (see
        :mod:`phi3v.cache`); :meth:`clear_cache` releases it. Raises ModelFolderError /
        ConfigError for a bad folder."""
        config = load_config(model_dir)
        tokenizer = PromptTokenizer(config.path("tokenizer.json"))
        model = Model(config, providers, num_threads)
        return cls(config, model, tokenizer, reuse_prefix=reuse_prefix)

    def clear_cache(self) -> None:
        """Release the KV cache kept from the last generation."""
        self._prefix.put(None)

    def _decoder_for(self, request: _Request, keys: np.ndarray | None) -> tuple[KVDecoder, int]:
        """A decoder for ``request`` and how many prompt positions it already holds."""
        cached = self._prefix.take() if keys is not None else None
        reused = cached.reusable_length(keys) if cached else 0
        capacity = min(request.max_length + FOLLOW_UP_ROOM, self.config.context_length)
        if cached and reused:
            decoder = cached.decoder
            decoder.rewind(reused)
            if decoder.capacity < request.max_length:
                decoder = decoder.moved_to(max(capacity, 2 * decoder.capacity))
            return decoder, reused
        if cached:
            cached.decoder.close()  # before allocating the new cache, not after
        decoder = KVDecoder(
            self.model.decoder,
            self.config.decoder,
            max_length=capacity,
            share_buffer=self.config.past_present_share_buffer,
            vocab_size=self.config.vocab_size,
        )
        return decoder, 0

    def generate(
        self, prompt: Prompt = "", images: Sequence[ImageInput] = (), **options
    ) -> Generation:
        """Answer ``prompt`` about ``images``; same arguments as :meth:`stream`."""
        with self.stream(prompt, images, **options) as stream:
            for _ in stream:
                pass
            return stream.result()

    def stream(
        self,
        prompt: Prompt = "",
        images: Sequence[ImageInput] = (),
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        input_ids: Sequence[int] | None = None,
        num_crops: int | None = None,
    ) -> Stream:
        """Start a generation; iterate the result for text deltas as they are produced.

        ``prompt`` is a user message or a list of ``{"role", "content"}`` messages; images are
        file paths, bytes or PIL images, referred to as ``<|image_N|>`` (added in order when the
        prompt has no tags). ``input_ids``, when given, replaces the tokenized prompt; its
        placeholders ``-N`` refer to ``images[N-1]``. ``num_crops`` (1..16) trades image detail for
        speed. Bad input raises a :class:`~phi3v.errors.Phi3VError` here, before any model runs.
        """
        started = time.perf_counter()
        request = self._prepare(
            prompt,
            images,
            input_ids,
            num_crops,
            max_new_tokens,
            Sampling(temperature, top_k, top_p, seed),
        )
        return Stream(self, request, started)

    def _prepare(self, prompt, images, input_ids, num_crops, max_new_tokens, sampling) -> _Request:
        if (
            not isinstance(max_new_tokens, int)
            or isinstance(max_new_tokens, bool)
            or max_new_tokens < 1
        ):
            raise PromptError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise PromptError("images must be a list (of file paths, bytes or PIL images)")
        messages = None
        if input_ids is None:  # check the tags before spending time on the images
            messages = tag_images(normalize_messages(prompt), len(images))
        crops = self.config.num_crops if num_crops is None else num_crops
        check_num_crops(crops)
        processed = tuple(
            _preprocess(image, crops, n, len(images)) for n, image in enumerate(images, 1)
        )
        counts = [image.num_image_tokens for image in processed]
        if messages is not None:
            ids = np.array([build_input_ids(self.tokenizer, messages, counts)], dtype=np.int64)
        else:
            ids = self._check_input_ids(input_ids, counts)
        room = self.config.context_length - ids.shape[1]
        if room < 1:
            raise PromptError(
                f"the prompt is {ids.shape[1]:,} tokens ({sum(counts):,} of them for images); the "
                f"model's context is {self.config.context_length:,} tokens. Use fewer images, "
                "lower num_crops or a shorter conversation"
            )
        return _Request(ids, processed, min(max_new_tokens, room), sampling)

    def _check_input_ids(self, input_ids: Sequence[int], counts: list[int]) -> np.ndarray:
        try:
            ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        except (TypeError, ValueError) as err:
            raise PromptError(f"input_ids must be a flat list of integers ({err})") from err
        if ids.size == 0:
            raise PromptError("input_ids is empty")
        if ids.max() >= self.config.vocab_size:
            raise PromptError(
                f"input_ids has id {ids.max()}, beyond the vocabulary ({self.config.vocab_size})"
            )
        check_placeholders(ids[0], counts)
        return ids


def _preprocess(image: ImageInput, num_crops: int, number: int, count: int) -> ProcessedImage:
    try:
        return preprocess_image(image, num_crops)
    except ImageError as err:
        if count == 1:
            raise
        raise ImageError(f"image {number} of {count}: {err}") from err


class Stream:
    """One generation in progress: iterate it for text deltas; read its state at any time.

    Stopping early (``close()``, leaving a ``with`` block, or dropping the stream) ends the
    generation and frees its KV cache at once.
    """

    def __init__(self, pipeline: Pipeline, request: _Request, started: float):
        self.input_ids: list[int] = request.input_ids[0].tolist()
        self.text = ""
        # The generator references only the progress record, never this object, so dropping the
        # stream drops the generator by reference counting (no cycle waiting for the GC).
        self._progress = _Progress(started)
        self._progress.times["preprocess"] = time.perf_counter() - started
        self._deltas = _generate(pipeline, request, self._progress)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        delta = next(self._deltas)
        self.text += delta
        return delta

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_deltas"):
            self.close()

    def cancel(self) -> None:
        """Ask the generation to end as soon as it can. Safe from any thread, also while another
        thread is inside ``next()``: a model call in progress (the vision model or a long prefill)
        is aborted. The stream then ends, with stop_reason "cancelled", and frees its KV cache."""
        self._progress.cancel()

    def close(self) -> None:
        """End the generation now and release its buffers."""
        self._progress.cancel()
        # ValueError: another thread is inside next(); the cancel ends the generation there.
        with contextlib.suppress(ValueError):
            self._deltas.close()

    @property
    def token_ids(self) -> list[int]:
        """Ids generated so far, the stop token excluded."""
        return self._progress.token_ids

    @property
    def stop_reason(self) -> str | None:
        """None while running; then "eos", "length", or "cancelled" if closed early."""
        return self._progress.stop_reason

    @property
    def timings(self) -> Timings:
        return self._progress.timings()

    def result(self) -> Generation:
        """The finished generation (runs it to the end if it is not)."""
        for _ in self:
            pass
        return Generation(
            self.text,
            list(self.token_ids),
            self.input_ids,
            self.stop_reason,
            self.timings,
            self.reused_tokens,
        )

    @property
    def reused_tokens(self) -> int:
        """Prompt positions whose KV cache came from the previous generation (not recomputed)."""
        return self._progress.reused_tokens


class _Progress:
    """What a running generation has done so far; written by :func:`_generate`."""

    def __init__(self, started: float):
        self.started = started
        self.times: dict[str, float] = {}
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None
        self.reused_tokens = 0
        self.cancelled = False
        self.run_options = ort.RunOptions()  # shared by every model call of this generation
        self.sampled = 0
        self.first_token_at = self.last_token_at = 0.0

    def cancel(self) -> None:
        self.cancelled = True
        self.run_options.terminate = True  # onnxruntime checks it between nodes

    def count_token(self) -> None:
        now = time.perf_counter()
        if self.sampled == 0:
            self.first_token_at = now
        self.last_token_at = now
        self.sampled += 1

    def timings(self) -> Timings:
        elapsed = self.last_token_at - self.first_token_at
        return Timings(
            preprocess=self.times.get("preprocess", 0.0),
            vision=self.times.get("vision", 0.0),
            prefill=self.times.get("prefill", 0.0),
            time_to_first_token=self.first_token_at - self.started if self.sampled else 0.0,
            decode_tokens_per_second=(self.sampled - 1) / elapsed if elapsed > 0 else 0.0,
        )


def _generate(pipe: Pipeline, request: _Request, progress: _Progress) -> Iterator[str]:
    """Vision, embedding, prefill, then decode: yields text deltas, records progress."""
    model, options = pipe.model, progress.run_options
    keys = position_keys(request.input_ids, request.images) if pipe.reuse_prefix else None
    decoder, reused = pipe._decoder_for(request, keys)
    progress.reused_tokens = reused
    new_ids = request.input_ids[:, reused:]
    finished = False
    try:
        started = time.perf_counter()
        numbers = image_order(new_ids[0])  # the images whose positions still need computing
        encoded = model.encode_images([request.images[n - 1] for n in numbers], options)
        progress.times["vision"] = time.perf_counter() - started
        started = time.perf_counter()
        embeds = model.embed(new_ids, dict(zip(numbers, encoded, strict=True)), options)
        logits = decoder.step(embeds, options)
        progress.times["prefill"] = time.perf_counter() - started

        def feed(token: int) -> np.ndarray:
            return decoder.step(model.embed_token(token, options), options)

        tokens = decode_tokens(
            feed,
            logits,
            request.max_new_tokens,
            request.sampling,
            pipe.stop_ids,
            pipe.vocab_limit,
        )
        deltas = TextDeltas(pipe.tokenizer)
        reason = "length"
        for token in tokens:
            progress.count_token()
            if progress.cancelled:
                return
            if token in pipe.stop_ids:
                reason = "eos"
                break
            progress.token_ids.append(token)
            if delta := deltas.push(token):
                yield delta
        progress.stop_reason = reason
        finished = True
        if tail := deltas.flush():
            yield tail
    except Exception:
        if not progress.cancelled:
            raise
        # else: onnxruntime aborted a run because we asked it to; end quietly
    finally:
        if finished and keys is not None:
            # What the cache holds: the prompt, then each generated token that was fed back.
            held = np.concatenate([keys, np.array(progress.token_ids, dtype=np.int64)])
            pipe._prefix.put(CachedPrefix(held[: decoder.length], len(keys), decoder))
        else:
            decoder.close()
            if progress.stop_reason is None:
                progress.stop_reason = "cancelled"
