"""bench/vision_proxy.py, the vision proxy's measure: its draws move where a quantized path rounds
and not truth, and its ratio pools photos and draws.

The proxy is built from registry packages (as in test_proxies.py); the tests that need it skip,
with the reason, only when the registry cannot be reached.
"""

import numpy as np
import pytest

from phi3v.testing.proxies import ProxyUnavailable
from tests.bench_modules import bench_modules

DRAWS = 3


@pytest.fixture(scope="module")
def vision_proxy():
    with bench_modules("vision_proxy") as (module,):
        yield module


@pytest.fixture(scope="module")
def proxy(vision_proxy, tmp_path_factory):
    try:
        return vision_proxy.VisionProxy(tmp_path_factory.mktemp("vision"), DRAWS)
    except ProxyUnavailable as err:
        pytest.skip(str(err))


def test_draw_zero_is_the_pixels_and_the_others_move_each_value_by_a_unit_or_two(vision_proxy):
    pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert vision_proxy.jittered(pixels, 0) is pixels
    first, second = vision_proxy.jittered(pixels, 1), vision_proxy.jittered(pixels, 2)
    assert first.dtype == np.float32 and first.shape == pixels.shape
    assert np.array_equal(first, vision_proxy.jittered(pixels, 1))  # seeded: the same each run
    moved = np.abs(first / pixels - 1)
    assert moved.max() <= 2 * vision_proxy.JITTER  # the product's own rounding at most doubles it
    assert (first != pixels).mean() > 0.9  # nearly every value moves (not those the step misses)
    assert (first != second).mean() > 0.3  # each draw has its own pattern


def test_draws_move_the_quantized_roundings_and_not_truth(proxy):
    truth = proxy.truth  # [draws, photos, values]
    for draw in range(1, DRAWS):
        moved = np.linalg.norm(truth[draw] - truth[0], axis=-1) / np.linalg.norm(truth[0], axis=-1)
        assert moved.max() < 1e-5, "fp32 activations: a unit in the last place stays that small"
    exact = proxy.exact  # [photos, draws]: int8 activations, so each draw rounds anew
    assert exact.shape == (len(proxy.photos), DRAWS)
    spread = np.abs(exact[:, 1:] - exact[:, :1]) / exact[:, :1]
    assert np.median(spread) > 0.01, "the draws should change exact's error, photo by photo"


def test_a_path_measured_against_itself_is_one_and_the_ratio_pools_photos_and_draws(proxy):
    same = proxy.ratio(proxy.exact)
    assert same["ratio"] == pytest.approx(1.0)
    assert same["interval"] == pytest.approx([1.0, 1.0])
    assert same["draw_range"] == pytest.approx([1.0, 1.0])
    doubled = proxy.exact.copy()
    doubled[0] *= 3  # one photo three times as wrong: its share of the pooled sum grows
    found = proxy.ratio(doubled)
    expected = doubled.sum() / proxy.exact.sum()
    assert found["ratio"] == pytest.approx(expected)
    assert found["interval"][0] < found["ratio"] < found["interval"][1]
    assert found["worst_ratio"] == pytest.approx(doubled[0].mean() / proxy.exact.mean())
