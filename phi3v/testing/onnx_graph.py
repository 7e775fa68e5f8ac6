"""Writing ONNX graphs whose weights stream straight to one external-data file.

Every weight goes from the random generator to ``<model>.onnx.data`` at a 4 KiB-aligned offset
(so onnxruntime can map it) and the graph keeps only a reference, so building a real-size set
needs little memory and never meets protobuf's 2 GB limit. Small shape constants stay inline.
The bytes depend only on the seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from phi3v.testing.sizes import WEIGHT_FORMATS

OPSET = 17
IR_VERSION = 10
ALIGN = 4096  # external-data offsets on page boundaries
PRODUCER = "phi3v.testing"

# The cpu-int4 release's quantisation: MatMulNBits, 4-bit RTN, block 32, accuracy level 4.
INT4_BITS = 4
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4
# RMS of (code - 8) for uniform codes 0..15 around MatMulNBits' default zero point 8:
# sqrt(variance 255/12 + squared mean 0.25) = sqrt(21.5).
INT4_CODE_RMS = math.sqrt(21.5)
INT4_MAX_CODE = 2**INT4_BITS - 1

FLOAT, INT64, INT32, BOOL = (
    TensorProto.FLOAT,
    TensorProto.INT64,
    TensorProto.INT32,
    TensorProto.BOOL,
)


def value(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    """A graph input or output declaration."""
    return helper.make_tensor_value_info(name, dtype, shape)


def rng(seed: int, stream: int) -> np.random.Generator:
    """One independent random stream per model, so each file depends only on (seed, stream)."""
    # SFC64: its raw output (2.3 GB of int4 codes for the real size) comes at ~3 GB/s
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, stream])))


@dataclass(frozen=True)
class Int4Weights:
    """A [k, n] weight in MatMulNBits' int4 form: codes [n, k/32, 16] (two per byte, low nibble
    first), scales [n * k/32] and zero_points [n * k/64] (two per byte, low nibble first)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    n: int


