"""Random-weight Phi-3-vision ONNX model sets with the real release's interface, in any size.

The real weights cannot be downloaded in CI or offline, yet everything that touches a model
(session creation, input names and dtypes, the KV-cache loop, the image-token layout, the genai
oracle, speed and memory) depends only on the *interface* and the shapes of the files. This module
writes a folder that looks, to onnxruntime and to onnxruntime-genai 0.18, like a real
Phi-3-vision ONNX release, with random weights:

* the same file names, input/output names, dtypes, ranks and dynamic axes
  (docs/ARCHITECTURE.md#the-model-interface);
* the decoder genai's model builder makes: ``SimplifiedLayerNormalization`` /
  ``SkipSimplifiedLayerNormalization``, a packed QKV projection into ``GroupQueryAttention`` with
  rotary inside, LongRoPE as an ``If`` on ``attention_mask.shape[1] > 4096`` choosing a short or
  a long cos/sin cache, a SiLU-gated MLP and an ``lm_head``
  (docs/ARCHITECTURE.md#the-random-weight-model-sets);
* the vision model: CLIP on every crop (patch Conv, CLS + position embedding, pre-LN, encoder
  layers with ``MultiHeadAttention`` and a QuickGelu MLP, up to hidden_states[-2]), CLS dropped,
  the 2x2 merge, the HD layout with sub_GN / glb_GN in an ONNX ``Loop``, and ``img_projection``;
  it emits exactly the Phi-3-V number of rows for any image size, because genai pre-allocates
  that output (docs/ARCHITECTURE.md#two-export-layouts);
* every linear layer as fp32 ``MatMul`` ("float") or as ``MatMulNBits`` int4, block 32,
  accuracy level 4 ("int4", as the cpu-int4 release); the patch Conv and the embedding table
  stay fp32, as released;
* weights as external data in ``<name>.onnx.data`` beside each ``.onnx``.

Two layouts exist (docs/ARCHITECTURE.md#two-export-layouts): "redesigned" (Sep 2024, what
genai 0.18 runs: vision -> ``image_features`` [N, H], the embedding model merges them) and
"legacy" (June 2024, ``Phi-3-vision-128k-instruct-onnx-cpu``: vision -> ``visual_features``
[1, N, H], the embedding model is a bare ``Gather``). The decoder, the tokenizer and the
embedding table do not depend on the layout, so both layouts give the same tokens for the same
inputs.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from phi3v.config import DEFAULT_NUM_CROPS, GENAI_CONFIG, PROCESSOR_CONFIG, TOKENIZER
from phi3v.image import TILE, TOKENS_PER_ROW, TOKENS_PER_TILE
from phi3v.testing.onnx_graph import (
    BOOL,
    FLOAT,
    INT4_BLOCK,
    INT32,
    INT64,
    Graph,
    WeightFile,
    rng,
    value,
)
from phi3v.testing.sizes import TINY, WEIGHT_FORMATS, ModelSize

LAYOUTS = ("redesigned", "legacy")
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
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "phi3v-tokenizer"
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json")

# --- Phi-3 text model (config.json, docs/ARCHITECTURE.md#the-model-interface) ---
RMS_NORM_EPS = 1e-5  # rms_norm_eps
ROPE_THETA = 10000.0  # rope_theta
ORIGINAL_CONTEXT = 4096  # original_max_position_embeddings: where LongRoPE switches caches
CONTEXT_LENGTH = 131072  # max_position_embeddings / genai context_length (ARCHITECTURE.md)

# --- token ids (genai_config.json / tokenizer.json, docs/ARCHITECTURE.md#the-prompt-ids) ---
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 32007  # <|end|>
PAD_TOKEN_ID = 32000  # <|endoftext|>
BYTE_TOKENS = range(3, 259)  # <0x00>..<0xFF>, the byte-fallback pieces
ADDED_TOKENS_START = 32000  # <|endoftext|>, <|assistant|>, ... and ids with no token

# --- CLIP ViT-L/14-336 as Phi-3-V uses it: 24x24 patches of 14 pixels, 2x2-merged to 12x12 ---
PATCHES_PER_SIDE = 2 * TOKENS_PER_ROW  # 24
PATCH_SIZE = TILE // PATCHES_PER_SIDE  # 14
CLIP_TOKENS = PATCHES_PER_SIDE**2 + 1  # 576 patches + CLS
CLIP_LN_EPS = 1e-5
QUICK_GELU_ALPHA = 1.702

# --- random-weight gains (values do not matter to timing; these make the output text-like) ---
LM_HEAD_GAIN = 4.0  # first-step logits std ~4 for unit-RMS hidden states
BYTE_TOKEN_GAIN = 1.25  # byte-fallback pieces win now and then, as in real output
SPECIAL_TOKEN_GAIN = 0.5  # added tokens (<|end|>, ...) rarely win, so runs are not cut short
# Unit-scale random q and k give near-uniform attention, which over a long prompt averages to
# nothing: the next token then depends on the current one only and greedy output cycles.
QK_GAIN = 2.0
DEFAULT_OUTLIER_GAIN = 32.0  # outlier channels of LLM activations are tens of times the rest

# Independent random streams, so each model's weights do not depend on which others are built.
_STREAMS = {"embedding": 0, "decoder": 1, "vision": 2}


def build_model(
    out_dir: str | Path,
    *,
    size: ModelSize = TINY,
    weights: str | None = None,
    layout: str = "redesigned",
    seed: int = 1234,
    outlier_channels: int = 0,
    outlier_gain: float = DEFAULT_OUTLIER_GAIN,
) -> Path:
    """Write a complete random-weight Phi-3-vision model folder into ``out_dir``; return it.

    ``size`` is TINY or REAL (or any ModelSize); ``weights`` "float" (fp32 MatMul) or "int4"
    (MatMulNBits), by default ``size.default_weights``; ``layout`` "redesigned" (genai 0.18) or
    "legacy" (June 2024). ``outlier_channels`` > 0 multiplies that many channels of every norm
    weight feeding a linear layer by ``outlier_gain`` (the channels are ``outlier_channel_ids``),
    so the activations entering the MatMuls have outlier channels as real LLMs' do. The same
    arguments give byte-identical files; the decoder and embedding table do not depend on the
    layout.
    """
    weights = weights or size.default_weights
    _check_arguments(size, weights, layout, outlier_channels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outliers = _Outliers(outlier_channels, outlier_gain)
    legacy = layout == "legacy"
    builders = {
        "embedding": lambda g: _embedding_model(g, size, legacy=legacy),
        "decoder": lambda g: _decoder_model(g, size, outliers),
        "vision": lambda g: _vision_model(g, size, outliers, legacy=legacy),
    }
    for role, build in builders.items():
        path = out_dir / MODEL_FILES[layout][role]
        with WeightFile(path.with_name(path.name + ".data")) as data:
            model = build(Graph(data, rng(seed, _STREAMS[role]), weight_format=weights))
        onnx.save_model(model, path)  # the proto holds references, constants and RoPE caches
    _write_json(out_dir / GENAI_CONFIG, _genai_config(size, layout))
    _write_json(out_dir / PROCESSOR_CONFIG, _processor_config())
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)
    return out_dir


def outlier_channel_ids(width: int, count: int) -> np.ndarray:
    """The ``count`` channels (sorted) of a ``width``-wide norm that outliers=count amplifies.

    They depend on the width only, so every norm of one model amplifies the same channels, as
    the outlier channels of a real LLM persist through its layers.
    """
    if not 0 <= count <= width:
        raise ValueError(f"outlier channels must be 0..{width}, not {count}")
    return np.sort(np.random.default_rng(width).choice(width, count, replace=False))


def _check_arguments(size: ModelSize, weights: str, layout: str, outlier_channels: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, not {weights!r}")
    if outlier_channels < 0 or outlier_channels > min(size.hidden_size, size.clip_width):
        raise ValueError(
            f"outlier_channels must be 0..{min(size.hidden_size, size.clip_width)} "
            f"for the {size.name} size, not {outlier_channels}"
        )
    if not TOKENIZER_DIR.is_dir():
        raise FileNotFoundError(
            f"the tokenizer fixture {TOKENIZER_DIR} is missing: build from a source checkout "
            "of the project (pip install -e .)"
        )
    if weights != "int4":
        return
    inner = {
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "clip_width": size.clip_width,
        "clip_mlp": size.clip_mlp,
    }
    bad = {name: k for name, k in inner.items() if k % INT4_BLOCK}
    if bad:
        raise ValueError(
            f"int4 weights need every linear layer's input width to be a multiple of "
            f"{INT4_BLOCK}, but the {size.name} size has {bad}: use weights='float' or other sizes"
        )


@dataclass(frozen=True)
class _Outliers:
    count: int
    gain: float

    def apply(self, norm_weight: np.ndarray) -> np.ndarray:
        norm_weight[outlier_channel_ids(norm_weight.size, self.count)] *= self.gain
        return norm_weight


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Embedding


def _embedding_model(
    g: Graph, size: ModelSize, *, legacy: bool, table: np.ndarray | None = None
) -> onnx.ModelProto:
    """input_ids -> inputs_embeds; the redesigned model also pastes in image_features.

    Redesigned: image positions hold -image_id; they look up row 0 and are then overwritten, in
    sequence order, by the rows of ``image_features`` (which may be empty, [0, hidden]).
    Legacy: a bare Gather, so negative ids wrap around as in the real file (spec gotcha 5).
    ``table`` [vocab, hidden] is the embedding table; random unless given.
    """
    hidden = size.hidden_size
    if table is None:
        table = g.normal((size.vocab_size, hidden), 1.0)
    table = g.weight("model.embed_tokens.weight", table)
    ids_input = value("input_ids", INT64, ["batch_size", "sequence_length"])
    embeds_output = value("inputs_embeds", FLOAT, ["batch_size", "sequence_length", hidden])
    if legacy:
        g.op("Gather", "/embed/Gather", [table, "input_ids"], outputs=["inputs_embeds"])
        return g.model("phi3v-text-embedding", [ids_input], [embeds_output])

    clamped = g.op("Max", "/embed/Max", ["input_ids", g.const(0)])
    embeds = g.op("Gather", "/embed/Gather", [table, clamped])
    is_image = g.op("Less", "/embed/Less", ["input_ids", g.const(0)])
    where = g.op("NonZero", "/embed/NonZero", [is_image])  # [2, n], row-major = sequence order
    where = g.op("Transpose", "/embed/Transpose", [where], perm=[1, 0])
    g.op(
        "ScatterND",
        "/embed/ScatterND",
        [embeds, where, "image_features"],
        outputs=["inputs_embeds"],
    )
    features_input = value("image_features", FLOAT, ["num_image_tokens", hidden])
    return g.model("phi3v-embedding", [ids_input, features_input], [embeds_output])


# ---------------------------------------------------------------------------------------------
# Decoder


def _decoder_model(g: Graph, size: ModelSize, outliers: _Outliers) -> onnx.ModelProto:
    """The random-weight decoder, with Phi-3's LongRoPE caches."""
    return decoder_model(g, size, RandomDecoderWeights(outliers), rope=_longrope_switch)


