"""The vision proxy's measure, one owner for ``accuracy.py``, ``vision_attribution.py`` and
``vision_speed.py``: a path's relative feature error to truth (the same int4 weights with fp32
activations), as a multiple of exact's, on the DINOv2 ViT-S/14 int4 proxy's photographs, **pooled
over draws of the rounding noise**.

Why draws. Every quantized path rounds every activation, and a change in the seventh digit of a
value (an fp32 kernel that adds in another order: another CPU, another onnxruntime, a float
simulation instead of the integer GEMM) moves some values across a rounding boundary. Each layer
rounds again what the last one changed, so the difference grows: the default fast copy and its
float simulation agree to float rounding after the first projection and, at the output, differ
by about as much as either differs from truth (``vision_attribution.py``'s last table, layer by
layer). Neither is wrong; they are two draws of the same noise, and on 11 photos one draw's
ratio to exact's error can land a fifth away from the pooled figure (the draw range in
``bench/results/accuracy*.md``), more than the numerics being chosen differ by.

So each draw moves every input value by +-2^-22 of itself (one or two units in the last place; a
fresh, seeded pattern per draw; draw 0 is the photos as they are). Truth, being smooth, moves by
about 1e-6; the quantized paths draw their roundings anew. The figure pools every photo and draw
(the sum of a path's errors over the sum of exact's), with a 95 % interval from a bootstrap over
photos (each photo with all its draws, ``paired.pooled_ratio``), and the range of the single
draws' ratios, which is how far one run can land from the pooled figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paired

from phi3v.sessions import SessionSettings, open_session
from phi3v.testing import proxies

DRAWS = 8
JITTER = 2.0**-22  # relative: one or two units in the last place of an fp32 value
SETTINGS = SessionSettings(num_threads=1)  # leaves a core to others; the draws do the rest


def add_draws_argument(parser: argparse.ArgumentParser) -> None:
    """``--draws``, for every script that measures on the vision proxy."""
    parser.add_argument(
        "--draws",
        type=int,
        default=DRAWS,
        help="draws of the rounding noise on the vision proxy (default %(default)s)",
    )


def jittered(pixels: np.ndarray, draw: int) -> np.ndarray:
    """``pixels`` with each value multiplied by 1 +- 2^-22 (a seeded sign pattern per draw);
    draw 0 returns them unchanged."""
    if draw == 0:
        return pixels
    signs = np.random.default_rng(draw).choice(np.array([-1, 1], np.float32), size=pixels.shape)
    return (pixels * (1 + signs * np.float32(JITTER))).astype(np.float32)


class VisionProxy:
    """The proxy model, its photos in ``draws`` jittered versions, truth's features for each and
    exact's errors; :meth:`errors` and :meth:`ratio` measure any other path the same way."""

    def __init__(self, folder: Path, draws: int = DRAWS, settings: SessionSettings = SETTINGS):
        if draws < 1:
            raise ValueError(f"draws must be at least 1, not {draws}")
        self.settings = settings
        self.source = proxies.build_vision_proxy(folder)
        self.photos = proxies.proxy_photos()
        pixels = proxies.vision_proxy_inputs(self.photos)
        self.inputs = [jittered(pixels, draw) for draw in range(draws)]
        self.truth = self.features(open_session(self.source, settings, fp32_activations=True))
        self.exact = self.errors(open_session(self.source, settings))
        self.weights = paired.document_weights(len(self.photos))

    @property
    def draws(self) -> int:
        return len(self.inputs)

    @property
    def exact_error(self) -> float:
        """Exact's mean relative error over photos and draws."""
        return float(self.exact.mean())

    def session(self, path: Path) -> ort.InferenceSession:
        return open_session(path, self.settings)

    def features(self, session: ort.InferenceSession) -> np.ndarray:
        """[draws, photos, feature values] of one path."""
        name = session.get_inputs()[0].name
        return np.stack(
            [
                session.run([proxies.FEATURES_OUTPUT], {name: pixels})[0].reshape(len(pixels), -1)
                for pixels in self.inputs
            ]
        )

    def errors(self, session: ort.InferenceSession) -> np.ndarray:
        """[photos, draws]: each photo's relative error to truth in each draw."""
        return self.relative(self.features(session), self.truth)

    def relative(self, features: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """[photos, draws]: |features - reference| / |truth| per photo and draw."""
        difference = np.linalg.norm(features - reference, axis=-1)
        return (difference / np.linalg.norm(self.truth, axis=-1)).T

    def ratio(self, errors: np.ndarray) -> dict:
        """A path's errors ([photos, draws]) against exact's: the pooled ratio with its interval,
        the range of the single draws' ratios, and the worst photo's (its mean over the draws,
        over exact's mean)."""
        pooled = paired.pooled_ratio(self.weights, errors.sum(axis=1), self.exact.sum(axis=1))
        per_draw = errors.mean(axis=0) / self.exact.mean(axis=0)
        return {
            "ratio": pooled["value"],
            "interval": pooled["interval"],
            "draw_range": [float(per_draw.min()), float(per_draw.max())],
            "worst_ratio": float(errors.mean(axis=1).max() / self.exact_error),
            "mean_error": float(errors.mean()),
        }

    def describe(self) -> dict:
        """What the measure ran on, for a results file."""
        return {
            "photos": [photo.name for photo in self.photos],
            "draws": self.draws,
            "jitter": JITTER,
            "exact_error": self.exact_error,
        }