def quantize_int4(weight: np.ndarray) -> Int4Weights:
    """Asymmetric round-to-nearest int4 of a [k, n] fp32 weight, per column and block of 32 rows.

    As onnxruntime's blockwise quantizer does it: each block's range is widened to include 0,
    scale = range / 15, zero point = round(-min / scale), codes = clip(round(w / scale) + zp).
    """
    k, n = weight.shape
    if k % INT4_BLOCK or (k // INT4_BLOCK) % 2:
        raise ValueError(f"int4 weights need K (here {k}) to be a multiple of {2 * INT4_BLOCK}")
    blocks = weight.T.reshape(n, k // INT4_BLOCK, INT4_BLOCK).astype(np.float32)
    low = np.minimum(blocks.min(axis=2), 0.0)
    high = np.maximum(blocks.max(axis=2), 0.0)
    scales = (high - low) / INT4_MAX_CODE
    scales[scales == 0] = 1.0  # an all-zero block: any scale gives codes equal to the zero point
    zero_points = np.clip(np.round(-low / scales), 0, INT4_MAX_CODE).astype(np.uint8)
    codes = np.round(blocks / scales[..., None]) + zero_points[..., None]
    codes = np.clip(codes, 0, INT4_MAX_CODE).astype(np.uint8)
    return Int4Weights(
        codes=_pack_nibbles(codes),
        scales=scales.reshape(-1),
        zero_points=_pack_nibbles(zero_points).reshape(-1),
        k=k,
        n=n,
    )


def dequantize_int4(weights: Int4Weights) -> np.ndarray:
    """The [k, n] fp32 weight MatMulNBits computes with: (code - zero_point) * scale."""
    codes = _unpack_nibbles(weights.codes).astype(np.float32)  # [n, blocks, 32]
    blocks = weights.k // INT4_BLOCK
    zero_points = _unpack_nibbles(weights.zero_points.reshape(weights.n, -1))[:, :blocks]
    scales = weights.scales.reshape(weights.n, blocks)
    values = (codes - zero_points[..., None]) * scales[..., None]
    return values.reshape(weights.n, weights.k).T


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[..., 2m] values 0..15 -> [..., m] bytes, the even-indexed value in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)


class WeightFile:
    """Appends arrays to one external-data file; hands back TensorProtos that point at them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def __enter__(self) -> WeightFile:
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        """Write ``array`` at the next aligned offset; return an external-data tensor for it."""
        padding = -self.offset % ALIGN
        self.file.write(b"\0" * padding)
        self.offset += padding
        data = np.ascontiguousarray(array)
        self.file.write(data.data)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(data.dtype)
        tensor.dims.extend(data.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, text in (
            ("location", self.path.name),
            ("offset", str(self.offset)),
            ("length", str(data.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, text
        self.offset += data.nbytes
        return tensor


class Graph:
    """The nodes and initializers of one graph, with the random weights that go into it.

    ``weight()`` streams a tensor to the WeightFile; ``const()`` keeps a small constant inline
    (shapes, axes); ``linear()`` adds a projection in the graph's weight format. A graph without
    a WeightFile or generator (a Loop or If body) only holds nodes and constants.
    """

    def __init__(
        self,
        weights: WeightFile | None = None,
        generator: np.random.Generator | None = None,
        *,
        weight_format: str = "float",
    ):
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, not {weight_format!r}")
        self.weights, self.rng, self.weight_format = weights, generator, weight_format
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.weights.add(name, array))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small inline constant, shared between users of the same value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/constants/{array.dtype.name}/{list(array.shape)}/{array.tolist()}"
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def op(self, op_type: str, name: str, inputs, *, outputs=None, n_out=1, domain="", **attrs):
        """Add a node; its outputs are ``outputs`` or ``<name>/output_<k>``, as genai names them."""
        outputs = outputs or [f"{name}/output_{k}" for k in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outputs, name=name, domain=domain, **attrs)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def normal(self, shape, std: float) -> np.ndarray:
        values = self.rng.standard_normal(shape, dtype=np.float32)
        values *= std  # in place: the real embedding table alone is 394 MB
        return values

    def linear(
        self,
        name: str,
        x: str,
        k: int,
        n: int,
        *,
        gain: float = 1.0,
        column_gains: np.ndarray | None = None,
        bias: bool = False,
        output: str | None = None,
    ) -> str:
        """``x @ W (+ b)`` for a random W [k, n] whose output columns have RMS ~gain / sqrt(k).

        So unit-scale inputs give outputs of RMS ~gain; ``column_gains`` [n] rescales single
        outputs. "float" weights are an fp32 ``MatMul`` (``<name>.weight`` [k, n]); "int4" ones a
        ``MatMulNBits`` as the cpu-int4 release has them (see ``_int4_inputs``).
        """
        outputs = [output] if output else None
        node = f"{name}/MatMulNBits" if self.weight_format == "int4" else f"{name}/MatMul"
        bias_name = f"{name}.bias"
        if self.weight_format == "int4":
            inputs = [x, *self._int4_inputs(name, k, n, gain, column_gains)]
            if bias:  # input 5, after the empty zero_points and g_idx
                inputs += ["", "", self.weight(bias_name, self.normal((n,), 0.02))]
            return self.op(
                "MatMulNBits",
                node,
                inputs,
                outputs=outputs,
                domain="com.microsoft",
                K=k,
                N=n,
                bits=INT4_BITS,
                block_size=INT4_BLOCK,
                accuracy_level=INT4_ACCURACY_LEVEL,
            )
        w = self.normal((k, n), gain / math.sqrt(k))
        if column_gains is not None:
            w *= column_gains
        if not bias:
            return self.op("MatMul", node, [x, self.weight(f"{name}.weight", w)], outputs=outputs)
        product = self.op("MatMul", node, [x, self.weight(f"{name}.weight", w)])
        b = self.weight(bias_name, self.normal((n,), 0.02))
        return self.op("Add", f"{name}/Add", [product, b], outputs=outputs)

    def quantized_linear(
        self,
        name: str,
        x: str,
        weight: np.ndarray,
        *,
        accuracy_level: int = INT4_ACCURACY_LEVEL,
        output: str | None = None,
    ) -> str:
        """``x @ weight`` for a given fp32 ``weight`` [k, n], as an asymmetric int4 MatMulNBits
        (block 32, uint8 zero points; see ``quantize_int4``) at ``accuracy_level``."""
        q = quantize_int4(weight)
        inputs = [
            x,
            self.weight(f"{name}.qweight", q.codes),
            self.weight(f"{name}.scales", q.scales),
            self.weight(f"{name}.qzeros", q.zero_points),
        ]
        return self.op(
            "MatMulNBits",
            f"{name}/MatMulNBits",
            inputs,
            outputs=[output] if output else None,
            domain="com.microsoft",
            K=q.k,
            N=q.n,
            bits=INT4_BITS,
            block_size=INT4_BLOCK,
            accuracy_level=accuracy_level,
        )

    def _int4_inputs(self, name: str, k: int, n: int, gain: float, column_gains) -> list[str]:
        """MatMulNBits' B and scales: random codes, scales giving columns of RMS gain / sqrt(k).

        B is uint8 [n, k/32, 16]: two 4-bit codes per byte, low nibble first, uniform random;
        no zero_points, so the default 8 applies. scales [n * k/32] have a random sign and an RMS
        of gain / (INT4_CODE_RMS * sqrt(k)), so each dequantised column has mean ~0.
        """
        if k % INT4_BLOCK:
            raise ValueError(
                f"{name}: int4 weights need K (here {k}) to be a multiple of the block size "
                f"{INT4_BLOCK}; use weights='float' or change the model size"
            )
        blocks = k // INT4_BLOCK
        codes = self.rng.bit_generator.random_raw(n * k // 16).view(np.uint8)
        codes = codes.reshape(n, blocks, INT4_BLOCK * INT4_BITS // 8)
        rms = gain / (INT4_CODE_RMS * math.sqrt(k))
        # uniform on [-1, 1) has RMS 1/sqrt(3)
        scales = self.rng.random((n, blocks), dtype=np.float32) * 2 - 1
        scales *= rms * math.sqrt(3)
        if column_gains is not None:
            scales *= column_gains[:, None]
        return [
            self.weight(f"{name}.qweight", codes),
            self.weight(f"{name}.scales", scales.reshape(-1)),
        ]

    def body(self, name: str, inputs, outputs) -> onnx.GraphProto:
        """This graph as the body of a Loop or If."""
        return helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(
            self.body(name, inputs, outputs), opset_imports=opsets, producer_name=PRODUCER
        )
        model.ir_version = IR_VERSION
        return model


def projection_model(path: Path, name: str, k: int, n: int, leading=("rows",)) -> Path:
    """One int4 ``MatMulNBits`` projection, K -> N, as a model file at ``path`` (weights in
    ``<path>.data``): input ``x`` [*leading, K], output ``y`` [*leading, N]. For the converter's
    tests and benchmarks."""
    with WeightFile(path.with_name(path.name + ".data")) as weights:
        graph = Graph(weights, rng(0, 0), weight_format="int4")
        graph.linear(name, "x", k, n, output="y")
        model = graph.model(
            "projection",
            [value("x", TensorProto.FLOAT, [*leading, k])],
            [value("y", TensorProto.FLOAT, [*leading, n])],
        )
    path.write_bytes(model.SerializeToString())
    return path
