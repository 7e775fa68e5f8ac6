"""The built model sets have the real Phi-3-vision ONNX interface and behave like a language model.

Interface facts are from docs/ARCHITECTURE.md#the-model-interface and #two-export-layouts; the
token-count formula is docs/ARCHITECTURE.md#the-image-token-formula: (h*w + 1) * 144 + 1 +
(h + 1) * 12 rows per image. The tiny sets come in
two weight formats: fp32 MatMul ("float") and MatMulNBits int4 block 32 ("int4", as released).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
from PIL import Image
from tokenizers import Tokenizer

from phi3v import Pipeline, image
from phi3v.testing import (
    DEFAULT_OUTLIER_GAIN,
    MODEL_FILES,
    ORIGINAL_CONTEXT,
    REAL,
    TINY,
    ModelSize,
    build_model,
    outlier_channel_ids,
)
from tests.conftest import FIXTURES, OUTLIER_CHANNELS

HIDDEN_SIZE, HEAD_SIZE, VOCAB_SIZE = TINY.hidden_size, TINY.head_size, TINY.vocab_size
NUM_KV_HEADS, NUM_LAYERS = TINY.num_kv_heads, TINY.num_layers

FLOAT, INT64 = "tensor(float)", "tensor(int64)"
KV_NAMES = [f"past_key_values.{i}.{part}" for i in range(NUM_LAYERS) for part in ("key", "value")]
PRESENT_NAMES = [f"present.{i}.{part}" for i in range(NUM_LAYERS) for part in ("key", "value")]
TEXT_PROMPT = "<|user|>\nWho are you?<|end|>\n<|assistant|>\n"
IMAGE_PROMPT = "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n"


def num_image_tokens(h_crops: int, w_crops: int) -> int:
    """Rows for an image of h_crops x w_crops tiles, by phi3v's own formula."""
    return image.num_image_tokens(image.TILE * h_crops, image.TILE * w_crops)


def _session(model_dir: Path, layout: str, role: str) -> ort.InferenceSession:
    path = model_dir / MODEL_FILES[layout][role]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(args) -> list[tuple[str, str, int]]:
    return [(arg.name, arg.type, len(arg.shape)) for arg in args]


def _pixel_values(num_images: int, num_crops: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_images, num_crops, 3, 336, 336)).astype(np.float32)


def _image_sizes(*crops_hw: tuple[int, int]) -> np.ndarray:
    return np.array([[336 * h, 336 * w] for h, w in crops_hw], dtype=np.int64)


def _empty_past(length: int = 0) -> dict[str, np.ndarray]:
    return {name: np.zeros((1, NUM_KV_HEADS, length, HEAD_SIZE), np.float32) for name in KV_NAMES}


def _run_decoder(decoder, embeds, past: dict[str, np.ndarray]):
    """One decoder call with growing KV: returns logits and the next step's past."""
    total = embeds.shape[1] + past["past_key_values.0.key"].shape[2]
    mask = np.ones((1, total), dtype=np.int64)
    logits, *present = decoder.run(
        ["logits", *PRESENT_NAMES], {"inputs_embeds": embeds, "attention_mask": mask, **past}
    )
    return logits, dict(zip(KV_NAMES, present, strict=True))


def _random_embeds(length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, length, HIDDEN_SIZE)).astype(np.float32)


# --- building ----------------------------------------------------------------------------------

FIXTURE_NAMES = {
    ("redesigned", "float"): "tiny_model_dir",
    ("legacy", "float"): "tiny_legacy_model_dir",
    ("redesigned", "int4"): "tiny_int4_model_dir",
    ("legacy", "int4"): "tiny_int4_legacy_model_dir",
}
FORMATS = ["float", "int4"]


def _model_dir(request, layout: str = "redesigned", weights: str = "float") -> Path:
    """The session's tiny set of that layout and weight format (see conftest.py)."""
    return request.getfixturevalue(FIXTURE_NAMES[layout, weights])


@pytest.fixture(params=FORMATS)
def any_model_dir(request) -> Path:
    """The tiny re-designed set, once in each weight format."""
    return _model_dir(request, weights=request.param)


def test_unknown_layout_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        build_model(tmp_path, layout="june")


def test_unknown_weight_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        build_model(tmp_path, weights="int8")


