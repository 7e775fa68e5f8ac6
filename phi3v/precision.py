"""Which precision a pipeline runs, and its sessions: "exact", "fast", or "auto" to choose.

* "exact" runs the model files as they are: bit for bit what onnxruntime-genai computes.
* "fast" reads pictures and prompts on integer-GEMM copies (:mod:`phi3v.convert`), checked once
  against the model's own files and fp32 activations (:mod:`phi3v.fast_check`); when that check
  fails, "fast" still runs (it was asked for) with a warning.
* "auto" takes "fast" where this CPU has integer-GEMM units (:mod:`phi3v.machine`), the memory
  holds the copies, and the self-check on this model passed; "exact" otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from phi3v import convert, machine
from phi3v.config import ModelConfig
from phi3v.errors import PrecisionError
from phi3v.fast_check import FastCheck, run_check
from phi3v.results import Progress
from phi3v.sessions import Sessions
from phi3v.tokenizer import PromptTokenizer

PRECISIONS = ("auto", "exact", "fast")
CHECK_KEY = "self_check"  # the self-check's record in the copies' manifest
# The copies take about 1.6x the int4 files (int8 weights, the decoder once more for prompts);
# beyond them "auto" leaves room for the KV cache and activations of a picture's prompt.
COPY_SIZE_RATIO = 1.6
FAST_HEADROOM_BYTES = 4 << 30


@dataclass(frozen=True)
class PrecisionChoice:
    """What runs, why, and the fast copies' self-check where there is one."""

    precision: str  # "exact" or "fast"
    reason: str  # one line a user can read
    check: FastCheck | None = None


EXACT = PrecisionChoice("exact", "asked for")


def check_precision(precision: str) -> None:
    """Raise :class:`PrecisionError` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def open_sessions(
    config: ModelConfig,
    tokenizer: PromptTokenizer,
    precision: str,
    *,
    providers: Sequence[str] | None = None,
    num_threads: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    numerics: convert.FastNumerics | None = None,
) -> tuple[Sessions, PrecisionChoice]:
    """The sessions for ``precision`` and what was chosen; makes and checks the fast copies the
    first time they are needed (with ``progress``), in ``numerics`` (by default the chosen ones;
    either as this CPU must store them: :func:`phi3v.convert.numerics_for_this_cpu`)."""
    check_precision(precision)
    if precision == "exact":
        return Sessions(config, providers, num_threads), PrecisionChoice("exact", "asked for")
    unfit = _why_not_fast(config, precision)
    if unfit:
        return Sessions(config, providers, num_threads), PrecisionChoice("exact", unfit)
    fast = convert.fast_models(config, progress, numerics)
    check = recorded_check(fast)
    if check is not None and not check.passed and precision == "auto":
        reason = f"the fast copies failed their self-check ({check.summary()})"
        return Sessions(config, providers, num_threads), PrecisionChoice("exact", reason, check)
    sessions = Sessions(
        config, providers, num_threads, vision_path=fast.vision, prefill_path=fast.decoder
    )
    if check is None:
        check = run_check(sessions, tokenizer, progress)
        fast.record(CHECK_KEY, check.to_json())
    if check.passed:
        return sessions, PrecisionChoice("fast", check.summary(), check)
    if precision == "fast":
        warnings.warn(
            f"the fast copies of {config.model_dir.name} failed their self-check "
            f"({check.summary()}); running fast as asked: answers may differ from the "
            "model's; use precision='exact' where that matters",
            stacklevel=3,
        )
        return sessions, PrecisionChoice("fast", check.summary(), check)
    del sessions  # release the copies before loading the model's own files
    reason = f"the fast copies failed their self-check ({check.summary()})"
    return Sessions(config, providers, num_threads), PrecisionChoice("exact", reason, check)


def recorded_check(fast: convert.FastModels) -> FastCheck | None:
    """The self-check recorded in the copies' manifest, or None if it has not run."""
    record = fast.manifest().get(CHECK_KEY)
    try:
        return FastCheck.from_json(record) if record else None
    except (KeyError, TypeError, ValueError):  # an older or damaged record: check again
        return None


def _why_not_fast(config: ModelConfig, precision: str) -> str | None:
    """Why ``precision`` ("fast" or "auto") runs exact here, or None when fast may run."""
    sources = [config.path(config.vision.filename), config.path(config.decoder.filename)]
    if not any(convert.has_int4_layers(path) for path in sources):
        if precision == "fast":
            raise PrecisionError(
                f"{config.model_dir.name} has no int4 MatMulNBits layers to convert; "
                "use precision='exact'"
            )
        return "the model has no int4 layers to convert"
    if precision == "fast":
        return None
    if not machine.has_integer_gemm():
        return "this CPU has no AMX or VNNI integer units"
    needed = int(COPY_SIZE_RATIO * sum(_file_size(p) for p in sources)) + FAST_HEADROOM_BYTES
    if machine.available_memory() < needed:
        return f"the fast copies need {needed / 2**30:.1f} GiB of free memory"
    return None


def _file_size(path) -> int:
    data = convert.data_path(path)
    return data.stat().st_size if data.exists() else path.stat().st_size
