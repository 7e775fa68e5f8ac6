"""Placeholder during the refactor."""

from __future__ import annotations

from phi3v.errors import PromptError

PRECISIONS = ("exact", "fast", "auto")


def choose_precision(precision, config):
    if precision not in PRECISIONS:
        raise PromptError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "exact"


def fast_models(config, progress):
    raise NotImplementedError