def test_int4_weights_need_input_widths_that_are_multiples_of_32(tmp_path):
    odd = ModelSize(
        name="odd",
        hidden_size=48,  # 48 = 1.5 blocks of 32
        num_heads=4,
        num_kv_heads=2,
        num_layers=1,
        intermediate_size=64,
        clip_width=32,
        clip_heads=2,
        clip_mlp=64,
        clip_layers=1,
        clip_layers_used=1,
        default_weights="float",
    )
    with pytest.raises(ValueError, match=r"multiple of 32.*'hidden_size': 48"):
        build_model(tmp_path, size=odd, weights="int4")
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_real_size_has_the_dimensions_of_the_real_release():
    real = json.loads((FIXTURES / "phi3v-tokenizer" / "genai_config.json").read_text())["model"]
    decoder = real["decoder"]
    assert (REAL.hidden_size, REAL.head_size, REAL.num_layers) == (
        decoder["hidden_size"],
        decoder["head_size"],
        decoder["num_hidden_layers"],
    )
    assert (REAL.num_heads, REAL.num_kv_heads) == (
        decoder["num_attention_heads"],
        decoder["num_key_value_heads"],
    )
    assert REAL.vocab_size == TINY.vocab_size == real["vocab_size"]
    # CLIP ViT-L/14-336 up to hidden_states[-2]; img_projection 4096 -> 3072 -> 3072
    # (docs/ARCHITECTURE.md#the-image-token-formula)
    assert (REAL.clip_width, REAL.clip_heads, REAL.clip_mlp) == (1024, 16, 4096)
    assert (REAL.clip_layers, REAL.clip_layers_used) == (24, 23)
    assert REAL.projection_shapes == ((4096, 3072), (3072, 3072))
    assert (REAL.default_weights, TINY.default_weights) == ("int4", "float")


