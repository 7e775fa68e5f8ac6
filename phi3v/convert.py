"""The "fast" precision: integer-GEMM copies of the vision model and of the decoder.

Nearly all of the first answer about a photo is ``MatMulNBits`` (int4, block 32, accuracy level
4), which onnxruntime runs on its AVX-512-VNNI kernel. Its u8s8 integer GEMM
(``MatMulIntegerToFloat``) is faster on the same CPUs: it uses AMX tiles where they exist (about
11x on one decoder projection) and VNNI dot products elsewhere (about 2-3x on an AMD EPYC without
AMX). Where a CPU has neither, the u8s8 kernel clips 16-bit sums, so the copies go to the u8u8
GEMM instead (:func:`stored_for_this_cpu`). docs/PERFORMANCE.md has the measurements,
docs/ARCHITECTURE.md#the-fast-precisions-copies the design. So we rewrite each ``MatMulNBits``
as that GEMM, in the numerics a :class:`~phi3v.integer_gemm.Numerics` names
(:mod:`phi3v.integer_gemm`): int8 weights per output channel, 8-bit activations per row or per
group along K, optionally an online block-Hadamard rotation, optionally some projections left
int4.

Which of these the copies use (:data:`DEFAULT_NUMERICS`) was chosen on trained proxy networks by
KL divergence and top-1 agreement against fp32 activations (bench/accuracy.py,
docs/PERFORMANCE.md); random weights have no outlier channels and cannot show the difference.

The decoder copy is also cut before the LM head to the last position (the prefill needs only its
logits; the LM head itself stays int4). It does prompt processing only; the int4 decoder keeps the
token-by-token steps, which are memory-bound and would read twice the bytes in int8. Both write
the same KV cache. Beside it are its stages: the same graph cut at each attention, so that the
prefill can run our fused causal attention kernel between them (:mod:`phi3v.layered`); their
weights are the copy's own data file.

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
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from phi3v import machine
from phi3v.config import ModelConfig
from phi3v.errors import ModelFolderError, first_line
from phi3v.files import sha256_file
from phi3v.integer_gemm import (
    GemmBuilder,
    Numerics,
    SplitOutputs,
    bias_input,
    constants,
    layer_count,
    projection_role,
)
from phi3v.layered import (
    NotLayerable,
    node_attributes,
    node_reads,
    subgraph_reads,
    write_stages,
    write_vision_stages,
)
from phi3v.results import Progress

CONVERTER_VERSION = 9  # bump when the rewrite changes: every cached copy is then rebuilt
CACHE_FOLDER = ".phi3v-cache"
CACHE_ENV = "PHI3V_CACHE_DIR"
MANIFEST = "manifest.json"
ALIGN = 4096  # external-data offsets on page boundaries, so onnxruntime can map them
INT4_ZERO_POINT = 8  # MatMulNBits' zero point when the node has none


@dataclass(frozen=True)
class FastNumerics:
    """The numerics of the two copies."""

    vision: Numerics = field(default_factory=Numerics)
    decoder: Numerics = field(default_factory=Numerics)


# Chosen on the trained proxies (docs/PERFORMANCE.md, "Accuracy of the fast precision" and "Where
# the fast vision error comes from"): one scale per row had 5x exact's KL on the decoder proxy and
# 4x its feature error on the vision proxy; a Hadamard rotation of 64 brings the decoder to 1.3x.
# On the vision proxy a rotation of 32 is within 5 % of 128's error at a quarter of the cost, but
# leaves 1.8x: half of it is the int8 weights themselves, and most of that sits in the last layers,
# whose rounding reaches the features with no later layer to mix it in. So every projection of
# the last two layers, and attention_out everywhere, carry an int8 remainder weight: 1.49x
# exact's error pooled over draws (the attention projections everywhere, the earlier choice:
# 1.50x) at 1.09x the real-size vision time (1.24x) on a VNNI-only CPU.
DEFAULT_NUMERICS = FastNumerics(
    vision=Numerics(rotation=32, fine_weights=("attention_out",), fine_layers=(-2, -1)),
    decoder=Numerics(rotation=64),
)


def numerics_for_this_cpu(numerics: FastNumerics = DEFAULT_NUMERICS) -> FastNumerics:
    """``numerics`` as this CPU must store them (:func:`stored_for_this_cpu`, both models)."""
    return FastNumerics(stored_for_this_cpu(numerics.vision), stored_for_this_cpu(numerics.decoder))


def stored_for_this_cpu(numerics: Numerics) -> Numerics:
    """``numerics`` with uint8 weights (onnxruntime's u8u8 GEMM) where this CPU has neither
    VNNI nor AMX, whose u8s8 kernel saturates 16-bit pair sums (:mod:`phi3v.integer_gemm`); as
    they are elsewhere. The integer sums, and so the numbers, are the same either way."""
    return replace(numerics, unsigned_weights=True) if machine.u8s8_saturates() else numerics


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


def has_int4_layers(path: Path) -> bool:
    """Whether the ONNX model at ``path`` has int4 ``MatMulNBits`` layers to convert."""
    return any(node.op_type == "MatMulNBits" for node in _load_graph(path).graph.node)


def fast_models(
    config: ModelConfig,
    progress: Callable[[Progress], None] | None = None,
    numerics: FastNumerics | None = None,
) -> FastModels:
    """The integer-GEMM copies for ``config``'s folder, made now if missing or stale, in
    ``numerics`` (by default :data:`DEFAULT_NUMERICS`) as this CPU must store them
    (:func:`numerics_for_this_cpu`)."""
    report = progress or (lambda _: None)
    numerics = numerics_for_this_cpu(numerics or DEFAULT_NUMERICS)
    sources = {
        "vision": config.path(config.vision.filename),
        "decoder": config.path(config.decoder.filename),
    }
    key = _cache_key(sources.values(), numerics, report)
    root = _cache_root(config.model_dir)
    target = root / f"fast-{key}"
    result = FastModels(target / sources["vision"].name, target / sources["decoder"].name)
    _remove_abandoned_work(root)
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
        layers = {
            "decoder": _write_stages(write_stages, work / decoder.name, config.decoder),
            "vision": _write_stages(write_vision_stages, work / vision.name, config.vision),
        }
        _write_manifest(work, numerics, layers)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _remove_abandoned_work(root: Path) -> None:
    """Delete the work folders (``tmp-<key>-<pid>``) of conversions whose process is gone: a
    process killed or stopped at exit mid-way (its conversion runs in a daemon thread in the
    app) never ran its own clean-up, and each such folder holds up to the copies' gigabytes.
    A conversion another live process is making is left alone."""
    for work in root.glob("tmp-*"):
        pid = work.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(work, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# --- the rewrite ------------------------------------------------------------------------------


def convert_model(
    source: Path,
    target: Path,
    numerics: Numerics,
    *,
    last_position_output: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    what: str = "model",
    fold_splits: bool = True,
) -> None:
    """Write ``source`` with its MatMulNBits as integer GEMMs to ``target`` (+ ``.data``).

    With ``last_position_output`` (the decoder's logits) the LM head sees only the last position.
    ``fold_splits=False`` keeps each Split of a projection's output (for the test that folding
    them changes no number).
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
    builder = GemmBuilder(opset, numerics, layer_count(n.name or n.output[0] for n in targets))
    nodes: list[onnx.NodeProto] = []
    converted = {id(node) for node in targets}
    foldable = fold_splits and not numerics.group
    splits = _foldable_splits(old_nodes, graph, targets, initializers, reader) if foldable else {}
    folded = {id(split) for split, _ in splits.values()}
    done = 0
    for node in old_nodes:
        if id(node) in folded:
            continue
        if id(node) not in converted:
            nodes.append(node)
            continue
        report(Progress(f"converting the {what} model", done, len(targets)))
        done += 1
        split = splits.get(id(node), (None, None))[1]
        weights = _dequantize(node, initializers, reader)
        nodes += builder.integer_gemm(node, weights, split)
    report(Progress(f"converting the {what} model", len(targets), len(targets)))
    replaced = {name for node in targets for name in node.input[1:4]}
    replaced |= {bias_input(node) for node in targets if id(node) in splits} - {None}
    kept = [_copy(t) for t in graph.initializer if t.name not in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    used = {name for node in nodes for name in node_reads(node)}
    kept = [tensor for tensor in kept if tensor.name in used]  # e.g. a folded Split's sizes
    graph.initializer.extend(kept + builder.weights)
    graph.initializer.extend(c for c in builder.constants() if c.name in used)
    _write_with_data(model, target, reader)


def int4_weights(source: Path) -> dict[str, np.ndarray]:
    """Each int4 ``MatMulNBits`` of the model at ``source`` as float32 [K, N], by node name
    (for the benchmarks that study the numerics)."""
    model = _load_graph(source)
    reader = _TensorReader(source.parent)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    return {
        node.name or node.output[0]: _dequantize(node, initializers, reader)
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
    }


def _foldable_splits(
    nodes: list[onnx.NodeProto],
    graph: onnx.GraphProto,
    targets: list[onnx.NodeProto],
    initializers: dict[str, TensorProto],
    reader: _TensorReader,
) -> dict[int, tuple[onnx.NodeProto, SplitOutputs]]:
    """The converted projections whose output only a ``Split`` along the last axis reads (the
    decoder's gate/up, the vision encoder's q/k/v), by ``id`` of the projection: each gets a
    GEMM per part, so the Split and its copy go away. ``nodes`` are the graph's nodes as the
    conversion reads them (``targets`` among them); the graph gives its outputs and subgraphs."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    elsewhere = {out.name for out in graph.output}
    elsewhere |= {name for node in graph.node for name in subgraph_reads(node)}
    found = {}
    for node in targets:
        output = node.output[0]
        (split, *others) = readers.get(output, [None])
        if others or output in elsewhere or split is None or split.op_type != "Split":
            continue
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        sizes = _split_sizes(split, initializers, reader)
        if axis != -1 or sizes is None or len(sizes) != len(split.output):
            continue
        bias = bias_input(node)
        bias = reader.array(initializers[bias]) if bias else None
        found[id(node)] = split, SplitOutputs(tuple(split.output), tuple(sizes), bias)
    return found


def _split_sizes(split, initializers, reader) -> list[int] | None:
    """A Split's sizes where they are constant (an initializer input, or the opset < 13
    attribute), else ``None``."""
    if len(split.input) > 1 and split.input[1] in initializers:
        return [int(v) for v in reader.array(initializers[split.input[1]])]
    attribute = next((a for a in split.attribute if a.name == "split"), None)
    return list(attribute.ints) if attribute is not None else None


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
    graph.initializer.extend(constants({"minus_one": [-1], "int_max": [2**62], "axis_one": [1]}))
    return head.output[0] if head.op_type == "MatMulNBits" else None


def _dequantize(
    node: onnx.NodeProto, initializers: dict[str, TensorProto], reader: _TensorReader
) -> np.ndarray:
    """The node's int4 weights as float32 [K, N]."""
    attrs = node_attributes(node)
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
    digest = hashlib.sha256(f"phi3v.convert {CONVERTER_VERSION} {_numerics_key(numerics)}".encode())
    for path in sources:
        for file in (path, data_path(path)):
            if file.exists():
                report(Progress(f"checking {file.name}", 0, 1))
                memo = _cache_root(file.parent) / "hashes.json"
                digest.update(f"{file.name} {sha256_file(file, memo=memo)}".encode())
    return digest.hexdigest()[:16]


def _numerics_key(numerics: FastNumerics) -> str:
    """The numerics as the cache key spells them. Options added later are left out while they
    keep their default, so copies made before an option existed keep their key."""
    key = repr(numerics)
    for default in (", fine_weights=()", ", fine_layers=()", ", unsigned_weights=False"):
        key = key.replace(default, "")
    return key


def _write_stages(write: Callable, copy: Path, config) -> dict:
    """A copy's stages for the fused attention kernel (:mod:`phi3v.layered`), written beside it
    by ``write`` (``write_stages`` or ``write_vision_stages``); the manifest's record of them, or
    of why the copy has none."""
    try:
        plan = write(copy, config)
    except NotLayerable as error:
        return {"stages": 0, "why_not": str(error)}
    return {"stages": len(plan.stages)}


def _write_manifest(folder: Path, numerics: FastNumerics, layers: dict) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    manifest = {
        "converter_version": CONVERTER_VERSION,
        "numerics": asdict(numerics),
        "layers": layers,
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


def data_path(path: Path) -> Path:
    """The external-data file beside the ONNX model at ``path``."""
    return path.with_name(path.name + ".data")
