"""bench/studies.py's reading of the decoder proxy against issue 15's targets: what the generated
docs say follows from the intervals, not from the point figures alone."""

import pytest

from tests.bench_modules import bench_modules

POSITIONS = 100  # per document
DOCUMENTS = 10


@pytest.fixture
def bench():
    """bench/'s studies and paired modules."""
    with bench_modules("studies", "paired") as modules:
        yield modules


def totals(hits: int, only_path_right: int = 0, only_exact_right: int = 0) -> dict:
    """One document's totals as paired.document_totals makes them, with no near ties."""
    return {
        "positions": POSITIONS,
        "top1_hits": hits,
        "kl_sum": 0.4,
        "first_kl": 0.004,
        "same_as_exact": POSITIONS - only_path_right - only_exact_right,
        "only_path_right": only_path_right,
        "only_exact_right": only_exact_right,
        "near_ties": 0,
        "misses_at_near_ties": 0,
        "misses_below_margins": [0, 0, 0, 0],
        "positions_below_margins": [0, 0, 0, 0],
    }


def accuracy(paired, exact_hits: int, fast_hits: int) -> dict:
    """Results with exact and one fast variant ("fast") scoring the same in every document."""
    exact = [totals(exact_hits) for _ in range(DOCUMENTS)]
    worse, better = max(exact_hits - fast_hits, 0), max(fast_hits - exact_hits, 0)
    fast = [totals(fast_hits, better, worse) for _ in range(DOCUMENTS)]
    weights = paired.document_weights(DOCUMENTS)
    split = {
        "documents": DOCUMENTS,
        "answer_tokens": POSITIONS,
        "per_document": {"exact": exact, "fast": fast},
        "paths": {
            name: paired.path_summary(d, weights) for name, d in [("exact", exact), ("fast", fast)]
        },
        "paired": {"fast": paired.paired_summary(exact, fast, weights)},
    }
    return {"decoder": {"tune": split, "held_out": split}}


@pytest.mark.parametrize(
    ("exact_top1", "fast_top1", "says", "never_says"),
    [
        (95, 95, ["cannot tell fast's top-1 from exact's"], []),
        (95, 94, ["distinguishably below exact's"], ["cannot tell"]),
        (
            95,
            95,
            ["target at least 97.5% **missed**", "its whole interval lies below the target"],
            [],
        ),
        (99, 99, ["target at least 97.5% **met**"], ["better than the released model's own"]),
    ],
    ids=[
        "as good as exact: indistinguishable",
        "worse in every document: distinguishably below",
        "a target exact misses too says so",
        "a target both reach is met",
    ],
)
def test_the_verdicts_follow_the_intervals(bench, exact_top1, fast_top1, says, never_says):
    studies, paired = bench
    text = studies.decoder_targets(accuracy(paired, exact_top1, fast_top1), "fast")
    for phrase in says:
        assert phrase in text
    for phrase in never_says:
        assert phrase not in text
