"""The onnxruntime sessions (vision, embedding, decoder(s)) and the fusion of image features.

Fusion differs by export layout (see :mod:`phi3v.config`):

* redesigned: the embedding model scatters the images' feature rows into the positions holding
  negative ids, in sequence order;
* legacy: the embedding model is a bare Gather, so we embed the ids with placeholders clamped to
  0 and write each image's rows over the positions holding its own placeholder ``-N``.

Either way, image N's rows land on the run of ``-N`` placeholders, whatever the order of the tags.
The vision model reads one image per call in both layouts.

With ``precision="fast"`` (see :mod:`phi3v.convert`) the vision model and a second decoder for
prompt processing are the integer-GEMM copies; the int4 decoder still does the token-by-token
steps, and both decoders write the same KV cache. ``PHI3V_FUSED_ATTENTION`` chooses the copies'
attention: ``1`` (or ``fp32``) or ``bf16`` runs the prompt decoder and the vision copy in layers
with our fused attention kernel between them (:mod:`phi3v.layered`) in those numerics, where the
kernel can be built and run here; ``0`` runs them whole, with onnxruntime's GroupQueryAttention
and MultiHeadAttention; ``auto`` (the default) runs the prompt's attention on the kernel in
bf16 on CPUs with AMX tiles, and onnxruntime's attention elsewhere and in the vision copy
(:data:`AUTO_ON_AMX` says why).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from phi3v import attention, machine
from phi3v.config import ModelConfig
from phi3v.errors import ModelFolderError, PrecisionError, PromptError, first_line
from phi3v.huge_pages import HugePages
from phi3v.image import ProcessedImage
from phi3v.layered import LayeredDecoder, LayeredVision, NotLayerable, plan_path

FUSED_ATTENTION_ENV = "PHI3V_FUSED_ATTENTION"  # the fast copies' attention: our kernel or not
AUTO = "auto"
# its values: the kernel's numerics, None for onnxruntime's attention, or AUTO (by the CPU)
FUSED_ATTENTION_VALUES = {
    **dict.fromkeys(("", AUTO), AUTO),
    **dict.fromkeys(("0", "false", "no", "off"), None),
    **dict.fromkeys(("1", "true", "yes", "on", "fp32"), "fp32"),
    "bf16": "bf16",
}
# What AUTO runs on a CPU with AMX tiles (docs/PERFORMANCE.md has the measurements): the
# prompt's attention in bf16 on the tiles, which made a photo's first token a fifth sooner on a
# 2-core Xeon with decode after it no slower, and keeps the trained decoder proxy within the
# fidelity limits. The vision copy keeps onnxruntime's: bf16 there saved under a second and
# moved the trained vision proxy's error from just under its limit to just over it. Elsewhere
# both keep onnxruntime's: on a 2-core EPYC the processes that ran the kernel decoded slowly
# more often.
AUTO_ON_AMX = {"prompt": "bf16", "vision": None}
WHY_NOT = {  # why AUTO leaves a part to onnxruntime, for a status line
    "prompt": "by default the fused kernel runs on CPUs with AMX only",
    "vision": "by default the vision copy keeps it (bf16 attention moved the trained vision "
    "proxy's error past its limit)",
}
GQA = "GroupQueryAttention (onnxruntime)"
MHA = "MultiHeadAttention (onnxruntime)"


@dataclass(frozen=True)
class SessionSettings:
    """What every session of a pipeline is created with."""

    # None = onnxruntime's choice: one thread per physical core. (onnxruntime-genai uses half
    # the hardware threads, which halves speed where there is no SMT.)
    num_threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @property
    def threads(self) -> int:
        """How many threads each session runs on: ``num_threads``, else one per physical core
        (onnxruntime's choice), for work beside the sessions that should use as many."""
        return self.num_threads or machine.physical_cores()


class Sessions:
    """Runs the vision and embedding models and holds the decoder sessions.

    ``decoder`` runs the token-by-token steps; ``prefill_decoder`` processes prompts (the same
    session unless a fast copy is given). ``vision_path`` / ``prefill_path`` replace the model
    folder's vision model / add a prompt decoder (the integer-GEMM copies of :mod:`phi3v.convert`),
    run in layers with the fused attention kernel where it can (``fused_attention``: False for
    onnxruntime's attention, True or ``"fp32"`` for the kernel in fp32, ``"bf16"`` in bf16,
    ``"auto"`` by the CPU; None = as ``PHI3V_FUSED_ATTENTION`` says, auto by default): causal
    over the KV cache in the prompt decoder, without a mask in the vision copy.
    ``prefill_attention`` and ``vision_attention`` say what computes each attention, and why,
    for a status line.
    """

    def __init__(
        self,
        config: ModelConfig,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
        *,
        vision_path: Path | None = None,
        prefill_path: Path | None = None,
        fused_attention: bool | str | None = None,
    ):
        self.config = config
        self.options = SessionSettings(num_threads, tuple(providers or ["CPUExecutionProvider"]))
        self.vision: ort.InferenceSession | LayeredVision
        if vision_path:
            self.vision, self.vision_attention = _open_copy(
                vision_path, self.options, fused_attention, "vision"
            )
        else:
            self.vision = open_session(config.path(config.vision.filename), self.options)
            self.vision_attention = MHA
        self.embedding = open_session(config.path(config.embedding.filename), self.options)
        self.decoder = open_session(config.path(config.decoder.filename), self.options)
        self.prefill_decoder: ort.InferenceSession | LayeredDecoder = self.decoder
        self.prefill_attention = GQA
        # what Pipeline.load did with the weights' pages, once every session is open
        self.huge_pages = HugePages(reason="not asked (Pipeline.load moves them)")
        if prefill_path:
            self.prefill_decoder, self.prefill_attention = _open_copy(
                prefill_path, self.options, fused_attention, "prompt"
            )
        _check_io(config, self)

    def encode_images(
        self, images: Sequence[ProcessedImage], run_options: ort.RunOptions | None = None
    ) -> list[np.ndarray]:
        """Vision features of each image, [num_image_tokens, hidden] apiece, in the given order.

        One image per call, also where the model would take several (the redesigned layout):
        an image's features then depend on its own pixels only, never on the images beside it,
        so features kept from any earlier run are exact (:mod:`phi3v.feature_cache`). Batching
        saves nothing here: every crop goes through CLIP on its own either way.
        """
        return [self._run_vision(image, run_options) for image in images]

    def embed(
        self,
        input_ids: np.ndarray,
        features: Mapping[int, np.ndarray],
        run_options: ort.RunOptions | None = None,
    ) -> np.ndarray:
        """Embeddings [1, L, hidden] of ``input_ids`` [1, L] with image features fused in:
        ``features[N]`` replaces the run of placeholder ids ``-N`` (as checked by
        :func:`check_placeholders`); ids may be any part of a prompt, so ``features`` needs only
        the images whose placeholders are in it."""
        order = image_order(input_ids[0])
        if self.config.layout == "redesigned":
            # The embedding model scatters rows into the negative positions in sequence order.
            rows = np.concatenate([features[n] for n in order]) if order else self._no_features()
            return self._run_embedding(input_ids, rows, run_options)
        embeds = self._run_embedding(np.maximum(input_ids, 0), None, run_options)  # a bare Gather
        for number in order:
            embeds[0, input_ids[0] == -number] = features[number]
        return embeds

    def embed_token(self, token_id: int, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Embedding [1, 1, hidden] of one generated token."""
        return self._run_embedding(np.array([[token_id]], dtype=np.int64), None, run_options)

    def _run_vision(self, image: ProcessedImage, run_options: ort.RunOptions | None) -> np.ndarray:
        vision = self.config.vision
        # Only the crops the HD grid uses: every crop goes through CLIP on its own and the
        # model drops the zero padding crops by ``image_sizes``, so skipping them is exact
        # (13 of 17 crops for a 4:3 photo at 16 crops).
        feeds = {
            vision.pixel_values: image.pixel_values[None, : image.used_crops],
            vision.image_sizes: np.array([image.image_size], dtype=np.int64),
        }
        (features,) = self.vision.run([vision.features], feeds, run_options)
        features = features.reshape(-1, features.shape[-1])  # legacy: [1, N, hidden]
        if features.shape[0] != image.num_image_tokens:
            raise ModelFolderError(
                f"the vision model returned {features.shape[0]} feature rows for an image that "
                f"needs {image.num_image_tokens}; {vision.filename} does not follow the Phi-3-V "
                "token formula"
            )
        return features

    def _run_embedding(
        self,
        input_ids: np.ndarray,
        features: np.ndarray | None,
        run_options: ort.RunOptions | None,
    ) -> np.ndarray:
        embedding = self.config.embedding
        feeds = {embedding.input_ids: input_ids}
        if embedding.image_features is not None:
            feeds[embedding.image_features] = (
                features if features is not None else self._no_features()
            )
        (embeds,) = self.embedding.run([embedding.inputs_embeds], feeds, run_options)
        return embeds

    def _no_features(self) -> np.ndarray:
        return np.zeros((0, self.config.decoder.hidden_size), dtype=np.float32)


def check_placeholders(ids: np.ndarray, image_token_counts: Sequence[int]) -> None:
    """Each image N must own exactly one run of ``image_token_counts[N-1]`` ids equal to ``-N``."""
    negative = ids[ids < 0]
    if negative.size and -negative.min() > len(image_token_counts):
        raise PromptError(
            f"input_ids has placeholder {negative.min()} but only {len(image_token_counts)} "
            "image(s) were given; placeholder -N refers to images[N-1]"
        )
    for number, expected in enumerate(image_token_counts, start=1):
        positions = np.flatnonzero(ids == -number)
        if positions.size != expected:
            raise PromptError(
                f"image {number} needs {expected} placeholder ids (-{number}) in input_ids, "
                f"found {positions.size}"
            )
        if positions.size and positions[-1] - positions[0] + 1 != positions.size:
            raise PromptError(f"the placeholders of image {number} must be contiguous in input_ids")


def image_order(ids: np.ndarray) -> list[int]:
    """Image numbers in the order their placeholders first appear in ``ids``."""
    negative = ids[ids < 0]
    _, first = np.unique(negative, return_index=True)
    return [int(-negative[i]) for i in sorted(first)]


def open_session(
    path: Path,
    settings: SessionSettings,
    *,
    fp32_activations: bool = False,
    spinning: bool = True,
    shared_arena: bool = False,
) -> ort.InferenceSession:
    """An onnxruntime session of the model file at ``path``. ``fp32_activations`` runs int4
    ``MatMulNBits`` with float activations whatever its accuracy level (the fast precision's
    self-check uses it as the reference, see :mod:`phi3v.fast_check`)."""
    options = ort.SessionOptions()
    if settings.num_threads is not None:
        options.intra_op_num_threads = settings.num_threads
    if fp32_activations:
        options.add_session_config_entry("mlas.qnbit.force_fp32", "1")
    if not spinning:  # idle threads sleep: another thread pool runs between the runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_arena:  # the environment's arena (registered by the caller), not one per session
        options.add_session_config_entry("session.use_env_allocators", "1")
    try:
        # From the path, so the .onnx.data beside it is found (external data is path-relative).
        return ort.InferenceSession(
            str(path), sess_options=options, providers=list(settings.providers)
        )
    except Exception as err:  # onnxruntime raises its own exception types, not ours
        raise ModelFolderError(
            f"onnxruntime could not load {path} ({first_line(err)}); check that "
            f"{path.name}.data sits beside it and is complete, or re-download the model set"
        ) from err


def fused_attention_numerics(fused: bool | str | None, part: str = "prompt") -> str | None:
    """The fused kernel's numerics that ``fused`` asks for the ``part`` ("prompt" or "vision")
    to run in (None: onnxruntime's attention); None reads ``PHI3V_FUSED_ATTENTION``, and
    ``auto`` (its default) decides by the CPU (:data:`AUTO_ON_AMX`). Raises
    :class:`PrecisionError` for a value it does not know."""
    return _numerics(_fused_choice(fused), part)


def _fused_choice(fused: bool | str | None) -> str | None:
    """What ``fused`` (None: ``PHI3V_FUSED_ATTENTION``) asks for: ``fp32``, ``bf16``,
    :data:`AUTO`, or None for onnxruntime's attention."""
    if fused is None:
        fused = os.environ.get(FUSED_ATTENTION_ENV, "")
    if isinstance(fused, bool):
        return "fp32" if fused else None
    choice = fused.strip().lower()
    if choice not in FUSED_ATTENTION_VALUES:
        raise PrecisionError(
            f"{FUSED_ATTENTION_ENV}={fused!r} is not a choice: use auto (the default: by the "
            "CPU), 1 (or fp32) for the fused kernel, bf16 for it in bf16, or 0 for onnxruntime's "
            "attention"
        )
    return FUSED_ATTENTION_VALUES[choice]


def _numerics(choice: str | None, part: str) -> str | None:
    """The numerics a :func:`_fused_choice` runs the ``part`` in on this CPU."""
    if choice == AUTO:
        return AUTO_ON_AMX[part] if machine.has_amx_bf16() else None
    return choice


# Per part of the fast copies: the layered runner for the kernel, and what runs it otherwise.
_PARTS = {"prompt": (LayeredDecoder, GQA), "vision": (LayeredVision, MHA)}


def _open_copy(
    path: Path, settings: SessionSettings, fused: bool | str | None, part: str
) -> tuple[ort.InferenceSession | LayeredDecoder | LayeredVision, str]:
    """The ``part``'s copy at ``path`` ("prompt": the decoder's, "vision": the vision model's):
    in layers with the fused attention kernel where ``fused`` asks for it, the copy has its
    stages and the kernel runs here, else whole; and what computes its attention, and why."""
    layered, onnxruntime = _PARTS[part]
    choice = _fused_choice(fused)
    numerics = _numerics(choice, part)
    if numerics is None:
        why = WHY_NOT[part] if choice == AUTO else "the fused kernel is off (asked)"
        return open_session(path, settings), f"{onnxruntime}: {why}"
    if not plan_path(path).exists():
        return open_session(path, settings), f"{onnxruntime}: the copy has no stages for the kernel"
    try:
        kernel = attention.kernel(settings.threads, numerics)
        runner = layered(path, settings, kernel)
        return runner, runner.name
    except (attention.KernelUnavailable, NotLayerable) as error:
        return open_session(path, settings), f"{onnxruntime}: {first_line(error)}"


def _check_io(config: ModelConfig, model: Sessions) -> None:
    """Every tensor name the config uses must exist in its model file."""
    decoder = config.decoder
    decoder_io = (
        [decoder.inputs_embeds, decoder.attention_mask, *decoder.past_names(0)],
        [decoder.logits, *decoder.present_names(0)],
    )
    expected = {
        (config.vision.filename, model.vision): (
            [config.vision.pixel_values, config.vision.image_sizes],
            [config.vision.features],
        ),
        (config.embedding.filename, model.embedding): (
            [config.embedding.input_ids]
            + ([config.embedding.image_features] if config.embedding.image_features else []),
            [config.embedding.inputs_embeds],
        ),
        (decoder.filename, model.decoder): decoder_io,
    }
    prompt_copy = f"the prompt copy of {decoder.filename}"
    if isinstance(model.prefill_decoder, LayeredDecoder):  # its attention reads no past inputs
        expected[prompt_copy, model.prefill_decoder] = ([decoder.inputs_embeds], [decoder.logits])
    else:
        expected[prompt_copy, model.prefill_decoder] = decoder_io
    for (filename, session), (inputs, outputs) in expected.items():
        have_in = {i.name for i in session.get_inputs()}
        have_out = {o.name for o in session.get_outputs()}
        missing = [n for n in inputs if n not in have_in] + [
            n for n in outputs if n not in have_out
        ]
        if missing:
            raise ModelFolderError(
                f"{filename} has no tensor named {', '.join(missing)} that genai_config.json "
                f"names; the config and the model files are from different exports"
            )
