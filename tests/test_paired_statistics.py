"""bench/paired.py: a fast variant against exact on the same teacher-forced tokens, with
intervals from a bootstrap over documents."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "paired.py"
_spec = importlib.util.spec_from_file_location("paired", SCRIPT)
paired = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired)


def document(positions: int, hits: int, kl_sum: float = 0.5) -> dict:
    """A document's totals as paired.document_totals makes them (the fields the summaries read)."""
    return {
        "positions": positions,
        "top1_hits": hits,
        "kl_sum": kl_sum,
        "first_kl": kl_sum / positions,
        "same_as_exact": positions,
        "only_path_right": 0,
        "only_exact_right": 0,
    }


def test_document_totals_count_each_kind_of_position():
    truth, exact, path = np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]), np.array([1, 0, 3, 4])
    kl, margin = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.5, 0.03, 0.5, 0.005])
    totals = paired.document_totals(truth, exact, path, kl, margin)
    assert totals["positions"] == 4
    assert totals["top1_hits"] == 3  # positions 0, 2, 3
    assert totals["same_as_exact"] == 2  # positions 0, 3
    assert totals["only_path_right"] == 1  # position 2
    assert totals["only_exact_right"] == 1  # position 1
    assert np.isclose(totals["kl_sum"], 1.0) and np.isclose(totals["first_kl"], 0.1)
    assert totals["near_ties"] == 1  # position 3: its margin is below paired.NEAR_TIE
    assert totals["misses_at_near_ties"] == 0  # position 3 is right
    assert totals["misses_below_margins"] == [0, 0, 1, 1]  # below 0.01, 0.02, 0.05, 0.1
    assert totals["positions_below_margins"] == [1, 1, 2, 2]


def test_the_margin_is_the_first_probability_minus_the_second():
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    np.testing.assert_allclose(paired.top_two_margin(logits), [0.2, 0.7])


def test_top1_where_truth_is_clear_leaves_out_the_near_ties():
    # 100 positions, 10 near ties; 6 misses, 4 of them at near ties: 2 misses in 90 clear ones.
    below = {"misses_below_margins": [4] * 4, "positions_below_margins": [10] * 4}
    totals = document(100, 94) | {"near_ties": 10, "misses_at_near_ties": 4} | below
    summary = paired.path_summary([totals], paired.document_weights(1, resamples=10))
    assert np.isclose(summary["near_tie_share"], 0.1)
    assert np.isclose(summary["misses_at_near_ties"], 4 / 6)
    assert np.isclose(summary["top1_clear"], 88 / 90)


def test_each_resample_draws_as_many_documents_as_there_are():
    weights = paired.document_weights(7, resamples=500)
    assert weights.shape == (500, 7)
    assert (weights.sum(axis=1) == 7).all()
    assert (weights >= 0).all()


def test_documents_that_all_say_the_same_give_an_interval_of_one_point():
    result = paired.pooled_ratio(paired.document_weights(5), [3] * 5, [4] * 5)
    assert result["value"] == 0.75
    assert np.allclose(result["interval"], [0.75, 0.75])


def test_a_path_identical_to_exact_differs_by_zero_and_is_not_distinguishable():
    exact = [document(64, 60), document(64, 62), document(64, 58)]
    result = paired.paired_summary(exact, exact, paired.document_weights(3))
    assert result["top1_difference"]["value"] == 0
    assert result["top1_difference"]["interval"] == [0, 0]
    assert result["kl_ratio"]["value"] == 1
    assert not paired.distinguishable(result)


def test_a_path_one_token_worse_in_every_document_is_distinguishable():
    exact = [document(100, 96) for _ in range(10)]
    fast = [document(100, 95) for _ in range(10)]
    result = paired.paired_summary(exact, fast, paired.document_weights(10))
    assert np.isclose(result["top1_difference"]["value"], -1.0)  # percentage points
    assert paired.distinguishable(result)


def test_a_difference_made_by_one_document_is_not_evidence():
    # Pooled over tokens, 20 of 1,000 is a clear 2 points; but it all comes from one text, and
    # about a third of the resamples leave that text out (0.9 ** 10).
    exact = [document(100, 96) for _ in range(10)]
    fast = [document(100, 76)] + exact[1:]
    result = paired.paired_summary(exact, fast, paired.document_weights(10))
    assert np.isclose(result["top1_difference"]["value"], -2.0)
    assert result["top1_difference"]["interval"][1] == 0
    assert not paired.distinguishable(result)


def test_the_kl_ratio_is_pooled_over_documents():
    exact = [document(10, 9, kl_sum=1.0), document(10, 9, kl_sum=3.0)]
    fast = [document(10, 9, kl_sum=2.0), document(10, 9, kl_sum=4.0)]
    result = paired.paired_summary(exact, fast, paired.document_weights(2))
    assert np.isclose(result["kl_ratio"]["value"], 1.5)  # (2 + 4) / (1 + 3)
    low, high = result["kl_ratio"]["interval"]
    assert 4 / 3 <= low <= 1.5 <= high <= 2.0  # the ratios of the resamples lie between 4/3 and 2
