"""The "fast" precision: integer-GEMM copies of the vision model and of the decoder.

Nearly all of the first answer about a photo is ``MatMulNBits`` (int4, block 32, accuracy level
4), which onnxruntime runs on its AVX-512-VNNI kernel. Its u8s8 integer GEMM
(``MatMulIntegerToFloat``, ``DynamicQuantizeMatMul``) is faster on the same CPUs: it uses AMX tiles
where they exist (about 11x on one decoder projection, shared/docs/prefill-amx.md) and VNNI dot
products elsewhere (about 2-3x on an AMD EPYC without AMX, bench/results/prefill_forms.md).
So we rewrite each ``MatMulNBits`` as:

* weights: the int4 blocks dequantized and requantized to int8 with one scale per output channel
  (the int8 grid is finer than each block's 16 levels, so this adds little error);
* activations: quantized per row (per token) with a symmetric scale, ``absmax / 127`` around the
  zero point 128, then ``MatMulIntegerToFloat`` (the channel scales applied in the GEMM's output
  step) and the row scales applied to its float result. One
  scale per tensor (``DynamicQuantizeMatMul``) is the other form (``ACTIVATION_SCALES``); a
  single outlier token or channel crushes the others' resolution under it, and LLM activations
  have both. docs/PERFORMANCE.md has the measured speed and error of both.

The decoder copy is also cut before the LM head to the last position (the prefill needs only its
logits; the LM head itself stays int4). It does prompt processing only; the int4 decoder keeps the
token-by-token steps, which are memory-bound and would read twice the bytes in int8. Both write
the same KV cache.

The copies are made once per model folder into ``<model>/.phi3v-cache/fast-<key>/`` (or
``$PHI3V_CACHE_DIR`` where the model folder is read-only), keyed by the source files' sha256 and
:data:`CONVERTER_VERSION`; written to a temporary folder, checked, then renamed, so a half-written
copy is never used; a stale copy is rebuilt. The downloaded files are only read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from phi3v.config import ModelConfig
from phi3v.errors import ModelFolderError, PromptError, first_line
from phi3v.results import Progress

PRECISIONS = ("exact", "fast", "auto")
CONVERTER_VERSION = 3  # bump when the rewrite changes: every cached copy is then rebuilt
ACTIVATION_SCALES = "row"  # "row" (per token) or "tensor"; chosen in docs/PERFORMANCE.md
CACHE_FOLDER = ".phi3v-cache"
CACHE_ENV = "PHI3V_CACHE_DIR"
MANIFEST = "manifest.json"
ALIGN = 4096  # external-data offsets on page boundaries, so onnxruntime can map them
INT4_ZERO_POINT = 8  # MatMulNBits' zero point when the node has none
# Integer-GEMM matrix units, or VNNI dot products: where the fast path was measured to win.
FAST_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
# Memory "auto" leaves free beyond the copies: the KV cache and activations of an image prompt.
FAST_HEADROOM_BYTES = 4 << 30


@dataclass(frozen=True)
class FastModels:
    """The integer-GEMM copies: the vision model and the prompt decoder."""

    vision: Path
    decoder: Path


def choose_precision(precision: str, config: ModelConfig) -> str:
    """Resolve "auto" to "fast" or "exact" for this CPU, memory and model set."""
    if precision not in PRECISIONS:
        raise PromptError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "exact":
        return "exact"
    sources = _int4_sources(config)
    if precision == "fast":
        if not sources:
            raise PromptError(
                f"{config.model_dir.name} has no int4 MatMulNBits layers to convert; "
                "use precision='exact'"
            )
        return "fast"
    needed = int(1.6 * sum(_data_size(path) for path in sources)) + FAST_HEADROOM_BYTES
    fast = bool(sources) and cpu_has_fast_gemm() and available_memory() >= needed
    return "fast" if fast else "exact"


def cpu_has_fast_gemm() -> bool:
    """Whether this CPU has AMX or VNNI integer units (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in FAST_CPU_FLAGS)