def test_command_line_builds_the_requested_set(tmp_path):
    out = tmp_path / "set"
    args = [str(out), "--weights", "int4", "--layout", "legacy", "--seed", "7"]
    done = subprocess.run(
        [sys.executable, "-m", "phi3v.testing", *args, "--outlier-channels", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tiny legacy Phi-3-vision set with int4 weights, 2 outlier channels" in done.stdout
    expected = build_model(
        tmp_path / "same", weights="int4", layout="legacy", seed=7, outlier_channels=2
    )
    for path in expected.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("layout", ["redesigned", "legacy"])
def test_folder_holds_models_with_external_data_configs_and_tokenizer(layout, weights, request):
    model_dir = _model_dir(request, layout, weights)
    expected = {
        "genai_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    for onnx_name in MODEL_FILES[layout].values():
        expected |= {onnx_name, onnx_name + ".data"}
    # files only: loading a set in "fast" precision adds a .phi3v-cache folder beside them
    assert {path.name for path in model_dir.iterdir() if path.is_file()} == expected


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("role", ["vision", "embedding", "decoder"])
def test_weights_live_in_the_data_file_beside_each_model_at_aligned_offsets(role, weights, request):
    path = _model_dir(request, weights=weights) / MODEL_FILES["redesigned"][role]
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            assert np.prod(tensor.dims) <= 8, f"{tensor.name} is stored inline"
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        assert entries["location"] == path.name + ".data"
        assert int(entries["offset"]) % 4096 == 0, tensor.name


@pytest.mark.parametrize("weights", FORMATS)
def test_rebuilding_gives_byte_identical_files(weights, tmp_path, request):
    built = _model_dir(request, weights=weights)
    rebuilt = build_model(tmp_path / "again", weights=weights)
    for path in built.iterdir():
        if path.is_file():
            assert (rebuilt / path.name).read_bytes() == path.read_bytes(), path.name


def test_rebuilding_into_the_same_folder_does_not_grow_the_data_files(tmp_path):
    first = build_model(tmp_path, layout="legacy")
    sizes = {path.name: path.stat().st_size for path in first.iterdir()}
    build_model(tmp_path, layout="legacy")
    assert {path.name: path.stat().st_size for path in tmp_path.iterdir()} == sizes


@pytest.mark.parametrize("weights", FORMATS)
def test_another_seed_gives_other_weights(weights, tmp_path, request):
    other = build_model(tmp_path, weights=weights, seed=7)
    for role in ("vision", "embedding", "decoder"):
        name = MODEL_FILES["redesigned"][role] + ".data"
        assert (other / name).read_bytes() != (
            _model_dir(request, weights=weights) / name
        ).read_bytes()


@pytest.mark.parametrize("weights", FORMATS)
def test_both_layouts_share_decoder_and_embedding_table(weights, request):
    new_dir, old_dir = (
        _model_dir(request, "redesigned", weights),
        _model_dir(request, "legacy", weights),
    )
    for name in ("phi-3-v-128k-instruct-text.onnx", "phi-3-v-128k-instruct-text.onnx.data"):
        assert (new_dir / name).read_bytes() == (old_dir / name).read_bytes()
    ids = np.array([[0, 1, 32007, VOCAB_SIZE - 1]], dtype=np.int64)
    new = _session(new_dir, "redesigned", "embedding").run(
        None, {"input_ids": ids, "image_features": np.zeros((0, HIDDEN_SIZE), np.float32)}
    )[0]
    old = _session(old_dir, "legacy", "embedding").run(None, {"input_ids": ids})[0]
    np.testing.assert_array_equal(new, old)


def _ops(model_dir: Path, role: str) -> list[onnx.NodeProto]:
    path = model_dir / MODEL_FILES["redesigned"][role]
    return list(onnx.load(str(path), load_external_data=False).graph.node)


LINEAR_OPS = {"float": "MatMul", "int4": "MatMulNBits"}
# decoder: qkv, o, gate_up, down per layer + lm_head; vision: qkv, out, fc1, fc2 per CLIP layer
# + the two img_projection linears
LINEAR_LAYERS = {
    "decoder": 4 * TINY.num_layers + 1,
    "vision": 4 * TINY.clip_layers_used + 2,
}


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("role", ["vision", "decoder"])
def test_every_linear_layer_has_the_chosen_weight_format(role, weights, request):
    ops = [node.op_type for node in _ops(_model_dir(request, weights=weights), role)]
    assert ops.count(LINEAR_OPS[weights]) == LINEAR_LAYERS[role]
    other = LINEAR_OPS["int4" if weights == "float" else "float"]
    assert other not in ops


@pytest.mark.parametrize("role", ["vision", "decoder"])
def test_int4_layers_are_4_bit_block_32_accuracy_level_4_without_zero_points(
    role, tiny_int4_model_dir
):
    for node in _ops(tiny_int4_model_dir, role):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
        # A, B, scales, then (for a bias, input 5) empty zero_points and g_idx
        assert len(node.input) in (3, 6), node.name
        assert list(node.input[3:5]) in ([], ["", ""]), node.name


def test_tokenizer_files_are_the_fixture_copies(tiny_model_dir):
    fixtures = FIXTURES / "phi3v-tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model_dir / name).read_bytes() == (fixtures / name).read_bytes()


# --- interface ---------------------------------------------------------------------------------


def test_redesigned_vision_io(tiny_model_dir):
    session = _session(tiny_model_dir, "redesigned", "vision")
    assert _signature(session.get_inputs()) == [
        ("pixel_values", FLOAT, 5),
        ("image_sizes", INT64, 2),
    ]
    assert _signature(session.get_outputs()) == [("image_features", FLOAT, 2)]


def test_legacy_vision_io(tiny_legacy_model_dir):
    session = _session(tiny_legacy_model_dir, "legacy", "vision")
    assert _signature(session.get_inputs()) == [
        ("pixel_values", FLOAT, 5),
        ("image_sizes", INT64, 2),
    ]
    assert _signature(session.get_outputs()) == [("visual_features", FLOAT, 3)]


def test_redesigned_embedding_io(tiny_model_dir):
    session = _session(tiny_model_dir, "redesigned", "embedding")
    assert _signature(session.get_inputs()) == [
        ("input_ids", INT64, 2),
        ("image_features", FLOAT, 2),
    ]
    assert _signature(session.get_outputs()) == [("inputs_embeds", FLOAT, 3)]


def test_legacy_embedding_takes_only_input_ids(tiny_legacy_model_dir):
    session = _session(tiny_legacy_model_dir, "legacy", "embedding")
    assert _signature(session.get_inputs()) == [("input_ids", INT64, 2)]
    assert _signature(session.get_outputs()) == [("inputs_embeds", FLOAT, 3)]


def test_decoder_io(tiny_model_dir):
    session = _session(tiny_model_dir, "redesigned", "decoder")
    kv_inputs = [(name, FLOAT, 4) for name in KV_NAMES]
    kv_outputs = [(name, FLOAT, 4) for name in PRESENT_NAMES]
    assert _signature(session.get_inputs()) == [
        ("inputs_embeds", FLOAT, 3),
        ("attention_mask", INT64, 2),
        *kv_inputs,
    ]
    assert _signature(session.get_outputs()) == [("logits", FLOAT, 3), *kv_outputs]


def test_decoder_has_two_kv_heads_and_full_vocab_logits(tiny_model_dir):
    session = _session(tiny_model_dir, "redesigned", "decoder")
    inputs = {arg.name: arg.shape for arg in session.get_inputs()}
    assert inputs["past_key_values.0.key"][1:] == [2, "past_sequence_length", 16]
    assert session.get_outputs()[0].shape[2] == VOCAB_SIZE


@pytest.mark.parametrize("layout", ["redesigned", "legacy"])
def test_genai_config_describes_the_tiny_model(layout, tiny_model_dir, tiny_legacy_model_dir):
    model_dir = tiny_model_dir if layout == "redesigned" else tiny_legacy_model_dir
    config = json.loads((model_dir / "genai_config.json").read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert (model["type"], model["bos_token_id"], model["eos_token_id"]) == ("phi3v", 1, 32007)
    assert (model["pad_token_id"], model["vocab_size"], model["context_length"]) == (
        32000,
        32064,
        131072,
    )
    assert (decoder["hidden_size"], decoder["head_size"], decoder["num_hidden_layers"]) == (
        64,
        16,
        2,
    )
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (4, 2)
    assert decoder["session_options"] == {"log_id": "onnxruntime-genai", "provider_options": []}
    for role in ("decoder", "embedding", "vision"):
        assert model[role]["filename"] == MODEL_FILES[layout][role]
    search = config["search"]
    assert search["past_present_share_buffer"] is True
    assert (search["do_sample"], search["top_k"], search["num_beams"]) == (False, 1, 1)
    assert search["max_length"] == 131072


def test_legacy_genai_config_has_the_keys_of_the_real_one(tiny_legacy_model_dir):
    real = json.loads((FIXTURES / "phi3v-tokenizer" / "genai_config.json").read_text())
    tiny = json.loads((tiny_legacy_model_dir / "genai_config.json").read_text())

    def keys(tree, prefix=""):
        if not isinstance(tree, dict):
            return {prefix}
        return {k for key, value in tree.items() for k in keys(value, f"{prefix}/{key}")}

    assert keys(tiny) == keys(real)
    assert tiny["search"] == real["search"]


def test_redesigned_genai_config_wires_image_features_into_the_embedding(tiny_model_dir):
    model = json.loads((tiny_model_dir / "genai_config.json").read_text())["model"]
    assert model["vision"]["outputs"] == {"image_features": "image_features"}
    assert model["embedding"]["inputs"] == {
        "input_ids": "input_ids",
        "image_features": "image_features",
    }


def test_processor_config_is_the_phi3_hd_pipeline_with_16_crops(tiny_model_dir):
    transforms = json.loads((tiny_model_dir / "processor_config.json").read_text())["processor"][
        "transforms"
    ]
    operations = [t["operation"] for t in transforms]
    assert [op["type"] for op in operations] == ["DecodeImage", "ConvertRGB", "Phi3ImageTransform"]
    assert operations[2]["attrs"]["num_crops"] == 16


# --- vision --------------------------------------------------------------------------------------

CROP_GRIDS = [
    (1, 1),
    (1, 2),
    (2, 1),
    (2, 2),
    (3, 4),
    (4, 3),
    (4, 4),
    (1, 6),
    (2, 6),
    (6, 2),
    (1, 16),
]


def test_token_formula_matches_the_spec_examples():
    # docs/ARCHITECTURE.md#the-image-token-formula:
    # 3x4 -> 1921, 4x3 -> 1933, 2x6 -> 1909, 4x4 -> 2509, 3x5 -> 2353
    assert [num_image_tokens(h, w) for h, w in [(3, 4), (4, 3), (2, 6), (4, 4), (3, 5)]] == [
        1921,
        1933,
        1909,
        2509,
        2353,
    ]


@pytest.mark.parametrize(("h", "w"), CROP_GRIDS)
def test_vision_emits_one_row_per_image_token(h, w, any_model_dir):
    vision = _session(any_model_dir, "redesigned", "vision")
    features = vision.run(
        None, {"pixel_values": _pixel_values(1, 17), "image_sizes": _image_sizes((h, w))}
    )[0]
    assert features.shape == (num_image_tokens(h, w), HIDDEN_SIZE)
    assert np.isfinite(features).all()


def test_vision_takes_several_images_in_one_call(any_model_dir):
    vision = _session(any_model_dir, "redesigned", "vision")
    pixels = _pixel_values(2, 17)
    both = vision.run(None, {"pixel_values": pixels, "image_sizes": _image_sizes((3, 4), (1, 2))})[
        0
    ]
    first = vision.run(None, {"pixel_values": pixels[:1], "image_sizes": _image_sizes((3, 4))})[0]
    second = vision.run(None, {"pixel_values": pixels[1:], "image_sizes": _image_sizes((1, 2))})[0]
    assert both.shape == (num_image_tokens(3, 4) + num_image_tokens(1, 2), HIDDEN_SIZE)
    np.testing.assert_allclose(both, np.concatenate([first, second]), atol=1e-6)


def test_vision_accepts_fewer_crops_than_17(any_model_dir):
    vision = _session(any_model_dir, "redesigned", "vision")
    pixels = _pixel_values(1, 17)
    full = vision.run(None, {"pixel_values": pixels, "image_sizes": _image_sizes((2, 2))})[0]
    five = vision.run(None, {"pixel_values": pixels[:, :5], "image_sizes": _image_sizes((2, 2))})[0]
    np.testing.assert_allclose(five, full, atol=1e-6)  # crops past 1 + h*w are padding


def test_vision_ignores_padding_crops(any_model_dir):
    vision = _session(any_model_dir, "redesigned", "vision")
    pixels = _pixel_values(1, 17)
    changed = pixels.copy()
    changed[:, 5:] = 0.0
    sizes = _image_sizes((2, 2))
    np.testing.assert_array_equal(
        vision.run(None, {"pixel_values": pixels, "image_sizes": sizes})[0],
        vision.run(None, {"pixel_values": changed, "image_sizes": sizes})[0],
    )


def test_vision_rows_follow_the_hd_layout(any_model_dir):
    vision = _session(any_model_dir, "redesigned", "vision")
    features = vision.run(
        None, {"pixel_values": _pixel_values(1, 17), "image_sizes": _image_sizes((1, 2))}
    )[0]
    # 12 rows of 24 sub-crop tokens + newline, then glb_GN, then 12 rows of 12 global + newline
    grid_newlines = features[24 : 12 * 25 : 25]
    global_newlines = features[12 * 25 + 1 + 12 :: 13]
    assert len(global_newlines) == 12
    np.testing.assert_allclose(grid_newlines, np.broadcast_to(features[24], grid_newlines.shape))
    np.testing.assert_allclose(
        global_newlines, np.broadcast_to(features[24], global_newlines.shape)
    )
    assert not np.allclose(features[12 * 25], features[24])  # glb_GN is a different vector


@pytest.mark.parametrize("weights", FORMATS)
def test_legacy_vision_gives_the_same_rows_with_a_batch_axis(weights, request):
    feeds = {"pixel_values": _pixel_values(1, 17), "image_sizes": _image_sizes((3, 4))}
    new_dir, old_dir = (_model_dir(request, layout, weights) for layout in ("redesigned", "legacy"))
    new = _session(new_dir, "redesigned", "vision").run(None, feeds)[0]
    old = _session(old_dir, "legacy", "vision").run(None, feeds)[0]
    assert old.shape == (1, num_image_tokens(3, 4), HIDDEN_SIZE)
    np.testing.assert_array_equal(old[0], new)


# --- embedding -----------------------------------------------------------------------------------


def test_embedding_pastes_image_features_at_negative_ids_in_order(any_model_dir):
    embedding = _session(any_model_dir, "redesigned", "embedding")
    ids = np.array([[32010, -1, -1, -1, 13, -2, -2, 32001]], dtype=np.int64)
    features = np.arange(5 * HIDDEN_SIZE, dtype=np.float32).reshape(5, HIDDEN_SIZE)
    embeds = embedding.run(None, {"input_ids": ids, "image_features": features})[0]
    np.testing.assert_array_equal(embeds[0, [1, 2, 3, 5, 6]], features)
    text_only = embedding.run(
        None, {"input_ids": ids.clip(0), "image_features": np.zeros((0, HIDDEN_SIZE), np.float32)}
    )[0]
    np.testing.assert_array_equal(embeds[0, [0, 4, 7]], text_only[0, [0, 4, 7]])


def test_embedding_accepts_empty_image_features(tiny_model_dir):
    embedding = _session(tiny_model_dir, "redesigned", "embedding")
    ids = np.array([[32010, 22110]], dtype=np.int64)
    embeds = embedding.run(
        None, {"input_ids": ids, "image_features": np.zeros((0, HIDDEN_SIZE), np.float32)}
    )[0]
    assert embeds.shape == (1, 2, HIDDEN_SIZE)


def test_legacy_embedding_wraps_negative_ids_like_a_plain_gather(tiny_legacy_model_dir):
    embedding = _session(tiny_legacy_model_dir, "legacy", "embedding")
    embeds = embedding.run(None, {"input_ids": np.array([[-1, VOCAB_SIZE - 1]], dtype=np.int64)})[0]
    np.testing.assert_array_equal(embeds[0, 0], embeds[0, 1])


# --- decoder -------------------------------------------------------------------------------------


def test_prefill_then_single_steps_equals_one_prefill(any_model_dir):
    decoder = _session(any_model_dir, "redesigned", "decoder")
    embeds = _random_embeds(24)
    whole, _ = _run_decoder(decoder, embeds, _empty_past())

    logits, past = _run_decoder(decoder, embeds[:, :20], _empty_past())
    rows = [logits]
    for t in range(20, 24):
        logits, past = _run_decoder(decoder, embeds[:, t : t + 1], past)
        rows.append(logits)
    np.testing.assert_allclose(np.concatenate(rows, axis=1), whole, atol=5e-5, rtol=1e-5)


def test_shared_kv_buffer_gives_the_same_logits_as_growing_kv(any_model_dir):
    decoder = _session(any_model_dir, "redesigned", "decoder")
    embeds = _random_embeds(24)
    whole, _ = _run_decoder(decoder, embeds, _empty_past())

    max_length = 32
    buffers = {
        name: ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, NUM_KV_HEADS, max_length, HEAD_SIZE), np.float32)
        )
        for name in KV_NAMES
    }
    rows = []
    for start, end in [(0, 20), (20, 21), (21, 22), (22, 23), (23, 24)]:
        binding = decoder.io_binding()
        binding.bind_output("logits")  # bound first: get_outputs() follows the bind order
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[:, start:end]))
        binding.bind_cpu_input("attention_mask", np.ones((1, end), dtype=np.int64))
        for past_name, present_name in zip(KV_NAMES, PRESENT_NAMES, strict=True):
            binding.bind_ortvalue_input(past_name, buffers[past_name])
            binding.bind_ortvalue_output(present_name, buffers[past_name])
        decoder.run_with_iobinding(binding)
        rows.append(binding.get_outputs()[0].numpy())
    np.testing.assert_allclose(np.concatenate(rows, axis=1), whole, atol=5e-5, rtol=1e-5)


