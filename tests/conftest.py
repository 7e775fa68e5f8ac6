"""Session fixtures: the tiny random-weight model sets, built once per test session."""

from pathlib import Path

import pytest

from phi3v.testing import build_model

FIXTURES = Path(__file__).parent / "fixtures"
# Channels amplified in tiny_outlier_model_dir (of 64 decoder and 32 vision channels).
OUTLIER_CHANNELS = 3


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny fp32 set in the re-designed (Sep 2024) layout that onnxruntime-genai 0.18 runs."""
    return build_model(tmp_path_factory.mktemp("tiny-redesigned"), layout="redesigned")


@pytest.fixture(scope="session")
def tiny_legacy_model_dir(tmp_path_factory) -> Path:
    """The same weights in the June-2024 layout of Phi-3-vision-128k-instruct-onnx-cpu."""
    return build_model(tmp_path_factory.mktemp("tiny-legacy"), layout="legacy")


@pytest.fixture(scope="session")
def tiny_int4_model_dir(tmp_path_factory) -> Path:
    """A tiny re-designed set whose linear layers are MatMulNBits int4, as the cpu-int4 release."""
    return build_model(tmp_path_factory.mktemp("tiny-int4"), weights="int4")


@pytest.fixture(scope="session")
def tiny_int4_legacy_model_dir(tmp_path_factory) -> Path:
    """The int4 weights of tiny_int4_model_dir in the June-2024 layout."""
    return build_model(tmp_path_factory.mktemp("tiny-int4-legacy"), weights="int4", layout="legacy")


@pytest.fixture(scope="session")
def tiny_outlier_model_dir(tmp_path_factory) -> Path:
    """A tiny int4 re-designed set whose activations entering every linear layer after a norm
    have OUTLIER_CHANNELS outlier channels (phi3v.testing.DEFAULT_OUTLIER_GAIN times the rest)."""
    return build_model(
        tmp_path_factory.mktemp("tiny-outliers"),
        weights="int4",
        outlier_channels=OUTLIER_CHANNELS,
    )
