"""The fast precision's self-check, on the user's own weights.

The fast copies (:mod:`phi3v.convert`) change the arithmetic of reading a picture and a prompt.
How much that changes the answers depends on the trained weights (their activation outliers),
which no test of ours can see. So when the copies are made, this module asks the model one
question about a picture drawn here (at one crop: low detail, so the check is short) and feeds it
a fixed answer, teacher-forced, along three paths:

* truth: the model's int4 weights with fp32 activations (onnxruntime's ``mlas.qnbit.force_fp32``,
  the same numbers as ``accuracy_level`` 0);
* exact: the model files as released (onnxruntime-genai's numbers: int8 activations per block of
  32 inside ``MatMulNBits``);
* fast: the integer-GEMM copies for the picture and the prompt, the int4 decoder for the answer.

At every answer position it compares the next-token distributions with truth's: top-1 agreement
and the KL divergence. The fast copies pass when they stay within a small multiple of the
deviation exact itself has (:data:`MAX_KL_RATIO`, :data:`KL_FLOOR`, :data:`MAX_TOP1_DROP`); the
result is recorded in the copies' manifest, so it runs once per copy.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from phi3v.config import ModelConfig
from phi3v.image import ProcessedImage, preprocess_image
from phi3v.kv_cache import PREFILL_CHUNK, KVCache
from phi3v.prompt import build_input_ids, normalize_messages
from phi3v.results import Progress
from phi3v.sessions import Sessions, open_session
from phi3v.tokenizer import PromptTokenizer

CHECK_CROPS = 1  # low detail: one tile plus the global view, 313 image tokens
CHECK_QUESTION = "Describe this picture in two sentences."
# Teacher-forced: every path is scored on the same continuation, position by position.
CHECK_ANSWER = (
    "The picture shows a small red house with a brown roof and a blue door, standing on green "
    "grass under a clear sky. A yellow sun shines in the top left corner, and a tall tree with "
    "a round green crown grows to the right of the house."
)
# The pass rule. On the trained proxies (docs/PERFORMANCE.md) the default numerics stay within
# 1.5x exact's KL; one question of ~50 answer positions is a small sample, so the bound is wider,
# with a floor for models where exact itself is almost lossless. A damaged copy (a wrong weight
# scale, a lost outlier) is orders of magnitude beyond it.
MAX_KL_RATIO = 3.0
KL_FLOOR = 0.02  # nats
MAX_TOP1_DROP = 0.10  # share of positions


@dataclass(frozen=True)
class Agreement:
    """How one path's next-token distributions compare with truth's over the answer positions."""

    top1: float  # share of positions where the path's likeliest token is truth's
    mean_kl: float  # mean KL(truth || path), nats
    first_kl: float  # KL at the first answer position (the prompt's last logits)


@dataclass(frozen=True)
class FastCheck:
    """The self-check's result, as recorded in the copies' manifest."""

    passed: bool
    fast: Agreement
    exact: Agreement
    positions: int
    seconds: float

    def summary(self) -> str:
        """One line for a status bar or a log, e.g.
        ``fast: 98.0 % top-1 agreement with fp32, KL 0.0031 (exact: 98.0 %, 0.0025): passed``."""
        verdict = "passed" if self.passed else "failed"
        return (
            f"fast: {self.fast.top1:.1%} top-1 agreement with fp32, KL {self.fast.mean_kl:.4f} "
            f"(exact: {self.exact.top1:.1%}, {self.exact.mean_kl:.4f}): {verdict}"
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> FastCheck:
        return cls(
            passed=bool(data["passed"]),
            fast=Agreement(**data["fast"]),
            exact=Agreement(**data["exact"]),
            positions=int(data["positions"]),
            seconds=float(data["seconds"]),
        )


def passes(fast: Agreement, exact: Agreement) -> bool:
    """The pass rule: fast's KL within ``MAX_KL_RATIO`` x exact's (or ``KL_FLOOR``), and its
    top-1 agreement at most ``MAX_TOP1_DROP`` below exact's."""
    kl_ok = fast.mean_kl <= max(MAX_KL_RATIO * exact.mean_kl, KL_FLOOR)
    return kl_ok and fast.top1 >= exact.top1 - MAX_TOP1_DROP