def test_long_rope_cache_is_used_once_the_total_length_passes_4096(any_model_dir):
    # A token at position 4000 after a random 4000-position KV cache: with total lengths 4001
    # and 4096 its query is rotated by the short cache, with 4097 by the long one. Attention is
    # causal, so only the cache choice can change its logits (and its layer-0 key).
    decoder = _session(any_model_dir, "redesigned", "decoder")
    rng = np.random.default_rng(1)
    past = {
        name: rng.standard_normal(kv.shape).astype(np.float32)
        for name, kv in _empty_past(4000).items()
    }
    embeds = _random_embeds(ORIGINAL_CONTEXT + 1 - 4000)
    alone, alone_kv = _run_decoder(decoder, embeds[:, :1], past)  # total 4001
    short, short_kv = _run_decoder(decoder, embeds[:, :-1], past)  # total 4096
    long, long_kv = _run_decoder(decoder, embeds, past)  # total 4097

    key = "past_key_values.0.key"
    np.testing.assert_allclose(short[0, 0], alone[0, 0], atol=1e-4)
    np.testing.assert_allclose(short_kv[key][:, :, 4000], alone_kv[key][:, :, 4000], atol=1e-5)
    assert np.abs(long[0, 0] - short[0, 0]).max() > 0.1
    assert np.abs(long_kv[key][:, :, 4000] - short_kv[key][:, :, 4000]).max() > 0.1


