"""The state of one running generation, and this machine's measured speed.

:class:`RunState` is written by :meth:`phi3v.engine.Pipeline._run` and read by its
:class:`~phi3v.engine.Stream` (progress, tokens, timings, cancellation); :class:`MeasuredSpeed`
keeps the seconds per crop and per prompt position of the latest runs.
"""

from __future__ import annotations

import time

import onnxruntime as ort

from phi3v.results import Progress, StopReason, Timings


class Rate:
    """Seconds per unit of work (crops, prompt positions), from the latest large-enough run."""

    def __init__(self, min_units: int):
        self.min_units = min_units
        self.seconds_per_unit: float | None = None

    def record(self, units: int, seconds: float) -> None:
        if units >= self.min_units:
            self.seconds_per_unit = seconds / units

    def estimate(self, units: int) -> float | None:
        return None if self.seconds_per_unit is None else units * self.seconds_per_unit


class MeasuredSpeed:
    """This machine's measured speed, for the first-token estimate shown while a user waits."""

    def __init__(self) -> None:
        self.vision = Rate(min_units=1)
        self.prefill = Rate(min_units=256)  # short prefills measure per-call overhead


class RunState:
    """What a running generation has done so far; written by :meth:`Pipeline._run`."""

    def __init__(self, started: float):
        self.started = started
        self.preprocess_seconds = time.perf_counter() - started
        self.vision_seconds = self.prefill_seconds = 0.0
        self.embedding_seconds = 0.0  # the new prompt positions' embedding, part of the prefill
        self.progress = Progress("preprocess")
        self.token_ids: list[int] = []
        self.stop_reason: StopReason | None = None
        self.reused_tokens = 0
        self.cancelled = False
        self.run_options = ort.RunOptions()  # shared by every model call of this generation
        self.sampled = 0
        self.first_token_at = self.last_token_at = 0.0

    def cancel(self) -> None:
        self.cancelled = True
        self.run_options.terminate = True  # onnxruntime checks it between nodes

    def count_token(self, produced: int, limit: int) -> None:
        now = time.perf_counter()
        if self.sampled == 0:
            self.first_token_at = now
        self.last_token_at = now
        self.sampled += 1
        self.progress = Progress("decode", produced, limit)

    def timings(self) -> Timings:
        elapsed = self.last_token_at - self.first_token_at
        return Timings(
            preprocess=self.preprocess_seconds,
            vision=self.vision_seconds,
            prefill=self.prefill_seconds,
            time_to_first_token=self.first_token_at - self.started if self.sampled else 0.0,
            decode_tokens_per_second=(self.sampled - 1) / elapsed if elapsed > 0 else 0.0,
        )
