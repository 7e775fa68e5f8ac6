"""The KV cache of one conversation: buffers, attention mask, length and capacity.

The cache never leaves onnxruntime's reach: past and present tensors are OrtValues bound through
IOBinding. With ``past_present_share_buffer`` (the released configs' setting) each layer's key and
value live in one buffer [1, kv_heads, capacity, head_size] bound as both the past input and the
present output, and GroupQueryAttention writes the new positions in place; so the cache can be
rewound (keep a prefix) or copied (start from a shared one), and several decoder sessions (the
int4 decoder and its integer-GEMM copy for prompt processing) can write the same buffers.
Otherwise each run's ``present.*`` outputs become the next run's ``past_key_values.*`` inputs.

On Linux a cache's buffers live in one memory file (``memfd``), so a copy of a shared prefix (a
warmed example, frozen once shared) maps that file privately instead of copying it: the copy
reads the prefix's pages and owns a page only once it writes there. Copying a one-photo prefix
of the real model byte by byte takes over a second (1.5 GB, a page fault per 4 KB); the mapping
takes microseconds, and the prefix's memory is held once however many visitors start from it.
"""

from __future__ import annotations

import math
import mmap
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from phi3v.config import DecoderConfig

if TYPE_CHECKING:
    from phi3v.layered import LayeredDecoder

# Prompt positions per decoder call. Bounds the logits of a prefill to [PREFILL_CHUNK, vocab]
# (64 MB, not 128 KB per prompt token), lets Stop land between chunks and progress be shown.
PREFILL_CHUNK = 512


def lazy_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array whose pages take memory only once written, so a cache can reserve room.

    Not ``np.empty``: numpy asks the kernel for transparent huge pages on large arrays, and a
    2 MB page is resident as soon as one byte of it is written. Each head's block of a Phi-3-V
    cache is only ~1.2 MB at 3k positions, so with huge pages the unwritten room would be
    resident too (+0.7 GB measured for 1024 reserved positions). Anonymous mmap memory with huge
    pages declined is what onnxruntime's own allocations get.
    """
    count = math.prod(shape)
    memory = _small_pages(mmap.mmap(-1, max(count * 4, 1)))  # anonymous, zero until written
    return np.frombuffer(memory, dtype=np.float32, count=count).reshape(shape)


def _small_pages(memory: mmap.mmap) -> mmap.mmap:
    """``memory`` with transparent huge pages declined (see :func:`lazy_buffer`), where the
    system has them: a memory file's pages too, where the kernel lets shared memory use them."""
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return memory


class _MemoryFile:
    """Room for ``count`` buffers of ``shape`` in one anonymous memory file, pages allocated only
    once written; each :meth:`buffers` call maps it anew, shared or copy-on-write."""

    def __init__(self, count: int, shape: tuple[int, ...]):
        self.count, self.shape = count, shape
        self.size = max(count * math.prod(shape) * 4, 1)
        self.fd = os.memfd_create("phi3v-kv-cache", os.MFD_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)  # each mapping keeps the file alive on its own
        os.ftruncate(self.fd, self.size)

    def buffers(self, private: bool) -> list[np.ndarray]:
        """The buffers, mapped shared (the file's writer) or private (a copy-on-write copy)."""
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        memory = _small_pages(mmap.mmap(self.fd, self.size, flags=flags))
        per = math.prod(self.shape)
        flat = np.frombuffer(memory, dtype=np.float32, count=self.count * per)
        return [flat[i * per : (i + 1) * per].reshape(self.shape) for i in range(self.count)]


def _allocate(count: int, shape: tuple[int, ...]) -> tuple[_MemoryFile | None, list[np.ndarray]]:
    """``count`` lazily backed buffers of ``shape``, in a memory file where the system has one."""
    if not hasattr(os, "memfd_create"):  # not Linux: anonymous memory, copies copy
        return None, [lazy_buffer(shape) for _ in range(count)]
    file = _MemoryFile(count, shape)
    return file, file.buffers(private=False)


def bytes_per_position(config: DecoderConfig) -> int:
    """Memory one cached position takes: keys and values of every layer, float32."""
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_size * 4