class DecoderWeights(Protocol):
    """Where a decoder's weights come from: random (``build_model``) or trained (the proxies).

    Names are Phi-3's (``model.layers.{i}.attn.qkv_proj``, ...); ``gain`` and ``column_gains``
    shape random weights and are ignored by given ones.
    """

    def norm(self, g: Graph, name: str, width: int) -> str: ...

    def linear(
        self,
        g: Graph,
        name: str,
        x: str,
        k: int,
        n: int,
        *,
        gain: float = 1.0,
        column_gains: np.ndarray | None = None,
        output: str | None = None,
    ) -> str: ...


@dataclass(frozen=True)
class RandomDecoderWeights:
    """Random norms (with optional outlier channels) and random linear layers."""

    outliers: _Outliers

    def norm(self, g: Graph, name: str, width: int) -> str:
        return _rms_norm_weight(g, name, width, self.outliers)

    def linear(self, g, name, x, k, n, *, gain=1.0, column_gains=None, output=None) -> str:
        return g.linear(name, x, k, n, gain=gain, column_gains=column_gains, output=output)


RopeCaches = Callable[[Graph, str, int], tuple[str, str]]


def decoder_model(
    g: Graph, size: ModelSize, weights: DecoderWeights, *, rope: RopeCaches
) -> onnx.ModelProto:
    """inputs_embeds + attention_mask + past KV -> logits + present KV, as genai builds Phi-3.

    ``rope(g, total_len, head_size)`` gives the (cos, sin) caches GroupQueryAttention rotates with.
    """
    lengths = _gqa_lengths(g)
    caches = rope(g, lengths[2], size.head_size)

    hidden, residual = "inputs_embeds", None
    for layer in range(size.num_layers):
        hidden, residual = _decoder_layer(
            g, size, weights, layer, hidden, residual, lengths, caches
        )

    final_norm = weights.norm(g, "model.norm.weight", size.hidden_size)
    normed, _ = _skip_rms_norm(g, "/model/norm", hidden, residual, final_norm)
    weights.linear(
        g,
        "lm_head",
        normed,
        size.hidden_size,
        size.vocab_size,
        gain=LM_HEAD_GAIN,
        column_gains=_token_gains(size.vocab_size),
        output="logits",
    )

    past = ["batch_size", size.num_kv_heads, "past_sequence_length", size.head_size]
    present = ["batch_size", size.num_kv_heads, "total_sequence_length", size.head_size]
    inputs = [
        value("inputs_embeds", FLOAT, ["batch_size", "sequence_length", size.hidden_size]),
        value("attention_mask", INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [value("logits", FLOAT, ["batch_size", "sequence_length", size.vocab_size])]
    for layer in range(size.num_layers):
        for kind in ("key", "value"):
            inputs.append(value(f"past_key_values.{layer}.{kind}", FLOAT, past))
            outputs.append(value(f"present.{layer}.{kind}", FLOAT, present))
    return g.model("phi3v-text", inputs, outputs)


def _rms_norm_weight(g: Graph, name: str, width: int, outliers: _Outliers) -> str:
    return g.weight(name, outliers.apply(1.0 + g.normal((width,), 0.05)))


def _skip_rms_norm(g: Graph, name: str, x: str, residual: str, weight: str) -> tuple[str, str]:
    """RMSNorm(x + residual) and the new residual stream x + residual, in one op."""
    normed, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization",
        f"{name}/SkipLayerNorm",
        [x, residual, weight],
        n_out=4,
        domain="com.microsoft",
        epsilon=RMS_NORM_EPS,
    )
    return normed, residual


def _token_gains(vocab_size: int) -> np.ndarray:
    """Per-token lm_head gains, so greedy output mixes word pieces and bytes.

    With equal gains the 256 byte pieces would almost never beat ~32k word pieces; the real
    model emits them now and then (newlines, emoji), so they get a larger gain. The added
    special tokens (and ids with no token at all) get a small one: a real model rarely
    emits them, and an early <|end|> would cut generations short.
    """
    gains = np.ones(vocab_size, dtype=np.float32)
    gains[BYTE_TOKENS.start : BYTE_TOKENS.stop] = BYTE_TOKEN_GAIN
    gains[ADDED_TOKENS_START:] = SPECIAL_TOKEN_GAIN
    return gains


def _gqa_lengths(g: Graph) -> tuple[str, str, str]:
    """GroupQueryAttention's seqlens_k (mask sum - 1) and total_sequence_length, and the total
    length as int64, all from attention_mask."""
    base = "/model/attn_mask_reformat"
    total = g.op("ReduceSum", f"{base}/ReduceSum", ["attention_mask", g.const([1])], keepdims=0)
    seqlens_k = g.op(
        "Cast", f"{base}/Sub/Cast", [g.op("Sub", f"{base}/Sub", [total, g.const(1)])], to=INT32
    )
    mask_shape = g.op("Shape", f"{base}/Shape", ["attention_mask"])
    total_len = g.op("Gather", f"{base}/Gather", [mask_shape, g.const(1)], axis=0)
    total_seq_len = g.op("Cast", f"{base}/Gather/Cast", [total_len], to=INT32)
    return seqlens_k, total_seq_len, total_len


def _longrope_factors(head_size: int, long: bool) -> np.ndarray:
    """Per-frequency LongRoPE rescale factors (head_size / 2 of them). Made up, but shaped like
    Phi-3's: close to 1 for the short cache, rising to tens for the long one, so switching
    caches visibly changes the outputs."""
    ramp = np.linspace(0.0, 1.0, head_size // 2)
    return 1.0 + (60.0 * ramp**3 if long else 0.2 * ramp**2)


def _rope_cache_branch(label: str, length: int, head_size: int, long: bool) -> onnx.GraphProto:
    """If branch with inline cos/sin caches [length, head_size / 2] ("su" mscale applied), as
    genai's builder puts them."""
    exponents = np.arange(0, head_size, 2, dtype=np.float64) / head_size
    inv_freq = 1.0 / (_longrope_factors(head_size, long) * ROPE_THETA**exponents)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    # the same magnitude scaling for both caches (genai builder make_mscale_su)
    mscale = math.sqrt(1 + math.log(CONTEXT_LENGTH / ORIGINAL_CONTEXT) / math.log(ORIGINAL_CONTEXT))
    nodes, outputs = [], []
    for kind, values in (("cos", np.cos(angles)), ("sin", np.sin(angles))):
        name = f"{kind}_cache_{label}"
        cache = numpy_helper.from_array((values * mscale).astype(np.float32), name)
        nodes.append(helper.make_node("Constant", [], [name], name=f"/{label}/{kind}", value=cache))
        outputs.append(value(name, FLOAT, [length, head_size // 2]))
    return helper.make_graph(nodes, f"{label}_rope_caches", [], outputs)


def _longrope_switch(g: Graph, total_len: str, head_size: int) -> tuple[str, str]:
    """The LongRoPE If: the long cache once the total length passes the original context."""
    base = "/model/rope_caches_subgraph"
    is_long = g.op("Greater", f"{base}/Greater", [total_len, g.const(ORIGINAL_CONTEXT)])
    return g.op(
        "If",
        f"{base}/If",
        [is_long],
        n_out=2,
        then_branch=_rope_cache_branch("large", CONTEXT_LENGTH, head_size, long=True),
        else_branch=_rope_cache_branch("small", ORIGINAL_CONTEXT, head_size, long=False),
    )


def _decoder_layer(g: Graph, size: ModelSize, weights, i, hidden, residual, lengths, rope):
    """Phi-3 block i; returns (MLP output, residual stream), which the next norm adds up.

    As in genai's builder the residual additions live inside SkipSimplifiedLayerNormalization:
    the first layer's input norm has nothing to add, so it is a plain SimplifiedLayerNormalization.
    """
    base, names = f"/model/layers.{i}", f"model.layers.{i}"
    width = size.hidden_size
    norm = weights.norm(g, f"{names}.input_layernorm.weight", width)
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
        normed, residual = _skip_rms_norm(g, f"{base}/input_layernorm", hidden, residual, norm)

    qk_size = (size.num_heads + size.num_kv_heads) * size.head_size
    qkv_gains = np.ones(qk_size + size.num_kv_heads * size.head_size, dtype=np.float32)
    qkv_gains[:qk_size] = QK_GAIN  # q and k scaled up for sharper attention
    qkv = weights.linear(
        g, f"{names}.attn.qkv_proj", normed, width, qkv_gains.size, column_gains=qkv_gains
    )
    seqlens_k, total_seq_len, _ = lengths
    attention = f"{base}/attn/GroupQueryAttention"
    attn, _, _ = g.op(
        "GroupQueryAttention",
        attention,
        [
            qkv,  # packed q | k | v, so the separate key and value inputs stay empty
            "",
            "",
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            seqlens_k,
            total_seq_len,
            *rope,
        ],
        outputs=[f"{attention}/output_0", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        num_heads=size.num_heads,
        kv_num_heads=size.num_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
    )
    attn = weights.linear(g, f"{names}.attn.o_proj", attn, width, width)

    post_norm = weights.norm(g, f"{names}.post_attention_layernorm.weight", width)
    normed, residual = _skip_rms_norm(
        g, f"{base}/post_attention_layernorm", attn, residual, post_norm
    )
    ff = size.intermediate_size
    gate_up = weights.linear(g, f"{names}.mlp.gate_up_proj", normed, width, 2 * ff)
    gate, up = g.op("Split", f"{base}/mlp/Split", [gate_up, g.const([ff, ff])], n_out=2, axis=-1)
    sigmoid = g.op("Sigmoid", f"{base}/mlp/act_fn/Sigmoid", [gate])
    silu = g.op("Mul", f"{base}/mlp/act_fn/Mul", [gate, sigmoid])
    gated = g.op("Mul", f"{base}/mlp/Mul", [silu, up])
    return weights.linear(g, f"{names}.mlp.down_proj", gated, ff, width), residual


# ---------------------------------------------------------------------------------------------
# Vision


def _vision_model(
    g: Graph, size: ModelSize, outliers: _Outliers, *, legacy: bool
) -> onnx.ModelProto:
    """pixel_values [images, crops, 3, 336, 336] + image_sizes [images, 2] -> image rows.

    Every crop goes through CLIP (up to hidden_states[-2]); CLS is dropped and each 2x2 block of
    patches merged into one token; a Loop over images lays the tokens out in the HD order
    (see _hd_layout_body); img_projection maps them to the decoder width.
    Redesigned: ``image_features`` [sum of num_image_tokens, hidden]; legacy (one image per call):
    ``visual_features`` [1, num_image_tokens, hidden].
    """
    merged = _clip_merged_tokens(g, size, outliers)
    width = size.merged_width
    sub_gn = g.weight("model.vision_embed_tokens.sub_GN", g.normal((1, 1, width), 0.5))
    glb_gn = g.weight("model.vision_embed_tokens.glb_GN", g.normal((1, width), 0.5))
    pixel_shape = g.op("Shape", "/vision/Shape", ["pixel_values"])
    num_images = g.op("Gather", "/vision/num_images", [pixel_shape, g.const(0)], axis=0)
    no_rows = g.const(np.zeros((0, width)), dtype=np.float32)
    rows = g.op(
        "Loop",
        "/vision/hd_layout/Loop",
        [num_images, "", no_rows],
        body=_hd_layout_body(merged, sub_gn, glb_gn, width),
    )
    (k1, n1), (k2, n2) = size.projection_shapes
    projection = "model.vision_embed_tokens.img_projection"
    x = g.linear(f"{projection}.0", rows, k1, n1, bias=True)
    x = g.op("Gelu", "/vision/img_projection/Gelu", [x], domain="com.microsoft")  # erf form
    inputs = [
        value("pixel_values", FLOAT, ["num_images", "num_crops", 3, TILE, TILE]),
        value("image_sizes", INT64, ["num_images", 2]),
    ]
    if not legacy:  # the rows of all images, concatenated: [N, hidden]
        g.linear(f"{projection}.2", x, k2, n2, bias=True, output="image_features")
        output = value("image_features", FLOAT, ["num_image_tokens", n2])
        return g.model("phi3v-vision", inputs, [output])
    x = g.linear(f"{projection}.2", x, k2, n2, bias=True)
    g.op("Unsqueeze", "/vision/Unsqueeze", [x, g.const([0])], outputs=["visual_features"])
    output = value("visual_features", FLOAT, [1, "num_image_tokens", n2])
    return g.model("phi3v-vision", inputs, [output])


def _clip_merged_tokens(g: Graph, size: ModelSize, outliers: _Outliers) -> str:
    """pixel_values -> CLIP hidden_states[-2] minus CLS, 2x2-merged: [imgs, crops, 12, 12, 4W]."""
    base, width = "/vision/clip", size.clip_width
    crops = g.op("Reshape", f"{base}/crops", ["pixel_values", g.const([-1, 3, TILE, TILE])])
    conv_w = g.normal((width, 3, PATCH_SIZE, PATCH_SIZE), 1 / math.sqrt(3 * PATCH_SIZE**2))
    patches = g.op(
        "Conv",
        f"{base}/patch_embedding/Conv",
        [crops, g.weight("vision.embeddings.patch_embedding.weight", conv_w)],
        kernel_shape=[PATCH_SIZE, PATCH_SIZE],
        strides=[PATCH_SIZE, PATCH_SIZE],
    )  # [n, W, 24, 24], no bias in CLIP
    patches = g.op("Reshape", f"{base}/flatten", [patches, g.const([0, width, -1])])
    patches = g.op("Transpose", f"{base}/to_tokens", [patches], perm=[0, 2, 1])  # [n, 576, W]
    cls = g.weight("vision.embeddings.class_embedding", g.normal((1, 1, width), 1.0))
    patches_shape = g.op("Shape", f"{base}/Shape", [patches])
    n_crops = g.op("Gather", f"{base}/n_crops", [patches_shape, g.const([0])], axis=0)
    cls_shape = g.op("Concat", f"{base}/cls_shape", [n_crops, g.const([1, width])], axis=0)
    cls = g.op("Expand", f"{base}/cls", [cls, cls_shape])
    tokens = g.op("Concat", f"{base}/with_cls", [cls, patches], axis=1)  # [n, 577, W]
    positions = g.weight(
        "vision.embeddings.position_embedding", g.normal((1, CLIP_TOKENS, width), 1.0)
    )
    x = g.op("Add", f"{base}/positions", [tokens, positions])
    x = _layer_norm(g, f"{base}/pre_layrnorm", "vision.pre_layrnorm", x, width)
    for layer in range(size.clip_layers_used):
        x = _clip_layer(g, size, outliers, layer, x)

    x = g.op("Slice", f"{base}/drop_cls", [x, g.const([1]), g.const([CLIP_TOKENS]), g.const([1])])
    # Phi-3-V's merge: [n, 24, 24, W] -> [n, 12, 2, 12, 2, W] -> [n, 12, 12, 2, 2, W] -> [.., 4W]
    side = TOKENS_PER_ROW
    x = g.op("Reshape", f"{base}/merge/split", [x, g.const([-1, side, 2, side, 2, width])])
    x = g.op("Transpose", f"{base}/merge/Transpose", [x], perm=[0, 1, 3, 2, 4, 5])
    pixel_shape = g.op("Shape", f"{base}/pixel_shape", ["pixel_values"])
    images_crops = g.op("Slice", f"{base}/images_crops", [pixel_shape, g.const([0]), g.const([2])])
    merged_shape = g.op(
        "Concat",
        f"{base}/merged_shape",
        [images_crops, g.const([side, side, size.merged_width])],
        axis=0,
    )
    return g.op("Reshape", f"{base}/merge/Reshape", [x, merged_shape])


def _layer_norm(
    g: Graph, name: str, weight_name: str, x: str, width: int, outliers: _Outliers | None = None
) -> str:
    scale = 1.0 + g.normal((width,), 0.05)
    if outliers is not None:
        outliers.apply(scale)
    inputs = [
        x,
        g.weight(f"{weight_name}.weight", scale),
        g.weight(f"{weight_name}.bias", g.normal((width,), 0.02)),
    ]
    return g.op("LayerNormalization", name, inputs, axis=-1, epsilon=CLIP_LN_EPS)


def _clip_layer(g: Graph, size: ModelSize, outliers: _Outliers, i: int, x: str) -> str:
    """Pre-LN CLIP encoder layer: x + attn(LN(x)), then + fc2(QuickGelu(fc1(LN(.))))."""
    base, weights, width = f"/vision/clip/layers.{i}", f"vision.encoder.layers.{i}", size.clip_width
    normed = _layer_norm(g, f"{base}/layer_norm1", f"{weights}.layer_norm1", x, width, outliers)
    qkv = g.linear(f"{weights}.self_attn.qkv_proj", normed, width, 3 * width, bias=True)
    q, k, v = g.op("Split", f"{base}/attn/Split", [qkv, g.const([width] * 3)], n_out=3, axis=-1)
    attn = g.op(
        "MultiHeadAttention",
        f"{base}/attn/MultiHeadAttention",
        [q, k, v],
        domain="com.microsoft",
        num_heads=size.clip_heads,
    )
    attn = g.linear(f"{weights}.self_attn.out_proj", attn, width, width, bias=True)
    x = g.op("Add", f"{base}/attn/residual", [x, attn])

    normed = _layer_norm(g, f"{base}/layer_norm2", f"{weights}.layer_norm2", x, width, outliers)
    h = g.linear(f"{weights}.mlp.fc1", normed, width, size.clip_mlp, bias=True)
    h = g.op(
        "QuickGelu", f"{base}/mlp/QuickGelu", [h], domain="com.microsoft", alpha=QUICK_GELU_ALPHA
    )
    h = g.linear(f"{weights}.mlp.fc2", h, size.clip_mlp, width, bias=True)
    return g.op("Add", f"{base}/mlp/residual", [x, h])


def _hd_layout_body(merged: str, sub_gn: str, glb_gn: str, width: int) -> onnx.GraphProto:
    """Loop body for image i: append its rows in Phi-3-V's HD order to the carried rows.

    image_sizes[i] = padded [H, W], so the image has h = H/336 by w = W/336 sub-crops (crops
    1..h*w, row-major; crop 0 is the global view). Rows appended: the (12h) x (12w) sub-crop grid,
    each grid row followed by sub_GN; glb_GN; the 12 x 12 global crop, each row followed by sub_GN.
    Crops past 1 + h*w are padding and never read.
    """
    b = Graph()
    side = TOKENS_PER_ROW
    image_size = b.op("Gather", "/hd/size", ["image_sizes", "i"], axis=0)
    tiles = b.op("Div", "/hd/tiles", [image_size, b.const(TILE)])  # [h, w]
    h = b.op("Slice", "/hd/h", [tiles, b.const([0]), b.const([1])])
    w = b.op("Slice", "/hd/w", [tiles, b.const([1]), b.const([2])])
    crops = b.op("Gather", "/hd/crops", [merged, "i"], axis=0)  # [crops, 12, 12, C]

    last = b.op("Add", "/hd/last", [b.op("Mul", "/hd/count", [h, w]), b.const([1])])
    subs = b.op("Slice", "/hd/subs", [crops, b.const([1]), last, b.const([0])])
    tile_shape = b.op("Concat", "/hd/tile_shape", [h, w, b.const([side, side, width])], axis=0)
    grid = b.op("Reshape", "/hd/tiles5", [subs, tile_shape])  # [h, w, 12, 12, C]
    grid = b.op("Transpose", "/hd/tiles_t", [grid], perm=[0, 2, 1, 3, 4])  # [h, 12, w, 12, C]
    rows_h = b.op("Mul", "/hd/rows_h", [h, b.const([side])])
    cols_w = b.op("Mul", "/hd/cols_w", [w, b.const([side])])
    grid_shape = b.op("Concat", "/hd/grid_shape", [rows_h, cols_w, b.const([width])], axis=0)
    grid = b.op("Reshape", "/hd/grid", [grid, grid_shape])
    grid_rows = _rows_with_newlines(b, "/hd/grid", grid, rows_h, sub_gn, width)

    global_crop = b.op("Gather", "/hd/global", [crops, b.const(0)], axis=0)  # [12, 12, C]
    global_rows = _rows_with_newlines(b, "/hd/global", global_crop, b.const([side]), sub_gn, width)
    appended = ["rows_in", grid_rows, glb_gn, global_rows]
    b.op("Concat", "/hd/append", appended, outputs=["rows_out"], axis=0)
    b.op("Identity", "/hd/keep_going", ["cond_in"], outputs=["cond_out"])
    carried = [None, width]  # grows every iteration
    return b.body(
        "hd_layout_body",
        [value("i", INT64, []), value("cond_in", BOOL, []), value("rows_in", FLOAT, carried)],
        [value("cond_out", BOOL, []), value("rows_out", FLOAT, carried)],
    )


def _rows_with_newlines(b: Graph, name: str, grid: str, height: str, sub_gn: str, width) -> str:
    """[r, c, C] -> [r * (c + 1), C]: sub_GN appended to every row of the grid."""
    newline_shape = b.op("Concat", f"{name}/newline_shape", [height, b.const([1, width])], axis=0)
    newlines = b.op("Expand", f"{name}/newlines", [sub_gn, newline_shape])
    grid = b.op("Concat", f"{name}/with_newlines", [grid, newlines], axis=1)
    return b.op("Reshape", f"{name}/flatten", [grid, b.const([-1, width])])


# ---------------------------------------------------------------------------------------------
# Configuration files


def _genai_config(size: ModelSize, layout: str) -> dict:
    """genai_config.json: the keys of the real release of that layout, with the set's dims."""
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
                "head_size": size.head_size,
                "hidden_size": size.hidden_size,
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
                "num_attention_heads": size.num_heads,
                "num_hidden_layers": size.num_layers,
                "num_key_value_heads": size.num_kv_heads,
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
            "vocab_size": size.vocab_size,
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

    def step(name: str, op_type: str, attrs: dict | None = None) -> dict:
        op = {"name": name, "domain": "com.microsoft.extensions", "type": op_type}
        return {"operation": {**op, "attrs": attrs} if attrs else op}

    hd_transform = {"num_crops": DEFAULT_NUM_CROPS, "num_img_tokens": TOKENS_PER_TILE}
    return {
        "processor": {
            "name": "image_processing",
            "transforms": [
                step("decode_image", "DecodeImage", {"color_space": "BGR"}),
                step("convert_to_rgb", "ConvertRGB"),
                step("phi3_image_transform", "Phi3ImageTransform", hd_transform),
            ],
        }
    }