def test_greedy_decoding_is_varied_and_mixes_bytes_and_word_pieces(any_model_dir):
    embedding = _session(any_model_dir, "redesigned", "embedding")
    decoder = _session(any_model_dir, "redesigned", "decoder")
    tokenizer = Tokenizer.from_file(str(any_model_dir / "tokenizer.json"))
    ids = tokenizer.encode(TEXT_PROMPT, add_special_tokens=False).ids
    no_image = np.zeros((0, HIDDEN_SIZE), np.float32)

    past, step_ids, tokens = _empty_past(), ids, []
    for _ in range(64):
        embeds = embedding.run(
            None, {"input_ids": np.array([step_ids], np.int64), "image_features": no_image}
        )[0]
        logits, past = _run_decoder(decoder, embeds, past)
        if not tokens:
            assert np.isfinite(logits).all()
            assert 1.0 < logits.std() < 10.0
        tokens.append(int(logits[0, -1].argmax()))
        step_ids = tokens[-1:]

    assert len(set(tokens)) > 32
    assert any(3 <= t < 259 for t in tokens)  # byte-fallback pieces <0x00>..<0xFF>
    assert sum(259 <= t < 32000 for t in tokens) > 32  # ordinary word pieces


# --- onnxruntime-genai 0.18 ----------------------------------------------------------------------


