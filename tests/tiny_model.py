"""A tiny random-weight Phi-3-vision model set with the real release's ONNX interface.

The real weights (several GB) cannot be downloaded in CI or offline, yet every part of the project
that touches a model (session creation, input names and dtypes, the KV-cache loop, the image-token
layout, the genai oracle) must be tested against the *interface* those files have. This module
writes a folder that looks, to onnxruntime and to onnxruntime-genai 0.18, exactly like a real
Phi-3-vision ONNX release, only with random weights and a hidden size of 64:

* the same file names, input/output names, dtypes, ranks and dynamic axes (``phi3v-spec.md`` §2);
* the same decoder structure as genai's model builder: ``SimplifiedLayerNormalization`` /
  ``SkipSimplifiedLayerNormalization``, a packed QKV ``MatMul`` into ``GroupQueryAttention`` with
  rotary inside, LongRoPE as an ``If`` on ``attention_mask.shape[1] > 4096`` choosing between a
  short and a long cos/sin cache, a SiLU-gated MLP and an ``lm_head`` (``scale-baseline.md`` §1);
* a "CLIP-lite" vision model that emits exactly the Phi-3-V number of image rows for any image
  size, because genai pre-allocates that output (``model-interfaces.md`` §3, §6);
* weights as external data in ``<name>.onnx.data`` beside each ``.onnx``, as the release ships.

Two layouts exist (``model-interfaces.md`` §1): "redesigned" (Sep 2024, what genai 0.18 runs:
vision -> ``image_features`` [N, H], the embedding model merges them) and "legacy" (June 2024,
``Phi-3-vision-128k-instruct-onnx-cpu``: vision -> ``visual_features`` [1, N, H], the embedding
model is a bare ``Gather``). The decoder, the tokenizer and the embedding table are identical
in both, so the two layouts must give the same tokens for the same inputs.

Run ``python tests/tiny_model.py OUT_DIR [--legacy] [--seed N]`` to write a set to try the app on.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYOUTS = ("redesigned", "legacy")
TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "phi3v-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# --- text model (tiny, but the structure of phi3v-spec.md §2 / scale-baseline.md §1) ---
HIDDEN_SIZE = 64  # real: 3072
NUM_HEADS = 4  # real: 32
NUM_KV_HEADS = 2  # real: 32; fewer here so code that confuses heads and kv heads fails
HEAD_SIZE = HIDDEN_SIZE // NUM_HEADS  # 16; real: 96
NUM_LAYERS = 2  # real: 32
INTERMEDIATE_SIZE = 128  # real: 8192
VOCAB_SIZE = 32064  # Phi-3-V embedding/logit rows (phi3v-spec.md §1)
RMS_NORM_EPS = 1e-5  # Phi-3 config rms_norm_eps (phi3v-spec.md §2)
ROPE_THETA = 10000.0  # Phi-3 config rope_theta (phi3v-spec.md §2)
ORIGINAL_CONTEXT = 4096  # original_max_position_embeddings: the LongRoPE switch point (spec §2)
CONTEXT_LENGTH = 131072  # max_position_embeddings / genai context_length (spec §1)
# LongRoPE ("su") rescale factors, one per rotary frequency (HEAD_SIZE / 2 of them). Made up
# for the tiny model but shaped like Phi-3's 48: near 1 for the short cache, growing to tens
# for the long one, so switching caches visibly changes the outputs.
SHORT_FACTORS = (1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.6, 2.0)
LONG_FACTORS = (1.1, 1.3, 1.8, 3.0, 6.0, 12.0, 25.0, 48.0)

# --- token ids (genai_config.json / tokenizer.json, phi3v-spec.md §1, §3.1) ---
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 32007  # <|end|>
PAD_TOKEN_ID = 32000  # <|endoftext|>
BYTE_TOKENS = range(3, 259)  # <0x00>..<0xFF>, the byte-fallback pieces
ADDED_TOKENS_START = 32000  # <|endoftext|>, <|assistant|>, ... and 19 ids with no token

# --- random-weight scales (chosen for this tiny model, see _lm_head_weight) ---
LM_HEAD_STD = 0.5  # logits std ~ LM_HEAD_STD * sqrt(HIDDEN_SIZE) = 4 for unit-RMS hidden states
BYTE_TOKEN_GAIN = 1.25  # byte-fallback pieces win now and then, as in real output
SPECIAL_TOKEN_GAIN = 0.5  # added tokens (<|end|>, ...) rarely win
# Unit-scale random q/k give near-uniform attention, which over a 2k-token image prompt averages
# to nothing: the next token then depends on the current one only and greedy output cycles.
QK_GAIN = 2.0

# --- vision (Phi-3-V HD transform, phi3v-spec.md §4-6) ---
CROP_SIZE = 336  # CLIP ViT-L/14-336 input size
PATCH_SIZE = 14  # CLIP patch size
PATCHES_PER_SIDE = CROP_SIZE // PATCH_SIZE  # 24
MERGED_PER_SIDE = PATCHES_PER_SIDE // 2  # 12: 2x2 patch merge -> 144 tokens per crop
VISION_CHANNELS = 32  # real: 1024 (CLIP width)
MERGED_CHANNELS = 4 * VISION_CHANNELS  # 128; real: 4096
MAX_CROPS = 16  # num_crops / hd_num; processors emit MAX_CROPS + 1 crops (global first)

OPSET = 17
IR_VERSION = 10
EXTERNAL_DATA_THRESHOLD = 128  # bytes: every weight goes to .onnx.data, scalar constants stay

# Independent random streams, so each model's weights do not depend on which others are built.
_STREAM_EMBEDDING, _STREAM_DECODER, _STREAM_VISION = 0, 1, 2

MODEL_FILES = {
    "redesigned": {
        "vision": "phi-3-v-128k-instruct-vision.onnx",
        "embedding": "phi-3-v-128k-instruct-embedding.onnx",
        "decoder": "phi-3-v-128k-instruct-text.onnx",
    },
    "legacy": {
        "vision": "phi-3-v-128k-instruct-vision.onnx",
        "embedding": "phi-3-v-128k-instruct-text-embedding.onnx",
        "decoder": "phi-3-v-128k-instruct-text.onnx",
    },
}

FLOAT, INT64, INT32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32


def build_tiny_model(out_dir: Path, *, layout: str = "redesigned", seed: int = 1234) -> Path:
    """Write a complete tiny Phi-3-vision model folder into ``out_dir`` and return ``out_dir``.

    ``layout`` is "redesigned" (genai 0.18) or "legacy" (June 2024). The same ``seed`` gives
    byte-identical files, and the decoder and embedding table do not depend on the layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = MODEL_FILES[layout]
    legacy = layout == "legacy"

    _save(_vision_model(_rng(seed, _STREAM_VISION), legacy=legacy), out_dir / files["vision"])
    _save(
        _embedding_model(_rng(seed, _STREAM_EMBEDDING), legacy=legacy), out_dir / files["embedding"]
    )
    _save(_decoder_model(_rng(seed, _STREAM_DECODER)), out_dir / files["decoder"])
    _write_json(out_dir / "genai_config.json", _genai_config(layout))
    _write_json(out_dir / "processor_config.json", _processor_config())
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)
    return out_dir


