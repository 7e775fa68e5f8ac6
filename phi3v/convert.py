"""The "fast" precision: integer-GEMM copies of the vision model and of the decoder.

Nearly all of the first answer about a photo is ``MatMulNBits`` (int4, block 32, accuracy level
4), which onnxruntime runs on its AVX-512-VNNI kernel. Its u8s8 integer GEMM
(``MatMulIntegerToFloat``) is faster on the same CPUs: it uses AMX tiles where they exist (about
11x on one decoder projection) and VNNI dot products elsewhere (about 2-3x on an AMD EPYC without
AMX); docs/PERFORMANCE.md has the measurements, docs/ARCHITECTURE.md#the-fast-precisions-copies
the design. So we rewrite each ``MatMulNBits`` as:

* weights: the int4 blocks dequantized and requantized to int8 with one scale per output channel
  (the int8 grid is finer than each block's 16 levels, so this adds little error);
* activations: quantized to 8 bits with one symmetric scale (``absmax / 127`` around the zero
  point 128) per row, or per group of columns along K, as :class:`Numerics` says;
* optionally an online block-Hadamard rotation of the activations first (the weights rotated the
  other way at conversion, so the product is unchanged): it spreads an outlier channel over its
  block, so one large value no longer crushes the resolution of every other value in its row;
* optionally, projections of a kind (say the MLP's down projection, whose inputs are the spikiest
  in trained LLMs) left as int4 ``MatMulNBits``.

Which of these the copies use (:data:`DEFAULT_NUMERICS`) was chosen on trained proxy networks by
KL divergence and top-1 agreement against fp32 activations (bench/fidelity.py,
docs/PERFORMANCE.md); random weights have no outlier channels and cannot show the difference.

The decoder copy is also cut before the LM head to the last position (the prefill needs only its
logits; the LM head itself stays int4). It does prompt processing only; the int4 decoder keeps the
token-by-token steps, which are memory-bound and would read twice the bytes in int8. Both write
the same KV cache.

The copies are made once per model folder into ``<model>/.phi3v-cache/fast-<key>/`` (or
``$PHI3V_CACHE_DIR`` where the model folder is read-only), keyed by the source files' sha256, the
numerics and :data:`CONVERTER_VERSION`; written to a temporary folder, checked, then renamed, so a
half-written copy is never used; a stale copy is rebuilt. The downloaded files are only read. The
manifest beside the copies also records the self-check of :mod:`phi3v.fast_check`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from phi3v.config import ModelConfig
from phi3v.errors import ModelFolderError, first_line
from phi3v.files import sha256_file
from phi3v.results import Progress

CONVERTER_VERSION = 4  # bump when the rewrite changes: every cached copy is then rebuilt
CACHE_FOLDER = ".phi3v-cache"
CACHE_ENV = "PHI3V_CACHE_DIR"
MANIFEST = "manifest.json"
ALIGN = 4096  # external-data offsets on page boundaries, so onnxruntime can map them
INT4_ZERO_POINT = 8  # MatMulNBits' zero point when the node has none
INT8_PEAK = 127  # symmetric int8: activations and weights map [-peak, peak] to [-127, 127]
# Reductions take their axes as an input from this ONNX opset on (an attribute before).
AXES_AS_INPUT_FROM = 18

# What a projection does, from its node's name: the genai model builder's decoder names
# (qkv_proj, o_proj, gate_up_proj, down_proj), CLIP's (q/k/v_proj, out_proj, fc1, fc2) and
# DINOv2's (attn/qkv, attn/proj, mlp/fc1, mlp/fc2).
ROLES = {
    "attention_in": r"qkv|q_proj|k_proj|v_proj",
    "attention_out": r"o_proj|out_proj|attn[./_]proj|dense",
    "mlp_in": r"gate_up|gate_proj|up_proj|fc1",
    "mlp_out": r"down_proj|fc2",
}


@dataclass(frozen=True)
class Numerics:
    """How one model's integer-GEMM copy computes its projections.

    ``rotation``: block size of the online Hadamard rotation of each projection's input (0: none;
    a power of two; a projection whose K it does not divide uses the largest power of two that
    does). ``group``: activation columns sharing one scale along K (0: one scale per row over the
    whole K). ``keep_int4``: roles (keys of :data:`ROLES`) whose projections stay ``MatMulNBits``.
    """

    rotation: int = 0
    group: int = 0
    keep_int4: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for size in (self.rotation, self.group):
            if size and size & (size - 1):
                raise ValueError(f"rotation and group sizes are powers of two, got {size}")
        unknown = set(self.keep_int4) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown projection roles {sorted(unknown)}; known: {list(ROLES)}")

    def describe(self) -> str:
        """A short name, e.g. ``"hadamard 64, per row, int4 mlp_out"``."""
        parts = [f"hadamard {self.rotation}"] if self.rotation else []
        parts.append(f"per group of {self.group}" if self.group else "per row")
        parts += [f"int4 {role}" for role in self.keep_int4]
        return ", ".join(parts)


@dataclass(frozen=True)
class FastNumerics:
    """The numerics of the two copies."""

    vision: Numerics = field(default_factory=Numerics)
    decoder: Numerics = field(default_factory=Numerics)


# Chosen on the trained proxies: docs/PERFORMANCE.md, "Accuracy of the fast precision".
DEFAULT_NUMERICS = FastNumerics(vision=Numerics(), decoder=Numerics())


@dataclass(frozen=True)
class FastModels:
    """The integer-GEMM copies (the vision model and the prompt decoder) and their manifest."""

    vision: Path
    decoder: Path

    @property
    def folder(self) -> Path:
        return self.decoder.parent

    def manifest(self) -> dict:
        """The copies' manifest: converter version, numerics, files, and the self-check once run."""
        return json.loads((self.folder / MANIFEST).read_text())

    def record(self, key: str, value: dict) -> None:
        """Add ``key`` to the manifest (written whole to a temporary file, then renamed)."""
        manifest = self.manifest()
        manifest[key] = value
        temporary = self.folder / f"{MANIFEST}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(manifest, indent=1))
        os.replace(temporary, self.folder / MANIFEST)