def _genai_tokens(model: og.Model, inputs, count: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=4096)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens = []
    while len(tokens) < count and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.fixture
def image_path(tmp_path) -> Path:
    """A 320x240 noise PNG."""
    path = tmp_path / "noise.png"
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    return path


@pytest.mark.oracle
def test_genai_generates_from_an_image_prompt(any_model_dir, image_path):
    model = og.Model(str(any_model_dir))
    processor = model.create_multimodal_processor()

    inputs = processor(IMAGE_PROMPT, images=og.Images.open(str(image_path)))
    # 320x240 -> 1344x1008 HD image, 3x4 crops (docs/ARCHITECTURE.md#the-hd-transform)
    assert inputs["image_sizes"].as_numpy().tolist() == [[1008, 1344]]
    assert inputs["num_image_tokens"].as_numpy().tolist() == [[num_image_tokens(3, 4)]]
    assert inputs["pixel_values"].as_numpy().shape == (1, 17, 3, 336, 336)
    assert (inputs["input_ids"].as_numpy() == -1).sum() == num_image_tokens(3, 4)

    tokens = _genai_tokens(model, inputs, 16)
    assert len(tokens) == 16
    assert len(set(tokens)) > 1


@pytest.mark.oracle
def test_genai_and_plain_onnxruntime_agree_on_a_text_prompt(any_model_dir):
    model = og.Model(str(any_model_dir))
    inputs = model.create_multimodal_processor()(TEXT_PROMPT, images=None)
    ids = inputs["input_ids"].as_numpy().astype(np.int64)
    expected = _genai_tokens(model, inputs, 16)

    embedding = _session(any_model_dir, "redesigned", "embedding")
    decoder = _session(any_model_dir, "redesigned", "decoder")
    no_image = np.zeros((0, HIDDEN_SIZE), np.float32)
    past, step_ids, tokens = _empty_past(), ids, []
    while len(tokens) < len(expected):
        embeds = embedding.run(None, {"input_ids": step_ids, "image_features": no_image})[0]
        logits, past = _run_decoder(decoder, embeds, past)
        tokens.append(int(logits[0, -1].argmax()))
        step_ids = np.array([tokens[-1:]], dtype=np.int64)
    assert tokens == expected


