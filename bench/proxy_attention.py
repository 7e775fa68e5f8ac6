"""The trained decoder proxy's real attention inputs, for bench/attention_forms.py.

SmolLM2-135M (:mod:`phi3v.testing.proxies`, fp32 activations) reads the first tokens of a real
text (``bench/texts/tune``) in one prefill; each chosen layer's packed Q|K|V projection output is
taken from the graph and rotated with the graph's own rotary caches (non-interleaved halves, as
its GroupQueryAttention does), and the rotated keys are checked against the layer's present key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

PROMPT_TOKENS = 1200  # as bench/accuracy.py's prompts: up to 1,200 tokens of one text


def capture(folder: Path, layers: tuple[int, ...]) -> tuple[dict, dict]:
    """{layer: {"q", "k", "v"} [1, S, heads * head] rotated}, and {"heads", "kv_heads", "head"}."""
    import onnxruntime as ort

    from phi3v.config import TOKENIZER, load_config
    from phi3v.sessions import Sessions
    from phi3v.testing import proxies
    from phi3v.tokenizer import PromptTokenizer

    proxies.build_decoder_proxy(folder, accuracy_level=0)
    config = load_config(folder)
    decoder_path = config.path(config.decoder.filename)
    model = onnx.load(str(decoder_path))
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: a.i for a in attention[0].attribute}
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    initializers = {t.name: t for t in model.graph.initializer}
    cos, sin = (numpy_helper.to_array(initializers[attention[0].input[i]]) for i in (7, 8))
    head = cos.shape[1] * 2
    wanted = {layer: attention[layer].input[0] for layer in layers}
    present = {layer: attention[layer].output[1] for layer in layers}
    for name in [*wanted.values(), *present.values()]:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    tapped = folder / "tapped.onnx"
    onnx.save_model(model, str(tapped), save_as_external_data=True, location="tapped.onnx.data")
    sessions = Sessions(config)
    tokenizer = PromptTokenizer(config.path(TOKENIZER))
    text = proxies.evaluation_texts("tune")[0]
    ids = [tokenizer.bos_id, *tokenizer.encode_text(text.text)[:PROMPT_TOKENS]]
    embeds = sessions.embed(np.array([ids], np.int64), {})
    decoder = config.decoder
    feeds = {
        decoder.inputs_embeds: embeds,
        decoder.attention_mask: np.ones((1, len(ids)), np.int64),
    }
    empty = np.zeros((1, kv_heads, 0, head), np.float32)
    for layer in range(config.decoder.num_hidden_layers):
        for name in decoder.past_names(layer):
            feeds[name] = empty
    session = ort.InferenceSession(str(tapped))
    names = [*wanted.values(), *present.values()]
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    result = {}
    for layer in layers:
        packed = outputs[wanted[layer]]
        q, k, v = np.split(packed, [heads * head, (heads + kv_heads) * head], axis=2)
        q, k = rotate(q, cos, sin, head), rotate(k, cos, sin, head)
        key = outputs[present[layer]]  # [1, kv_heads, S, head]
        check = np.abs(k.reshape(1, -1, kv_heads, head).transpose(0, 2, 1, 3) - key).max()
        if check > 1e-3 * np.abs(key).max():
            raise SystemExit(f"layer {layer}: the rotated keys differ from GQA's by {check}")
        result[layer] = {"q": q, "k": k, "v": np.ascontiguousarray(v)}
    return result, {"heads": heads, "kv_heads": kv_heads, "head": head, "text": text.name}


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, head: int) -> np.ndarray:
    """Rotary embedding of [1, S, n * head] at positions 0..S-1, halves not interleaved."""
    positions = x.shape[1]
    split = x.reshape(1, positions, -1, head)
    first, second = split[..., : head // 2], split[..., head // 2 :]
    c, s = cos[:positions, None, :], sin[:positions, None, :]
    turned = np.concatenate([first * c - second * s, second * c + first * s], axis=-1)
    return np.ascontiguousarray(turned.reshape(x.shape), np.float32)
