"""Session fixtures: the tiny random-weight model sets, built once per test session."""

from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model set in the re-designed (Sep 2024) layout that onnxruntime-genai 0.18 runs."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-redesigned"), layout="redesigned")


@pytest.fixture(scope="session")
def tiny_legacy_model_dir(tmp_path_factory) -> Path:
    """The same weights in the June-2024 layout of Phi-3-vision-128k-instruct-onnx-cpu."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-legacy"), layout="legacy")