def fast_models(
    config: ModelConfig, progress: Callable[[Progress], None] | None = None
) -> FastModels:
    """The integer-GEMM copies for ``config``'s folder, made now if missing or stale."""
    report = progress or (lambda _: None)
    sources = {
        "vision": config.path(config.vision.filename),
        "decoder": config.path(config.decoder.filename),
    }
    key = _cache_key(sources.values(), report)
    root = _cache_root(config.model_dir)
    target = root / f"fast-{key}"
    result = FastModels(target / sources["vision"].name, target / sources["decoder"].name)
    if _complete(target):
        return result
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("fast-*"):  # other keys: older sources or converter versions
        shutil.rmtree(stale, ignore_errors=True)
    work = root / f"tmp-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        logits = config.decoder.logits
        _convert(sources["vision"], work / sources["vision"].name, None, report, "vision")
        _convert(sources["decoder"], work / sources["decoder"].name, logits, report, "decoder")
        _write_manifest(work)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


# --- the rewrite ------------------------------------------------------------------------------


def _convert(
    source: Path,
    target: Path,
    last_position_output: str | None,
    report: Callable[[Progress], None],
    what: str,
) -> None:
    """Write ``source`` with every MatMulNBits as an integer GEMM to ``target`` (+ its data)."""
    model = _load_graph(source)
    graph = model.graph
    reader = _TensorReader(source.parent)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    head = _last_position_cut(graph, last_position_output) if last_position_output else None
    old_nodes = [_copy(node) for node in graph.node]
    targets = [n for n in old_nodes if n.op_type == "MatMulNBits" and n.output[0] != head]
    nodes: list[onnx.NodeProto] = []
    new_weights: list[TensorProto] = []
    done = 0
    for node in old_nodes:
        if node.op_type != "MatMulNBits" or node.output[0] == head:
            nodes.append(node)
            continue
        report(Progress(f"converting the {what} model", done, len(targets)))
        weight, scale = _requantize(node, initializers, reader)
        nodes += _integer_gemm(node, weight, scale, new_weights)
        done += 1
    report(Progress(f"converting the {what} model", done, len(targets)))
    replaced = {name for n in targets for name in n.input[1:4]}
    kept = [_copy(t) for t in graph.initializer if t.name not in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_weights)
    used = {name for node in nodes for name in node.input}
    graph.initializer.extend(c for c in _integer_gemm_constants() if c.name in used)
    _write_with_data(model, target, reader)


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _last_position_cut(graph: onnx.GraphProto, logits: str) -> str | None:
    """Feed the LM head (the node making ``logits``) only the last position's hidden state;
    the name of its output when it is a MatMulNBits (which then stays int4: one row)."""
    head = next((n for n in graph.node if logits in n.output), None)
    if head is None:
        raise ModelFolderError(f"the decoder has no node making {logits!r}; re-download it")
    hidden = head.input[0]
    last = f"{hidden}/last_position"
    cut = helper.make_node(
        "Slice",
        [hidden, "phi3v/minus_one", "phi3v/int_max", "phi3v/axis_one"],
        [last],
        name="phi3v/last_position",
    )
    graph.node.insert(list(graph.node).index(head), cut)
    head.input[0] = last
    for output in graph.output:
        if output.name == logits:
            dims = output.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_param")
                dims[1].dim_value = 1
    return head.output[0] if head.op_type == "MatMulNBits" else None


