"""The fused attention kernel (``kernels/attention.c``): built on first use, run by ctypes.

The fast prefill's attention where it is asked for (:mod:`phi3v.layered`), and the same blocks
without a mask for the vision encoder's attention (:meth:`AttentionKernel.full`). onnxruntime's
GroupQueryAttention computes every (query, key) pair of a chunk's queries against the cache, the
masked half too, and its tiled path stops late (blocks of ~680 keys); the kernel tiles the
causal triangle in blocks of 64 keys and computes only the blocks that can see something. One
decoder layer over a photo's 1,935 positions took 122 ms against GroupQueryAttention's 204 ms
on a 2-core Xeon, 141 ms against 195 ms on a 2-core EPYC with AVX-512
(``bench/results/attention_forms*.md``), with the same fp32 arithmetic (relative error to
float64 1e-6, as GroupQueryAttention's).

The C file is compiled with the system's C compiler (``$CC``, else ``cc`` or ``gcc``) into
``~/.cache/phi3v/kernels`` the first time it is needed, again only when the source changes. The
library is built without global instruction-set flags, so it loads on any x86-64; at run time
it takes AVX-512 where the CPU has it, else AVX2 and FMA. Where it cannot be built or run (no
compiler, another architecture, a CPU without AVX2) :func:`kernel` raises
:class:`KernelUnavailable` with the reason, and the prefill keeps GroupQueryAttention.

Two numerics (:class:`AttentionKernel`): ``fp32``, the arithmetic above, and ``bf16``, which
rounds Q, K, V and the weights to bf16 and accumulates in fp32, as attention on a GPU does: on
AMX tiles where the CPU has them, else on AVX-512 BF16 dot products (AMD Zen 4, Intel Cooper Lake
and later), twice the fp32 FMA's multiply-adds per instruction. On the trained decoder proxy,
bf16 attention moves the fast copy's distance from truth by a few per cent
(``bench/results/attention_fidelity.md``); it runs with ``PHI3V_FUSED_ATTENTION=bf16``, and by
default on a CPU with AMX tiles (:mod:`phi3v.sessions`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from functools import cache
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
FP32, AMX_BF16, BF16 = 0, 1, 2  # the C file's enum variant
KEYS = 64  # keys per tile of the causal triangle (the C file's KEYS)
AMX_ROWS = 16  # query rows per tile of the AMX variant (the C file's AMX_ROWS)
# The C file's status codes.
ERRORS = {
    -1: "shape not supported (head must be 16 (fp32 only), 32, 64 or 96; heads a multiple of "
    "kv_heads)",
    -2: "AMX bf16 is not available (the CPU lacks it, or Linux refused the tile state)",
    -3: "the CPU lacks AVX-512 with bf16 (avx512_bf16), which the bf16 variants need",
    -4: "out of memory",
    -5: "the CPU lacks AVX2 and FMA (or the OS their registers), which the fp32 variant needs",
}
NO_AVX512, NO_AVX2 = -3, -5
NUMERICS = ("fp32", "bf16")  # what AttentionKernel computes in
HEADS = {"fp32": (16, 32, 64, 96), "bf16": (32, 64, 96)}  # the head sizes each takes (the C file)
_BUILD_LOCK = threading.Lock()


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here: no C compiler, or the CPU (or the OS) lacks what it needs."""