@pytest.mark.oracle
def test_genai_and_phi3v_agree_on_an_image_prompt(any_model_dir, image_path):
    model = og.Model(str(any_model_dir))
    inputs = model.create_multimodal_processor()(
        IMAGE_PROMPT, images=og.Images.open(str(image_path))
    )
    ids = inputs["input_ids"].as_numpy()[0].tolist()
    expected = _genai_tokens(model, inputs, 16)

    result = Pipeline.load(any_model_dir, precision="exact").generate(
        IMAGE_PROMPT, images=[image_path], input_ids=ids, max_new_tokens=len(expected)
    )
    assert list(result.token_ids) == expected


# --- outlier activation channels -----------------------------------------------------------------


def _linear_inputs(model_dir: Path, role: str, feeds: dict) -> dict[str, np.ndarray]:
    """The activation entering every linear layer that reads a norm's output, by layer name."""
    model = onnx.load(str(model_dir / MODEL_FILES["redesigned"][role]))
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    entering = {
        node.name: node.input[0]
        for node in model.graph.node
        if node.op_type in ("MatMul", "MatMulNBits")
        and produced_by.get(node.input[0], "").endswith("LayerNormalization")
    }
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        for name in entering.values()
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(list(entering.values()), feeds)
    return dict(zip(entering, values, strict=True))


