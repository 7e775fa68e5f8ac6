"""The model's weights on 2 MB pages (Linux): fewer address translations for every token.

Each decode step reads every weight of the int4 decoder once, about 2 GB in the real model. On
4 KB pages that is half a million page-table entries per token, more than any TLB holds, and in
a virtual machine each miss walks two sets of tables (the guest's and the host's). onnxruntime
allocates its packed weights with ``malloc``, and where the system's transparent huge pages
are ``madvise`` (the default of Ubuntu and of many VMs) nothing asks for large pages, so the
weights stay on 4 KB ones.

After the sessions are loaded, :func:`collapse` asks Linux to move every large, already
resident, private anonymous mapping of the process (onnxruntime's weights, above all) onto
2 MB pages: ``madvise(MADV_COLLAPSE)`` (Linux 6.1 and later), which copies the pages in place
synchronously and works whatever ``/sys/kernel/mm/transparent_hugepage/enabled`` says. One
mapping after another: a collapse holds the process's memory map, so threads would only wait on
each other. The
numbers are the same bytes on other pages, so nothing computed changes. Mappings that are mostly
unwritten (arenas with room, the KV caches' reserved positions) are left alone: a huge page is
resident as a whole, so collapsing them would add memory.

It costs seconds at load (every resident weight is copied: 5-8 s for the real model's 3 GB on a
2-core EPYC, ``bench/results/huge_pages.md``) and buys a few per cent of decode speed (1.05x
there, measured inside one process against a second decoder left on 4 KB pages), so it pays off
in a server that answers for hours: the app asks for it, ``Pipeline.load`` and the CLI do not
unless told (``huge_pages=True``). ``PHI3V_HUGE_PAGES=1`` or ``0`` decides for all of them.
Where the kernel lacks ``MADV_COLLAPSE`` or the machine is not Linux, nothing is done and
:attr:`HugePages.reason` says why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HUGE_PAGES_ENV = "PHI3V_HUGE_PAGES"  # "1" / "0": move the weights or not, whoever loads them
OFF = ("0", "false", "no", "off")
NOT_ASKED = f"not asked for (huge_pages=False, or {HUGE_PAGES_ENV}=0)"
HUGE = 2 << 20  # a transparent huge page on x86-64 and most arm64 kernels
MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1
MIN_RESIDENT = 0.9  # collapse a mapping only when this share of it is written already


@dataclass(frozen=True)
class HugePages:
    """What :func:`collapse` did: bytes moved onto 2 MB pages, bytes the kernel could not move
    (no free 2 MB block, say), the seconds it took; ``reason`` when it did nothing."""

    collapsed: int = 0
    failed: int = 0
    seconds: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        """One line for a status report."""
        if self.reason:
            return f"weights on 4 KB pages: {self.reason}"
        text = f"{self.collapsed / 2**30:.1f} GB of weights on 2 MB pages ({self.seconds:.1f} s)"
        if self.failed:
            text += f"; {self.failed / 2**30:.1f} GB could not be moved"
        return text


@dataclass(frozen=True)
class Mapping:
    """One mapping of /proc/self/smaps: its address range and the bytes of it resident."""

    start: int
    end: int
    resident: int
    huge: int  # bytes on huge pages already
    anonymous_private_writable: bool

    def span(self) -> tuple[int, int]:
        """The 2 MB-aligned part of the range: [first, last) rounded inwards."""
        return whole_pages(self.start, self.end)


def whole_pages(start: int, end: int) -> tuple[int, int]:
    """The 2 MB-aligned part of [start, end): rounded inwards."""
    return -(-start // HUGE) * HUGE, end // HUGE * HUGE


def wanted(default: bool) -> bool:
    """Whether to move the weights: as ``PHI3V_HUGE_PAGES`` says (off for ``0``, ``false``,
    ``no`` or ``off``, on for anything else), ``default`` where it is unset or empty."""
    value = os.environ.get(HUGE_PAGES_ENV, "").strip().lower()
    return default if not value else value not in OFF


def mappings(smaps: str) -> list[Mapping]:
    """The mappings in the text of a /proc/<pid>/smaps file."""
    found, current = [], None
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            if current:
                found.append(Mapping(**current))
            start, end = (int(x, 16) for x in fields[0].split("-"))
            perms, inode, path = fields[1], fields[4], fields[5] if len(fields) > 5 else ""
            current = {
                "start": start,
                "end": end,
                "resident": 0,
                "huge": 0,
                "anonymous_private_writable": (
                    perms.startswith("rw") and perms[3] == "p" and inode == "0"
                    and path in ("", "[heap]")
                ),
            }  # fmt: skip
        elif current is not None and fields[0] == "Rss:":
            current["resident"] = int(fields[1]) * 1024
        elif current is not None and fields[0] == "AnonHugePages:":
            current["huge"] = int(fields[1]) * 1024
    if current:
        found.append(Mapping(**current))
    return found


def candidates(
    found: list[Mapping], leave: Sequence[tuple[int, int]] = ()
) -> list[tuple[int, int]]:
    """The (address, length) of each range worth collapsing: in a private, anonymous, writable
    mapping that is mostly resident and not all on huge pages already, whole 2 MB pages, outside
    the [start, end) ranges of ``leave``. (Linux merges neighbouring anonymous mappings, so
    memory mapped later can extend a mapping that was there before: ranges, not mappings.)"""
    chosen = []
    for mapping in found:
        size = mapping.end - mapping.start
        if not mapping.anonymous_private_writable:
            continue
        if mapping.resident < MIN_RESIDENT * size or mapping.huge >= mapping.resident:
            continue
        for start, end in _outside(mapping.start, mapping.end, leave):
            first, last = whole_pages(start, end)
            if last - first >= HUGE:
                chosen.append((first, last - first))
    return chosen


def _outside(start: int, end: int, leave: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside every range of ``leave``, in order."""
    parts = [(start, end)]
    for gone_start, gone_end in leave:
        parts = [
            piece
            for a, b in parts
            for piece in ((a, min(b, gone_start)), (max(a, gone_end), b))
            if piece[0] < piece[1]
        ]
    return parts


def collapse(leave: Sequence[tuple[int, int]] = ()) -> HugePages:
    """Move this process's resident weights onto 2 MB pages (see the module's text), except the
    [start, end) ranges of ``leave``: the memory of another runtime in the same process, say
    (the ranges of :func:`mappings` before this one's sessions were loaded)."""
    if not sys.platform.startswith("linux"):
        return HugePages(reason="only Linux has transparent huge pages")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    started = time.perf_counter()
    regions = candidates(mappings(Path("/proc/self/smaps").read_text()), leave)

    results = []  # (bytes, errno) per range
    for address, length in regions:
        done = libc.madvise(address, length, MADV_COLLAPSE) == 0
        results.append((length, 0 if done else ctypes.get_errno()))
    if results and all(code == errno.EINVAL for _, code in results):
        return HugePages(reason="this kernel has no MADV_COLLAPSE (Linux 6.1 or later has)")
    return HugePages(
        collapsed=sum(length for length, code in results if code == 0),
        failed=sum(length for length, code in results if code != 0),
        seconds=time.perf_counter() - started,
    )