def num_image_tokens(h_crops: int, w_crops: int) -> int:
    """Rows the vision model emits for one image of h_crops x w_crops tiles (phi3v-spec.md §4.8)."""
    tokens_per_crop = MERGED_PER_SIDE * MERGED_PER_SIDE
    return (h_crops * w_crops + 1) * tokens_per_crop + 1 + (h_crops + 1) * MERGED_PER_SIDE


# ---------------------------------------------------------------------------------------------
# Graph-building helpers


class _Graph:
    """Collects the nodes and initializers of one ONNX graph; op() returns output names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer, shared between users of the same value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/constants/{array.dtype.name}/{array.tolist()}"
            self._constants[key] = self.weight(name, array)
        return self._constants[key]

    def op(self, op_type: str, name: str, inputs, *, outputs=None, n_outputs=1, domain="", **attrs):
        """Add a node; its outputs are ``outputs`` or ``<name>/output_<k>``, as genai names them."""
        outputs = outputs or [f"{name}/output_{k}" for k in range(n_outputs)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outputs, name=name, domain=domain, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="phi3v-tiny-model")
        model.ir_version = IR_VERSION
        return model


def _tensor(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _linear(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    """A [fan_in, fan_out] MatMul weight that keeps activations at unit scale."""
    return _normal(rng, (fan_in, fan_out), 1.0 / math.sqrt(fan_in))


def _norm_weight(rng: np.random.Generator) -> np.ndarray:
    return (1.0 + _normal(rng, (HIDDEN_SIZE,), 0.1)).astype(np.float32)


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in ``<name>.onnx.data`` beside the model, as the release does."""
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_path.name,
        size_threshold=EXTERNAL_DATA_THRESHOLD,
    )
    data_path.chmod(path.stat().st_mode)  # onnx creates it owner-only; match the .onnx


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Embedding


