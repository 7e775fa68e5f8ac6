"""How the next token is chosen: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.random  # noqa: F401 - imported here, not at the first token (~40 ms)

from phi3v.errors import PromptError

# The range the app, its APIs and the CLI offer, as OpenAI's API does; the package takes up to 100.
OFFERED_MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Sampling:
    """Sampling settings. ``temperature`` 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise PromptError(
                f"temperature must be a number from 0 to 100, got {self.temperature!r}"
            )
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise PromptError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and (
            not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1
        ):
            raise PromptError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise PromptError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    def sampler(self):
        """A function from one row of logits to a token id, with its own random stream."""
        rng = np.random.default_rng(self.seed)
        return lambda logits: sample(logits, self, rng)


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick a token id from one row of logits: argmax, or temperature / top-k / top-p sampling."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.size:
        kth = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled[scaled < kth] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))
