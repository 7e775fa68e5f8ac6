"""Random-weight Phi-3-vision ONNX model sets with the real release's interface.

One builder for the tests (``TINY``, fp32 weights, tens of MB, built in well under a second) and
the benchmarks (``REAL``, the real dimensions with int4 ``MatMulNBits`` weights, ~3 GB)::

    from phi3v.testing import REAL, TINY, build_model

    build_model("/tmp/tiny")                                    # TINY, float, redesigned
    build_model("/tmp/tiny-int4", weights="int4", layout="legacy")
    build_model("/tmp/scale", size=REAL)                        # int4, as the cpu-int4 release

or ``python -m phi3v.testing OUT_DIR [--size tiny|real] [--weights float|int4] ...``.

Trained proxies (SmolLM2-135M as a Phi-3-V decoder, DINOv2 ViT-S/14 with int4 MatMuls), built
from registry packages, measure what a numerics change does to a trained network: see
:mod:`phi3v.testing.proxies`.
"""

from phi3v.testing.model_builder import (
    DEFAULT_OUTLIER_GAIN,
    LAYOUTS,
    MODEL_FILES,
    ORIGINAL_CONTEXT,
    build_model,
    outlier_channel_ids,
)
from phi3v.testing.sizes import REAL, SIZES, TINY, WEIGHT_FORMATS, ModelSize

__all__ = [
    "DEFAULT_OUTLIER_GAIN",
    "EvaluationText",
    "LAYOUTS",
    "MODEL_FILES",
    "ORIGINAL_CONTEXT",
    "Photo",
    "REAL",
    "SIZES",
    "TINY",
    "WEIGHT_FORMATS",
    "ModelSize",
    "ProxyUnavailable",
    "TrainedDecoder",
    "build_decoder_proxy",
    "build_model",
    "build_vision_proxy",
    "evaluation_texts",
    "outlier_channel_ids",
    "proxy_photos",
    "proxy_wheel",
    "smollm2_decoder",
    "vision_proxy_inputs",
]

# The proxies are imported when first asked for, so that ``python -m phi3v.testing.proxies``
# (which CI runs) does not find its module imported already by this package.
_PROXY_NAMES = {
    "EvaluationText",
    "Photo",
    "ProxyUnavailable",
    "TrainedDecoder",
    "build_decoder_proxy",
    "build_vision_proxy",
    "evaluation_texts",
    "proxy_photos",
    "proxy_wheel",
    "smollm2_decoder",
    "vision_proxy_inputs",
}


def __getattr__(name: str):
    if name in _PROXY_NAMES:
        from phi3v.testing import proxies

        return getattr(proxies, name)
    raise AttributeError(f"module 'phi3v.testing' has no attribute {name!r}")
