"""The integer-GEMM form of one int4 projection, in the numerics a :class:`Numerics` names.

Given a ``MatMulNBits`` node's weights (dequantized to float [K, N]), :class:`GemmBuilder` writes
the nodes computing the same product on onnxruntime's u8s8 GEMM (``MatMulIntegerToFloat``):

* weights: int8 with one scale per output channel (the int8 grid is finer than each int4 block's
  16 levels, so this adds little error);
* activations: 8 bits with one symmetric scale (``absmax / 127`` around the zero point 128) per
  row, or per group of columns along K;
* optionally an online block-Hadamard rotation of the activations first, the weights rotated the
  other way here, so the product is unchanged while an outlier channel's energy is spread over
  its block instead of crushing the resolution of every other value in its row;
* optionally, for the roles :attr:`Numerics.fine_weights` names and every projection of the
  layers :attr:`Numerics.fine_layers` names, an int8 remainder weight beside the int8 one
  (``w ~ q * s + r * s2``, :func:`quantize_with_remainder`): a second GEMM on the same quantized
  activations, which makes the weights about as exact as the int4 ones at twice that
  projection's GEMM time;
* on CPUs without VNNI dot products, the same int8 weights stored as uint8 around a zero point
  of 128 (:attr:`Numerics.unsigned_weights`), so that onnxruntime runs its u8u8 GEMM: its u8s8
  kernel there adds each pair of u8 x s8 products into 16 bits with saturation
  (``vpmaddubsw``), which clips sums above 32,767 and made the error of one projection 6x larger
  on an AVX2-only CPU (docs/PERFORMANCE.md). The u8u8 kernel widens to 16 bits first; its
  integer sums are exactly those of the int8 form, so the copy computes what a VNNI or AMX CPU
  computes.

Every node is valid from ONNX opset 14 (the released models' opset) upward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT8_PEAK = 127  # symmetric int8: activations and weights map [-peak, peak] to [-127, 127]
# Reductions take their axes as an input from this ONNX opset on (an attribute before).
AXES_AS_INPUT_FROM = 18

# What a projection does, from its node's name: the genai model builder's decoder names
# (qkv_proj, o_proj, gate_up_proj, down_proj), CLIP's (q/k/v_proj, out_proj, fc1, fc2) and
# DINOv2's as Hugging Face exports it (attention/query|key|value, attention/output/dense,
# mlp/fc1, mlp/fc2).
ROLES = {
    "attention_in": r"qkv|[qkv]_proj|attention/(query|key|value)",
    "attention_out": r"o_proj|out_proj|attn[./_]proj|dense",
    "mlp_in": r"gate_up|gate_proj|up_proj|fc1",
    "mlp_out": r"down_proj|fc2",
}


@dataclass(frozen=True)
class SplitOutputs:
    """A ``Split`` along the last axis that alone reads a projection's output: its outputs, their
    widths, and the projection's bias values (``None`` when it has no bias)."""

    names: tuple[str, ...]
    widths: tuple[int, ...]
    bias: np.ndarray | None


@dataclass(frozen=True)
class Numerics:
    """How one model's integer-GEMM copy computes its projections.

    ``rotation``: block size of the online Hadamard rotation of each projection's input (0: none;
    a power of two; a projection whose K it does not divide uses the largest power of two that
    does). ``group``: activation columns sharing one scale along K (0: one scale per row over the
    whole K). ``keep_int4``: roles (keys of :data:`ROLES`) whose projections stay ``MatMulNBits``.
    ``fine_weights``: roles whose int8 weights carry an int8 remainder (with per-row scales only).
    ``fine_layers``: layers (as node names number them, :func:`projection_layer`; negative from
    the last) all of whose projections carry one; layers a model does not have are left out, so
    the same numerics fit a smaller model (a test model, a projection alone).
    ``unsigned_weights``: store the int8 weights as uint8 + 128 with a zero point of 128, for
    onnxruntime's u8u8 GEMM (CPUs without VNNI: see the module's notes); the same integer sums.
    """

    rotation: int = 0
    group: int = 0
    keep_int4: tuple[str, ...] = ()
    fine_weights: tuple[str, ...] = ()
    fine_layers: tuple[int, ...] = ()
    unsigned_weights: bool = False

    def __post_init__(self) -> None:
        for size in (self.rotation, self.group):
            if size and size & (size - 1):
                raise ValueError(f"rotation and group sizes are powers of two, got {size}")
        unknown = set(self.keep_int4 + self.fine_weights) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown projection roles {sorted(unknown)}; known: {list(ROLES)}")
        if self.group and (self.fine_weights or self.fine_layers):
            raise ValueError(
                "remainder weights (fine_weights, fine_layers) go with per-row scales only"
            )

    def refines(self, name: str, layers: int) -> bool:
        """Whether the projection named ``name``, in a model of ``layers`` layers, carries a
        remainder weight."""
        if projection_role(name) in self.fine_weights:
            return True
        layer = projection_layer(name)
        return layer is not None and layer in {
            i if i >= 0 else layers + i for i in self.fine_layers
        }

    def describe(self) -> str:
        """A short name, e.g. ``"hadamard 64, per row, int4 mlp_out"``."""
        parts = [f"hadamard {self.rotation}"] if self.rotation else []
        parts.append(f"per group of {self.group}" if self.group else "per row")
        parts += [f"int4 {role}" for role in self.keep_int4]
        if self.fine_weights or self.fine_layers:
            fine = list(self.fine_weights)
            if self.fine_layers:
                fine.append(_layers_name(self.fine_layers))
            parts.append(f"remainder {'+'.join(fine)}")
        if self.unsigned_weights:
            parts.append("u8u8 GEMM")
        return ", ".join(parts)


