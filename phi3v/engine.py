"""The public entry point: load a model folder, then generate or stream answers.

    pipe = Pipeline.load("data/phi-3-vision-cpu")
    for delta in pipe.stream("What is in this picture?", images=["cat.png"]):
        print(delta, end="", flush=True)

Everything that can be wrong with a request (messages, image tags, images, settings, size) is
checked when ``stream``/``generate`` is called, before any model runs. One generation is
:meth:`Pipeline._run`: check out a KV cache, read the images (or take their kept features),
prefill the new prompt positions in chunks, then sample / stop? / step until done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from phi3v import machine
from phi3v.config import TOKENIZER, ModelConfig, load_config
from phi3v.errors import ImageError, LimitError, PromptError
from phi3v.feature_cache import PUBLIC, FeatureCache, request_scope
from phi3v.huge_pages import NOT_ASKED, HugePages
from phi3v.huge_pages import collapse as move_to_huge_pages
from phi3v.huge_pages import wanted as huge_pages_wanted
from phi3v.image import (
    ImageInput,
    ProcessedImage,
    check_num_crops,
    describe_image,
    preprocess_data,
    read_image,
    source_digest,
)
from phi3v.kv_cache import PREFILL_CHUNK, KVCache, bytes_per_position
from phi3v.precision import EXACT, PrecisionChoice, open_sessions
from phi3v.prefix_cache import LONG_ROPE_FROM, PrefixCache, position_keys, uses_long_rope
from phi3v.prompt import (
    END,
    END_OF_TEXT,
    build_input_ids,
    continues_reply,
    normalize_messages,
    tag_images,
)
from phi3v.results import Generation, Progress, StopReason, Timings
from phi3v.run_state import MeasuredSpeed, RunState
from phi3v.sampling import Sampling
from phi3v.sessions import Sessions, check_placeholders, image_order
from phi3v.tokenizer import PromptTokenizer, TextDeltas

DEFAULT_MAX_NEW_TOKENS = 512
# KV positions reserved beyond a request, so the next turn of the conversation fits in the same
# cache. They are address space, not memory: pages nobody writes are never made resident. (Moving
# a 2k-position cache of the real model into a bigger one costs seconds of page faults.)
FOLLOW_UP_ROOM = 1024
# A prompt part at least this long is prefilled on the integer-GEMM decoder in "fast" precision;
# shorter ones on the int4 decoder, which is faster for a handful of positions (1.07x slower at
# 4 positions, 1.2x faster at 8, 2.2x at 32 on a 2-core EPYC: bench/results/prefill_forms.md).
FAST_PREFILL_FROM = 8
# Share of the memory available at load time that a request's KV cache may take, and that kept
# conversations' caches may take together.
PROMPT_MEMORY_SHARE = 0.5
CACHE_MEMORY_SHARE = 0.25
# Ids of a continued reply that the answer's text is decoded after (TextDeltas), enough for its
# first token to keep the space before it.
CONTEXT_IDS = 4
DEFAULT_CONVERSATION = "default"  # the key of calls that name no conversation
Prompt = str | Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class _Request:
    input_ids: np.ndarray  # [1, L] int64
    images: tuple[ProcessedImage, ...]
    max_new_tokens: int
    sampling: Sampling
    conversation: Hashable | None  # whose KV cache to continue and keep; None: a one-off
    scope: Hashable | None = None  # where image features are looked up and kept (feature_cache)
    share: bool = False  # keep the KV cache as a prefix for everyone (Pipeline.warm)
    context: tuple[int, ...] = ()  # the last ids of a reply the answer continues (TextDeltas)

    @property
    def max_length(self) -> int:
        return self.input_ids.shape[1] + self.max_new_tokens


class Pipeline:
    """A loaded Phi-3 Vision model set: config, tokenizer and onnxruntime sessions."""

    def __init__(
        self,
        config: ModelConfig,
        sessions: Sessions,
        tokenizer: PromptTokenizer,
        *,
        reuse_prefix: bool = True,
        precision: PrecisionChoice = EXACT,
        max_prompt_tokens: int | None = None,
        cache_budget_bytes: int | None = None,
        feature_cache_bytes: int | None = None,
    ):
        self.config, self.sessions, self.tokenizer = config, sessions, tokenizer
        self.precision = precision.precision  # what runs: "exact" or "fast"
        self.precision_choice = precision  # and why, with the fast copies' self-check
        # Reusing a cache needs one we can rewind: the shared past/present buffer.
        self.reuse_prefix = reuse_prefix and config.past_present_share_buffer
        per_position = bytes_per_position(config.decoder)
        self.max_prompt_tokens = max_prompt_tokens or _default_prompt_limit(config, per_position)
        budget = cache_budget_bytes or int(CACHE_MEMORY_SHARE * machine.available_memory())
        self._prefix = PrefixCache(budget)
        self._features = FeatureCache(feature_cache_bytes)
        self.stop_ids = frozenset(
            (*config.eos_token_ids, tokenizer.token_id(END), tokenizer.token_id(END_OF_TEXT))
        )
        # Logit rows past the tokenizer's last id (32045..32063) have no text; never pick them.
        self.vocab_limit = min(config.vocab_size, tokenizer.vocab_size)
        self._speed = MeasuredSpeed()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        providers: Sequence[str] | None = None,
        *,
        num_threads: int | None = None,
        reuse_prefix: bool = True,
        precision: str = "auto",
        max_prompt_tokens: int | None = None,
        feature_cache_bytes: int | None = None,
        progress: Callable[[Progress], None] | None = None,
        huge_pages: bool | None = None,
    ) -> Pipeline:
        """Load a model folder (either export layout).

        ``precision``: "exact" runs the model files as they are (bit for bit what
        onnxruntime-genai computes); "fast" reads images and prompts on integer-GEMM copies of
        the vision model and decoder (made and self-checked once per folder, see
        :mod:`phi3v.precision`; much faster on CPUs with AMX or VNNI, slightly different
        numbers); "auto" picks "fast" where this CPU and its memory favour it and the self-check
        passed. ``progress`` receives :class:`Progress` while copies are made and checked.
        ``num_threads`` defaults to onnxruntime's choice, one per physical core. With
        ``reuse_prefix`` a conversation's next turn prefills only what is new (see
        :mod:`phi3v.prefix_cache`). ``max_prompt_tokens`` caps a request's prompt (default: what
        half of the memory available now holds). ``feature_cache_bytes`` bounds the images'
        vision features kept for later requests (default 256 MiB, 0 keeps none; see
        :mod:`phi3v.feature_cache`). Raises ModelFolderError / ConfigError for a bad folder,
        PrecisionError for a bad precision. With ``huge_pages`` (None: as ``PHI3V_HUGE_PAGES``
        says, off by default) the loaded weights are then moved onto 2 MB pages on Linux:
        seconds at load for a few per cent faster decoding (:mod:`phi3v.huge_pages`); the app
        does it.
        """
        config = load_config(model_dir)
        tokenizer = PromptTokenizer(config.path(TOKENIZER))
        sessions, chosen = open_sessions(
            config,
            tokenizer,
            precision,
            providers=providers,
            num_threads=num_threads,
            progress=progress,
        )
        # every session's weights are packed now: onto 2 MB pages with them (bit for bit the
        # same numbers; decode reads every weight once per token)
        if huge_pages is None:
            huge_pages = huge_pages_wanted(default=False)
        sessions.huge_pages = move_to_huge_pages() if huge_pages else HugePages(reason=NOT_ASKED)
        return cls(
            config,
            sessions,
            tokenizer,
            reuse_prefix=reuse_prefix,
            precision=chosen,
            max_prompt_tokens=max_prompt_tokens,
            feature_cache_bytes=feature_cache_bytes,
        )

    def clear_cache(self) -> None:
        """Release every kept KV cache and image feature (the warmed examples' too)."""
        self._prefix.clear()
        self._features.clear()

    def forget(self, conversation: Hashable) -> None:
        """Release the KV cache kept for ``conversation``'s next turn, if any, and the image
        features kept for it (those of a call that named no ``owner``)."""
        self._prefix.release(conversation)
        self._features.release(request_scope(None, conversation))

    def generate(
        self, prompt: Prompt = "", images: Sequence[ImageInput] = (), **options
    ) -> Generation:
        """Answer ``prompt`` about ``images``; same arguments as :meth:`stream`."""
        with self.stream(prompt, images, **options) as stream:
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
        num_crops: int | Sequence[int | None] | None = None,
        conversation: Hashable | None = None,
        remember: bool = True,
        owner: Hashable | None = None,
    ) -> Stream:
        """Start a generation; iterate the result for text deltas as they are produced.

        ``prompt`` is a user message or a list of ``{"role", "content"}`` messages; images are
        file paths, bytes or PIL images, referred to as ``<|image_N|>`` (added in order when the
        prompt has no tags). ``input_ids``, when given, replaces the tokenized prompt; its
        placeholders ``-N`` refer to ``images[N-1]``. ``num_crops`` (1..16) trades image detail for
        speed: one count for every image, or one per image (None: the model's). A KV cache is
        reused only by a later call with the same ``conversation`` (calls without one share a
        default); ``remember=False`` neither continues nor keeps one (a one-off question, such
        as an anonymous API call's). An image's vision features are kept for later calls of the
        same ``owner`` (a visitor, who may hold several conversations; without one, of the same
        conversation) and never seen by another (:mod:`phi3v.feature_cache`). Any call reuses
        what :meth:`warm` prepared. Bad input raises a :class:`~phi3v.errors.Phi3VError` here,
        before any model runs.
        """
        started = time.perf_counter()
        _check_max_new_tokens(max_new_tokens)
        if not remember:
            conversation = None
        elif conversation is None:
            conversation = DEFAULT_CONVERSATION
        request = self._prepare(
            prompt,
            images,
            input_ids,
            num_crops,
            max_new_tokens,
            Sampling(temperature, top_k, top_p, seed),
            conversation,
            request_scope(owner, conversation),
        )
        return Stream(self, request, started)

    def warm(
        self,
        prompt: Prompt = "",
        images: Sequence[ImageInput] = (),
        *,
        input_ids: Sequence[int] | None = None,
        num_crops: int | Sequence[int | None] | None = None,
    ) -> Stream:
        """Read an example's images and prompt ahead of time, for every caller.

        The images' features and the prompt's KV cache are kept in the public scope: a later
        call (any conversation, any owner) with the same images at the same crop count skips
        the vision model, and one whose prompt starts the same way, through at least a whole
        image, prefills only the rest (on a copy: nothing it writes reaches the prefix).
        Arguments as in :meth:`stream`. Public by design, and so only for what everyone may
        know (an app's own examples, never a visitor's upload): any caller's speed shows what
        was warmed.

        Returns a :class:`Stream` that produces no tokens; nothing runs until it is iterated or
        ``result()`` is called, and ``cancel()`` stops it.
        """
        started = time.perf_counter()
        request = self._prepare(prompt, images, input_ids, num_crops, 0, Sampling(), None, PUBLIC)
        return Stream(self, replace(request, share=True), started)

    # --- one request -----------------------------------------------------------------------

    def _prepare(
        self, prompt, images, input_ids, num_crops, max_new_tokens, sampling, conversation, scope
    ) -> _Request:
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise PromptError("images must be a list (of file paths, bytes or PIL images)")
        messages = None
        if input_ids is None:  # check the tags before spending time on the images
            messages = tag_images(normalize_messages(prompt), len(images))
        crops = self._crops(num_crops, len(images))
        processed = tuple(
            self._image(image, count, scope, n, len(images))
            for n, (image, count) in enumerate(zip(images, crops, strict=True), 1)
        )
        counts = [image.num_image_tokens for image in processed]
        if messages is not None:
            ids = np.array([build_input_ids(self.tokenizer, messages, counts)], dtype=np.int64)
        else:
            ids = self._check_input_ids(input_ids, counts)
        self._check_size(ids.shape[1], sum(counts))
        room = self.config.context_length - ids.shape[1]
        continued = messages is not None and continues_reply(messages) and messages[-1].content
        context = tuple(int(i) for i in ids[0, -CONTEXT_IDS:]) if continued else ()
        return _Request(
            ids,
            processed,
            min(max_new_tokens, room),
            sampling,
            conversation,
            scope,
            context=context,
        )

    def _crops(self, num_crops: int | Sequence[int | None] | None, images: int) -> list[int]:
        """Each image's crop count: ``num_crops`` for all, or its own entry (None: the model's)."""
        if not isinstance(num_crops, Sequence) or isinstance(num_crops, (str, bytes)):
            count = self.config.num_crops if num_crops is None else num_crops
            check_num_crops(count)  # also where there is no image
            return [count] * images
        if len(num_crops) != images:
            raise ImageError(
                f"num_crops must be one integer from 1 to 16 or a list of one per image "
                f"({images}), got a list of {len(num_crops)}"
            )
        counts = [self.config.num_crops if count is None else count for count in num_crops]
        for count in counts:
            check_num_crops(count)
        return counts

    def _image(
        self, image: ImageInput, num_crops: int, scope: Hashable | None, number: int, count: int
    ) -> ProcessedImage:
        """``image`` ready for the model: recognised by its bytes when ``scope`` (or the public
        scope) holds its features, so nothing is decoded, else preprocessed now."""
        try:
            data = read_image(image)
            source, what = source_digest(data, num_crops), describe_image(image)
            known = self._features.recall(
                scope, source, lambda: preprocess_data(data, num_crops, what, source).pixel_values
            )
            return known or preprocess_data(data, num_crops, what, source)
        except ImageError as err:
            if count == 1:
                raise
            raise ImageError(f"image {number} of {count}: {err}") from err

    def _check_size(self, length: int, image_tokens: int) -> None:
        context, limit = self.config.context_length, self.max_prompt_tokens
        what = f" ({image_tokens:,} of them for images)" if image_tokens else ""
        if length >= context:
            advice = "Use fewer images, lower num_crops or a shorter conversation"
            raise LimitError(
                f"the prompt is {length:,} tokens{what}; the model's context is {context:,} "
                f"tokens. {advice if image_tokens else 'Shorten the text or the conversation'}"
            )
        if length > limit:
            advice = (
                "Use fewer or smaller images, lower the image detail (num_crops), or start a "
                "new conversation"
            )
            raise LimitError(
                f"the prompt is {length:,} tokens{what}; this server takes at most {limit:,}. "
                f"{advice if image_tokens else 'Shorten the text or start a new conversation'}"
            )

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

    def _run(self, request: _Request, run: RunState) -> Iterator[str]:
        """Images -> prefill -> sample / stop? / step: yields text deltas, records ``run``."""
        options = run.run_options
        cache, keys, reused, logits = self._checkout(request)
        run.reused_tokens = reused
        finished, prompt_logits = False, logits
        try:
            if logits is None:  # else a warmed example's prompt, whole: its logits were kept
                new_ids = request.input_ids[:, reused:]
                embeds = self._read_images(new_ids, request.images, run, request.scope)
                logits = prompt_logits = self._prefill(cache, embeds, run)
            choose, deltas = request.sampling.sampler(), TextDeltas(self.tokenizer, request.context)
            reason: StopReason = "length"
            for produced in range(1, request.max_new_tokens + 1):
                token = choose(logits[: self.vocab_limit])  # ids past the tokenizer have no text
                run.count_token(produced, request.max_new_tokens)
                if run.cancelled:
                    return
                if token in self.stop_ids:
                    reason = "eos"
                    break
                run.token_ids.append(token)
                if delta := deltas.push(token):
                    yield delta
                if produced < request.max_new_tokens:
                    step = self.sessions.embed_token(token, options)
                    logits = cache.run(self.sessions.decoder, step, options)
            run.stop_reason, finished = reason, True
            if tail := deltas.flush():
                yield tail
        except Exception:
            if not run.cancelled:
                raise
            # else: onnxruntime aborted a run because we asked it to; end quietly
        finally:
            self._checkin(request, cache, keys, run, finished, prompt_logits)

    def _read_images(
        self,
        new_ids: np.ndarray,
        images: Sequence[ProcessedImage],
        run: RunState,
        scope: Hashable | None = None,
    ) -> np.ndarray:
        """Embeddings of the new prompt positions, with the features of the images they hold:
        kept ones from the feature cache (``scope``'s or public), the others from the vision
        model."""
        numbers = image_order(new_ids[0])  # the images whose positions still need computing
        run.progress = Progress("vision", 0, len(numbers))
        started = time.perf_counter()
        encoded = self._features.get_or_encode(
            scope, [images[n - 1] for n in numbers], lambda missing: self._encode(missing, run)
        )
        run.vision_seconds = time.perf_counter() - started
        features = dict(zip(numbers, encoded, strict=True))
        started = time.perf_counter()
        embeds = self.sessions.embed(new_ids, features, run.run_options)
        run.embedding_seconds = time.perf_counter() - started
        return embeds

    def _encode(self, images: list[ProcessedImage], run: RunState) -> list[np.ndarray]:
        """The vision model's features of ``images``; its speed is recorded for estimates."""
        started = time.perf_counter()
        encoded = self.sessions.encode_images(images, run.run_options)
        crops = sum(image.used_crops for image in images)
        self._speed.vision.record(crops, time.perf_counter() - started)
        return encoded

    def _prefill(self, cache: KVCache, embeds: np.ndarray, run: RunState) -> np.ndarray:
        """Run the decoder over ``embeds`` in chunks; the logits of the last position."""
        total = embeds.shape[1]
        decoder = self.sessions.decoder
        if total >= FAST_PREFILL_FROM:
            decoder = self.sessions.prefill_decoder
        started = time.perf_counter()
        cache.prefault(total, self.sessions.options.threads)
        logits = None
        for start, end in _chunks(cache.length, total):
            run.progress = Progress("prefill", start, total)
            if run.cancelled:
                raise _Cancelled
            chunk = np.ascontiguousarray(embeds[:, start:end])
            logits = cache.run(decoder, chunk, run.run_options)
        # The prompt's embedding counts in its prefill, once the decoder has read it all.
        run.prefill_seconds = run.embedding_seconds + time.perf_counter() - started
        self._speed.prefill.record(total, run.prefill_seconds)
        run.progress = Progress("decode", 0, 0)
        return logits

    def _checkout(
        self, request: _Request
    ) -> tuple[KVCache, np.ndarray | None, int, np.ndarray | None]:
        """The request's cache, its prompt's position keys, how many positions the cache
        already holds, and the last position's logits when it holds them all."""
        room = FOLLOW_UP_ROOM
        if request.share:  # a warmed example: room for a default answer too, so that its copies
            room += DEFAULT_MAX_NEW_TOKENS  # keep its layout and are copy-on-write (kv_cache.py)
        capacity = min(request.max_length + room, self.config.context_length)
        if not self.reuse_prefix:
            return self._new_cache(capacity), None, 0, None
        keys = position_keys(request.input_ids, request.images)
        cache, reused, logits = self._prefix.checkout(
            request.conversation, keys, request.max_length, capacity, self._new_cache
        )
        return cache, keys, reused, logits

    def _checkin(
        self, request, cache: KVCache, keys, run: RunState, finished: bool, prompt_logits
    ) -> None:
        if not finished:
            run.stop_reason = "cancelled"
        run.progress = Progress("done")
        # A stopped generation is kept too, as far as it got: the follow-up after Stop then
        # reads only what is new (the picture is not read again). An error keeps nothing.
        keep = keys is not None and (finished or run.cancelled)
        if keep and request.share and finished:
            self._prefix.share(keys, cache, prompt_logits)
        elif keep and not request.share and request.conversation is not None:
            # What the cache holds: the prompt, then each generated token that was fed back
            # (checkin keeps as many keys as the cache has positions: a model call that Stop
            # aborted wrote none).
            held = np.concatenate([keys, np.array(run.token_ids, dtype=np.int64)])
            self._prefix.checkin(request.conversation, held, cache)
        else:
            cache.close()  # a one-off call, an unfinished warm-up or an error keeps nothing

    def _new_cache(self, capacity: int) -> KVCache:
        config = self.config
        return KVCache(
            config.decoder, capacity, config.past_present_share_buffer, config.vocab_size
        )

    def estimate_first_token(self, request: _Request) -> float | None:
        """Seconds from the call to the first token, from this machine's measured speed."""
        unread = [im for im in request.images if not self._features.holds(request.scope, im)]
        crops = sum(image.used_crops for image in unread)
        vision = self._speed.vision.estimate(crops) if crops else 0.0
        prefill = self._speed.prefill.estimate(request.input_ids.shape[1])
        if vision is None or prefill is None:
            return None
        return vision + prefill


