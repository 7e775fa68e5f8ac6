"""bench/floor.py: the multiply-adds it reads from onnxruntime's profiles (through
prefill_profile.operators), its peaks' counting, and the floor it derives from them."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.bench_modules import bench_modules

M, K, N = 37, 64, 48  # rows, depth, outputs: none a multiple of another
BATCH, LENGTH, WIDTH, HEADS = 2, 21, 32, 4


def profiled(tmp_path, graph, feeds) -> str:
    """Run ``graph`` once under onnxruntime's profiler; the trace's path."""
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "trace")
    session = ort.InferenceSession(model.SerializeToString(), options)
    session.run(None, feeds)
    return session.end_profiling()


def test_the_products_work_is_read_from_the_profile(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.integers(-8, 8, (K, N), dtype=np.int8)
    float_weights = rng.standard_normal((N, N)).astype(np.float32)
    nodes = [
        helper.make_node(
            "MatMulIntegerToFloat",
            ["a", "w", "a_scale", "w_scale", "a_zero"],
            ["projected"],
            domain="com.microsoft",
        ),
        helper.make_node("MatMul", ["projected", "rotation"], ["rotated"]),
        helper.make_node("MatMul", ["rotated", "rotated_t"], ["scores"]),  # no weight: not counted
        helper.make_node(
            "MultiHeadAttention",
            ["q", "q", "q"],
            ["attended"],
            domain="com.microsoft",
            num_heads=HEADS,
        ),
    ]
    initializers = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(float_weights, "rotation"),
        numpy_helper.from_array(np.float32(0.1), "a_scale"),
        numpy_helper.from_array(np.full(N, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.uint8(128), "a_zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "products",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [M, K]),
            helper.make_tensor_value_info("rotated_t", TensorProto.FLOAT, [N, M]),
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [BATCH, LENGTH, WIDTH]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("attended", TensorProto.FLOAT, None),
        ],
        initializer=initializers,
    )
    feeds = {
        "a": rng.integers(0, 255, (M, K), dtype=np.uint8),
        "rotated_t": rng.standard_normal((N, M)).astype(np.float32),
        "q": rng.standard_normal((BATCH, LENGTH, WIDTH)).astype(np.float32),
    }
    with bench_modules("prefill_profile") as (prefill_profile,):
        ops = prefill_profile.operators(profiled(tmp_path, graph, feeds))
    assert ops["MatMulIntegerToFloat"]["macs"] == M * K * N
    assert ops["MatMul"]["macs"] == M * N * N  # the weight's product only
    assert ops["MultiHeadAttention"]["macs"] == 2 * BATCH * LENGTH * LENGTH * WIDTH
    assert all(entry["s"] > 0 for entry in ops.values())


def test_the_floor_puts_each_part_at_its_instructions_peak():
    peaks = {
        "int8_vnni512": {"what": "vnni", "per_second": 400e9},
        "int8_avx2": {"what": "avx2", "per_second": 200e9},
        "fp32_fma512": {"what": "fma", "per_second": 100e9},
        "bf16_dot512": {"what": "bf16", "per_second": 200e9},
    }
    work = {
        "vision": {
            "MatMulIntegerToFloat": {"s": 9.0, "macs": 2e12},
            "MultiHeadAttention": {"s": 3.0, "macs": 0.2e12},
            "Add": {"s": 1.0, "macs": 0.0},
        },
        "prefill": {
            "MatMulIntegerToFloat": {"s": 20.0, "macs": 6e12},
            "MatMul": {"s": 1.0, "macs": 0.05e12},
        },
        "attention": {"computed": 0.5e12, "causal": 0.4e12, "layers": 32, "width": 3072},
    }
    with bench_modules("floor") as (floor,):
        least = floor.floor({"peaks": peaks, "work": work})
    assert least["int8"] == ("vnni", 400e9)  # the best int8 instruction this CPU has
    assert least["seconds"] == pytest.approx(
        {
            "integer GEMMs": 20.0,
            "fp32 GEMMs (the rotations)": 0.5,
            "prefill attention, causal part": 4.0,
            "vision attention": 2.0,
        }
    )
    assert least["total"] == pytest.approx(26.5)
    assert least["total_bf16_attention"] == pytest.approx(26.5 - 6.0 + 3.0)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="building peak.c needs gcc")
def test_each_peak_function_counts_the_multiply_adds_it_does():
    """What every function returns is its work: CHAINS products per round per thread, times the
    products one instruction does. Run only the functions this CPU has."""
    with bench_modules("floor") as (floor,):
        from phi3v import machine

        library = ctypes.CDLL(str(floor.build()))
        flags = machine.cpu_flags()
        lanes = {"int8_vnni512": 64, "int8_vnni256": 32, "int8_avx2": 32, "fp32_fma512": 16}
        lanes |= {"fp32_fma256": 8, "bf16_dot512": 32}
        ran = 0
        for name, needs, _ in floor.INT8[1:] + floor.FP32 + floor.BF16:
            if not needs <= flags:
                continue
            function = getattr(library, name)
            function.restype, function.argtypes = ctypes.c_int64, [ctypes.c_int64, ctypes.c_int]
            assert function(10, 2) == 10 * 12 * lanes[name] * 2, name
            ran += 1
    assert ran, "this CPU has none of the instructions (AVX2 at least is expected)"