def _decoder_feeds() -> dict[str, np.ndarray]:
    return {
        "inputs_embeds": _random_embeds(16),
        "attention_mask": np.ones((1, 16), dtype=np.int64),
        **_empty_past(),
    }


def _vision_feeds() -> dict[str, np.ndarray]:
    return {"pixel_values": _pixel_values(1, 3), "image_sizes": _image_sizes((1, 2))}


def _channel_rms(activation: np.ndarray) -> np.ndarray:
    rows = activation.reshape(-1, activation.shape[-1])
    return np.sqrt((rows.astype(np.float64) ** 2).mean(axis=0))


# every norm feeds one: qkv and gate_up per decoder layer + lm_head; qkv and fc1 per CLIP layer
NORMED_LINEARS = {"decoder": 2 * TINY.num_layers + 1, "vision": 2 * TINY.clip_layers_used}


@pytest.mark.parametrize(
    ("role", "width", "feeds"),
    [("decoder", TINY.hidden_size, _decoder_feeds), ("vision", TINY.clip_width, _vision_feeds)],
)
def test_outlier_option_gives_every_normed_linear_input_the_same_outlier_channels(
    role, width, feeds, tiny_outlier_model_dir
):
    expected = outlier_channel_ids(width, OUTLIER_CHANNELS)
    activations = _linear_inputs(tiny_outlier_model_dir, role, feeds())
    assert len(activations) == NORMED_LINEARS[role]
    for name, activation in activations.items():
        rms = _channel_rms(activation)
        assert sorted(np.argsort(rms)[-OUTLIER_CHANNELS:]) == expected.tolist(), name
        typical = np.median(np.delete(rms, expected))
        # The first norm's channels are exactly DEFAULT_OUTLIER_GAIN times the rest; later ones
        # less evenly so, since the amplified channels also shape the residual stream.
        assert rms[expected].max() > 0.5 * DEFAULT_OUTLIER_GAIN * typical, name
        assert rms[expected].min() > 4 * typical, name


@pytest.mark.parametrize(
    ("role", "feeds"), [("decoder", _decoder_feeds), ("vision", _vision_feeds)]
)
def test_without_the_outlier_option_no_channel_stands_out(role, feeds, tiny_int4_model_dir):
    activations = _linear_inputs(tiny_int4_model_dir, role, feeds())
    assert len(activations) == NORMED_LINEARS[role]
    for name, activation in activations.items():
        rms = _channel_rms(activation)
        assert rms.max() < 4 * np.median(rms), name


def test_outlier_set_still_gives_finite_logits_and_image_features(tiny_outlier_model_dir):
    result = Pipeline.load(tiny_outlier_model_dir).generate("Hello", max_new_tokens=8)
    assert len(result.token_ids) == 8
    logits, _ = _run_decoder(
        _session(tiny_outlier_model_dir, "redesigned", "decoder"), _random_embeds(16), _empty_past()
    )
    assert np.isfinite(logits).all()
    features = _session(tiny_outlier_model_dir, "redesigned", "vision").run(None, _vision_feeds())[
        0
    ]
    assert np.isfinite(features).all()


def test_outlier_channels_must_fit_the_narrowest_norm(tmp_path):
    with pytest.raises(ValueError, match="outlier_channels must be 0..32"):
        build_model(tmp_path, outlier_channels=TINY.clip_width + 1)
