"""phi3v/kernels/attention.c, the fused attention kernel: its output is causal attention, as a
float64 numpy reference computes it, chunk by chunk as the prefill runs it; and attention without
a mask, as the vision encoder's.

Tolerances (inputs standard normal, outputs of order 0.1-1): fp32 accumulates in fp32 and its
exp2 is good to 1e-8, so 2e-6 relative (Frobenius) and 1e-5 largest absolute; the bf16 variants
(AMX tiles, or AVX-512 BF16 dot products) round Q, K, V and the weights to bf16 (8 significant
bits, 2^-9 = 2e-3 relative each), so 1e-2 relative and 5e-2 absolute (measured: 3e-3 and 1e-2).
Skipped without a C compiler or without AVX2 and FMA (fp32 runs on AVX-512 where the CPU has
it, else on AVX2: these tests check whichever this CPU runs); the bf16 tests also need AVX-512
with bf16, the AMX tests AMX tiles.
"""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from phi3v import attention as phi3v_attention
from phi3v.machine import cpu_flags

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "attention_kernel.py"
TOLERANCE = {"fp32": (2e-6, 1e-5), "amx": (1e-2, 5e-2), "bf16": (1e-2, 5e-2)}  # relative, max
# positions, heads, kv_heads, head, chunk: partial query and key blocks, chunk edges inside
# blocks, shared key/value heads, every head size the kernel takes; blocks of 13 rows end inside
# the AVX2 path's groups of rows (6, 6, then 4)
SHAPES = [
    (1, 1, 1, 32, 512),
    (5, 2, 2, 32, 512),
    (70, 4, 1, 64, 32),
    (300, 4, 2, 96, 128),
    (777, 3, 3, 96, 512),
    (200, 2, 2, 64, 7),
    (90, 2, 1, 32, 13),
    (40, 4, 2, 16, 16),  # the tiny test models' heads: fp32 only
]

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="no C compiler (gcc) to build phi3v/kernels/attention.c"
)


