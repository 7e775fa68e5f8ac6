"""The fused causal attention kernel (``kernels/attention.c``): built on first use, run by ctypes.

The fast prefill's attention where it is asked for (:mod:`phi3v.layered`). onnxruntime's
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

The kernel's second variant (AMX bf16 tiles, 2x faster again on a Xeon) is measured in
``bench/`` and not used here yet: it keeps bf16 copies of the whole cache across chunks.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("kernels") / "attention.c"
FP32, AMX_BF16 = 0, 1  # the C file's enum variant
KEYS = 64  # keys per tile of the causal triangle (the C file's KEYS)
AMX_ROWS = 16  # query rows per tile of the AMX variant (the C file's AMX_ROWS)
# The C file's status codes.
ERRORS = {
    -1: "shape not supported (head must be 16 (fp32 only), 32, 64 or 96; heads a multiple of "
    "kv_heads)",
    -2: "AMX bf16 is not available (the CPU lacks it, or Linux refused the tile state)",
    -3: "the CPU lacks AVX-512 (with bf16 conversions), which the AMX variant needs",
    -4: "out of memory",
    -5: "the CPU lacks AVX2 and FMA (or the OS their registers), which the fp32 variant needs",
}
NO_AVX2 = -5
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
    lib.attention_amx_ready.restype = ctypes.c_int
    lib.attention_fp32_rows.restype = ctypes.c_int
    lib.store_chunk.argtypes = [floats] * 4 + [ctypes.c_int] * 6
    lib.store_chunk.restype = ctypes.c_int
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


@dataclass(frozen=True)
class CausalAttention:
    """The kernel's fp32 variant, ready to run: ``rows`` query rows per block on this CPU (32
    with AVX-512, 16 with AVX2), the heads shared among ``threads`` threads."""

    rows: int
    threads: int

    @property
    def name(self) -> str:
        """What runs, for a status line: e.g. ``fused causal fp32 (AVX-512)``."""
        return f"fused causal fp32 ({'AVX-512' if self.rows == 32 else 'AVX2'})"

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
        status = library().causal_attention(
            q, keys, values, out, q.shape[0], start, capacity, heads, kv_heads, head, FP32,
            self.threads, None, None,
        )  # fmt: skip
        check_status(status)

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


def kernel(threads: int) -> CausalAttention:
    """The kernel on this machine with ``threads`` threads, or :class:`KernelUnavailable`."""
    rows = library().attention_fp32_rows()
    if rows == 0:
        raise KernelUnavailable(ERRORS[NO_AVX2])
    return CausalAttention(rows=rows, threads=threads)