def _layers_name(layers: tuple[int, ...]) -> str:
    """``(-2, -1)`` -> ``"last 2 layers"``; others as numbers, ``"layers 0,-1"``."""
    count = len(layers)
    if sorted(layers) == list(range(-count, 0)):
        return "last layer" if count == 1 else f"last {count} layers"
    return f"layers {','.join(str(i) for i in layers)}"


def bias_input(node: onnx.NodeProto) -> str | None:
    """A ``MatMulNBits`` node's bias input, if it has one."""
    return node.input[5] if len(node.input) > 5 and node.input[5] else None


def projection_role(name: str) -> str:
    """The role (a key of :data:`ROLES`) of the projection named ``name``, or ``"other"``."""
    lowered = name.lower()
    return next((role for role, pattern in ROLES.items() if re.search(pattern, lowered)), "other")


def projection_layer(name: str) -> int | None:
    """The layer number in a projection's node name (``layers.3.`` or ``/layer.3/``, as the
    decoder, CLIP and DINOv2 exports name them), or ``None`` outside the layers."""
    found = re.search(r"layers?\.(\d+)[./]", name)
    return int(found.group(1)) if found else None


def layer_count(names) -> int:
    """How many layers the projections named ``names`` span (0 if none is in a layer)."""
    layers = [projection_layer(name) for name in names]
    return max((layer for layer in layers if layer is not None), default=-1) + 1


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


