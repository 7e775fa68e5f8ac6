"""One decoder layer's prefill attention as small ONNX graphs, one per form (attention_forms.py).

Every form takes the layer's rotated queries, keys and values as the projections give them,
``q [1, S, heads * head]``, ``k`` and ``v [1, S, kv_heads * head]``, and returns the attention
output ``[1, S, heads * head]``, causal: position i attends to positions 0..i.

* ``gqa``: onnxruntime's ``GroupQueryAttention`` as the decoder runs it: the prompt in chunks of
  ``chunk`` positions, each chunk after the cached ones (past and present share one buffer).
* ``mha``: ``MultiHeadAttention`` over the same chunks with **no mask** (each chunk sees all keys
  up to its end, its own later ones too): GQA's work without the causal mask, so not usable;
  it shows the rate of onnxruntime's fused fp32 kernel.
* block-causal forms in plain ONNX ops, one graph: queries in blocks of ``block`` rows, block j
  attends to keys ``[0, end_j)`` only, with an additive mask on its diagonal block:
  ``fp32`` (MatMul, Add, Softmax, MatMul), ``products`` (the two MatMuls alone: the floor of
  any plain-ops form), ``int8 qk`` (SageAttention's Q·Kᵀ: K minus the first chunk's mean key,
  exact under softmax, int8 per key token; Q int8 per head and block; ``MatMulIntegerToFloat``
  batched over heads, both scales and 1/sqrt(head) folded into its per-column ``b_scale``) and
  ``int8 qk pv`` (also P·V: P uint8 per row, V int8 per head and channel).

Forms other than ``gqa`` need as many key heads as query heads (repeat them first).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # reductions take their axes as an attribute up to 17
MASKED = -1e9  # added to a score above the diagonal: exp() of it is 0 in fp32
PLAIN = ("fp32", "products", "int8 qk", "int8 qk pv")


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def const(self, array, dtype=np.int64) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], domain: str = "", n_out: int = 1, **attrs):
        self._count += 1
        outputs = [f"{op_type}_{self._count}_{k}" for k in range(n_out)]
        self.nodes.append(
            helper.make_node(
                op_type, inputs, outputs, f"{op_type}_{self._count}", domain=domain, **attrs
            )
        )
        return outputs[0] if n_out == 1 else outputs

    def slice(self, x: str, axis: int, start: int, end: int) -> str:
        return self.op("Slice", [x, self.const([start]), self.const([end]), self.const([axis])])

    def model(self, inputs, output: str, width: int) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], ["out"], "out"))
        graph = helper.make_graph(
            self.nodes,
            "attention",
            inputs,
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "S", width])],
            self.initializers,
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def _inputs(heads: int, kv_heads: int, head: int) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "S", n * head])
        for name, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))
    ]


def gqa_model(heads: int, kv_heads: int, head: int) -> onnx.ModelProto:
    """``GroupQueryAttention`` with a past/present buffer of ``[1, kv_heads, capacity, head]``."""
    g = _Graph()
    cache = [1, kv_heads, "capacity", head]
    inputs = _inputs(heads, kv_heads, head) + [
        helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    g.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
            ["attention", "present_key", "present_value"],
            "gqa",
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
        )
    )
    model = g.model(inputs, "attention", heads * head)
    model.graph.output.extend(
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, cache)
            for name in ("present_key", "present_value")
        ]
    )
    return model


def mha_model(heads: int, head: int, positions: int, chunk: int) -> onnx.ModelProto:
    """``MultiHeadAttention`` per chunk of queries over all keys up to the chunk's end, unmasked."""
    g = _Graph()
    outputs = []
    for start in range(0, positions, chunk):
        end = min(start + chunk, positions)
        q = g.slice("q", 1, start, end)
        k, v = g.slice("k", 1, 0, end), g.slice("v", 1, 0, end)
        outputs.append(g.op("MultiHeadAttention", [q, k, v], "com.microsoft", num_heads=heads))
    out = g.op("Concat", outputs, axis=1) if len(outputs) > 1 else outputs[0]
    return g.model(_inputs(heads, heads, head), out, heads * head)


