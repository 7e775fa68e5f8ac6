"""The vision copy in layers (phi3v/layered.py, LayeredVision): the CLIP encoder cut at each
MultiHeadAttention, the fused kernel's attention without a mask in between.

It must compute what the whole copy computes with onnxruntime's MultiHeadAttention: the image
features within fp32 rounding (the kernel sums in another order; the next projection's per-row
int8 quantization turns a few such roundings into whole steps), in bf16 within bf16 rounding.
Where the kernel cannot run or the graph is not what it computes, the copy runs whole and the
status says why. Skipped where the kernel cannot be built or run; the fallback tests run
everywhere.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from phi3v import attention, convert, load_config
from phi3v.image import preprocess_image
from phi3v.layered import LayeredVision, NotLayerable, cut_vision, plan_path
from phi3v.sessions import Sessions
from phi3v.testing import build_model
from phi3v.testing.sizes import TINY

PICTURES = ["data/examples/bar_chart.png", "data/examples/scene.png"]
# Measured on the tiny sets: fp32 moves the features by 2e-7 relative where no int8 step flips,
# by up to 4e-3 where one does (the next projection's per-row quantization); bf16 (heads of 32)
# by 1.6e-2. A kernel that masks the keys as a causal one would moves them by 0.13-0.67.
FP32_CLOSE, BF16_CLOSE = 2e-2, 6e-2


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def opened(folder, fused):
    config = load_config(folder)
    fast = convert.fast_models(config)
    return config, Sessions(
        config, vision_path=fast.vision, prefill_path=fast.decoder, fused_attention=fused
    )


def bf16_or_skip() -> None:
    try:
        attention.kernel(2, "bf16")
    except attention.KernelUnavailable as error:
        pytest.skip(f"the kernel's bf16 numerics cannot run here: {error}")


def features(sessions: Sessions, picture: str, crops: int = 4) -> np.ndarray:
    return sessions.encode_images([preprocess_image(picture, crops)])[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("layered-vision") / "int4", weights="int4")


@pytest.fixture(scope="module")
def both(folder):
    try:
        attention.kernel(2)
    except attention.KernelUnavailable as error:
        pytest.skip(f"the fused attention kernel cannot run here: {error}")
    return opened(folder, False)[1], opened(folder, True)[1]


def test_the_vision_copy_has_a_stage_per_attention_and_one_after(folder, both):
    _, layered = both
    config = load_config(folder)
    fast = convert.fast_models(config)
    plan = json.loads(plan_path(fast.vision).read_text())
    assert len(plan["stages"]) == TINY.clip_layers_used + 1
    assert plan["inputs"] == [config.vision.pixel_values, config.vision.image_sizes]
    assert [layer["head"] for layer in plan["layers"]] == [16] * TINY.clip_layers_used
    assert isinstance(layered.vision, LayeredVision)
    assert layered.vision_attention.startswith("fused fp32")
    manifest = json.loads((fast.folder / convert.MANIFEST).read_text())
    assert manifest["layers"]["vision"] == {"stages": len(plan["stages"])}
    # the stages' weights are the copy's own data file: no second one
    assert sorted(p.name for p in fast.folder.glob("*.data")) == [
        f"{config.decoder.filename}.data",
        f"{config.vision.filename}.data",
    ]


@pytest.mark.parametrize("picture", PICTURES)
@pytest.mark.parametrize("crops", [1, 4])
def test_layers_compute_what_the_whole_vision_copy_computes(both, picture, crops):
    whole, layered = both
    expected, got = features(whole, picture, crops), features(layered, picture, crops)
    assert got.shape == expected.shape
    assert relative(expected, got) < FP32_CLOSE


def test_the_whole_copy_runs_where_the_kernel_is_off_and_says_so(folder):
    _, sessions = opened(folder, False)
    assert not isinstance(sessions.vision, LayeredVision)
    assert sessions.vision_attention == (
        "MultiHeadAttention (onnxruntime): the fused kernel is off (asked)"
    )


def test_bf16_on_heads_of_16_dims_keeps_multi_head_attention_and_says_why(folder):
    bf16_or_skip()
    _, sessions = opened(folder, "bf16")
    assert not isinstance(sessions.vision, LayeredVision)
    assert sessions.vision_attention == (
        "MultiHeadAttention (onnxruntime): the kernel's bf16 numerics take heads of 32, 64, 96 "
        "dims, not 16"
    )


def test_layers_in_bf16_compute_what_the_whole_vision_copy_computes(tmp_path_factory):
    bf16_or_skip()
    size = dataclasses.replace(TINY, name="tiny-clip-head-32", clip_width=64)
    folder = build_model(tmp_path_factory.mktemp("vision-bf16") / "int4", size=size, weights="int4")
    _, whole = opened(folder, False)
    _, layered = opened(folder, "bf16")
    assert layered.vision_attention.startswith("fused bf16")
    for picture in PICTURES:
        expected, got = features(whole, picture), features(layered, picture)
        assert relative(expected, got) < BF16_CLOSE


def test_the_layered_vision_copy_names_the_output_it_makes(both):
    _, layered = both
    with pytest.raises(ValueError, match="makes image_features only"):
        layered.vision.run(["something_else"], {})


# --- what the cut refuses -------------------------------------------------------------------


def attention_graph(inputs=("q", "k", "v"), outputs=("out",), **attributes) -> onnx.ModelProto:
    """x [N, T, 8] -> three biased projections -> MultiHeadAttention(2 heads) -> y."""
    nodes, weights = [], []
    for name in ("q", "k", "v"):
        weights.append(helper.make_tensor(f"w_{name}", TensorProto.FLOAT, [8, 8], [0.1] * 64))
        weights.append(helper.make_tensor(f"b_{name}", TensorProto.FLOAT, [8], [0.0] * 8))
        nodes.append(helper.make_node("MatMul", ["x", f"w_{name}"], [f"{name}_raw"]))
        nodes.append(helper.make_node("Add", [f"{name}_raw", f"b_{name}"], [name]))
    nodes.append(
        helper.make_node(
            "MultiHeadAttention",
            list(inputs),
            list(outputs),
            name="attention",
            domain="com.microsoft",
            num_heads=2,
            **attributes,
        )
    )
    nodes.append(helper.make_node("Identity", [outputs[0]], ["y"]))
    graph = helper.make_graph(
        nodes,
        "one-attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 8])],
        initializer=weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_the_cut_reads_the_heads_width_from_the_projections():
    stages, layers = cut_vision(attention_graph(), "y")
    assert len(stages) == 2
    assert (layers[0].q, layers[0].k, layers[0].v, layers[0].heads, layers[0].head) == (
        "q", "k", "v", 2, 4,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("graph", "reason"),
    [
        (attention_graph(unidirectional=1), "a causal mask"),
        (attention_graph(scale=0.5), "a custom scale"),
        (attention_graph(inputs=("q", "k", "v", "x")), "not three separate inputs"),
        (attention_graph(inputs=("q", "", "")), "not three separate inputs"),
        (attention_graph(outputs=("out", "present_k")), "returns its keys and values"),
    ],
)
def test_an_attention_the_kernel_does_not_compute_is_refused(graph, reason):
    with pytest.raises(NotLayerable, match=reason):
        cut_vision(graph, "y")


def test_a_width_no_weight_tells_is_refused():
    graph = attention_graph()
    graph.graph.input.append(helper.make_tensor_value_info("q_in", TensorProto.FLOAT, None))
    for node in graph.graph.node:  # the queries from an input: nothing says their width
        if node.op_type == "MultiHeadAttention":
            node.input[0] = "q_in"
    with pytest.raises(NotLayerable, match="cannot tell the width of q_in"):
        cut_vision(graph, "y")


def test_a_model_without_multi_head_attention_is_refused():
    graph = attention_graph()
    for node in graph.graph.node:
        if node.op_type == "MultiHeadAttention":
            node.op_type = "Attention"
    with pytest.raises(NotLayerable, match="no MultiHeadAttention"):
        cut_vision(graph, "y")
