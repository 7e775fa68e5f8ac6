"""Helpers for tests that need a model folder they can change."""

import json
import shutil
from pathlib import Path


def copy_model(source: Path, target: Path) -> Path:
    """A writable copy of a model folder (hard links for the big files)."""
    target.mkdir()
    for path in source.iterdir():
        if path.is_dir():
            continue  # a cache of converted copies (phi3v.convert) belongs to the source
        if path.suffix == ".json":
            shutil.copy(path, target / path.name)
        else:
            (target / path.name).hardlink_to(path)
    return target


def edit_config(folder: Path, edit) -> None:
    """Rewrite the folder's genai_config.json with ``edit(config_dict)`` applied."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