def _requantize(
    node: onnx.NodeProto, initializers: dict[str, TensorProto], reader: _TensorReader
) -> tuple[np.ndarray, np.ndarray]:
    """The node's int4 weights as int8 [K, N] with one float32 scale per output channel."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    if bits != 4 or len(node.input) > 4 and node.input[4]:
        raise ModelFolderError(
            f"{node.name}: only 4-bit MatMulNBits without g_idx can be converted; "
            "use precision='exact'"
        )
    blocks = -(-k // block)
    codes = reader.array(initializers[node.input[1]]).reshape(n, blocks, block // 2)
    scales = reader.array(initializers[node.input[2]]).astype(np.float32).reshape(n, blocks, 1)
    zero_points = _zero_points(node, initializers, reader, n, blocks)
    quantized = np.empty((k, n), np.int8)
    channel_scales = np.empty(n, np.float32)
    for start in range(0, n, 1024):  # a slice of output channels at a time bounds the memory
        rows = slice(start, min(start + 1024, n))
        nibbles = np.stack([codes[rows] & 0x0F, codes[rows] >> 4], axis=-1)  # low nibble first
        values = nibbles.reshape(-1, blocks, block).astype(np.float32) - zero_points[rows]
        weights = (values * scales[rows]).reshape(-1, blocks * block)[:, :k]
        peak = np.abs(weights).max(axis=1)
        step = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
        quantized[:, rows] = np.rint(weights / step[:, None]).astype(np.int8).T
        channel_scales[rows] = step
    return quantized, channel_scales


def _zero_points(node, initializers, reader, n: int, blocks: int) -> np.ndarray:
    if len(node.input) < 4 or not node.input[3]:
        return np.full((n, 1, 1), INT4_ZERO_POINT, np.float32)
    packed = reader.array(initializers[node.input[3]])
    if packed.dtype != np.uint8:
        raise ModelFolderError(f"{node.name}: float zero points cannot be converted")
    pairs = packed.reshape(n, -1)
    both = np.stack([pairs & 0x0F, pairs >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    return both.astype(np.float32)[:, :, None]


def _integer_gemm(
    node: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray, new_weights: list[TensorProto]
) -> list[onnx.NodeProto]:
    """Nodes computing ``node``'s output with int8 weights and quantized activations."""
    name, x, y = node.name or node.output[0], node.input[0], node.output[0]
    weight_name, scale_name = f"{name}/weight_int8", f"{name}/channel_scale"
    new_weights += [numpy_helper.from_array(weight, weight_name)]
    new_weights += [numpy_helper.from_array(scale, scale_name)]
    bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
    out = f"{name}/no_bias" if bias else y
    if ACTIVATION_SCALES == "tensor":
        nodes = [
            helper.make_node(
                "DynamicQuantizeMatMul",
                [x, weight_name, scale_name],
                [out],
                name=f"{name}/dqmatmul",
                domain="com.microsoft",
            )
        ]
    else:

        def t(suffix: str) -> str:
            return f"{name}/{suffix}"

        nodes = [
            helper.make_node("Abs", [x], [t("abs")], name=t("abs")),
            helper.make_node("ReduceMax", [t("abs")], [t("peak")], name=t("peak"), axes=[-1]),
            helper.make_node("Max", [t("peak"), "phi3v/tiny"], [t("peak1")], name=t("peak1")),
            helper.make_node("Mul", [t("peak1"), "phi3v/inv127"], [t("rs")], name=t("rs")),
            helper.make_node("Div", [x, t("rs")], [t("xs")], name=t("xs")),
            helper.make_node(
                "QuantizeLinear", [t("xs"), "phi3v/one", "phi3v/zp128"], [t("xq")], name=t("xq")
            ),
            # (xq - 128) @ weight * channel scale, in float: the scaling is fused into the
            # GEMM's output step, one pass over [rows, N] fewer than MatMulInteger + Cast + Mul.
            helper.make_node(
                "MatMulIntegerToFloat",
                [t("xq"), weight_name, "phi3v/one", scale_name, "phi3v/zp128"],
                [t("yc")],
                name=t("mm"),
                domain="com.microsoft",
            ),
            helper.make_node("Mul", [t("yc"), t("rs")], [out], name=t("yr")),
        ]
    if bias:
        nodes.append(helper.make_node("Add", [out, bias], [y], name=f"{name}/bias"))
    return nodes


def _integer_gemm_constants() -> list[TensorProto]:
    return [
        numpy_helper.from_array(np.array(1e-12, np.float32), "phi3v/tiny"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "phi3v/inv127"),
        numpy_helper.from_array(np.array(1.0, np.float32), "phi3v/one"),
        numpy_helper.from_array(np.array(128, np.uint8), "phi3v/zp128"),
        numpy_helper.from_array(np.array([-1], np.int64), "phi3v/minus_one"),
        numpy_helper.from_array(np.array([2**62], np.int64), "phi3v/int_max"),
        numpy_helper.from_array(np.array([1], np.int64), "phi3v/axis_one"),
    ]


# --- reading and writing tensors ------------------------------------------------------------


