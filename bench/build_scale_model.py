"""Build a real-size, random-weight Phi-3-vision ONNX model set for speed and memory benchmarks.

Speed and memory depend on shapes and formats, not on weight values, so a set with the real
Phi-3-vision dimensions and random int4 weights times exactly like the real release while needing
no download. The set follows the re-designed (Sep 2024) layout that onnxruntime-genai 0.18 runs and
``shared/docs/scale-baseline.md`` §1 describes:

* decoder ``phi-3-v-128k-instruct-text.onnx``: 32 layers, hidden 3072, 32 heads / 32 kv heads,
  head 96, FF 8192, vocab 32064; ``SimplifiedLayerNormalization`` /
  ``SkipSimplifiedLayerNormalization``;
  ``MatMulNBits`` (int4, block 32, accuracy level 4) for packed QKV, o, gate_up, down and lm_head;
  ``GroupQueryAttention`` with rotary inside; the LongRoPE ``If`` at 4096 positions;
* embedding ``phi-3-v-128k-instruct-text-embedding.onnx``: fp32 ``Gather`` 32064 x 3072 of the
  clamped ids, then ``ScatterND`` of ``image_features`` into the positions holding negative ids;
* vision ``phi-3-v-128k-instruct-vision.onnx``: CLIP ViT-L/14-336 on every crop (fp32 patch Conv,
  CLS + position embedding, pre-LN, 23 encoder layers with ``MatMulNBits`` and
  ``MultiHeadAttention``; Phi-3-V reads hidden_states[-2], so CLIP's 24th layer is never built),
  the 2x2 merge, the HD layout in an ONNX ``Loop`` and the int4 img_projection.

Weights go straight from the random generator to ``<model>.onnx.data`` (4 KiB-aligned, so
onnxruntime can map them), so building needs little memory and never meets protobuf's 2 GB limit.
Only the LongRoPE cos/sin caches (50 MB) stay inline, in the ``If`` branches, as genai's builder
puts them. The same seed gives byte-identical files.

    python bench/build_scale_model.py /tmp/scale        # ~2.8 GB, about 10 s
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "phi3v-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# --- Phi-3-vision-128k-instruct text model (its config.json) ---
HIDDEN = 3072
NUM_HEADS = 32
NUM_KV_HEADS = 32
HEAD_SIZE = HIDDEN // NUM_HEADS  # 96
NUM_LAYERS = 32
INTERMEDIATE = 8192
VOCAB = 32064
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
ORIGINAL_CONTEXT = 4096  # original_max_position_embeddings: where LongRoPE switches caches
CONTEXT = 131072  # max_position_embeddings
BOS_ID, EOS_ID, PAD_ID = 1, 32007, 32000  # <s>, <|end|>, <|endoftext|>
ADDED_TOKENS_START = 32000  # special tokens and unused rows from here on

# --- CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336) as Phi-3-V uses it ---
CROP = 336
PATCH = 14
PATCHES_PER_SIDE = CROP // PATCH  # 24
CLIP_TOKENS = PATCHES_PER_SIDE**2 + 1  # 576 patches + CLS
CLIP_WIDTH = 1024
CLIP_HEADS = 16
CLIP_MLP = 4096
CLIP_LAYERS_USED = 23  # of 24: Phi-3-V takes hidden_states[-2]
CLIP_LN_EPS = 1e-5
QUICK_GELU_ALPHA = 1.702
MERGED_PER_SIDE = PATCHES_PER_SIDE // 2  # 12: 2x2 merge -> 144 tokens per crop
MERGED_WIDTH = 4 * CLIP_WIDTH  # 4096
MAX_CROPS = 16  # onnxruntime-extensions hard-codes it; 17 crops come out (global first)

# --- the cpu-int4 release's quantisation: MatMulNBits, 4-bit RTN, block 32, accuracy level 4 ---
BITS = 4
BLOCK = 32
ACCURACY_LEVEL = 4
ZERO_POINT = 8  # MatMulNBits' default when no zero_points input is given
# RMS of (code - 8) for uniform codes 0..15: sqrt(var 255/12 + mean^2 0.25) = sqrt(21.5)
CODE_RMS = math.sqrt(21.5)

# --- random-weight gains (values are irrelevant to timing; these keep activations finite) ---
LM_HEAD_GAIN = 4.0  # first-step logits std ~4, as in the baseline
SPECIAL_TOKEN_GAIN = 0.5  # keep <|end|> (and unused rows) rare so runs produce all 32 tokens
# Unit-scale random q and k give near-uniform attention, so the next token would depend on the
# current one only and greedy output would cycle; sharper attention makes it use the context.
QK_GAIN = 2.0

OPSET = 17
IR_VERSION = 10
ALIGN = 4096  # external-data offsets on page boundaries
INLINE_LIMIT = 128  # bytes; smaller tensors (shape constants) stay in the graph

MODEL_FILES = {
    "decoder": "phi-3-v-128k-instruct-text.onnx",
    "embedding": "phi-3-v-128k-instruct-text-embedding.onnx",
    "vision": "phi-3-v-128k-instruct-vision.onnx",
}
_STREAMS = {"embedding": 0, "decoder": 1, "vision": 2}  # independent random streams per model

FLOAT, INT64, INT32, BOOL = (
    TensorProto.FLOAT,
    TensorProto.INT64,
    TensorProto.INT32,
    TensorProto.BOOL,
)


def build_scale_model(out_dir: Path, seed: int = 1234) -> dict[str, float]:
    """Write the full model set into ``out_dir``; return the seconds each part took."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for part, build in (
        ("embedding", _embedding_model),
        ("decoder", _decoder_model),
        ("vision", _vision_model),
    ):
        started = time.perf_counter()
        path = out_dir / MODEL_FILES[part]
        with WeightFile(path.with_name(path.name + ".data")) as weights:
            graph = Graph(weights, _rng(seed, _STREAMS[part]))
            model = build(graph)
        onnx.save_model(model, path)  # the proto holds only references and the RoPE caches
        seconds[part] = time.perf_counter() - started
    _write_json(out_dir / "genai_config.json", genai_config())
    _write_json(out_dir / "processor_config.json", processor_config())
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)
    return seconds


