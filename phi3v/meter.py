"""Download progress: a tqdm bar per file, and DownloadProgress snapshots for a caller's UI."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from phi3v.hub import RemoteFile

SPEED_WINDOW_S = 5.0  # speed and ETA follow the last few seconds, not the whole run
REPORT_EVERY_S = 0.1  # the callback hears about bytes at most this often (a UI need not more)


@dataclass(frozen=True)
class DownloadProgress:
    """A snapshot for a progress display: the current file, and bytes over the whole set."""

    filename: str
    file_done: int
    file_total: int
    done: int
    total: int
    speed: float  # bytes per second over the last few seconds
    eta: float | None  # seconds left, None while the speed is unknown


class Meter:
    """Counts bytes for the current file's tqdm bar and for the caller's progress callback.

    ``callback`` (None: no snapshots) hears a DownloadProgress when a file starts, restarts or
    is placed, and as bytes arrive at most every REPORT_EVERY_S; ``bars`` draws the tqdm bars.
    Set ``total`` to the bytes of the whole set once it is known.
    """

    def __init__(self, callback: Callable[[DownloadProgress], None] | None, bars: bool = True):
        self.callback, self.bars = callback, bars
        self.total = 0  # bytes of the whole set, known once the folder is listed
        self.placed_bytes = 0  # bytes of the files already in place
        self.file: RemoteFile | None = None
        self.file_done = 0  # bytes of the file being fetched
        self.bar: tqdm | None = None
        self.received = 0  # bytes over the network in this run, for the speed
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        self.last_report = 0.0

    def start(self, remote: RemoteFile, have: int) -> None:
        """Fetching ``remote`` begins (or resumes with ``have`` bytes already in its part)."""
        self.file, self.file_done = remote, have
        self.bar = tqdm(
            total=remote.size,
            initial=have,
            desc=remote.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not self.bars,
        )
        self._report()

    def add(self, n: int) -> None:
        """``n`` more bytes of the current file arrived."""
        self.file_done += n
        self.received += n
        now = time.monotonic()
        self.samples.append((now, self.received))
        while len(self.samples) > 2 and now - self.samples[1][0] > SPEED_WINDOW_S:
            self.samples.popleft()
        self.bar.update(n)
        if now - self.last_report >= REPORT_EVERY_S:
            self._report()

    def restart(self) -> None:
        """The current file starts again from byte 0 (the server ignored our Range)."""
        self.file_done = 0
        self.bar.reset(total=self.file.size)
        self._report()

    def end(self) -> None:
        """Fetching the current file stopped (done, failed or to be restarted)."""
        self.file_done = 0
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def placed(self, remote: RemoteFile) -> None:
        """``remote`` is in place, fetched just now or before."""
        self.file, self.file_done = remote, remote.size
        self._report()
        self.placed_bytes += remote.size
        self.file_done = 0

    def _report(self) -> None:
        if self.callback is None:
            return
        self.last_report = time.monotonic()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        speed = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        done = self.placed_bytes + self.file_done
        self.callback(
            DownloadProgress(
                filename=self.file.name,
                file_done=self.file_done,
                file_total=self.file.size,
                done=done,
                total=self.total,
                speed=speed,
                eta=(self.total - done) / speed if speed > 0 else None,
            )
        )
