"""bench/attention_fidelity.py's emulation of prefill attention numerics: with no rounding it is
GroupQueryAttention (rotary, key/value heads shared, causal over a past), and each rounding form
moves the output by the amount its precision allows, no more and not zero.

GroupQueryAttention runs alone in a graph beside the emulation, with a past of its own (not the
shared buffer the decoder uses; the benchmark's own "fp32 activations: fp32" row checks that
case in the decoder, against truth).
"""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.bench_modules import bench_modules


@pytest.fixture(scope="module")
def fidelity():
    with bench_modules("attention_fidelity") as (module,):
        yield module


def attention_pair(fidelity, heads, kv_heads, head, qk, pv):
    """A session computing GroupQueryAttention (``reference``) and its emulation (``out``)."""
    angles = np.outer(np.arange(256), 1.0 / 10000 ** (np.arange(0, head, 2) / head))
    caches = [
        numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
        numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"],
        ["out", "present_key", "present_value"],
        name="attention",
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
    )
    emulation = fidelity._Emulation(node, {t.name: t for t in caches}, 17, qk, pv)
    width = (heads + 2 * kv_heads) * head
    graph = helper.make_graph(
        [node, *emulation.nodes],
        "attention",
        [
            helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, None, width]),
            helper.make_tensor_value_info("past_key", TensorProto.FLOAT, [1, kv_heads, None, head]),
            helper.make_tensor_value_info(
                "past_value", TensorProto.FLOAT, [1, kv_heads, None, head]
            ),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("out/replaced", TensorProto.FLOAT, None),
        ],
        caches,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString())


def run(session, heads, kv_heads, head, past, new, seed=0):
    """(emulated, GroupQueryAttention) outputs for ``new`` positions after ``past`` ones, on
    inputs with an outlier channel and a large key bias, as trained models have."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((1, new, (heads + 2 * kv_heads) * head)).astype(np.float32)
    qkv[..., 5::head] *= 8  # one large channel per head
    qkv[..., heads * head : (heads + kv_heads) * head] += 2.0  # keys share a bias
    past_key, past_value = rng.standard_normal((2, 1, kv_heads, past, head)).astype(np.float32)
    feeds = {
        "qkv": qkv,
        "past_key": past_key,
        "past_value": past_value,
        "seqlens_k": np.array([past + new - 1], np.int32),
        "total": np.array(past + new, np.int32),
    }
    return session.run(None, feeds)


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


SHAPES = [(9, 3, 64, 0, 17), (9, 3, 64, 40, 7), (4, 4, 32, 5, 1), (8, 2, 96, 100, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "heads{}-kv{}-d{}-past{}-new{}".format(*s))
def test_with_no_rounding_the_emulation_is_group_query_attention(fidelity, shape):
    heads, kv_heads, head, past, new = shape
    session = attention_pair(fidelity, heads, kv_heads, head, "fp32", "fp32")
    out, reference = run(session, *shape)
    # To fp32 rounding: the outlier channel makes scores of up to ~100, whose last bits move
    # single weights by ~1e-4 while the tensor stays within ~1e-6 (GroupQueryAttention sums and
    # exponentiates in its own order). The rounding forms below move it by 1e-4 or more.
    assert relative(out, reference) < 1e-5


# form -> the relative error it may add: bf16 keeps 8 significant bits (2^-9 each rounding),
# int8 7 (per query and key row), uint8 P 8 and int8 V 7 bits (per row and channel).
BOUNDS = {
    "bf16": (1e-4, 1e-2),
    "int8 QK": (1e-4, 3e-2),
    "int8 QK, K smoothed": (1e-4, 3e-2),
    "int8 QK and PV": (1e-3, 5e-2),
}


@pytest.mark.parametrize("form", list(BOUNDS))
def test_each_rounding_form_moves_the_output_by_what_its_precision_allows(fidelity, form):
    shape = (9, 3, 64, 40, 30)
    session = attention_pair(fidelity, *shape[:3], *fidelity.FORMS[form])
    out, reference = run(session, *shape)
    low, high = BOUNDS[form]
    assert low < relative(out, reference) < high


def test_smoothing_the_keys_helps_int8_scores_when_the_keys_share_a_bias(fidelity):
    shape = (9, 3, 64, 40, 30)
    errors = {}
    for form in ("int8 QK", "int8 QK, K smoothed"):
        session = attention_pair(fidelity, *shape[:3], *fidelity.FORMS[form])
        out, reference = run(session, *shape)
        errors[form] = relative(out, reference)
    assert errors["int8 QK, K smoothed"] < errors["int8 QK"]