@pytest.fixture(scope="module")
def kernel():
    """bench/attention_kernel.py, its library built; skips where the CPU lacks AVX2 and FMA."""
    spec = importlib.util.spec_from_file_location("attention_kernel", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.attention(*inputs(1, 1, 1, 32), head=32, variant="fp32")
    except module.KernelUnavailable as error:
        pytest.skip(f"the kernel cannot run here: {error}")
    return module


def variant_or_skip(kernel, variant: str) -> str:
    if variant == "amx" and not kernel.amx_ready():
        pytest.skip("no AVX-512 and AMX bf16 tiles on this CPU (or Linux refused their state)")
    if variant == "bf16" and not kernel.library().attention_bf16_ready():
        pytest.skip("no AVX-512 with bf16 dot products (avx512_bf16) on this CPU")
    return variant


def inputs(positions: int, heads: int, kv_heads: int, head: int) -> list[np.ndarray]:
    """q [1, S, heads * head], k and v [1, S, kv_heads * head], standard normal fp32."""
    rng = np.random.default_rng(positions * 1000 + heads * 10 + head)
    widths = (heads * head, kv_heads * head, kv_heads * head)
    return [rng.standard_normal((1, positions, w)).astype(np.float32) for w in widths]


def causal_attention(q, k, v, head: int, causal: bool = True) -> np.ndarray:
    """float64 softmax(q kᵀ / sqrt(head)) v, position i over keys 0..i (every key where not
    ``causal``); query head h reads key/value head h // (heads // kv_heads)."""
    positions, heads, kv_heads = q.shape[1], q.shape[2] // head, k.shape[2] // head
    q, k, v = (x[0].astype(np.float64).reshape(positions, -1, head) for x in (q, k, v))
    later = np.triu(np.ones((positions, positions), bool), 1) & causal
    out = np.empty((positions, heads, head))
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = np.where(later, -np.inf, q[:, h] @ k[:, g].T / np.sqrt(head))
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = weights / weights.sum(axis=1, keepdims=True) @ v[:, g]
    return out.reshape(1, positions, -1)


@pytest.mark.parametrize("variant", ["fp32", "amx", "bf16"])
@pytest.mark.parametrize(("positions", "heads", "kv_heads", "head", "chunk"), SHAPES)
def test_equals_causal_attention(kernel, variant, positions, heads, kv_heads, head, chunk):
    q, k, v = inputs(positions, heads, kv_heads, head)
    if head == 16 and variant_or_skip(kernel, variant) != "fp32":
        with pytest.raises(kernel.KernelUnavailable, match="shape not supported"):
            kernel.attention(q, k, v, head, variant, chunk)
        return
    out = kernel.attention(q, k, v, head, variant_or_skip(kernel, variant), chunk)
    exact = causal_attention(q, k, v, head)
    relative, absolute = TOLERANCE[variant]
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < relative
    assert np.abs(out - exact).max() < absolute


@pytest.mark.parametrize("variant", ["fp32", "amx", "bf16"])
def test_the_first_position_sees_only_the_first_value(kernel, variant):
    q, k, v = inputs(40, 2, 2, 64)
    out = kernel.attention(q, k, v, 64, variant_or_skip(kernel, variant), chunk=16)
    np.testing.assert_allclose(out[0, 0], v[0, 0], atol=TOLERANCE[variant][1])


def test_an_unsupported_head_size_is_refused_with_the_reason(kernel):
    with pytest.raises(kernel.KernelUnavailable, match=r"head must be 16 \(fp32 only\), 32"):
        kernel.attention(*inputs(8, 1, 1, 80), head=80, variant="fp32")


def test_fp32_blocks_are_32_rows_with_avx512_and_16_with_avx2(kernel):
    avx512 = {"avx512f", "avx512dq", "avx512bw", "avx512_bf16"} <= cpu_flags()
    assert kernel.tile("fp32") == ((32, 64) if avx512 else (16, 64))
    assert kernel.tile("amx") == kernel.tile("bf16") == (16, 64)


def test_pairs_count_the_tiles_of_the_triangle(kernel):
    # one chunk of 40 positions: fp32 blocks see keys up to their last row, blocks of 32 rows
    # (AVX-512) up to 32 and 40, of 16 rows (AVX2) up to 16, 32 and 40; AMX blocks of 16 rows
    # see whole blocks of 64 keys
    fp32 = {32: 32 * 32 + 8 * 40, 16: 16 * 16 + 16 * 32 + 8 * 40}
    assert kernel.pairs(40, 512, "fp32") == fp32[kernel.tile("fp32")[0]]
    assert kernel.pairs(40, 512, "amx") == kernel.pairs(40, 512, "bf16") == 40 * 64


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_the_products_calls_through_a_kv_cache_are_causal_attention(kernel, numerics):
    """phi3v.attention as the layered prefill calls it: for each chunk, layer after layer, the
    chunk's keys and values stored into the layer's cache (longer than the prompt, its unused
    positions NaN: nothing may read them), then the chunk's queries attended. In bf16 the one
    pair of copies it keeps is refilled from each layer's cache on every call, and grows with
    the cache: a second, longer cache follows on the same kernel."""
    try:
        run = phi3v_attention.kernel(2, numerics)
    except phi3v_attention.KernelUnavailable as error:
        pytest.skip(str(error))
    positions, heads, kv_heads, head = 300, 4, 2, 64
    layers = [inputs(positions + n, heads, kv_heads, head) for n in range(2)]
    layers = [[x[:, :positions] for x in layer] for layer in layers]
    relative, absolute = TOLERANCE[numerics]
    for capacity in (320, 1000):
        caches = [
            [np.full((kv_heads, capacity, head), np.nan, np.float32) for _ in range(2)]
            for _ in layers
        ]
        outs = [np.empty((positions, heads * head), np.float32) for _ in layers]
        for start in range(0, positions, 96):
            end = min(start + 96, positions)
            for (q, k, v), (keys, values), out in zip(layers, caches, outs, strict=True):
                run.store(k[0, start:end], v[0, start:end], keys, values, start)
                rows = np.ascontiguousarray(q[0, start:end])
                run(rows, keys, values, out[start:end], start, heads)
        for (q, k, v), out in zip(layers, outs, strict=True):
            exact = causal_attention(q, k, v, head)[0]
            assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < relative
            assert np.abs(out - exact).max() < absolute


def test_bf16_takes_heads_of_32_64_or_96_dims(kernel):
    try:
        run = phi3v_attention.kernel(2, "bf16")
    except phi3v_attention.KernelUnavailable as error:
        pytest.skip(str(error))
    run.check(96)
    with pytest.raises(phi3v_attention.KernelUnavailable, match="take heads of 32, 64, 96 dims"):
        run.check(16)


# tokens, heads, head: a CLIP crop's 577 tokens (a partial last block of keys and of query rows),
# a single token, and the tiny test models' heads (fp32 only)
FULL_SHAPES = [(577, 3, 64), (1, 1, 32), (70, 2, 96), (33, 2, 16)]


@pytest.mark.parametrize("variant", ["fp32", "amx", "bf16"])
@pytest.mark.parametrize(("tokens", "heads", "head"), FULL_SHAPES)
def test_full_attention_sees_every_key(kernel, variant, tokens, heads, head):
    q, k, v = (x[0] for x in inputs(tokens, heads, heads, head))
    if head == 16 and variant_or_skip(kernel, variant) != "fp32":
        with pytest.raises(kernel.KernelUnavailable, match="shape not supported"):
            kernel.full(q, k, v, head, variant)
        return
    out = kernel.full(q, k, v, head, variant_or_skip(kernel, variant))
    exact = causal_attention(q[None], k[None], v[None], head, causal=False)[0]
    relative, absolute = TOLERANCE[variant]
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < relative
    assert np.abs(out - exact).max() < absolute


@pytest.mark.parametrize("numerics", ["fp32", "bf16"])
def test_the_products_full_calls_reuse_their_buffers_across_sizes(kernel, numerics):
    """AttentionKernel.full as the layered vision model calls it, crop after crop: its key and
    value buffers (and in bf16 their copies) are kept and grow; a short call after a long one
    reads none of the long one's keys."""
    try:
        run = phi3v_attention.kernel(2, numerics)
    except phi3v_attention.KernelUnavailable as error:
        pytest.skip(str(error))
    relative, absolute = TOLERANCE[numerics]
    for tokens in (100, 577, 40):
        q, k, v = (x[0] for x in inputs(tokens, 4, 4, 64))
        out = np.empty_like(q)
        run.full(q, k, v, out, heads=4)
        exact = causal_attention(q[None], k[None], v[None], 64, causal=False)[0]
        assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < relative
        assert np.abs(out - exact).max() < absolute