def projection_role(name: str) -> str:
    """The role (a key of :data:`ROLES`) of the projection named ``name``, or ``"other"``."""
    lowered = name.lower()
    return next((role for role, pattern in ROLES.items() if re.search(pattern, lowered)), "other")


def has_int4_layers(path: Path) -> bool:
    """Whether the ONNX model at ``path`` has int4 ``MatMulNBits`` layers to convert."""
    return any(node.op_type == "MatMulNBits" for node in _load_graph(path).graph.node)


def fast_models(
    config: ModelConfig,
    progress: Callable[[Progress], None] | None = None,
    numerics: FastNumerics = DEFAULT_NUMERICS,
) -> FastModels:
    """The integer-GEMM copies for ``config``'s folder, made now if missing or stale."""
    report = progress or (lambda _: None)
    sources = {
        "vision": config.path(config.vision.filename),
        "decoder": config.path(config.decoder.filename),
    }
    key = _cache_key(sources.values(), numerics, report)
    root = _cache_root(config.model_dir)
    target = root / f"fast-{key}"
    result = FastModels(target / sources["vision"].name, target / sources["decoder"].name)
    if _complete(target):
        return result
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("fast-*"):  # other keys: older sources, numerics or converter versions
        shutil.rmtree(stale, ignore_errors=True)
    work = root / f"tmp-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        vision, decoder = sources["vision"], sources["decoder"]
        convert_model(vision, work / vision.name, numerics.vision, progress=report, what="vision")
        convert_model(
            decoder,
            work / decoder.name,
            numerics.decoder,
            last_position_output=config.decoder.logits,
            progress=report,
            what="decoder",
        )
        _write_manifest(work, numerics)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


# --- the rewrite ------------------------------------------------------------------------------