def run_check(
    sessions: Sessions,
    tokenizer: PromptTokenizer,
    progress: Callable[[Progress], None] | None = None,
) -> FastCheck:
    """Check the fast ``sessions`` (its vision model and prefill decoder the copies) against the
    model's own files and against fp32 activations; see the module docstring."""
    report = progress or (lambda _: None)
    started = time.perf_counter()
    config = sessions.config
    image = preprocess_image(check_picture(), num_crops=CHECK_CROPS)
    messages = normalize_messages(f"<|image_1|>\n{CHECK_QUESTION}")
    prompt = np.array([build_input_ids(tokenizer, messages, [image.num_image_tokens])], np.int64)
    answer = np.array([tokenizer.encode_text(CHECK_ANSWER)], np.int64)
    vocab = min(config.vocab_size, tokenizer.vocab_size)
    logits = {}
    for number, path in enumerate(("truth", "exact", "fast")):
        report(Progress("checking the fast copies", number, 3))
        paired = path_sessions(sessions, path)
        logits[path] = teacher_forced_logits(paired, prompt, answer, [image])[:, :vocab]
    report(Progress("checking the fast copies", 3, 3))
    fast, exact = (agreement(logits["truth"], logits[p]) for p in ("fast", "exact"))
    return FastCheck(
        passed=passes(fast, exact),
        fast=fast,
        exact=exact,
        positions=answer.shape[1],
        seconds=round(time.perf_counter() - started, 2),
    )


def agreement(truth: np.ndarray, path: np.ndarray) -> Agreement:
    """Compare next-token logits [positions, vocab] of a path with truth's."""
    kl = kl_divergence(truth, path)
    top1 = float(np.mean(truth.argmax(axis=-1) == path.argmax(axis=-1)))
    return Agreement(top1=top1, mean_kl=float(kl.mean()), first_kl=float(kl[0]))


def kl_divergence(truth: np.ndarray, path: np.ndarray) -> np.ndarray:
    """KL(softmax(truth) || softmax(path)) per row of two [positions, vocab] logit arrays."""
    log_p = _log_softmax(truth.astype(np.float64))
    log_q = _log_softmax(path.astype(np.float64))
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def check_picture() -> Image.Image:
    """The check's picture, drawn here (so the package carries no image file): what
    :data:`CHECK_ANSWER` describes."""
    picture = Image.new("RGB", (448, 336), (135, 190, 235))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 250, 448, 336), fill=(70, 150, 60))
    draw.ellipse((24, 20, 104, 100), fill=(250, 215, 40))
    draw.rectangle((120, 170, 260, 270), fill=(200, 40, 40))
    draw.polygon([(105, 175), (190, 110), (275, 175)], fill=(110, 70, 40))
    draw.rectangle((175, 210, 205, 270), fill=(40, 70, 180))
    draw.rectangle((330, 170, 350, 270), fill=(100, 65, 35))
    draw.ellipse((295, 100, 385, 190), fill=(40, 120, 40))
    return picture


def path_sessions(sessions: Sessions, path: str) -> Sessions:
    """``sessions`` with the vision model and decoders of ``path``: the copies are already in
    ``sessions`` (fast); exact reads the model's own vision file; truth runs the model's own
    files with fp32 activations."""
    if path == "fast":
        return sessions
    config, paired = sessions.config, copy.copy(sessions)
    fp32 = path == "truth"
    vision_file = config.path(config.vision.filename)
    paired.vision = open_session(vision_file, sessions.options, fp32_activations=fp32)
    if fp32:
        decoder_file = config.path(config.decoder.filename)
        paired.decoder = open_session(decoder_file, sessions.options, fp32_activations=True)
    paired.prefill_decoder = paired.decoder
    return paired


def teacher_forced_logits(
    sessions: Sessions,
    prompt: np.ndarray,
    answer: np.ndarray,
    images: Sequence[ProcessedImage] = (),
) -> np.ndarray:
    """Next-token logits [answer length, vocab] of ``answer`` [1, A] after ``prompt`` [1, P]:
    the prompt read as the engine reads it (the prefill decoder, chunk by chunk), then each
    answer token but the last fed to the step decoder (all of them in one call)."""
    config: ModelConfig = sessions.config
    features = dict(enumerate(sessions.encode_images(images), start=1))
    embeds = sessions.embed(prompt, features)
    cache = KVCache(config.decoder, prompt.shape[1] + answer.shape[1], True, config.vocab_size)
    try:
        for start in range(0, prompt.shape[1], PREFILL_CHUNK):
            chunk = np.ascontiguousarray(embeds[:, start : start + PREFILL_CHUNK])
            first = cache.run(sessions.prefill_decoder, chunk)
        first = first.copy()
        cache.run(sessions.decoder, sessions.embed(answer[:, :-1], {}))
        return np.concatenate([first[None], cache.last_logits()])
    finally:
        cache.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
