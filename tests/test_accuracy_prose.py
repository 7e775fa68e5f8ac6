"""bench/studies.py's reading of the decoder proxy against issue 15's targets: what the generated
docs say follows from the intervals, not from the point figures alone."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
POSITIONS = 100  # per document
DOCUMENTS = 10


@pytest.fixture
def bench(monkeypatch):
    """bench/'s studies and paired modules (bench scripts import each other by bare name)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import paired
    import studies

    yield studies, paired
    for name, module in list(sys.modules.items()):  # leave no bench module under a bare name
        if Path(getattr(module, "__file__", None) or "/").parent == BENCH:
            del sys.modules[name]


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


def test_fast_as_good_as_exact_is_read_as_indistinguishable(bench):
    studies, paired = bench
    text = studies.decoder_targets(accuracy(paired, 95, 95), "fast")
    assert "cannot tell fast's top-1 from exact's" in text


def test_fast_worse_in_every_document_is_read_as_distinguishably_below(bench):
    studies, paired = bench
    text = studies.decoder_targets(accuracy(paired, 95, 94), "fast")
    assert "distinguishably below exact's" in text
    assert "cannot tell" not in text


def test_a_top1_target_that_exact_misses_too_says_so(bench):
    studies, paired = bench
    text = studies.decoder_targets(accuracy(paired, 95, 95), "fast")
    assert "target at least 97.5% **missed**" in text
    assert "its whole interval lies below the target" in text


def test_a_top1_target_that_both_reach_is_met(bench):
    studies, paired = bench
    text = studies.decoder_targets(accuracy(paired, 99, 99), "fast")
    assert "target at least 97.5% **met**" in text
    assert "better than the released model's own numerics" not in text
