"""What this machine can do: its CPU's integer-GEMM units and the memory free now.

The "fast" precision pays off where onnxruntime's u8s8 integer GEMM has matrix units (AMX) or
VNNI dot products to run on (docs/PERFORMANCE.md); :mod:`phi3v.precision` decides with these
facts. Linux only reads them from /proc; elsewhere the answers are the safe ones (no integer
units: "auto" stays exact; memory: the physical size).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

AMX_FLAGS = ("amx_tile", "amx_int8")  # both: the tiles and their int8 dot products
# Integer-GEMM matrix units, or VNNI dot products: where the fast path was measured to win.
INTEGER_GEMM_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_integer_gemm() -> bool:
    """Whether this CPU has AMX or VNNI integer units."""
    return any(flag in cpu_flags() for flag in INTEGER_GEMM_FLAGS)


def u8s8_saturates() -> bool:
    """Whether onnxruntime's u8s8 GEMM adds u8 x s8 pairs in 16 bits with saturation here
    (``vpmaddubsw``: x86 without VNNI or AMX), so that weights must go to its u8u8 GEMM instead
    (:mod:`phi3v.integer_gemm`). A separate question from :func:`has_integer_gemm` (whether fast
    pays off), although the same flags answer both today."""
    return not any(flag in cpu_flags() for flag in INTEGER_GEMM_FLAGS)


def has_amx() -> bool:
    """Whether this CPU has AMX int8 tiles (the fast precision's best case)."""
    return all(flag in cpu_flags() for flag in AMX_FLAGS)


def has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tiles (the fused attention kernel's fastest numerics)."""
    return {"amx_tile", "amx_bf16"} <= cpu_flags()


def describe_cpu() -> str:
    """The CPU's model name and its integer-GEMM flags, for benchmark results and status lines."""
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    units = [flag for flag in (*AMX_FLAGS, "avx512_vnni", "avx_vnni") if flag in cpu_flags()]
    return f"{name} ({', '.join(units) or 'no AMX or VNNI'}), {os.cpu_count()} CPUs"


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or the physical memory if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once (hyperthreads share
    one), as onnxruntime sizes its default thread pool; all allowed CPUs where Linux's
    /proc/cpuinfo does not say."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        blocks = []
    cores = set()
    for block in blocks:
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in block.splitlines())
        )
        if "processor" not in fields or "core id" not in fields:
            continue
        if allowed is not None and int(fields["processor"]) not in allowed:
            continue
        cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or (len(allowed) if allowed else os.cpu_count() or 1)