def quantize_with_remainder(
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float [K, N] -> (int8 q, scale s, int8 r, scale s2) with ``w ~ q * s + r * s2``.

    ``r`` is the per-channel int8 quantization of what ``q * s`` leaves (at most half a step of
    ``s``), so the pair holds about 15 bits per weight: finer than the int4 block grid it came
    from, where int8 alone is not (its step spans a whole column's range).
    """
    quantized, step = quantize_per_channel(weights)
    remainder, fine_step = quantize_per_channel(weights - quantized.astype(np.float32) * step)
    return quantized, step, remainder, fine_step


class GemmBuilder:
    """Makes the integer-GEMM nodes of one model in one :class:`Numerics`; collects their weights
    and shared constants."""

    def __init__(self, opset: int, numerics: Numerics, layers: int):
        self.opset = opset
        self.numerics = numerics
        self.layers = layers  # the model's layer count, for Numerics.fine_layers
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
        return constants(self._constants)

    def integer_gemm(
        self, node: onnx.NodeProto, weights: np.ndarray, split: SplitOutputs | None = None
    ) -> list[onnx.NodeProto]:
        """Nodes computing ``node``'s output (float [..., K] -> [..., N]) on the integer GEMM,
        in the builder's numerics.

        With ``split`` (a ``Split`` along the last axis is the output's only reader) each part
        gets a GEMM of its own on the one quantized input and is written straight to the Split's
        output: the Split's copy of the whole product goes away, and every element is computed
        as before (per-channel weight scales, so the columns quantize alike either way).
        """
        name, x, numerics = node.name or node.output[0], node.input[0], self.numerics
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
        fine = numerics.refines(name, self.layers)
        if fine:
            quantized, channel_scale, remainder, fine_scale = quantize_with_remainder(weights)
        else:
            quantized, channel_scale = quantize_per_channel(weights)
        if group < k:  # [G, g, N]: one GEMM per group, batched
            if split:
                raise ValueError("per-group scales do not fold a Split: convert without it")
            self._add_weight(
                t("weight_int8"),
                quantized.reshape(k // group, group, n),
                t("channel_scale"),
                channel_scale,
            )
            nodes += self._per_group(t, x2, k, group, t("weight_int8"), t("channel_scale"))
            products = [(t, node.output[0], slice(0, n))]
        else:
            nodes += self._quantize_rows(t, x2)
            parts = split or SplitOutputs((node.output[0],), (n,), None)
            products, first = [], 0
            for index, (output, width) in enumerate(zip(parts.names, parts.widths, strict=True)):
                p = _Names(f"{name}/part{index}") if split else t
                columns = slice(first, first + width)
                first += width
                products.append((p, output, columns))
                self._add_weight(
                    p("weight_int8"),
                    quantized[:, columns],
                    p("channel_scale"),
                    channel_scale[columns],
                )
                if fine:
                    self._add_weight(
                        p("remainder_int8"),
                        remainder[:, columns],
                        p("remainder_scale"),
                        fine_scale[columns],
                    )
                    nodes += [
                        self._gemm(t, p("weight_int8"), p("channel_scale"), p("coarse")),
                        self._gemm(t, p("remainder_int8"), p("remainder_scale"), p("fine")),
                        self._node("Add", [p("coarse"), p("fine")], p("y2")),
                    ]
                else:
                    nodes.append(self._gemm(t, p("weight_int8"), p("channel_scale"), p("y2")))
        # Back to x's leading dimensions: [..., width].
        nodes += [
            self._node("Shape", [x], t("shape")),
            self._node("Slice", [t("shape"), "phi3v/zero", "phi3v/last_axis"], t("lead")),
        ]
        bias = bias_input(node)
        for p, output, columns in products:
            width = columns.stop - columns.start
            width_name = self._const(f"width_{width}", [width])
            nodes.append(self._node("Concat", [t("lead"), width_name], p("out_shape"), axis=0))
            nodes.append(
                self._node("Reshape", [p("y2"), p("out_shape")], p("no_bias") if bias else output)
            )
            if not bias:
                continue
            if split:  # each part adds its slice of the bias
                self.weights.append(numpy_helper.from_array(split.bias[columns], p("bias")))
            # Not MatMulIntegerToFloat's own bias input: with a per-row a_scale, onnxruntime
            # (1.32) scales the bias by it too.
            nodes.append(self._node("Add", [p("no_bias"), p("bias") if split else bias], output))
        return nodes

    def _rotation(self, t, x2: str, k: int, block: int) -> list[onnx.NodeProto]:
        """x [R, K] -> x @ blockdiag(H) [R, K]: a [R, K/b, b] @ [b, b] fp32 product."""
        blocks = self._const(f"blocks_{k}_{block}", [-1, k // block, block])
        return [
            self._node("Reshape", [x2, blocks], t("blocked")),
            self._node("MatMul", [t("blocked"), f"phi3v/hadamard_{block}"], t("turned")),
            self._node("Reshape", [t("turned"), f"phi3v/rows_of_{k}"], t("rotated")),
        ]

    def _add_weight(self, name: str, values: np.ndarray, scale_name: str, scale: np.ndarray):
        if (
            self.numerics.unsigned_weights
        ):  # int8 q -> uint8 q + 128, read back with the zero point 128
            values = (values.astype(np.int16) + 128).astype(np.uint8)
        self.weights += [
            numpy_helper.from_array(values, name),
            numpy_helper.from_array(scale, scale_name),
        ]

    def _quantize_rows(self, t, x2: str) -> list[onnx.NodeProto]:
        """[R, K] float -> ``xq`` uint8 with one symmetric scale per row, and the scales as the
        GEMM's ``scale_column`` [R, 1]. Three passes over the activations (max, min, quantize)
        and none over the output: row and channel scales are applied in the GEMM's output step."""
        return [
            *self._row_scales(t, x2, "scale"),
            self._node("QuantizeLinear", [x2, t("scale"), t("zp")], t("xq"), axis=0),
            self._node("Reshape", [t("scale"), "phi3v/column"], t("scale_column")),
        ]

    def _gemm(self, t, weight: str, scale: str, out: str) -> onnx.NodeProto:
        """``xq`` (from :meth:`_quantize_rows`) times an int8 weight, to float [R, N]."""
        return self._node(
            "MatMulIntegerToFloat",
            [t("xq"), weight, t("scale_column"), scale, "phi3v/zp128", *self._weight_zero()],
            out,
            domain="com.microsoft",
        )

    def _weight_zero(self) -> list[str]:
        """The weights' zero point input: 128 for uint8 weights, none (0) for int8."""
        return ["phi3v/zp128"] if self.numerics.unsigned_weights else []

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
                [t("gq"), weight, t("gscale"), scale, "phi3v/zp128", *self._weight_zero()],
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


def constants(values: dict) -> list[TensorProto]:
    """Initializers ``phi3v/<name>`` of the given values (the copies' shared constants)."""
    return [numpy_helper.from_array(np.asarray(v), f"phi3v/{k}") for k, v in values.items()]