class KVCache:
    """Keys and values of ``length`` positions, with room for ``capacity``."""

    def __init__(
        self,
        config: DecoderConfig,
        capacity: int,
        share_buffer: bool,
        vocab_size: int,
        _view_of: _MemoryFile | None = None,
    ):
        self.config, self.share_buffer, self.vocab_size = config, share_buffer, vocab_size
        self.length = 0
        self._mask = np.ones((1, capacity), dtype=np.int64)
        # Per decoder session: its binding, and its logit rows per run (None: one per input).
        self._bindings: dict[int, tuple[ort.IOBinding, int | None]] = {}
        self._logits: np.ndarray | None = None
        self._frozen = False
        self._file: _MemoryFile | None = None  # set for a cache that writes its own file
        if share_buffer:
            if _view_of is not None:
                self._buffers = _view_of.buffers(private=True)
            else:
                shape = (1, config.num_key_value_heads, capacity, config.head_size)
                count = len(self._names(config.past_names))
                self._file, self._buffers = _allocate(count, shape)
            self._past = [ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
        else:
            empty = (1, config.num_key_value_heads, 0, config.head_size)
            self._buffers = []
            self._past = [
                ort.OrtValue.ortvalue_from_shape_and_type(empty, np.float32)
                for _ in self._names(config.past_names)
            ]

    @property
    def capacity(self) -> int:
        """How many positions the cache can hold."""
        return self._mask.shape[1]

    @property
    def resident_bytes(self) -> int:
        """Memory the written positions take (reserved room is not resident)."""
        return self.length * bytes_per_position(self.config)

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` positions; later runs overwrite the rest."""
        if not self.share_buffer or not 0 <= length <= self.length:
            raise ValueError("only a shared-buffer cache can be rewound, and only backwards")
        self.length = length

    def grown_to(self, capacity: int) -> KVCache:
        """A cache with room for ``capacity`` positions holding this one's; closes this one."""
        bigger = self.copy(capacity, self.length)
        self.close()
        return bigger

    def freeze(self) -> None:
        """Make the cache read-only (a shared prefix): :meth:`run` refuses it from now on, and
        a copy of the same capacity maps its memory copy-on-write instead of copying it."""
        self._frozen = True

    def copy(self, capacity: int, length: int) -> KVCache:
        """A new cache with room for ``capacity`` positions holding this one's first ``length``;
        this one is left as it is (a shared prefix is copied, so no writer reaches it)."""
        if not self.share_buffer or not 0 <= length <= min(self.length, capacity):
            raise ValueError("only a shared-buffer cache can be copied, and only what it holds")
        if self._frozen and self._file is not None and capacity == self.capacity:
            # Copy-on-write: the same layout, and a file nobody writes any more.
            copied = KVCache(self.config, capacity, True, self.vocab_size, _view_of=self._file)
        else:
            copied = KVCache(self.config, capacity, True, self.vocab_size)
            for old, new in zip(self._buffers, copied._buffers, strict=True):
                new[:, :, :length] = old[:, :, :length]
        copied.length = length
        return copied

    def run(
        self,
        session: ort.InferenceSession | LayeredDecoder,
        embeds: np.ndarray,
        run_options: ort.RunOptions | None = None,
    ) -> np.ndarray:
        """Run a decoder on ``embeds`` [1, S, hidden] after the cached positions, append their
        keys and values, and return the logits of the last position [vocab]. The decoder is an
        onnxruntime session, or the fast prefill in layers (:mod:`phi3v.layered`), which runs
        itself on the cache's buffers.

        ``run_options.terminate`` aborts the run; the cache then holds the old positions only.
        """
        if not isinstance(session, ort.InferenceSession):
            return session.extend(self, embeds, run_options)
        new = embeds.shape[1]
        cfg = self.config
        mask = self.mask_for(new)
        binding, fixed_rows = self._binding(session)
        binding.bind_ortvalue_input(cfg.inputs_embeds, ort.OrtValue.ortvalue_from_numpy(embeds))
        binding.bind_ortvalue_input(cfg.attention_mask, ort.OrtValue.ortvalue_from_numpy(mask))
        # Logits land straight in a numpy buffer we own (a graph cut before the LM head gives
        # one row; the released graph gives one per input position).
        rows = fixed_rows or new
        if self._logits is None or self._logits.shape[1] != rows:
            self._logits = np.empty((1, rows, self.vocab_size), np.float32)
        binding.bind_ortvalue_output(cfg.logits, ort.OrtValue.ortvalue_from_numpy(self._logits))
        if not self.share_buffer:
            for name, value in zip(self._names(cfg.past_names), self._past, strict=True):
                binding.bind_ortvalue_input(name, value)
            for name in self._names(cfg.present_names):
                binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding, run_options)
        if not self.share_buffer:
            # Outputs come back in bind order: logits first, then the presents in our order.
            self._past = binding.get_outputs()[1:]
        self.length += new
        return self._logits[0, -1]

    def prefault(self, new: int, threads: int = 2) -> None:
        """Write zeros over the positions the next ``new`` will take, in every layer's buffers,
        before a prefill writes them there.

        The first write to each page of the cache's memory is a page fault. Taken inside the
        prefill, between its operators (onnxruntime writing the present keys and values, or
        the layered prefill's copies), a photo's prompt's faults cost seconds on a fresh cache
        on these VMs; in one pass beforehand, on ``threads`` threads, a fraction of that
        (``bench/results/layered_prefill*.md``). The prefill writes these pages anyway, so no
        memory is added; positions past the capacity are left to :meth:`run` to refuse.
        """
        if not self.share_buffer or self._frozen:
            return
        start, end = self.length, min(self.length + new, self.capacity)
        if end <= start:
            return

        def zero(buffer: np.ndarray) -> None:
            buffer[:, :, start:end] = 0

        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(zero, self._buffers))

    def mask_for(self, new: int) -> np.ndarray:
        """The attention mask [1, length + new] of a run of ``new`` positions, which must fit."""
        if self._frozen:
            raise RuntimeError("a frozen KV cache (a shared prefix) is read-only: run a copy")
        if self.length + new > self.capacity:
            raise RuntimeError("KV cache is full: the generation outgrew its capacity")
        return self._mask[:, : self.length + new]

    def layer_buffers(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer``'s key and value buffers [kv_heads, capacity, head], for a decoder that
        writes them itself (:mod:`phi3v.layered`); a shared-buffer cache only."""
        if not self.share_buffer or self._frozen:
            raise RuntimeError("only a writable shared-buffer cache hands out its buffers")
        return self._buffers[2 * layer][0], self._buffers[2 * layer + 1][0]

    def append(self, new: int, logits: np.ndarray) -> np.ndarray:
        """Record a run that wrote ``new`` positions' keys and values into
        :meth:`layer_buffers` and computed ``logits`` [1, rows, vocab]; the last row's logits."""
        self.mask_for(new)  # the same checks as before the run
        self._logits = logits
        self.length += new
        return logits[0, -1]

    def last_logits(self) -> np.ndarray:
        """The logits of every position of the last run [rows, vocab] (one row for a graph cut
        before the LM head); valid until the next run."""
        if self._logits is None:
            raise RuntimeError("the cache has not run yet")
        return self._logits[0]

    def close(self) -> None:
        """Release the buffers and bindings now rather than at garbage collection."""
        for binding, _ in self._bindings.values():
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        self._bindings, self._past, self._buffers, self._logits = {}, [], [], None
        self._file = None

    def _binding(self, session: ort.InferenceSession) -> tuple[ort.IOBinding, int | None]:
        known = self._bindings.get(id(session))
        if known is None:
            binding = session.io_binding()
            known = self._bindings[id(session)] = binding, _logit_rows(session, self.config.logits)
            if self.share_buffer:  # bound once: past and present are the same buffers
                names = self._names(self.config.past_names)
                for name, value in zip(names, self._past, strict=True):
                    binding.bind_ortvalue_input(name, value)
                names = self._names(self.config.present_names)
                for name, value in zip(names, self._past, strict=True):
                    binding.bind_ortvalue_output(name, value)
        return known

    def _names(self, pattern) -> list[str]:
        return [n for layer in range(self.config.num_hidden_layers) for n in pattern(layer)]


def _logit_rows(session: ort.InferenceSession, name: str) -> int | None:
    """Logit rows per run when the graph fixes them (1 for a graph cut before the LM head)."""
    shape = next(o.shape for o in session.get_outputs() if o.name == name)
    return shape[1] if len(shape) == 3 and isinstance(shape[1], int) else None
