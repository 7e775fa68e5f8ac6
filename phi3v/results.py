"""What a generation reports: the finished answer, where the time went, and live progress."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

StopReason = Literal["eos", "length", "cancelled"]
Stage = Literal["preprocess", "vision", "prefill", "decode", "done"]


@dataclass(frozen=True)
class Timings:
    """Where the time went, in seconds (and the decode rate in tokens per second)."""

    preprocess: float = 0.0  # images decoded and transformed, prompt tokenized
    vision: float = 0.0  # the vision model
    prefill: float = 0.0  # embedding + decoder over the new prompt positions
    time_to_first_token: float = 0.0  # from the call to the first generated token
    decode_tokens_per_second: float = 0.0  # after the first token; 0 for fewer than 2 tokens


@dataclass(frozen=True)
class Progress:
    """Where a running generation (or a model load) is: ``done`` of ``total`` units of ``stage``.

    Units are images for "vision", prompt positions for "prefill", tokens for "decode", and
    whatever the stage names (files, layers) for a load.
    """

    stage: str
    done: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


@dataclass(frozen=True)
class Generation:
    """A finished answer."""

    text: str
    token_ids: list[int]  # generated ids, the stop token excluded
    input_ids: list[int]  # the prompt, image placeholders as -N
    stop_reason: StopReason
    timings: Timings
    reused_tokens: int = 0  # prompt positions whose KV cache came from an earlier generation

    def to_dict(self) -> dict:
        return asdict(self)
