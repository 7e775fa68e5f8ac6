"""A rewrite of the fast copies' graphs that onnxruntime does not make itself.

A CLIP layer ends each half with ``LayerNormalization(residual + (projection + bias))``. Our
integer GEMM writes the projection without its bias (onnxruntime's ``MatMulIntegerToFloat``
would scale a bias by the per-row activation scale), so the copy adds the bias, then the
residual, then normalizes: three passes over [crops x 577, 1024] floats, and two more tensors
written. ``SkipLayerNormalization`` (com.microsoft) does all three in one pass and still hands
out the sum the next residual needs (its fourth output). onnxruntime's own fusion skips these
sites because the shapes around our Reshapes are not known when the session is made.

The sum is taken in another order ((projection + residual) + bias), so the copy's numbers change
by float rounding only.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


def fuse_residual_norms(
    nodes: list[onnx.NodeProto], bias_sums: set[str], kept: Iterable[str]
) -> list[onnx.NodeProto]:
    """``nodes`` (topologically ordered) with every ``LayerNormalization(s + (p + bias))`` over
    the last axis as one ``SkipLayerNormalization(p, s, gamma, beta, bias)``.

    ``bias_sums``: the outputs of the bias Adds the converter wrote (``p + bias``, the bias a
    vector as wide as the projection); only those are fused. ``kept``: names that must stay
    (graph outputs, names subgraphs read): such a sum is left alone.
    """
    producer = {name: node for node in nodes for name in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    usable = bias_sums - set(kept)
    fused: dict[int, onnx.NodeProto] = {}  # id of the residual Add -> its replacement
    gone: set[int] = set()
    for norm in nodes:
        site = _site(norm, producer, readers, usable)
        if site is None:
            continue
        residual, with_bias, projection, skip, bias = site
        gamma, beta = norm.input[1], norm.input[2] if len(norm.input) > 2 else ""
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        fused[id(residual)] = helper.make_node(
            "SkipLayerNormalization",
            [projection, skip, gamma, beta, bias],
            [norm.output[0], "", "", residual.output[0]],
            name=f"{norm.name or norm.output[0]}/skip",
            domain=MS_DOMAIN,
            epsilon=epsilon,
        )
        gone |= {id(with_bias), id(norm)}
    # The fused node takes the residual Add's place: its inputs all exist there, and whatever
    # reads the sum comes after it.
    return [fused.get(id(node), node) for node in nodes if id(node) not in gone]


def _site(norm, producer, readers, bias_sums):
    """(residual Add, bias Add, projection, skip, bias) if ``norm`` can be fused, else None."""
    if norm.op_type != "LayerNormalization" or len(norm.input) < 2:
        return None
    if any(a.name == "axis" and a.i != -1 for a in norm.attribute):
        return None
    if len([name for name in norm.output if name]) > 1:  # mean / inverse std asked for
        return None
    residual = producer.get(norm.input[0])
    if residual is None or residual.op_type != "Add":
        return None
    for index in (0, 1):
        summed = residual.input[index]
        if summed not in bias_sums or len(readers[summed]) != 1:
            continue
        projection, bias = producer[summed].input
        return residual, producer[summed], projection, residual.input[1 - index], bias
    return None