def _embedding_table(rng: np.random.Generator) -> np.ndarray:
    return _normal(rng, (VOCAB_SIZE, HIDDEN_SIZE), 1.0)


def _embedding_model(rng: np.random.Generator, *, legacy: bool) -> onnx.ModelProto:
    """input_ids -> inputs_embeds; the redesigned model also pastes in image_features.

    Redesigned: image positions hold -image_id; they look up row 0 and are then overwritten, in
    sequence order, by the rows of ``image_features`` (which may be empty, [0, hidden]).
    Legacy: a bare Gather, so negative ids wrap around as in the real file (spec gotcha 5).
    """
    g = _Graph()
    wte = g.weight("model.embed_tokens.weight", _embedding_table(rng))
    ids_input = _tensor("input_ids", INT64, ["batch_size", "sequence_length"])
    embeds_output = _tensor("inputs_embeds", FLOAT, ["batch_size", "sequence_length", HIDDEN_SIZE])
    if legacy:
        g.op("Gather", "/embed/Gather", [wte, "input_ids"], outputs=["inputs_embeds"])
        return g.model("phi3v-tiny-text-embedding", [ids_input], [embeds_output])

    clamped = g.op("Max", "/embed/Max", ["input_ids", g.const(0)])
    text_embeds = g.op("Gather", "/embed/Gather", [wte, clamped])
    is_image = g.op("Less", "/embed/Less", ["input_ids", g.const(0)])
    positions = g.op("NonZero", "/embed/NonZero", [is_image])  # [2, n] in sequence order
    positions = g.op("Transpose", "/embed/Transpose", [positions], perm=[1, 0])
    g.op(
        "ScatterND",
        "/embed/ScatterND",
        [text_embeds, positions, "image_features"],
        outputs=["inputs_embeds"],
    )
    features_input = _tensor("image_features", FLOAT, ["num_image_tokens", HIDDEN_SIZE])
    return g.model("phi3v-tiny-embedding", [ids_input, features_input], [embeds_output])


# ---------------------------------------------------------------------------------------------
# Decoder


def _rope_caches(factors, length: int) -> tuple[np.ndarray, np.ndarray]:
    """LongRoPE cos/sin caches [length, HEAD_SIZE / 2]: inv_freq divided by per-dim factors."""
    exponents = np.arange(0, HEAD_SIZE, 2, dtype=np.float64) / HEAD_SIZE
    inv_freq = 1.0 / (np.asarray(factors, dtype=np.float64) * ROPE_THETA**exponents)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    # "su" magnitude scaling, the same for both caches (genai builder make_mscale_su)
    scale = CONTEXT_LENGTH / ORIGINAL_CONTEXT
    mscale = math.sqrt(1.0 + math.log(scale) / math.log(ORIGINAL_CONTEXT))
    cos, sin = np.cos(angles) * mscale, np.sin(angles) * mscale
    return cos.astype(np.float32), sin.astype(np.float32)


def _rope_branch(name: str, factors, length: int) -> onnx.GraphProto:
    """An If branch returning constant cos/sin caches (inline, as genai's builder does)."""
    cos, sin = _rope_caches(factors, length)
    nodes, outputs = [], []
    for kind, cache in (("cos", cos), ("sin", sin)):
        value = f"{kind}_cache_{name}"
        tensor = numpy_helper.from_array(cache, value)
        nodes.append(
            helper.make_node("Constant", [], [value], name=f"/{name}/{kind}_cache", value=tensor)
        )
        outputs.append(_tensor(value, FLOAT, list(cache.shape)))
    return helper.make_graph(nodes, f"{name}_rope_caches_graph", [], outputs)


