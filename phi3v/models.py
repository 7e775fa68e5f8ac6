"""The registry of model sets this package knows how to fetch and run.

Each set is one folder of a Hugging Face Hub repo at a pinned revision, in one of the two
export layouts (docs/ARCHITECTURE.md#two-export-layouts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi3v.errors import DownloadError


@dataclass(frozen=True)
class ModelSpec:
    """One downloadable model set: a folder of a Hub repo at a revision, in a known layout."""

    name: str
    repo: str
    folder: str
    revision: str  # a full 40-character commit, or "main" where none is known (see README)
    layout: str  # "legacy" (June 2024, onnxruntime-genai <= 0.4) | "redesigned" (genai >= 0.5)
    approx_bytes: int


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="phi-3-vision-cpu",
            repo="microsoft/Phi-3-vision-128k-instruct-onnx-cpu",
            folder="cpu-int4-rtn-block-32-acc-level-4",
            revision="5ec8e2b2b96cd2815f8478c6a728616f9043e62a",
            layout="legacy",
            approx_bytes=3_220_000_000,  # the Hub's file listing of that revision
        ),
        ModelSpec(
            name="phi-3-vision",
            repo="microsoft/Phi-3-vision-128k-instruct-onnx",
            folder="cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
            revision="main",  # only the short id d6673a5 is known
            layout="redesigned",
            approx_bytes=3_220_000_000,
        ),
        ModelSpec(
            name="phi-3.5-vision",
            repo="microsoft/Phi-3.5-vision-instruct-onnx",
            folder="cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
            revision="main",  # only the short id a764e22 is known
            layout="redesigned",
            approx_bytes=3_220_000_000,
        ),
    )
}
DEFAULT_MODEL = "phi-3-vision-cpu"


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; DownloadError naming the known sets otherwise."""
    if name not in MODELS:
        known = ", ".join(MODELS)
        raise DownloadError(f"unknown model set {name!r}: choose one of {known}")
    return MODELS[name]


def model_folder(name: str, root: Path | str = "data") -> Path:
    """Where model set ``name`` lives: ``root/name``, with the files flat in it."""
    return Path(root) / model_spec(name).name
