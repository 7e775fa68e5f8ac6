"""Where a result came from (the commit of this repository it was measured at), and where it
goes: ``bench/results/<name>.json`` with everything measured, ``<name>.md`` to read."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def commit() -> str:
    """The repository's short HEAD commit, or "unknown" outside a git checkout."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def save(name: str, data: object, text: str, folder: Path = RESULTS) -> None:
    """Write a run's results: ``<folder>/<name>.json`` (``data``, everything measured) and
    ``<name>.md`` (``text``, the report made from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (folder / f"{name}.md").write_text(text.rstrip("\n") + "\n")