def _attention_mask_inputs(g: _Graph) -> tuple[str, str, str]:
    """seqlens_k, total_sequence_length (GQA inputs) and the total length, from attention_mask."""
    base = "/model/attn_mask_reformat"
    total = g.op("ReduceSum", f"{base}/ReduceSum", ["attention_mask", g.const([1])], keepdims=0)
    seqlens = g.op("Sub", f"{base}/Sub", [total, g.const(1)])
    seqlens_k = g.op("Cast", f"{base}/Sub/Cast", [seqlens], to=INT32)
    shape = g.op("Shape", f"{base}/Shape", ["attention_mask"])
    total_len = g.op("Gather", f"{base}/Gather", [shape, g.const(1)], axis=0)
    total_seq_len = g.op("Cast", f"{base}/Gather/Cast", [total_len], to=INT32)
    return seqlens_k, total_seq_len, total_len


def _rope_switch(g: _Graph, total_len: str) -> tuple[str, str]:
    """The LongRoPE If: the long cache once the total length passes the original context."""
    base = "/model/rope_caches_subgraph"
    is_long = g.op("Greater", f"{base}/Greater", [total_len, g.const(ORIGINAL_CONTEXT)])
    return g.op(
        "If",
        f"{base}/If",
        [is_long],
        n_outputs=2,
        then_branch=_rope_branch("large", LONG_FACTORS, CONTEXT_LENGTH),
        else_branch=_rope_branch("small", SHORT_FACTORS, ORIGINAL_CONTEXT),
    )


def _decoder_layer(
    g: _Graph,
    rng: np.random.Generator,
    i: int,
    hidden: str,
    residual: str | None,
    mask_inputs: tuple[str, str],
    rope: tuple[str, str],
) -> tuple[str, str]:
    """Phi-3 block i; returns (MLP output, residual stream), which the next norm adds up.

    As in genai's builder the residual additions live inside SkipSimplifiedLayerNormalization:
    the first layer's input norm has nothing to add, so it is a plain SimplifiedLayerNormalization.
    """
    base = f"/model/layers.{i}"
    norm = g.weight(f"model.layers.{i}.input_layernorm.weight", _norm_weight(rng))
    if residual is None:
        normed = g.op(
            "SimplifiedLayerNormalization",
            f"{base}/input_layernorm/LayerNorm",
            [hidden, norm],
            axis=-1,
            epsilon=RMS_NORM_EPS,
        )
        residual = hidden
    else:
        normed, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            f"{base}/input_layernorm/SkipLayerNorm",
            [hidden, residual, norm],
            n_outputs=4,
            domain="com.microsoft",
            epsilon=RMS_NORM_EPS,
        )

    qkv_w = g.weight(f"model.layers.{i}.attn.qkv_proj.weight", _qkv_weight(rng))
    qkv = g.op("MatMul", f"{base}/attn/qkv_proj/MatMul", [normed, qkv_w])
    seqlens_k, total_seq_len = mask_inputs
    cos_cache, sin_cache = rope
    # packed query (q | k | v), so the key and value inputs stay empty; rotary inside the op
    attn_name = f"{base}/attn/GroupQueryAttention"
    attn, _, _ = g.op(
        "GroupQueryAttention",
        attn_name,
        [
            qkv,
            "",
            "",
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            seqlens_k,
            total_seq_len,
            cos_cache,
            sin_cache,
        ],
        outputs=[f"{attn_name}/output_0", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        num_heads=NUM_HEADS,
        kv_num_heads=NUM_KV_HEADS,
        do_rotary=1,
        rotary_interleaved=0,
    )
    o_w = g.weight(f"model.layers.{i}.attn.o_proj.weight", _linear(rng, HIDDEN_SIZE, HIDDEN_SIZE))
    attn = g.op("MatMul", f"{base}/attn/o_proj/MatMul", [attn, o_w])

    post_norm = g.weight(f"model.layers.{i}.post_attention_layernorm.weight", _norm_weight(rng))
    normed, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization",
        f"{base}/post_attention_layernorm/SkipLayerNorm",
        [attn, residual, post_norm],
        n_outputs=4,
        domain="com.microsoft",
        epsilon=RMS_NORM_EPS,
    )
    return _mlp(g, rng, i, normed), residual


