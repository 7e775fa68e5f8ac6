"""The registry of model sets this package knows how to fetch and run.

Each set is one folder of a Hugging Face Hub repo at a pinned revision, in one of the two
export layouts (docs/ARCHITECTURE.md#two-export-layouts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi3v.errors import DownloadError

# The int4 CPU build, in the folder each release keeps it in.
LEGACY_FOLDER = "cpu-int4-rtn-block-32-acc-level-4"
REDESIGNED_FOLDER = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
SET_BYTES = 3_220_000_000  # about the same for every set: the Hub's file listing


@dataclass(frozen=True)
class ModelSpec:
    """One downloadable model set: a folder of a Hub repo at a revision, in a known layout."""

    name: str
    repo: str
    folder: str
    revision: str = "main"  # a full 40-character commit, or "main" where none is known
    layout: str = "redesigned"  # "legacy" (June 2024, genai <= 0.4) | "redesigned" (genai >= 0.5)
    approx_bytes: int = SET_BYTES


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="phi-3-vision-cpu",
            repo="microsoft/Phi-3-vision-128k-instruct-onnx-cpu",
            folder=LEGACY_FOLDER,
            revision="5ec8e2b2b96cd2815f8478c6a728616f9043e62a",
            layout="legacy",
        ),
        # At "main": only the short commit ids (d6673a5, a764e22) of these two are known.
        ModelSpec("phi-3-vision", "microsoft/Phi-3-vision-128k-instruct-onnx", REDESIGNED_FOLDER),
        ModelSpec("phi-3.5-vision", "microsoft/Phi-3.5-vision-instruct-onnx", REDESIGNED_FOLDER),
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