class _TensorReader:
    """Initializer values, from the proto or memory-mapped from their external data file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._maps: dict[str, np.memmap] = {}

    def raw(self, tensor: TensorProto) -> memoryview | bytes:
        if tensor.data_location != TensorProto.EXTERNAL:
            return tensor.raw_data if tensor.HasField("raw_data") else b""
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info["location"]
        if location not in self._maps:
            self._maps[location] = np.memmap(self.folder / location, dtype=np.uint8, mode="r")
        offset = int(info.get("offset", 0))
        length = int(info.get("length", len(self._maps[location]) - offset))
        return memoryview(self._maps[location][offset : offset + length])

    def array(self, tensor: TensorProto) -> np.ndarray:
        if tensor.data_location != TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
            return numpy_helper.to_array(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(self.raw(tensor), dtype=dtype).reshape(tuple(tensor.dims))


def _write_with_data(model: onnx.ModelProto, target: Path, reader: _TensorReader) -> None:
    """Save ``model`` with every initializer of 1 KiB or more in ``<target>.data``."""
    data_name = f"{target.name}.data"
    with open(target.parent / data_name, "wb") as data:
        for tensor in _all_initializers(model.graph):
            raw = reader.raw(tensor) if tensor.data_location == TensorProto.EXTERNAL else None
            if raw is None:
                if len(tensor.raw_data) < 1024:
                    continue
                raw = tensor.raw_data
            data.seek(-(-data.tell() // ALIGN) * ALIGN)
            offset = data.tell()
            data.write(raw)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", len(raw))):
                tensor.external_data.add(key=key, value=str(value))
        data.flush()
        os.fsync(data.fileno())
    target.write_bytes(model.SerializeToString())


def _all_initializers(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """The graph's initializers and those of its subgraphs (If branches, Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_initializers(subgraph)


# --- the cache --------------------------------------------------------------------------------


def _cache_root(model_dir: Path) -> Path:
    if override := os.environ.get(CACHE_ENV):
        return Path(override) / hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    if os.access(model_dir, os.W_OK):
        return model_dir / CACHE_FOLDER
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return home / "phi3v" / hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]


def _cache_key(sources, report: Callable[[Progress], None]) -> str:
    digest = hashlib.sha256(f"phi3v.convert {CONVERTER_VERSION} {ACTIVATION_SCALES}".encode())
    for path in sources:
        for file in (path, _data_path(path)):
            if file.exists():
                report(Progress(f"checking {file.name}", 0, 1))
                digest.update(f"{file.name} {_file_sha256(file)}".encode())
    return digest.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered beside the cache by (size, mtime) so it is hashed once."""
    memo_path = _cache_root(path.parent) / "hashes.json"
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    memo: dict = {}
    with contextlib.suppress(OSError, ValueError):
        memo = json.loads(memo_path.read_text())
    if memo.get(path.name, {}).get("stamp") == stamp:
        return memo[path.name]["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    memo[path.name] = {"stamp": stamp, "sha256": digest.hexdigest()}
    with contextlib.suppress(OSError):
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        memo_path.write_text(json.dumps(memo, indent=1))
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    manifest = {"converter_version": CONVERTER_VERSION, "made": time.time(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole copy: its manifest, and every file at its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and all((folder / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _int4_sources(config: ModelConfig) -> list[Path]:
    paths = [config.path(config.vision.filename), config.path(config.decoder.filename)]
    return [path for path in paths if any(_nbits_nodes(path))]


def _nbits_nodes(path: Path) -> Iterator[onnx.NodeProto]:
    model = _load_graph(path)
    return (node for node in model.graph.node if node.op_type == "MatMulNBits")


def _load_graph(path: Path) -> onnx.ModelProto:
    """The model's graph without its weights; a file that is not an ONNX model is our error."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, OSError, onnx's own checks
        raise ModelFolderError(
            f"could not load {path} as an ONNX model ({first_line(err)}); the file is damaged: "
            "re-download the model set"
        ) from err


def _data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def _data_size(path: Path) -> int:
    data = _data_path(path)
    return data.stat().st_size if data.exists() else path.stat().st_size


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or the physical memory if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