def num_image_tokens(h_crops: int, w_crops: int) -> int:
    """Rows the vision model emits for an image of h_crops x w_crops tiles (Phi-3-V formula)."""
    per_crop = MERGED_PER_SIDE**2
    return (h_crops * w_crops + 1) * per_crop + 1 + (h_crops + 1) * MERGED_PER_SIDE


# ---------------------------------------------------------------------------------------------
# Writing weights


class WeightFile:
    """Appends arrays to one external-data file and hands back TensorProtos that point at them."""

    def __init__(self, path: Path):
        self.path = path
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
        for key, value in (
            ("location", self.path.name),
            ("offset", str(self.offset)),
            ("length", str(data.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += data.nbytes
        return tensor


# ---------------------------------------------------------------------------------------------
# Graph building


class Graph:
    """Nodes and initializers of one graph; weights go to a WeightFile as they are made."""

    def __init__(self, weights: WeightFile | None, rng: np.random.Generator | None):
        self.weights, self.rng = weights, rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        if self.weights is None or array.nbytes <= INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            self.initializers.append(self.weights.add(name, array))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, thresholds)."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(f"const/{array.dtype.name}/{array.tolist()}", array)
        return self._constants[key]

    def op(self, op_type: str, name: str, inputs, *, outputs=None, n_out=1, domain="", **attrs):
        """Add a node and return its output name (or names when there are several)."""
        outputs = outputs or [f"{name}/output_{k}" for k in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outputs, name=name, domain=domain, **attrs)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def normal(self, shape, std: float) -> np.ndarray:
        values = self.rng.standard_normal(shape, dtype=np.float32)
        values *= std  # in place: the embedding table alone is 394 MB
        return values

    def int4_linear(
        self, name: str, x: str, k: int, n: int, *, gain: float = 1.0, row_gains=None, bias=False
    ) -> str:
        """``x @ W (+ b)`` with W [k, n] as random int4 MatMulNBits weights.

        B is uint8 [n, k/32, 16]: two codes per byte, low nibble first, uniform random. Scales
        [n * k/32] get a random sign and an RMS of gain / (CODE_RMS * sqrt(k)), so each dequantised
        column has mean ~0 and RMS ~gain / sqrt(k): unit-scale outputs for unit-scale inputs.
        ``row_gains`` [n] rescales individual outputs (the lm_head's special tokens).
        """
        blocks = k // BLOCK
        codes = self.rng.bit_generator.random_raw(n * k // 16).view(np.uint8)
        codes = codes.reshape(n, blocks, BLOCK * BITS // 8)
        rms = gain / (CODE_RMS * math.sqrt(k))
        # uniform on [-1, 1) has RMS 1/sqrt(3)
        scales = (self.rng.random((n, blocks), dtype=np.float32) * 2 - 1) * (rms * math.sqrt(3))
        if row_gains is not None:
            scales *= row_gains[:, None]
        inputs = [
            x,
            self.weight(f"{name}.qweight", codes),
            self.weight(f"{name}.scales", scales.reshape(-1).astype(np.float32)),
        ]
        if bias:
            inputs += ["", "", self.weight(f"{name}.bias", self.normal((n,), 0.02))]
        return self.op(
            "MatMulNBits",
            f"{name}/MatMulNBits",
            inputs,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=BITS,
            block_size=BLOCK,
            accuracy_level=ACCURACY_LEVEL,
        )

    def model(self, name: str, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="phi3v-bench-scale")
        model.ir_version = IR_VERSION
        return model


def _rng(seed: int, stream: int) -> np.random.Generator:
    # SFC64: its raw output (the int4 codes, 2.3 GB of them) comes at ~3 GB/s
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, stream])))