def convert_model(
    source: Path,
    target: Path,
    numerics: Numerics,
    *,
    last_position_output: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    what: str = "model",
) -> None:
    """Write ``source`` with its MatMulNBits as integer GEMMs to ``target`` (+ ``.data``).

    With ``last_position_output`` (the decoder's logits) the LM head sees only the last position.
    """
    report = progress or (lambda _: None)
    model = _load_graph(source)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 14)
    reader = _TensorReader(source.parent)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    head = _last_position_cut(graph, last_position_output) if last_position_output else None
    old_nodes = [_copy(node) for node in graph.node]
    targets = [node for node in old_nodes if _converts(node, head, numerics)]
    builder = _GemmBuilder(opset)
    nodes: list[onnx.NodeProto] = []
    converted = {id(node) for node in targets}
    for node in old_nodes:
        if id(node) not in converted:
            nodes.append(node)
            continue
        report(Progress(f"converting the {what} model", len(builder.weights) // 2, len(targets)))
        nodes += builder.integer_gemm(node, _dequantize(node, initializers, reader), numerics)
    report(Progress(f"converting the {what} model", len(targets), len(targets)))
    replaced = {name for node in targets for name in node.input[1:4]}
    kept = [_copy(t) for t in graph.initializer if t.name not in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    used = {name for node in nodes for name in node.input}
    graph.initializer.extend(kept + builder.weights)
    graph.initializer.extend(c for c in builder.constants() if c.name in used)
    _write_with_data(model, target, reader)


def _converts(node: onnx.NodeProto, head: str | None, numerics: Numerics) -> bool:
    if node.op_type != "MatMulNBits" or node.output[0] == head:
        return False
    return projection_role(node.name or node.output[0]) not in numerics.keep_int4


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
    graph.initializer.extend(_constants({"minus_one": [-1], "int_max": [2**62], "axis_one": [1]}))
    return head.output[0] if head.op_type == "MatMulNBits" else None


def _dequantize(
    node: onnx.NodeProto, initializers: dict[str, TensorProto], reader: _TensorReader
) -> np.ndarray:
    """The node's int4 weights as float32 [K, N]."""
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
    weights = np.empty((k, n), np.float32)
    for start in range(0, n, 1024):  # a slice of output channels at a time bounds the memory
        rows = slice(start, min(start + 1024, n))
        nibbles = np.stack([codes[rows] & 0x0F, codes[rows] >> 4], axis=-1)  # low nibble first
        values = nibbles.reshape(-1, blocks, block).astype(np.float32) - zero_points[rows]
        weights[:, rows] = (values * scales[rows]).reshape(-1, blocks * block)[:, :k].T
    return weights


def _zero_points(node, initializers, reader, n: int, blocks: int) -> np.ndarray:
    if len(node.input) < 4 or not node.input[3]:
        return np.full((n, 1, 1), INT4_ZERO_POINT, np.float32)
    packed = reader.array(initializers[node.input[3]])
    if packed.dtype != np.uint8:
        raise ModelFolderError(f"{node.name}: float zero points cannot be converted")
    pairs = packed.reshape(n, -1)
    both = np.stack([pairs & 0x0F, pairs >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    return both.astype(np.float32)[:, :, None]


def hadamard(size: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix of ``size`` (a power of two), symmetric."""
    matrix = np.ones((1, 1), np.float64)
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return (matrix / np.sqrt(size)).astype(np.float32)


def fitting_block(size: int, k: int) -> int:
    """The largest power of two that is at most ``size`` and divides ``k`` (1 if none above)."""
    block = size
    while block > 1 and k % block:
        block //= 2
    return block


def quantize_per_channel(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [K, N] -> (int8 [K, N], float32 scale per output channel [N]), symmetric."""
    peak = np.abs(weights).max(axis=0)
    step = np.where(peak > 0, peak / INT8_PEAK, 1.0).astype(np.float32)
    return np.rint(weights / step).astype(np.int8), step


class _GemmBuilder:
    """Makes the integer-GEMM nodes of one model; collects their weights and shared constants."""

    def __init__(self, opset: int):
        self.opset = opset
        self.weights: list[TensorProto] = []
        self._constants: dict[str, np.ndarray] = {
            "tiny": np.array(1e-12, np.float32),
            "inv127": np.array(1 / INT8_PEAK, np.float32),
            "zp128": np.array(128, np.uint8),
            "last_axis": np.array([-1], np.int64),
            "first_axis": np.array([0], np.int64),
            "zero": np.array([0], np.int64),
            "column": np.array([-1, 1], np.int64),
        }

    def constants(self) -> list[TensorProto]:
        return _constants(self._constants)

    def integer_gemm(
        self, node: onnx.NodeProto, weights: np.ndarray, numerics: Numerics
    ) -> list[onnx.NodeProto]:
        """Nodes computing ``node``'s output (float [..., K] -> [..., N]) on the integer GEMM."""
        name, x, y = node.name or node.output[0], node.input[0], node.output[0]
        k, n = weights.shape
        t = _Names(name)
        nodes = [self._node("Reshape", [x, self._const(f"rows_of_{k}", [-1, k])], t("x2"))]
        x2 = t("x2")
        rotation = fitting_block(numerics.rotation, k) if numerics.rotation else 1
        if rotation > 1:
            weights = (hadamard(rotation) @ weights.reshape(k // rotation, rotation, n)).reshape(
                k, n
            )
            self._constants[f"hadamard_{rotation}"] = hadamard(rotation)
            nodes += self._rotation(t, x2, k, rotation)
            x2 = t("rotated")
        group = fitting_block(numerics.group, k) if numerics.group else k
        quantized, channel_scale = quantize_per_channel(weights)
        weight_name, scale_name = f"{name}/weight_int8", f"{name}/channel_scale"
        if group < k:  # [G, g, N]: one GEMM per group, batched
            quantized = quantized.reshape(k // group, group, n)
        self.weights += [
            numpy_helper.from_array(quantized, weight_name),
            numpy_helper.from_array(channel_scale, scale_name),
        ]
        if group < k:
            nodes += self._per_group(t, x2, k, group, weight_name, scale_name)
        else:
            nodes += self._per_row(t, x2, weight_name, scale_name)
        # Back to x's leading dimensions: [..., N].
        nodes += [
            self._node("Shape", [x], t("shape")),
            self._node("Slice", [t("shape"), "phi3v/zero", "phi3v/last_axis"], t("lead")),
            self._node(
                "Concat", [t("lead"), self._const(f"width_{n}", [n])], t("out_shape"), axis=0
            ),
        ]
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        out = t("no_bias") if bias else y
        nodes.append(self._node("Reshape", [t("y2"), t("out_shape")], out))
        if bias:
            # Not MatMulIntegerToFloat's own bias input: with a per-row a_scale, onnxruntime
            # (1.32) scales the bias by it too.
            nodes.append(self._node("Add", [out, bias], y))
        return nodes

    def _rotation(self, t, x2: str, k: int, block: int) -> list[onnx.NodeProto]:
        """x [R, K] -> x @ blockdiag(H) [R, K]: a [R, K/b, b] @ [b, b] fp32 product."""
        blocks = self._const(f"blocks_{k}_{block}", [-1, k // block, block])
        return [
            self._node("Reshape", [x2, blocks], t("blocked")),
            self._node("MatMul", [t("blocked"), f"phi3v/hadamard_{block}"], t("turned")),
            self._node("Reshape", [t("turned"), f"phi3v/rows_of_{k}"], t("rotated")),
        ]

    def _per_row(self, t, x2: str, weight: str, scale: str) -> list[onnx.NodeProto]:
        """[R, K] float -> one symmetric uint8 scale per row -> MatMulIntegerToFloat [R, N].
        Three passes over the activations (max, min, quantize) and none over the output: the
        row and channel scales are applied in the GEMM's output step."""
        return [
            *self._row_scales(t, x2, "scale"),
            self._node("QuantizeLinear", [x2, t("scale"), t("zp")], t("xq"), axis=0),
            self._node("Reshape", [t("scale"), "phi3v/column"], t("scale_column")),
            self._node(
                "MatMulIntegerToFloat",
                [t("xq"), weight, t("scale_column"), scale, "phi3v/zp128"],
                t("y2"),
                domain="com.microsoft",
            ),
        ]

    def _per_group(self, t, x2: str, k: int, group: int, weight, scale) -> list[onnx.NodeProto]:
        """[R, K] -> a scale per row and group of ``group`` columns -> G batched GEMMs, summed.
        Measured for accuracy: its [G, R, N] partial products cost G times the output."""
        groups = k // group
        return [
            self._node(
                "Reshape", [x2, self._const(f"groups_{k}_{group}", [-1, groups, group])], t("xg")
            ),
            self._node("Transpose", [t("xg")], t("gx"), perm=[1, 0, 2]),
            self._node(
                "Reshape", [t("gx"), self._const(f"rows_of_{group}", [-1, group])], t("gx2")
            ),
            *self._row_scales(t, t("gx2"), "scale"),
            self._node("QuantizeLinear", [t("gx2"), t("scale"), t("zp")], t("gq2"), axis=0),
            self._node("Shape", [t("gx")], t("gshape")),
            self._node("Reshape", [t("gq2"), t("gshape")], t("gq")),
            self._node(
                "Reshape",
                [t("scale"), self._const(f"g_column_{groups}", [groups, -1, 1])],
                t("gscale"),
            ),
            self._node(
                "MatMulIntegerToFloat",
                [t("gq"), weight, t("gscale"), scale, "phi3v/zp128"],
                t("partial"),
                domain="com.microsoft",
            ),
            self._node("ReduceSum", [t("partial"), "phi3v/first_axis"], t("y2"), keepdims=0),
        ]

    def _row_scales(self, t, x2: str, out: str) -> list[onnx.NodeProto]:
        """Per row of [R, C]: ``max(|x|) / 127`` (from max and min, no |x| temporary), and a
        matching zero point 128 per row."""
        return [
            self._reduce("ReduceMax", x2, t("high")),
            self._reduce("ReduceMin", x2, t("low")),
            self._node("Neg", [t("low")], t("minus_low")),
            self._node("Max", [t("high"), t("minus_low"), "phi3v/tiny"], t("peak")),
            self._node("Mul", [t("peak"), "phi3v/inv127"], t(out)),
            self._node("Shape", [t(out)], t("rows")),
            self._node("Expand", ["phi3v/zp128", t("rows")], t("zp")),
        ]

    def _reduce(self, op: str, x: str, out: str) -> onnx.NodeProto:
        if self.opset >= AXES_AS_INPUT_FROM:
            return self._node(op, [x, "phi3v/last_axis"], out, keepdims=0)
        return self._node(op, [x], out, axes=[-1], keepdims=0)

    def _const(self, name: str, values) -> str:
        self._constants[name] = np.array(values, np.int64)
        return f"phi3v/{name}"

    @staticmethod
    def _node(op: str, inputs: list[str], output: str, domain: str = "", **attrs):
        return helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs)


class _Names:
    """``t("x")`` -> ``"<node>/x"``: the names of one projection's intermediate tensors."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"


def _constants(values: dict) -> list[TensorProto]:
    return [numpy_helper.from_array(np.asarray(v), f"phi3v/{k}") for k, v in values.items()]


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


def _cache_key(sources, numerics: FastNumerics, report: Callable[[Progress], None]) -> str:
    digest = hashlib.sha256(f"phi3v.convert {CONVERTER_VERSION} {numerics}".encode())
    for path in sources:
        for file in (path, _data_path(path)):
            if file.exists():
                report(Progress(f"checking {file.name}", 0, 1))
                memo = _cache_root(file.parent) / "hashes.json"
                digest.update(f"{file.name} {sha256_file(file, memo=memo)}".encode())
    return digest.hexdigest()[:16]


def _write_manifest(folder: Path, numerics: FastNumerics) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    manifest = {
        "converter_version": CONVERTER_VERSION,
        "numerics": asdict(numerics),
        "made": time.time(),
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole copy: its manifest, and every file at its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and all((folder / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