def cache_folder() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/phi3v/kernels`` (``~/.cache`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "phi3v" / "kernels"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc``, else ``gcc``; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (found := shutil.which(name)):
            return found
    return None


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel, built on first use (cached by the source's hash and the compiler)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"the kernel is x86-64 code; this machine is {platform.machine()}")
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler (set CC, or install gcc) to build the kernel")
    digest = hashlib.sha256(SOURCE.read_bytes() + cc.encode()).hexdigest()[:16]
    target = cache_folder() / f"attention-{digest}.so"
    with _BUILD_LOCK:
        if not target.exists():
            _build(cc, target)
    # OpenMP's threads must sleep, not spin, once a call returns: onnxruntime's threads run the
    # next stage on the same cores (spinning made the real model's prefill 2x slower). libgomp
    # reads this when it is loaded, with the library, unless something loaded it before.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    lib = ctypes.CDLL(str(target))
    floats = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    lib.causal_attention.argtypes = [floats] * 4 + [ctypes.c_int] * 8 + [ctypes.c_void_p] * 2
    lib.causal_attention.restype = ctypes.c_int
    lib.full_attention.argtypes = [floats] * 4 + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2
    lib.full_attention.restype = ctypes.c_int
    lib.attention_amx_ready.restype = ctypes.c_int
    lib.attention_bf16_ready.restype = ctypes.c_int
    lib.attention_fp32_rows.restype = ctypes.c_int
    lib.store_chunk.argtypes = [floats] * 4 + [ctypes.c_int] * 6
    lib.store_chunk.restype = ctypes.c_int
    lib.pack_cache.argtypes = [floats] * 2 + [ctypes.c_int] * 6 + [ctypes.c_void_p] * 2
    lib.pack_cache.restype = ctypes.c_int
    return lib


def _build(cc: str, target: Path) -> None:
    """Compile :data:`SOURCE` to ``target``: to a private name first, then renamed, so that two
    processes building at once each end with a whole library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = [cc, "-O3", "-fopenmp", "-shared", "-fPIC", "-o", str(partial), str(SOURCE), "-lm"]
    try:
        built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailable(f"{cc} could not build {SOURCE.name}: {error}") from error
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise KernelUnavailable(f"{cc} could not build {SOURCE.name}:\n{built.stderr.strip()}")
    partial.replace(target)


def check_status(status: int) -> None:
    """Raise :class:`KernelUnavailable` with the reason for a non-zero status of the C file."""
    if status:
        raise KernelUnavailable(ERRORS.get(status, f"the kernel failed with status {status}"))


def amx_ready() -> bool:
    """Whether the AMX variant can run: the CPU has AMX bf16 and Linux grants its tile state."""
    return bool(library().attention_amx_ready())


class AttentionKernel:
    """The kernel, ready to run causal attention over a KV cache (calling it: the decoder's
    prompt) or attention without a mask (:meth:`full`: the vision encoder's) with ``numerics``:

    * ``fp32``: the arithmetic of onnxruntime's GroupQueryAttention, in blocks of ``rows`` query
      rows (32 with AVX-512, 16 with AVX2);
    * ``bf16``: Q, K, V and the softmax's weights rounded to bf16, the products accumulated in
      fp32, the softmax in fp32; on AMX tiles where the CPU has them and Linux grants their
      state, else on AVX-512 BF16 dot products (``vdpbf16ps``).

    The heads are shared among ``threads`` threads. The bf16 variants read bf16 copies of the
    cache's keys and values (the values transposed by 32 keys); one pair of copies, sized for the
    longest cache seen, is reused by every layer and chunk and refilled from the layer's cache on
    each call: keeping every layer's copies from chunk to chunk instead would hold 780 MB more for
    a photo's prompt.
    """

    def __init__(self, numerics: str, threads: int):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
        lib = library()
        self.numerics, self.threads = numerics, threads
        if numerics == "fp32":
            self.rows = lib.attention_fp32_rows()
            if self.rows == 0:
                raise KernelUnavailable(ERRORS[NO_AVX2])
            self.variant = FP32
        else:
            if not lib.attention_bf16_ready():
                raise KernelUnavailable(ERRORS[NO_AVX512])
            self.rows = AMX_ROWS
            self.variant = AMX_BF16 if lib.attention_amx_ready() else BF16
        self._packed: list[np.ndarray] = []  # bf16 K and V^T, [kv_heads, pitch, head] each
        self._by_head_buffers: list[np.ndarray] = []  # full(): fp32 K and V, [heads, rows, head]
        self._lock = threading.Lock()

    def check(self, head: int) -> None:
        """Raise :class:`KernelUnavailable` unless these numerics take heads of ``head`` dims."""
        if head not in HEADS[self.numerics]:
            sizes = ", ".join(map(str, HEADS[self.numerics]))
            raise KernelUnavailable(
                f"the kernel's {self.numerics} numerics take heads of {sizes} dims, not {head}"
            )

    @property
    def name(self) -> str:
        """What runs the prompt's attention, for a status line: e.g. ``fused causal fp32
        (AVX-512)``."""
        return f"fused causal {self.arithmetic}"

    @property
    def arithmetic(self) -> str:
        """The numerics and the instructions: e.g. ``bf16 (AMX)``."""
        if self.variant == AMX_BF16:
            return "bf16 (AMX)"
        if self.variant == BF16:
            return "bf16 (AVX-512)"
        return f"fp32 ({'AVX-512' if self.rows == 32 else 'AVX2'})"

    def __call__(
        self,
        q: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        out: np.ndarray,
        start: int,
        heads: int,
    ) -> None:
        """Attend the queries q [rows, heads * head] at positions [start, start + rows) to the
        cache's keys and values [kv_heads, capacity, head] (which hold them already) up to each
        query's own position; the result into ``out`` [rows, heads * head]."""
        kv_heads, capacity, head = keys.shape
        lib = library()
        if self.variant == FP32:
            status = lib.causal_attention(
                q, keys, values, out, q.shape[0], start, capacity, heads, kv_heads, head, FP32,
                self.threads, None, None,
            )  # fmt: skip
            check_status(status)
            return
        with self._lock:  # one pair of copies: one call at a time
            packed_k, packed_vt = self._copies(kv_heads, capacity, head)
            status = lib.pack_cache(
                keys, values, 0, start, capacity, kv_heads, head, self.threads,
                packed_k.ctypes.data, packed_vt.ctypes.data,
            )  # fmt: skip
            check_status(status)
            status = lib.causal_attention(
                q, keys, values, out, q.shape[0], start, capacity, heads, kv_heads, head,
                self.variant, self.threads, packed_k.ctypes.data, packed_vt.ctypes.data,
            )  # fmt: skip
            check_status(status)

    def full(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, heads: int):
        """Attention without a mask, as the vision encoder's MultiHeadAttention (one key/value
        head per query head): every query of q [rows, heads * head] attends to every key of k
        and value of v [rows, heads * head]; the result into ``out`` [rows, heads * head]. The
        keys and values are laid out by head first, in buffers kept from call to call."""
        rows, width = q.shape
        head = width // heads
        lib = library()
        with self._lock:  # one set of buffers: one call at a time
            keys, values = self._by_head(heads, rows, head)
            self.store(k, v, keys, values, 0)
            packed = [None, None]
            if self.variant != FP32:
                packed = [x.ctypes.data for x in self._copies(heads, rows, head)]
            status = lib.full_attention(
                q, keys, values, out, rows, heads, head, self.variant, self.threads, *packed
            )
            check_status(status)

    def _by_head(self, heads: int, rows: int, head: int) -> list[np.ndarray]:
        """Buffers for keys and values [heads, rows, head]: the kept pair, or a larger one."""
        size = heads * rows * head
        if not self._by_head_buffers or self._by_head_buffers[0].size < size:
            self._by_head_buffers = [aligned(size, np.float32) for _ in range(2)]
        return [x[:size].reshape(heads, rows, head) for x in self._by_head_buffers]

    def _copies(self, kv_heads: int, capacity: int, head: int) -> list[np.ndarray]:
        """The bf16 copies for a cache of this shape: the kept pair, or a larger one."""
        pitch = -(-capacity // KEYS) * KEYS
        size = kv_heads * pitch * head
        if not self._packed or self._packed[0].size < size:
            self._packed = [aligned(size, np.uint16) for _ in range(2)]
        return [x[:size].reshape(kv_heads, pitch, head) for x in self._packed]

    def store(
        self, k: np.ndarray, v: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int
    ) -> None:
        """Write a chunk's keys and values k, v [rows, kv_heads * head] into the cache's
        ``keys``, ``values`` [kv_heads, capacity, head] at positions [start, start + rows),
        on the kernel's threads."""
        kv_heads, capacity, head = keys.shape
        status = library().store_chunk(
            k, v, keys, values, k.shape[0], start, capacity, kv_heads, head, self.threads
        )
        check_status(status)


def aligned(size: int, dtype) -> np.ndarray:
    """An uninitialized 1-D array of ``size`` elements starting on a 64-byte boundary: a tile or
    vector row that crossed two cache lines would cost two reads (numpy promises 16 bytes)."""
    nbytes = size * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip : skip + nbytes].view(dtype)


def kernel(threads: int, numerics: str = "fp32") -> AttentionKernel:
    """The kernel on this machine with ``threads`` threads and ``numerics`` (``fp32`` or
    ``bf16``), or :class:`KernelUnavailable` with the reason it cannot run here."""
    return AttentionKernel(numerics, threads)
