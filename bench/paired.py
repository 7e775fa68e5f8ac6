"""Can the measurement tell two precisions apart? Paired comparisons on the same teacher-forced
tokens, with intervals from a bootstrap over documents.

Every path is scored on the same answer positions, so a fast variant is compared with exact
position by position (paired), not as two separate percentages. The positions of one text are
not independent draws: a passage the model finds hard is hard for every path, and one outlier
channel that a text excites shifts many of its positions at once. So the unit of resampling is
the document: each bootstrap resample draws the documents with replacement and pools their
positions, the way the point figure pools them. With ten documents the percentile interval is
somewhat too narrow (it cannot show variation between texts that none of the ten has), so an
interval that only just excludes zero is weak evidence.

The inputs are per-document totals (:func:`document_totals`), which the results file keeps, so
the intervals can be recomputed from it.
"""

from __future__ import annotations

import numpy as np

# A position where truth's two likeliest tokens are this close in probability is a near tie: a
# small change of the logits may swap them, so a top-1 miss there says little about the
# numerics. The misses are also counted below each of MARGINS, to show how they spread.
NEAR_TIE = 0.02
MARGINS = (0.01, 0.02, 0.05, 0.1)
RESAMPLES = 10_000
LEVEL = 0.95  # two-sided: the 2.5th and 97.5th percentiles of the resampled figures


def document_totals(
    truth: np.ndarray, exact: np.ndarray, path: np.ndarray, kl: np.ndarray, margin: np.ndarray
) -> dict:
    """One path's totals on one document, from the next-token choices (argmax per position) of
    truth, exact and the path, the path's KL to truth per position, and truth's margin per
    position (its likeliest token's probability minus the second's)."""
    right, exact_right = path == truth, exact == truth
    near = margin < NEAR_TIE
    return {
        "positions": int(len(truth)),
        "top1_hits": int(right.sum()),  # the path's choice is truth's
        "kl_sum": float(kl.sum()),
        "first_kl": float(kl[0]),
        "same_as_exact": int((path == exact).sum()),
        "only_path_right": int((right & ~exact_right).sum()),
        "only_exact_right": int((exact_right & ~right).sum()),
        "near_ties": int(near.sum()),
        "misses_at_near_ties": int((near & ~right).sum()),
        "misses_below_margins": [int((~right & (margin < bound)).sum()) for bound in MARGINS],
        "positions_below_margins": [int((margin < bound).sum()) for bound in MARGINS],
    }


def top_two_margin(logits: np.ndarray) -> np.ndarray:
    """Per row of [positions, vocab] logits: the likeliest token's probability minus the
    second's."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
    top_two = np.partition(probabilities, -2, axis=-1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def document_weights(documents: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """How often each document is drawn in each resample: [resamples, documents] counts."""
    draws = np.random.default_rng(seed).integers(0, documents, size=(resamples, documents))
    offsets = np.arange(resamples)[:, None] * documents
    counts = np.bincount((draws + offsets).ravel(), minlength=resamples * documents)
    return counts.reshape(resamples, documents)


def pooled_ratio(weights: np.ndarray, numerator, denominator) -> dict:
    """sum(numerator) / sum(denominator) over the documents, and the same ratio in every
    resample (``weights`` from :func:`document_weights`) reduced to its percentile interval."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    samples = (weights @ numerator) / (weights @ denominator)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {
        "value": float(numerator.sum() / denominator.sum()),
        "interval": [float(low), float(high)],
    }


def path_summary(documents: list[dict], weights: np.ndarray) -> dict:
    """A path against truth, pooled over every document's positions: top-1 agreement with its
    interval, mean KL, KL at the first answer token (mean over documents), worst document's KL."""
    positions = [d["positions"] for d in documents]
    top1 = pooled_ratio(weights, [d["top1_hits"] for d in documents], positions)
    return {
        "top1": top1["value"],
        "top1_interval": top1["interval"],
        "mean_kl": sum(d["kl_sum"] for d in documents) / sum(positions),
        "first_kl": float(np.mean([d["first_kl"] for d in documents])),
        "worst_document_kl": max(d["kl_sum"] / d["positions"] for d in documents),
        **_near_tie_summary(documents),
    }


def _near_tie_summary(documents: list[dict]) -> dict:
    """Where truth is not nearly tied, top-1 agreement; and the share of the misses that fall
    on near ties (results made before near ties were counted have none)."""
    if "near_ties" not in documents[0]:
        return {}
    positions = sum(d["positions"] for d in documents)
    near = sum(d["near_ties"] for d in documents)
    misses = positions - sum(d["top1_hits"] for d in documents)
    near_misses = sum(d["misses_at_near_ties"] for d in documents)
    below = np.sum([d["misses_below_margins"] for d in documents], axis=0)
    positions_below = np.sum([d["positions_below_margins"] for d in documents], axis=0)
    return {
        "near_tie_share": near / positions,
        "misses_at_near_ties": near_misses / max(misses, 1),
        "top1_clear": 1 - (misses - near_misses) / (positions - near),
        "positions": positions,
        "misses": misses,
        "misses_below_margins": below.tolist(),
        "positions_below_margins": positions_below.tolist(),
    }


def paired_summary(exact: list[dict], path: list[dict], weights: np.ndarray) -> dict:
    """A path against exact on the same positions: its top-1 agreement with truth minus exact's
    (percentage points), its mean KL and first-answer-token KL over exact's (ratios), and how
    often it picks exact's token; each with its interval. ``only_*_right`` count the positions
    where one of the two picks truth's token and the other does not: the top-1 difference is
    made of them."""
    positions = [d["positions"] for d in path]
    difference = [100 * (p["top1_hits"] - e["top1_hits"]) for p, e in zip(path, exact, strict=True)]
    return {
        "top1_difference": pooled_ratio(weights, difference, positions),
        "first_kl_ratio": pooled_ratio(
            weights, [d["first_kl"] for d in path], [d["first_kl"] for d in exact]
        ),
        "kl_ratio": pooled_ratio(
            weights, [d["kl_sum"] for d in path], [d["kl_sum"] for d in exact]
        ),
        "same_as_exact": pooled_ratio(weights, [d["same_as_exact"] for d in path], positions),
        "only_path_right": sum(d["only_path_right"] for d in path),
        "only_exact_right": sum(d["only_exact_right"] for d in path),
    }


def distinguishable(comparison: dict) -> bool:
    """Whether the top-1 difference's interval excludes zero."""
    low, high = comparison["top1_difference"]["interval"]
    return low > 0 or high < 0