def _check_max_new_tokens(max_new_tokens: object) -> None:
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise PromptError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def _chunks(cached: int, total: int) -> list[tuple[int, int]]:
    """Bounds of the prefill chunks of ``total`` new positions after ``cached`` ones.

    A sequence longer than 4096 positions is rotated with the long RoPE factors throughout (the
    decoder picks them by the attention mask's length), so when the prompt crosses 4096 the first
    chunk must reach past it: a chunk ending below would rotate its keys with the short factors.
    """
    first = PREFILL_CHUNK
    if uses_long_rope(cached + total) and not uses_long_rope(cached):
        first = max(first, LONG_ROPE_FROM + 1 - cached)
    bounds = [(0, min(first, total))]
    while bounds[-1][1] < total:
        start = bounds[-1][1]
        bounds.append((start, min(start + PREFILL_CHUNK, total)))
    return bounds


class _Cancelled(Exception):
    """Ends a cancelled generation between two model calls."""


def _default_prompt_limit(config: ModelConfig, per_position: int) -> int:
    """The longest prompt whose KV cache fits in a share of the memory available now."""
    fits = int(PROMPT_MEMORY_SHARE * machine.available_memory()) // per_position
    return max(1, min(config.context_length - 1, fits))


class Stream:
    """One generation in progress: iterate it for text deltas; read its state at any time.

    Stopping early (``close()``, leaving a ``with`` block, or dropping the stream) ends the
    generation and frees its KV cache at once.
    """

    def __init__(self, pipeline: Pipeline, request: _Request, started: float):
        self.input_ids: list[int] = request.input_ids[0].tolist()
        self.text = ""
        self.estimated_first_token = pipeline.estimate_first_token(request)
        # The generator references only the run state, never this object, so dropping the
        # stream drops the generator by reference counting (no cycle waiting for the GC).
        self._run = RunState(started)
        self._deltas = pipeline._run(request, self._run)

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
        thread is inside ``next()``: a model call in progress (the vision model or a prefill
        chunk) is aborted. The stream then ends, with stop_reason "cancelled", and frees its KV
        cache."""
        self._run.cancel()

    def close(self) -> None:
        """End the generation now and release its buffers."""
        self._run.cancel()
        # ValueError: another thread is inside next(); the cancel ends the generation there.
        with contextlib.suppress(ValueError):
            self._deltas.close()

    @property
    def token_ids(self) -> list[int]:
        """Ids generated so far, the stop token excluded."""
        return self._run.token_ids

    @property
    def stop_reason(self) -> StopReason | None:
        """None while running; then "eos", "length", or "cancelled" if closed early."""
        return self._run.stop_reason

    @property
    def progress(self) -> Progress:
        """The stage the generation is in and how far it got (readable from any thread)."""
        return self._run.progress

    @property
    def timings(self) -> Timings:
        return self._run.timings()

    @property
    def reused_tokens(self) -> int:
        """Prompt positions whose KV cache came from an earlier turn (not recomputed)."""
        return self._run.reused_tokens

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