def _qkv_weight(rng: np.random.Generator) -> np.ndarray:
    """Packed [hidden, q | k | v] projection; q and k scaled up for sharper attention."""
    qk_size = (NUM_HEADS + NUM_KV_HEADS) * HEAD_SIZE
    weight = _linear(rng, HIDDEN_SIZE, qk_size + NUM_KV_HEADS * HEAD_SIZE)
    weight[:, :qk_size] *= QK_GAIN
    return weight


def _mlp(g: _Graph, rng: np.random.Generator, i: int, normed: str) -> str:
    """SiLU-gated MLP with Phi-3's packed gate_up projection."""
    base = f"/model/layers.{i}/mlp"
    gate_up_w = _linear(rng, HIDDEN_SIZE, 2 * INTERMEDIATE_SIZE)
    down_w = _linear(rng, INTERMEDIATE_SIZE, HIDDEN_SIZE)
    gate_up = g.op(
        "MatMul",
        f"{base}/gate_up_proj/MatMul",
        [normed, g.weight(f"model.layers.{i}.mlp.gate_up_proj.weight", gate_up_w)],
    )
    gate, up = g.op(
        "Split", f"{base}/Split", [gate_up, g.const([INTERMEDIATE_SIZE] * 2)], n_outputs=2, axis=-1
    )
    silu = g.op(
        "Mul", f"{base}/act_fn/Mul", [gate, g.op("Sigmoid", f"{base}/act_fn/Sigmoid", [gate])]
    )
    gated = g.op("Mul", f"{base}/Mul", [silu, up])
    down = g.weight(f"model.layers.{i}.mlp.down_proj.weight", down_w)
    return g.op("MatMul", f"{base}/down_proj/MatMul", [gated, down])


def _lm_head_weight(rng: np.random.Generator) -> np.ndarray:
    """[hidden, vocab] with per-token gains, so greedy output mixes word pieces and bytes.

    With equal gains the 256 byte pieces would almost never beat ~32k word pieces; the real
    model emits them now and then (newlines, emoji), so they get a larger gain. The added
    special tokens (and ids with no token at all) get a small one: a real model rarely
    emits them, and an early <|end|> would cut the tests' generations short.
    """
    gains = np.ones(VOCAB_SIZE, dtype=np.float32)
    gains[BYTE_TOKENS.start : BYTE_TOKENS.stop] = BYTE_TOKEN_GAIN
    gains[ADDED_TOKENS_START:] = SPECIAL_TOKEN_GAIN
    weight = _normal(rng, (HIDDEN_SIZE, VOCAB_SIZE), LM_HEAD_STD)
    return weight * gains


