"""Our fused causal attention kernel (``phi3v/kernels/attention.c``) for the benchmarks.

The product builds and calls the kernel through :mod:`phi3v.attention` (the variant this CPU
runs best); this module adds what the studies need: every variant on a CPU that runs several,
over whole Q/K/V arrays in the prefill's chunks (``attention``) or without a mask as the vision
encoder's (``full``), and a count of the work each does. ``attention_forms.py`` measures it beside
onnxruntime's GroupQueryAttention.

    out = attention(q, k, v, head=96, variant="fp32")  # or "amx": bf16 tiles

runs the prefill chunk by chunk as the fast decoder does: each chunk's keys and values are
written into a ``[kv_heads, positions, head]`` cache, then the chunk's queries attend to the
cache's keys up to their own position. The AMX variant also keeps bf16 copies of the keys and
of the values transposed, to which each chunk adds its own (converted once, in the kernel).

The fp32 variant runs on AVX-512 where the CPU has it (blocks of 32 query rows) and otherwise
on AVX2 and FMA (blocks of 16 rows, 8-lane vectors): the C code checks the CPU (cpuid) on each
call, and ``tile`` says which block runs here. The library is built without global instruction
set flags, so it loads on any x86-64; the AMX variant needs AVX-512 and AMX.
"""

from __future__ import annotations

import numpy as np

from phi3v.attention import (
    AMX_BF16,
    AMX_ROWS,
    BF16,
    FP32,
    KEYS,
    KernelUnavailable,
    aligned,
    amx_ready,
    check_status,
    kernel,
    library,
)

__all__ = ["KernelUnavailable", "amx_ready", "attention", "full", "library", "pairs", "tile"]

VARIANTS = {"fp32": FP32, "amx": AMX_BF16, "bf16": BF16}
THREADS = 2  # as the timed onnxruntime sessions: the machine's two cores


def tile(variant: str) -> tuple[int, int]:
    """Query rows x keys per tile of the causal triangle that ``variant`` runs on this CPU: fp32
    takes blocks of 32 rows with AVX-512 and of 16 with AVX2 (the C code chooses), AMX of 16."""
    if variant in ("amx", "bf16"):
        return AMX_ROWS, KEYS
    return kernel(THREADS).rows, KEYS


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, head: int, variant: str, chunk: int = 512
) -> np.ndarray:
    """Causal attention [1, S, heads * head] of q [1, S, heads * head] over k, v [1, S, kv_heads *
    head], in chunks of ``chunk`` positions through a key/value cache, as the engine's prefill."""
    lib = library()
    positions, heads, kv_heads = q.shape[1], q.shape[2] // head, k.shape[2] // head
    cache = [np.zeros((kv_heads, positions, head), np.float32) for _ in range(2)]
    pitch = -(-positions // KEYS) * KEYS
    # bf16 K and V^T, 64-byte aligned as the product's
    packed = [aligned(kv_heads * pitch * head, np.uint16) for _ in range(2)]
    addresses = [x.ctypes.data for x in packed] if variant != "fp32" else [None, None]
    out = np.empty((positions, heads * head), np.float32)
    for start in range(0, positions, chunk):
        end = min(start + chunk, positions)
        for stored, new in zip(cache, (k, v), strict=True):  # the chunk's present key/value
            part = new[0, start:end].reshape(end - start, kv_heads, head)
            stored[:, start:end] = part.swapaxes(0, 1)
        rows = np.ascontiguousarray(q[0, start:end])
        status = lib.causal_attention(
            rows, *cache, out[start:end], end - start, start, positions, heads, kv_heads, head,
            VARIANTS[variant], THREADS, *addresses,
        )  # fmt: skip
        check_status(status)
    return out[None]


def full(q: np.ndarray, k: np.ndarray, v: np.ndarray, head: int, variant: str) -> np.ndarray:
    """Attention without a mask [T, heads * head] of q, k, v [T, heads * head] (one key/value
    head per query head), as the vision encoder's: the kernel's ``full_attention`` in
    ``variant``, whichever the product would pick here."""
    lib = library()
    rows, heads = q.shape[0], q.shape[1] // head
    by_head = [np.ascontiguousarray(x.reshape(rows, heads, head).swapaxes(0, 1)) for x in (k, v)]
    pitch = -(-rows // KEYS) * KEYS
    packed = [aligned(heads * pitch * head, np.uint16) for _ in range(2)]
    addresses = [x.ctypes.data for x in packed] if variant != "fp32" else [None, None]
    out = np.empty_like(q)
    status = lib.full_attention(
        np.ascontiguousarray(q), *by_head, out, rows, heads, head, VARIANTS[variant], THREADS,
        *addresses,
    )  # fmt: skip
    check_status(status)
    return out


def pairs(positions: int, chunk: int, variant: str) -> int:
    """The (query, key) pairs the kernel computes on this CPU over a prefill of ``positions`` in
    chunks: each block of query rows (``tile``) meets the keys up to its last row (fp32), or up to
    that rounded up to a whole block of keys (AMX, whose tiles are a fixed size)."""
    rows, keys = tile(variant)
    total = 0
    for start in range(0, positions, chunk):
        end = min(start + chunk, positions)
        for first in range(start, end, rows):
            last = min(first + rows, end) - 1
            seen = last + 1 if variant == "fp32" else -(-(last + 1) // keys) * keys
            total += (last + 1 - first) * seen
    return total