def block_causal_model(
    form: str, heads: int, head: int, positions: int, block: int, chunk: int
) -> onnx.ModelProto:
    """A block-causal form (one of :data:`PLAIN`) over the whole prompt in one graph."""
    g = _Graph()
    scale = 1 / math.sqrt(head)

    def per_head(x: str) -> str:  # [1, S, H*D] -> [H, S, D]
        shaped = g.op("Reshape", [x, g.const([positions, heads, head])])
        return g.op("Transpose", [shaped], perm=[1, 0, 2])

    q, v = per_head("q"), per_head("v")
    k = per_head("k")
    if form.startswith("int8"):
        k_codes, column_scale = _keys_int8(g, k, heads, positions, head, chunk, scale)
    else:
        q = g.op("Mul", [q, g.const(scale, np.float32)])
        k_t = g.op("Transpose", [k], perm=[0, 2, 1])  # [H, D, S]
    if form == "int8 qk pv":
        v_codes, v_scale = _values_int8(g, v)
    outputs = []
    for start in range(0, positions, block):
        end = min(start + block, positions)
        q_block = g.slice(q, 1, start, end)
        if form.startswith("int8"):
            scores = _scores_int8(g, q_block, g.slice(k_codes, 2, 0, end), column_scale, end)
        else:
            scores = g.op("MatMul", [q_block, g.slice(k_t, 2, 0, end)])
        if form == "products":
            outputs.append(g.op("MatMul", [scores, g.slice(v, 1, 0, end)]))
            continue
        masked = g.op("Add", [scores, g.const(_diagonal_mask(start, end), np.float32)])
        p = g.op("Softmax", [masked], axis=-1)
        if form == "int8 qk pv":
            outputs.append(_pv_int8(g, p, g.slice(v_codes, 1, 0, end), v_scale, heads, end - start))
        else:
            outputs.append(g.op("MatMul", [p, g.slice(v, 1, 0, end)]))
    out = g.op("Concat", outputs, axis=1) if len(outputs) > 1 else outputs[0]
    back = g.op("Transpose", [out], perm=[1, 0, 2])
    flat = g.op("Reshape", [back, g.const([1, positions, heads * head])])
    return g.model(_inputs(heads, heads, head), flat, heads * head)


def _diagonal_mask(start: int, end: int) -> np.ndarray:
    """[rows, end]: 0 where key <= query, MASKED above the diagonal (only the last block)."""
    rows = np.arange(start, end)[:, None]
    return np.where(np.arange(end)[None, :] <= rows, 0.0, MASKED).astype(np.float32)


def _peak(g: _Graph, x: str, axes: list[int]) -> str:
    return g.op("ReduceMax", [g.op("Abs", [x])], axes=axes, keepdims=1)


def _keys_int8(g, k, heads, positions, head, chunk, scale) -> tuple[str, str]:
    """K minus the first chunk's mean key (the same vector for every key a query sees, so the
    softmax is unchanged), int8 per key token: codes [H, D, S] and the column scale [H, 1, S]
    (1/sqrt(head) folded in)."""
    mean = g.op("ReduceMean", [g.slice(k, 1, 0, min(chunk, positions))], axes=[1], keepdims=1)
    centred = g.op("Sub", [k, mean])
    token_scale = g.op("Mul", [_peak(g, centred, [2]), g.const(1 / 127, np.float32)])  # [H, S, 1]
    flat = g.op("Reshape", [centred, g.const([heads * positions, head])])
    flat_scale = g.op("Reshape", [token_scale, g.const([heads * positions])])
    zero = g.const(np.zeros(heads * positions), np.int8)
    codes = g.op("QuantizeLinear", [flat, flat_scale, zero], axis=0)
    codes = g.op(
        "Transpose", [g.op("Reshape", [codes, g.const([heads, positions, head])])], perm=[0, 2, 1]
    )
    column = g.op("Reshape", [token_scale, g.const([heads, 1, positions])])
    return codes, g.op("Mul", [column, g.const(scale, np.float32)])


def _scores_int8(g, q_block, k_codes, column_scale, end) -> str:
    """Q block int8 with one scale per head (uint8 around 128), times K codes: [H, rows, end]."""
    heads_scale = g.op("Mul", [_peak(g, q_block, [1, 2]), g.const(1 / 127, np.float32)])
    flat_scale = g.op("Reshape", [heads_scale, g.const([-1])])
    zero = g.op("Expand", [g.const(128, np.uint8), g.op("Shape", [flat_scale])])
    q_codes = g.op("QuantizeLinear", [q_block, flat_scale, zero], axis=0)
    b_scale = g.op("Mul", [heads_scale, g.slice(column_scale, 2, 0, end)])  # [H, 1, end]
    return g.op(
        "MatMulIntegerToFloat",
        [q_codes, k_codes, g.const(1.0, np.float32), b_scale, g.const(128, np.uint8)],
        "com.microsoft",
    )


def _values_int8(g, v) -> tuple[str, str]:
    """V int8 with one scale per head and channel over every position: codes and [H, 1, D]."""
    channel_scale = g.op("Mul", [_peak(g, v, [1]), g.const(1 / 127, np.float32)])
    codes = g.op(
        "QuantizeLinear",
        [g.op("Div", [v, channel_scale]), g.const(1.0, np.float32), g.const(0, np.int8)],
    )
    return codes, channel_scale


def _pv_int8(g, p, v_codes, v_scale, heads, rows) -> str:
    """P uint8 with one scale per row (its largest probability / 255), times V codes."""
    row_scale = g.op(
        "Mul", [g.op("ReduceMax", [p], axes=[2], keepdims=1), g.const(1 / 255, np.float32)]
    )
    flat_scale = g.op("Reshape", [row_scale, g.const([heads * rows])])
    flat = g.op("Reshape", [p, g.const([heads * rows, -1])])
    zero = g.const(np.zeros(heads * rows), np.uint8)
    codes = g.op("QuantizeLinear", [flat, flat_scale, zero], axis=0)
    codes = g.op("Reshape", [codes, g.const([heads, rows, -1])])
    product = g.op(
        "MatMulIntegerToFloat",
        [codes, v_codes, g.const(1.0, np.float32), v_scale, g.const(0, np.uint8)],
        "com.microsoft",
    )
    return g.op("Mul", [product, row_scale])