def _decoder_model(rng: np.random.Generator) -> onnx.ModelProto:
    """The text decoder: inputs_embeds + attention_mask + past KV -> logits + present KV."""
    g = _Graph()
    seqlens_k, total_seq_len, total_len = _attention_mask_inputs(g)
    rope = _rope_switch(g, total_len)

    hidden, residual = "inputs_embeds", None
    for i in range(NUM_LAYERS):
        hidden, residual = _decoder_layer(
            g, rng, i, hidden, residual, (seqlens_k, total_seq_len), rope
        )

    final_norm = g.weight("model.norm.weight", _norm_weight(rng))
    normed = g.op(
        "SkipSimplifiedLayerNormalization",
        "/model/norm/SkipLayerNorm",
        [hidden, residual, final_norm],
        domain="com.microsoft",
        epsilon=RMS_NORM_EPS,
    )
    lm_head = g.weight("lm_head.weight", _lm_head_weight(rng))
    g.op("MatMul", "/lm_head/MatMul", [normed, lm_head], outputs=["logits"])

    kv_past = ["batch_size", NUM_KV_HEADS, "past_sequence_length", HEAD_SIZE]
    kv_present = ["batch_size", NUM_KV_HEADS, "total_sequence_length", HEAD_SIZE]
    inputs = [
        _tensor("inputs_embeds", FLOAT, ["batch_size", "sequence_length", HIDDEN_SIZE]),
        _tensor("attention_mask", INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [_tensor("logits", FLOAT, ["batch_size", "sequence_length", VOCAB_SIZE])]
    for i in range(NUM_LAYERS):
        for kind in ("key", "value"):
            inputs.append(_tensor(f"past_key_values.{i}.{kind}", FLOAT, kv_past))
            outputs.append(_tensor(f"present.{i}.{kind}", FLOAT, kv_present))
    return g.model("phi3v-tiny-text", inputs, outputs)


# ---------------------------------------------------------------------------------------------
# Vision


def _vision_model(rng: np.random.Generator, *, legacy: bool) -> onnx.ModelProto:
    """pixel_values + image_sizes -> one row per image token, in Phi-3-V's HD layout.

    Each crop goes through a "CLIP-lite" encoder (patch Conv, position embedding, tanh) and a
    2x2 merge to 12 x 12 x 128; a Loop over images lays the crops out (see _hd_layout_body);
    img_projection maps the rows to the decoder's hidden size.
    """
    g = _Graph()
    merged = _crop_features(g, rng)
    sub_gn = g.weight(
        "model.vision_embed_tokens.sub_GN", _normal(rng, (1, 1, MERGED_CHANNELS), 0.5)
    )
    glb_gn = g.weight("model.vision_embed_tokens.glb_GN", _normal(rng, (1, MERGED_CHANNELS), 0.5))
    num_images = g.op(
        "Gather",
        "/vision/NumImages",
        [g.op("Shape", "/vision/Shape", ["pixel_values"]), g.const(0)],
        axis=0,
    )
    empty = g.weight("/vision/empty_rows", np.zeros((0, MERGED_CHANNELS), dtype=np.float32))
    rows = g.op(
        "Loop",
        "/vision/hd_layout/Loop",
        [num_images, "", empty],
        body=_hd_layout_body(merged, sub_gn, glb_gn),
    )
    features = _img_projection(g, rng, rows)

    pixel_shape = ["num_images", "num_crops", 3, CROP_SIZE, CROP_SIZE]
    inputs = [
        _tensor("pixel_values", FLOAT, pixel_shape),
        _tensor("image_sizes", INT64, ["num_images", 2]),
    ]
    if legacy:  # one image per call, with a batch axis: [1, N, hidden]
        g.op(
            "Unsqueeze", "/vision/Unsqueeze", [features, g.const([0])], outputs=["visual_features"]
        )
        output = _tensor("visual_features", FLOAT, [1, "num_image_tokens", HIDDEN_SIZE])
    else:  # the rows of all images, concatenated: [N, hidden]
        g.op("Identity", "/vision/Identity", [features], outputs=["image_features"])
        output = _tensor("image_features", FLOAT, ["num_image_tokens", HIDDEN_SIZE])
    return g.model("phi3v-tiny-vision", inputs, [output])


def _crop_features(g: _Graph, rng: np.random.Generator) -> str:
    """pixel_values [n, c, 3, 336, 336] -> merged crop features [n, c, 12, 12, 128]."""
    base = "/vision/clip"
    patch_w = _normal(
        rng, (VISION_CHANNELS, 3, PATCH_SIZE, PATCH_SIZE), 1 / math.sqrt(3 * PATCH_SIZE**2)
    )
    pos = _normal(rng, (1, VISION_CHANNELS, PATCHES_PER_SIDE, PATCHES_PER_SIDE), 0.5)
    shape = g.op("Shape", f"{base}/Shape", ["pixel_values"])
    crops = g.op(
        "Reshape", f"{base}/Reshape", ["pixel_values", g.const([-1, 3, CROP_SIZE, CROP_SIZE])]
    )
    patches = g.op(
        "Conv",
        f"{base}/patch_embedding/Conv",
        [crops, g.weight("vision.patch_embedding.weight", patch_w)],
        kernel_shape=[PATCH_SIZE, PATCH_SIZE],
        strides=[PATCH_SIZE, PATCH_SIZE],
    )
    positioned = g.op("Add", f"{base}/Add", [patches, g.weight("vision.position_embedding", pos)])
    encoded = g.op("Tanh", f"{base}/Tanh", [positioned])  # [n*c, 32, 24, 24]
    # 2x2 merge: channel index of the merged token = (dy, dx, c), as in Phi-3-V's reshape
    split = [-1, VISION_CHANNELS, MERGED_PER_SIDE, 2, MERGED_PER_SIDE, 2]
    blocks = g.op("Reshape", f"{base}/merge/Reshape", [encoded, g.const(split)])
    blocks = g.op("Transpose", f"{base}/merge/Transpose", [blocks], perm=[0, 2, 4, 3, 5, 1])
    images_and_crops = g.op("Slice", f"{base}/merge/Slice", [shape, g.const([0]), g.const([2])])
    merged_shape = g.op(
        "Concat",
        f"{base}/merge/Concat",
        [images_and_crops, g.const([MERGED_PER_SIDE, MERGED_PER_SIDE, MERGED_CHANNELS])],
        axis=0,
    )
    return g.op("Reshape", f"{base}/merge/Reshape_1", [blocks, merged_shape])


def _hd_layout_body(merged: str, sub_gn: str, glb_gn: str) -> onnx.GraphProto:
    """Loop body for image i: append its h*12*(w*12+1) + 1 + 12*13 rows to the carried rows.

    Sub-crops 1..h*w are tiled row-major into (h*12) x (w*12), each row followed by sub_GN;
    then glb_GN; then the global crop (crop 0) as 12 rows of 12 + a sub_GN newline.
    """
    b = _Graph()
    side, channels = MERGED_PER_SIDE, MERGED_CHANNELS
    size = b.op("Gather", "/hd/size", ["image_sizes", "i"], axis=0)  # padded HD [H, W]
    crops_hw = b.op("Div", "/hd/crops_hw", [size, b.const(CROP_SIZE)])
    h = b.op("Gather", "/hd/h", [crops_hw, b.const([0])], axis=0)  # [1]
    w = b.op("Gather", "/hd/w", [crops_hw, b.const([1])], axis=0)
    crops = b.op("Gather", "/hd/crops", [merged, "i"], axis=0)  # [c, 12, 12, 128]

    num_sub = b.op("Mul", "/hd/num_sub", [h, w])
    sub_end = b.op("Add", "/hd/sub_end", [num_sub, b.const([1])])
    subs = b.op("Slice", "/hd/subs", [crops, b.const([1]), sub_end, b.const([0])])
    tile_shape = b.op("Concat", "/hd/tile_shape", [h, w, b.const([side, side, channels])], axis=0)
    tiles = b.op("Reshape", "/hd/tiles", [subs, tile_shape])  # [h, w, 12, 12, 128]
    tiles = b.op("Transpose", "/hd/tiles_t", [tiles], perm=[0, 2, 1, 3, 4])  # [h, 12, w, 12, 128]
    grid_h = b.op("Mul", "/hd/grid_h", [h, b.const([side])])
    grid_w = b.op("Mul", "/hd/grid_w", [w, b.const([side])])
    grid_shape = b.op("Concat", "/hd/grid_shape", [grid_h, grid_w, b.const([channels])], axis=0)
    grid = b.op("Reshape", "/hd/grid", [tiles, grid_shape])
    grid_rows = _with_newlines(b, "/hd/grid", grid, grid_h, sub_gn)

    global_crop = b.op("Gather", "/hd/global", [crops, b.const(0)], axis=0)  # [12, 12, 128]
    global_rows = _with_newlines(b, "/hd/global", global_crop, b.const([side]), sub_gn)
    appended = ["rows_in", grid_rows, glb_gn, global_rows]
    b.op("Concat", "/hd/append", appended, outputs=["rows_out"], axis=0)
    b.op("Identity", "/hd/cond", ["cond_in"], outputs=["cond_out"])
    rows = [None, channels]  # the row count grows from one iteration to the next
    inputs = [
        _tensor("i", INT64, []),
        _tensor("cond_in", TensorProto.BOOL, []),
        _tensor("rows_in", FLOAT, rows),
    ]
    outputs = [_tensor("cond_out", TensorProto.BOOL, []), _tensor("rows_out", FLOAT, rows)]
    return helper.make_graph(b.nodes, "hd_layout_body", inputs, outputs, b.initializers)


def _with_newlines(b: _Graph, name: str, grid: str, height: str, sub_gn: str) -> str:
    """[rows, cols, C] -> [rows * (cols + 1), C]: every row ends with the sub_GN newline."""
    newline_shape = b.op(
        "Concat", f"{name}/newline_shape", [height, b.const([1, MERGED_CHANNELS])], axis=0
    )
    newlines = b.op("Expand", f"{name}/newlines", [sub_gn, newline_shape])
    with_newlines = b.op("Concat", f"{name}/with_newlines", [grid, newlines], axis=1)
    return b.op("Reshape", f"{name}/flatten", [with_newlines, b.const([-1, MERGED_CHANNELS])])


def _img_projection(g: _Graph, rng: np.random.Generator, rows: str) -> str:
    """Linear 128 -> 64, erf-GELU, Linear 64 -> 64 (Phi-3-V img_projection, spec §6)."""
    base = "/vision/img_projection"
    w1 = g.weight("img_projection.0.weight", _linear(rng, MERGED_CHANNELS, HIDDEN_SIZE))
    b1 = g.weight("img_projection.0.bias", _normal(rng, (HIDDEN_SIZE,), 0.1))
    w2 = g.weight("img_projection.2.weight", _linear(rng, HIDDEN_SIZE, HIDDEN_SIZE))
    b2 = g.weight("img_projection.2.bias", _normal(rng, (HIDDEN_SIZE,), 0.1))
    x = g.op("Add", f"{base}/0/Add", [g.op("MatMul", f"{base}/0/MatMul", [rows, w1]), b1])
    x = g.op("Gelu", f"{base}/1/Gelu", [x], domain="com.microsoft")  # erf form
    return g.op("Add", f"{base}/2/Add", [g.op("MatMul", f"{base}/2/MatMul", [x, w2]), b2])


# ---------------------------------------------------------------------------------------------
# Configuration files


def _genai_config(layout: str) -> dict:
    """genai_config.json: the keys of the real release, with the tiny model's dimensions."""
    files = MODEL_FILES[layout]
    legacy = layout == "legacy"
    embedding_inputs = {"input_ids": "input_ids"}
    if not legacy:
        embedding_inputs["image_features"] = "image_features"
    vision_output = "visual_features" if legacy else "image_features"
    return {
        "model": {
            "bos_token_id": BOS_TOKEN_ID,
            "context_length": CONTEXT_LENGTH,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": files["decoder"],
                "head_size": HEAD_SIZE,
                "hidden_size": HIDDEN_SIZE,
                "inputs": {
                    "inputs_embeds": "inputs_embeds",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": NUM_HEADS,
                "num_hidden_layers": NUM_LAYERS,
                "num_key_value_heads": NUM_KV_HEADS,
            },
            "embedding": {
                "filename": files["embedding"],
                "inputs": embedding_inputs,
                "outputs": {"inputs_embeds": "inputs_embeds"},
            },
            "vision": {
                "filename": files["vision"],
                "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
                "outputs": {vision_output: vision_output},
            },
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID,
            "type": "phi3v",
            "vocab_size": VOCAB_SIZE,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": CONTEXT_LENGTH,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _processor_config() -> dict:
    """The onnxruntime-extensions image pipeline genai runs: decode, to RGB, Phi-3 HD transform."""

    def operation(name: str, op_type: str, attrs: dict | None = None) -> dict:
        op = {"name": name, "domain": "com.microsoft.extensions", "type": op_type}
        if attrs:
            op["attrs"] = attrs
        return {"operation": op}

    return {
        "processor": {
            "name": "image_processing",
            "transforms": [
                operation("decode_image", "DecodeImage", {"color_space": "BGR"}),
                operation("convert_to_rgb", "ConvertRGB"),
                operation(
                    "phi3_image_transform",
                    "Phi3ImageTransform",
                    {"num_crops": MAX_CROPS, "num_img_tokens": MERGED_PER_SIDE * MERGED_PER_SIDE},
                ),
            ],
        }
    }


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a tiny random-weight Phi-3-vision ONNX model set (for offline tests).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model set into")
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="June-2024 layout (Phi-3-vision-128k-instruct-onnx-cpu) instead of the Sep-2024 "
        "one that onnxruntime-genai 0.18 runs",
    )
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default: 1234)")
    args = parser.parse_args(argv)
    layout = "legacy" if args.legacy else "redesigned"
    out_dir = build_tiny_model(args.out_dir, layout=layout, seed=args.seed)
    print(f"wrote a tiny {layout} Phi-3-vision model set to {out_dir}")


if __name__ == "__main__":
    main()