def _value(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _norm_weight(g: Graph, name: str, size: int) -> str:
    return g.weight(name, 1.0 + g.normal((size,), 0.05))


# ---------------------------------------------------------------------------------------------
# Embedding


def _embedding_model(g: Graph) -> onnx.ModelProto:
    """input_ids (image positions hold -image_id) + image_features -> inputs_embeds.

    Negative ids look up row 0 and are then overwritten, in sequence order, by the rows of
    ``image_features``, which is [0, hidden] for text-only prompts and decode steps.
    """
    table = g.weight("model.embed_tokens.weight", g.normal((VOCAB, HIDDEN), 1.0))
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
    return g.model(
        "phi3v-scale-embedding",
        [
            _value("input_ids", INT64, ["batch_size", "sequence_length"]),
            _value("image_features", FLOAT, ["num_image_tokens", HIDDEN]),
        ],
        [_value("inputs_embeds", FLOAT, ["batch_size", "sequence_length", HIDDEN])],
    )


# ---------------------------------------------------------------------------------------------
# Decoder


def _decoder_model(g: Graph) -> onnx.ModelProto:
    """inputs_embeds + attention_mask + past KV -> logits + present KV, as genai builds Phi-3."""
    seqlens_k, total_seq_len, total_len = _gqa_lengths(g)
    cos, sin = _longrope_switch(g, total_len)

    hidden, residual = "inputs_embeds", None
    for layer in range(NUM_LAYERS):
        hidden, residual = _decoder_layer(
            g, layer, hidden, residual, seqlens_k, total_seq_len, cos, sin
        )

    normed = g.op(
        "SkipSimplifiedLayerNormalization",
        "/model/norm/SkipLayerNorm",
        [hidden, residual, _norm_weight(g, "model.norm.weight", HIDDEN)],
        domain="com.microsoft",
        epsilon=RMS_EPS,
    )
    row_gains = np.ones(VOCAB, dtype=np.float32)
    row_gains[ADDED_TOKENS_START:] = SPECIAL_TOKEN_GAIN
    logits = g.int4_linear("lm_head", normed, HIDDEN, VOCAB, gain=LM_HEAD_GAIN, row_gains=row_gains)
    g.op("Identity", "/lm_head/Identity", [logits], outputs=["logits"])

    past = ["batch_size", NUM_KV_HEADS, "past_sequence_length", HEAD_SIZE]
    present = ["batch_size", NUM_KV_HEADS, "total_sequence_length", HEAD_SIZE]
    inputs = [
        _value("inputs_embeds", FLOAT, ["batch_size", "sequence_length", HIDDEN]),
        _value("attention_mask", INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [_value("logits", FLOAT, ["batch_size", "sequence_length", VOCAB])]
    for layer in range(NUM_LAYERS):
        for kind in ("key", "value"):
            inputs.append(_value(f"past_key_values.{layer}.{kind}", FLOAT, past))
            outputs.append(_value(f"present.{layer}.{kind}", FLOAT, present))
    return g.model("phi3v-scale-text", inputs, outputs)


def _gqa_lengths(g: Graph) -> tuple[str, str, str]:
    """GroupQueryAttention's seqlens_k (mask sum - 1) and total_sequence_length, from the mask."""
    base = "/model/attn_mask_reformat"
    total = g.op("ReduceSum", f"{base}/ReduceSum", ["attention_mask", g.const([1])], keepdims=0)
    seqlens_k = g.op(
        "Cast", f"{base}/Cast", [g.op("Sub", f"{base}/Sub", [total, g.const(1)])], to=INT32
    )
    mask_shape = g.op("Shape", f"{base}/Shape", ["attention_mask"])
    total_len = g.op("Gather", f"{base}/Gather", [mask_shape, g.const(1)], axis=0)
    total_seq_len = g.op("Cast", f"{base}/Gather/Cast", [total_len], to=INT32)
    return seqlens_k, total_seq_len, total_len


def _longrope_factors(long: bool) -> np.ndarray:
    """Per-frequency LongRoPE rescale factors (48 of them). Made up, but shaped like Phi-3's:
    close to 1 for the short cache, rising to tens for the long one."""
    ramp = np.linspace(0.0, 1.0, HEAD_SIZE // 2)
    return 1.0 + (60.0 * ramp**3 if long else 0.2 * ramp**2)


def _rope_cache_branch(label: str, length: int, long: bool) -> onnx.GraphProto:
    """If branch with inline cos/sin caches [length, 48], mscale applied (Phi-3 'su' scaling)."""
    exponents = np.arange(0, HEAD_SIZE, 2, dtype=np.float64) / HEAD_SIZE
    inv_freq = 1.0 / (_longrope_factors(long) * ROPE_THETA**exponents)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    mscale = math.sqrt(1 + math.log(CONTEXT / ORIGINAL_CONTEXT) / math.log(ORIGINAL_CONTEXT))
    nodes, outputs = [], []
    for kind, values in (("cos", np.cos(angles)), ("sin", np.sin(angles))):
        name = f"{kind}_cache_{label}"
        cache = numpy_helper.from_array((values * mscale).astype(np.float32), name)
        nodes.append(helper.make_node("Constant", [], [name], name=f"/{label}/{kind}", value=cache))
        outputs.append(_value(name, FLOAT, [length, HEAD_SIZE // 2]))
    return helper.make_graph(nodes, f"{label}_rope_caches", [], outputs)


def _longrope_switch(g: Graph, total_len: str) -> tuple[str, str]:
    """The LongRoPE If: the long cache once the sequence passes the original 4096 context."""
    base = "/model/rope_caches_subgraph"
    is_long = g.op("Greater", f"{base}/Greater", [total_len, g.const(ORIGINAL_CONTEXT)])
    return g.op(
        "If",
        f"{base}/If",
        [is_long],
        n_out=2,
        then_branch=_rope_cache_branch("large", CONTEXT, long=True),
        else_branch=_rope_cache_branch("small", ORIGINAL_CONTEXT, long=False),
    )


def _decoder_layer(g: Graph, i, hidden, residual, seqlens_k, total_seq_len, cos, sin):
    """One Phi-3 block; returns (MLP output, residual stream) for the next norm to add up."""
    base = f"/model/layers.{i}"
    norm = _norm_weight(g, f"model.layers.{i}.input_layernorm.weight", HIDDEN)
    if residual is None:  # nothing to add before the first layer
        normed = g.op(
            "SimplifiedLayerNormalization",
            f"{base}/input_layernorm/LayerNorm",
            [hidden, norm],
            axis=-1,
            epsilon=RMS_EPS,
        )
        residual = hidden
    else:
        normed, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            f"{base}/input_layernorm/SkipLayerNorm",
            [hidden, residual, norm],
            n_out=4,
            domain="com.microsoft",
            epsilon=RMS_EPS,
        )

    qkv_size = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_SIZE  # 9216
    qk_gains = np.ones(qkv_size, dtype=np.float32)
    qk_gains[: (NUM_HEADS + NUM_KV_HEADS) * HEAD_SIZE] = QK_GAIN
    qkv = g.int4_linear(
        f"model.layers.{i}.attn.qkv_proj", normed, HIDDEN, qkv_size, row_gains=qk_gains
    )
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
            cos,
            sin,
        ],
        outputs=[f"{attention}/output_0", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        num_heads=NUM_HEADS,
        kv_num_heads=NUM_KV_HEADS,
        do_rotary=1,
        rotary_interleaved=0,
    )
    attn = g.int4_linear(f"model.layers.{i}.attn.o_proj", attn, HIDDEN, HIDDEN)

    normed, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization",
        f"{base}/post_attention_layernorm/SkipLayerNorm",
        [
            attn,
            residual,
            _norm_weight(g, f"model.layers.{i}.post_attention_layernorm.weight", HIDDEN),
        ],
        n_out=4,
        domain="com.microsoft",
        epsilon=RMS_EPS,
    )
    gate_up = g.int4_linear(f"model.layers.{i}.mlp.gate_up_proj", normed, HIDDEN, 2 * INTERMEDIATE)
    gate, up = g.op(
        "Split", f"{base}/mlp/Split", [gate_up, g.const([INTERMEDIATE] * 2)], n_out=2, axis=-1
    )
    silu = g.op(
        "Mul", f"{base}/mlp/act/Mul", [gate, g.op("Sigmoid", f"{base}/mlp/act/Sigmoid", [gate])]
    )
    gated = g.op("Mul", f"{base}/mlp/Mul", [silu, up])
    return g.int4_linear(f"model.layers.{i}.mlp.down_proj", gated, INTERMEDIATE, HIDDEN), residual


# ---------------------------------------------------------------------------------------------
# Vision


def _vision_model(g: Graph) -> onnx.ModelProto:
    """pixel_values [images, crops, 3, 336, 336] + image_sizes [images, 2] -> image_features.

    Every crop goes through CLIP (up to hidden_states[-2]); CLS is dropped and each 2x2 block of
    patches merged into one 4096-wide token; a Loop over images lays the tokens out in the HD order
    (sub-crop grid with a sub_GN newline per row, glb_GN, the global crop with its newlines); the
    img_projection maps them to the decoder width. Output: [sum of num_image_tokens, 3072].
    """
    merged = _clip_merged_tokens(g)
    sub_gn = g.weight("model.vision_embed_tokens.sub_GN", g.normal((1, 1, MERGED_WIDTH), 0.5))
    glb_gn = g.weight("model.vision_embed_tokens.glb_GN", g.normal((1, MERGED_WIDTH), 0.5))
    pixel_shape = g.op("Shape", "/vision/Shape", ["pixel_values"])
    num_images = g.op("Gather", "/vision/num_images", [pixel_shape, g.const(0)], axis=0)
    no_rows = g.weight("/vision/no_rows", np.zeros((0, MERGED_WIDTH), dtype=np.float32))
    rows = g.op(
        "Loop",
        "/vision/hd_layout/Loop",
        [num_images, "", no_rows],
        body=_hd_layout_body(merged, sub_gn, glb_gn),
    )
    x = g.int4_linear(
        "model.vision_embed_tokens.img_projection.0", rows, MERGED_WIDTH, HIDDEN, bias=True
    )
    x = g.op("Gelu", "/vision/img_projection/Gelu", [x], domain="com.microsoft")  # erf form
    x = g.int4_linear("model.vision_embed_tokens.img_projection.2", x, HIDDEN, HIDDEN, bias=True)
    g.op("Identity", "/vision/Identity", [x], outputs=["image_features"])
    return g.model(
        "phi3v-scale-vision",
        [
            _value("pixel_values", FLOAT, ["num_images", "num_crops", 3, CROP, CROP]),
            _value("image_sizes", INT64, ["num_images", 2]),
        ],
        [_value("image_features", FLOAT, ["num_image_tokens", HIDDEN])],
    )


def _clip_merged_tokens(g: Graph) -> str:
    """pixel_values -> CLIP hidden_states[-2] minus CLS, 2x2-merged: [imgs, crops, 12, 12, 4096]."""
    base = "/vision/clip"
    crops = g.op("Reshape", f"{base}/crops", ["pixel_values", g.const([-1, 3, CROP, CROP])])
    conv_w = g.normal((CLIP_WIDTH, 3, PATCH, PATCH), 1 / math.sqrt(3 * PATCH * PATCH))
    patches = g.op(
        "Conv",
        f"{base}/patch_embedding/Conv",
        [crops, g.weight("vision.embeddings.patch_embedding.weight", conv_w)],
        kernel_shape=[PATCH, PATCH],
        strides=[PATCH, PATCH],
    )  # [n, 1024, 24, 24], no bias in CLIP
    patches = g.op("Reshape", f"{base}/flatten", [patches, g.const([0, CLIP_WIDTH, -1])])
    patches = g.op("Transpose", f"{base}/to_tokens", [patches], perm=[0, 2, 1])  # [n, 576, 1024]
    cls = g.weight("vision.embeddings.class_embedding", g.normal((1, 1, CLIP_WIDTH), 1.0))
    n_crops = g.op(
        "Gather",
        f"{base}/n_crops",
        [g.op("Shape", f"{base}/Shape", [patches]), g.const([0])],
        axis=0,
    )
    cls_shape = g.op("Concat", f"{base}/cls_shape", [n_crops, g.const([1, CLIP_WIDTH])], axis=0)
    cls = g.op("Expand", f"{base}/cls", [cls, cls_shape])
    tokens = g.op("Concat", f"{base}/with_cls", [cls, patches], axis=1)  # [n, 577, 1024]
    positions = g.normal((1, CLIP_TOKENS, CLIP_WIDTH), 1.0)
    x = g.op(
        "Add",
        f"{base}/positions",
        [tokens, g.weight("vision.embeddings.position_embedding", positions)],
    )
    x = _layer_norm(g, f"{base}/pre_layrnorm", "vision.pre_layrnorm", x)
    for layer in range(CLIP_LAYERS_USED):
        x = _clip_layer(g, layer, x)

    x = g.op("Slice", f"{base}/drop_cls", [x, g.const([1]), g.const([CLIP_TOKENS]), g.const([1])])
    # Phi-3-V's merge: [n, 24, 24, C] -> [n, 12, 2, 12, 2, C] -> [n, 12, 12, 2, 2, C] -> [.., 4C]
    side = MERGED_PER_SIDE
    x = g.op("Reshape", f"{base}/merge/split", [x, g.const([-1, side, 2, side, 2, CLIP_WIDTH])])
    x = g.op("Transpose", f"{base}/merge/Transpose", [x], perm=[0, 1, 3, 2, 4, 5])
    pixel_shape = g.op("Shape", f"{base}/pixel_shape", ["pixel_values"])
    images_crops = g.op("Slice", f"{base}/images_crops", [pixel_shape, g.const([0]), g.const([2])])
    merged_shape = g.op(
        "Concat",
        f"{base}/merged_shape",
        [images_crops, g.const([side, side, MERGED_WIDTH])],
        axis=0,
    )
    return g.op("Reshape", f"{base}/merge/Reshape", [x, merged_shape])


def _layer_norm(g: Graph, name: str, weight_name: str, x: str) -> str:
    scale = g.weight(f"{weight_name}.weight", 1.0 + g.normal((CLIP_WIDTH,), 0.05))
    bias = g.weight(f"{weight_name}.bias", g.normal((CLIP_WIDTH,), 0.02))
    return g.op("LayerNormalization", name, [x, scale, bias], axis=-1, epsilon=CLIP_LN_EPS)


def _clip_layer(g: Graph, i: int, x: str) -> str:
    """Pre-LN CLIP encoder layer: x + attn(LN(x)), then + fc2(QuickGelu(fc1(LN(.))))."""
    base = f"/vision/clip/layers.{i}"
    weights = f"vision.encoder.layers.{i}"
    normed = _layer_norm(g, f"{base}/layer_norm1", f"{weights}.layer_norm1", x)
    qkv = g.int4_linear(
        f"{weights}.self_attn.qkv_proj", normed, CLIP_WIDTH, 3 * CLIP_WIDTH, bias=True
    )
    q, k, v = g.op(
        "Split", f"{base}/attn/Split", [qkv, g.const([CLIP_WIDTH] * 3)], n_out=3, axis=-1
    )
    attn = g.op(
        "MultiHeadAttention",
        f"{base}/attn/MultiHeadAttention",
        [q, k, v],
        domain="com.microsoft",
        num_heads=CLIP_HEADS,
    )
    attn = g.int4_linear(f"{weights}.self_attn.out_proj", attn, CLIP_WIDTH, CLIP_WIDTH, bias=True)
    x = g.op("Add", f"{base}/attn/residual", [x, attn])

    normed = _layer_norm(g, f"{base}/layer_norm2", f"{weights}.layer_norm2", x)
    h = g.int4_linear(f"{weights}.mlp.fc1", normed, CLIP_WIDTH, CLIP_MLP, bias=True)
    h = g.op(
        "QuickGelu", f"{base}/mlp/QuickGelu", [h], domain="com.microsoft", alpha=QUICK_GELU_ALPHA
    )
    h = g.int4_linear(f"{weights}.mlp.fc2", h, CLIP_MLP, CLIP_WIDTH, bias=True)
    return g.op("Add", f"{base}/mlp/residual", [x, h])


def _hd_layout_body(merged: str, sub_gn: str, glb_gn: str) -> onnx.GraphProto:
    """Loop body for image i: append its rows in Phi-3-V's HD order to the carried rows.

    image_sizes[i] = padded [H, W], so the image has h = H/336 by w = W/336 sub-crops (crops
    1..h*w, row-major; crop 0 is the global view). Rows appended: the (12h) x (12w) sub-crop grid,
    each grid row followed by sub_GN; glb_GN; the 12 x 12 global crop, each row followed by sub_GN.
    """
    b = Graph(None, None)
    side, width = MERGED_PER_SIDE, MERGED_WIDTH
    size = b.op("Gather", "/hd/size", ["image_sizes", "i"], axis=0)
    tiles = b.op("Div", "/hd/tiles", [size, b.const(CROP)])  # [h, w]
    h = b.op("Slice", "/hd/h", [tiles, b.const([0]), b.const([1])])
    w = b.op("Slice", "/hd/w", [tiles, b.const([1]), b.const([2])])
    crops = b.op("Gather", "/hd/crops", [merged, "i"], axis=0)  # [crops, 12, 12, 4096]

    last = b.op("Add", "/hd/last", [b.op("Mul", "/hd/count", [h, w]), b.const([1])])
    subs = b.op("Slice", "/hd/subs", [crops, b.const([1]), last, b.const([0])])
    grid = b.op(
        "Reshape",
        "/hd/grid5",
        [subs, b.op("Concat", "/hd/grid5_shape", [h, w, b.const([side, side, width])], axis=0)],
    )
    grid = b.op("Transpose", "/hd/grid_t", [grid], perm=[0, 2, 1, 3, 4])  # [h, 12, w, 12, C]
    rows_h = b.op("Mul", "/hd/rows_h", [h, b.const([side])])
    cols_w = b.op("Mul", "/hd/cols_w", [w, b.const([side])])
    grid = b.op(
        "Reshape",
        "/hd/grid",
        [grid, b.op("Concat", "/hd/grid_shape", [rows_h, cols_w, b.const([width])], axis=0)],
    )
    grid_rows = _rows_with_newlines(b, "/hd/grid", grid, rows_h, sub_gn)

    global_crop = b.op("Gather", "/hd/global", [crops, b.const(0)], axis=0)  # [12, 12, C]
    global_rows = _rows_with_newlines(b, "/hd/global", global_crop, b.const([side]), sub_gn)
    b.op(
        "Concat",
        "/hd/append",
        ["rows_in", grid_rows, glb_gn, global_rows],
        outputs=["rows_out"],
        axis=0,
    )
    b.op("Identity", "/hd/keep_going", ["cond_in"], outputs=["cond_out"])
    carried = [None, width]  # grows every iteration
    return helper.make_graph(
        b.nodes,
        "hd_layout_body",
        [_value("i", INT64, []), _value("cond_in", BOOL, []), _value("rows_in", FLOAT, carried)],
        [_value("cond_out", BOOL, []), _value("rows_out", FLOAT, carried)],
        b.initializers,
    )


def _rows_with_newlines(b: Graph, name: str, grid: str, height: str, sub_gn: str) -> str:
    """[r, c, C] -> [r * (c + 1), C]: sub_GN appended to every row of the grid."""
    newline_shape = b.op(
        "Concat", f"{name}/newline_shape", [height, b.const([1, MERGED_WIDTH])], axis=0
    )
    newlines = b.op("Expand", f"{name}/newlines", [sub_gn, newline_shape])
    grid = b.op("Concat", f"{name}/with_newlines", [grid, newlines], axis=1)
    return b.op("Reshape", f"{name}/flatten", [grid, b.const([-1, MERGED_WIDTH])])


# ---------------------------------------------------------------------------------------------
# Configuration files


def genai_config() -> dict:
    """genai_config.json of the re-designed cpu-int4 release, with its real dimensions."""
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    return {
        "model": {
            "bos_token_id": BOS_ID,
            "context_length": CONTEXT,
            "decoder": {
                "session_options": dict(session),
                "filename": MODEL_FILES["decoder"],
                "head_size": HEAD_SIZE,
                "hidden_size": HIDDEN,
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
                "session_options": dict(session),
                "filename": MODEL_FILES["embedding"],
                "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                "outputs": {"inputs_embeds": "inputs_embeds"},
            },
            "vision": {
                "session_options": dict(session),
                "filename": MODEL_FILES["vision"],
                "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
                "outputs": {"image_features": "image_features"},
            },
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "type": "phi3v",
            "vocab_size": VOCAB,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": CONTEXT,
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


def processor_config() -> dict:
    """The onnxruntime-extensions image pipeline: decode, convert to RGB, Phi-3 HD transform."""

    def step(name: str, op_type: str, attrs: dict | None = None) -> dict:
        op = {"name": name, "domain": "com.microsoft.extensions", "type": op_type}
        return {"operation": {**op, "attrs": attrs} if attrs else op}

    return {
        "processor": {
            "name": "image_processing",
            "transforms": [
                step("decode_image", "DecodeImage", {"color_space": "BGR"}),
                step("convert_to_rgb", "ConvertRGB"),
                step(
                    "phi3_image_transform",
                    "Phi3ImageTransform",
                    {"num_crops": MAX_CROPS, "num_img_tokens": MERGED_PER_SIDE**2},
                ),
            ],
        }
    }


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build a real-size random-weight Phi-3-vision ONNX model set (~2.8 GB) "
        "in the layout onnxruntime-genai 0.18 runs, for benchmarks.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the set into (never commit it)")
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default: 1234)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seconds = build_scale_model(args.out_dir, args.seed)
    total = sum(f.stat().st_size for f in args.out_dir.iterdir() if f.is_file())
    parts = ", ".join(f"{part} {s:.1f} s" for part, s in seconds.items())
    print(
        f"wrote {total / 1e9:.2f} GB to {args.out_dir} in {time.perf_counter() - started:.1f} s "
        f"({parts})"
    )


if __name__ == "__main__":
    main()
