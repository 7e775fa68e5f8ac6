"""Writing ONNX graphs whose weights stream straight to one external-data file.

Every weight goes from the random generator to ``<model>.onnx.data`` at a 4 KiB-aligned offset
(so onnxruntime can map it) and the graph keeps only a reference, so building a real-size set
needs little memory and never meets protobuf's 2 GB limit. Small shape constants stay inline.
The bytes depend only on the seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
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
