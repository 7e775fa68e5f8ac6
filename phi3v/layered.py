"""The fast prefill in layers: the decoder copy cut at its attention, the fused kernel in between.

onnxruntime's GroupQueryAttention was over a quarter of the fast prefill of a photo's prompt on a
2-core EPYC and half of it on a Xeon (``bench/results/prefill_profile*.md``): for a chunk of
queries it computes every (query, key) pair, the masked half of the triangle too. Our kernel
(:mod:`phi3v.attention`) computes only the causal half, with the same fp32 arithmetic. An
onnxruntime graph cannot call it, so the prefill copy of the decoder is cut in stages, one per
attention:

    stage 0:  embeddings -> layer 0's norm and QKV projection -> Q, K, V (rotated)
    stage i:  layer i-1's attention output -> its o_proj, MLP, then layer i's norm and QKV -> ...
    stage L:  the last layer's attention output -> its o_proj, MLP, the final norm, the LM head

Each GroupQueryAttention (packed QKV, rotary inside) becomes a Split and two ``RotaryEmbedding``
nodes (the same rotation, from the same cos/sin caches the LongRoPE ``If`` picks), whose outputs
leave the stage. Between two stages the kernel writes the chunk's keys and values into the KV
cache (the same buffers the int4 decoder reads afterwards, [kv_heads, capacity, head] per layer)
and attends the queries to the cache. Tensors that later stages read (the residual
stream, the cos/sin caches) are passed along by name.

The stage graphs are small files beside the copy (:func:`write_stages`) whose weights point into
the copy's own ``.onnx.data``: no weight is written twice, and each lives in one stage's session.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from phi3v.attention import CausalAttention

if TYPE_CHECKING:
    from phi3v.config import DecoderConfig
    from phi3v.kv_cache import KVCache
    from phi3v.sessions import SessionSettings

PLAN_SUFFIX = ".layers.json"  # beside the decoder copy: the stages and their tensors
POSITIONS = "phi3v/position_ids"  # the stages' added input: the chunk's positions [1, S]
# Contrib operators whose outputs are float where their first input is (the residual stream,
# projections): the types onnx's shape inference cannot tell for tensors passed between stages.
FLOAT_OPS = {
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "GroupQueryAttention",
    "RotaryEmbedding",
    "QuickGelu",
}
_DEFAULTS = {  # GroupQueryAttention's attributes as the kernel computes them
    "do_rotary": 1,
    "rotary_interleaved": 0,
    "local_window_size": -1,
    "softcap": 0.0,
    "smooth_softmax": 0,
    "qk_output": 0,
}


class NotLayerable(ValueError):
    """The decoder's attention is not what the kernel computes (a reason for keeping it whole)."""


@dataclass(frozen=True)
class Layer:
    """One attention between two stages: the tensors it reads and writes, and its shape."""

    q: str
    k: str
    v: str
    output: str
    heads: int
    kv_heads: int
    head: int


@dataclass(frozen=True)
class Plan:
    """The stage files (in order), the attention after each but the last, and the graph's own
    input and output names."""

    stages: tuple[str, ...]
    layers: tuple[Layer, ...]
    embeds: str
    mask: str
    logits: str

    def to_json(self) -> dict:
        return {
            "stages": list(self.stages),
            "layers": [vars(layer) for layer in self.layers],
            "embeds": self.embeds,
            "mask": self.mask,
            "logits": self.logits,
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(
            stages=tuple(data["stages"]),
            layers=tuple(Layer(**layer) for layer in data["layers"]),
            embeds=data["embeds"],
            mask=data["mask"],
            logits=data["logits"],
        )


def plan_path(decoder: Path) -> Path:
    """Where the plan of the decoder copy at ``decoder`` is written."""
    return decoder.with_name(decoder.name + PLAN_SUFFIX)


# --- cutting the graph ----------------------------------------------------------------------


def write_stages(decoder: Path, config: DecoderConfig) -> Plan:
    """Cut the decoder copy at ``decoder`` at each GroupQueryAttention and write the stages beside
    it (``<name>.stage-NN.onnx``) and their plan (:func:`plan_path`); :class:`NotLayerable` when
    its attention is not what the kernel computes."""
    model = onnx.load(str(decoder), load_external_data=False)
    embeds, mask, logits = config.inputs_embeds, config.attention_mask, config.logits
    stages, layers = cut(model, config.head_size, embeds, mask, logits)
    names = []
    for number, stage in enumerate(stages):
        name = f"{decoder.stem}.stage-{number:02d}.onnx"
        onnx.save(stage, str(decoder.with_name(name)))
        names.append(name)
    plan = Plan(tuple(names), tuple(layers), embeds, mask, logits)
    plan_path(decoder).write_text(json.dumps(plan.to_json(), indent=1))
    return plan


def cut(
    model: onnx.ModelProto, head: int, embeds: str, mask: str, logits: str
) -> tuple[list[onnx.ModelProto], list[Layer]]:
    """The stages of ``model`` (each a model whose initializers are ``model``'s, external data
    included) and the attention between each two; ``head`` is the attention's head size."""
    graph = model.graph
    attentions = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if not attentions:
        raise NotLayerable("the decoder has no GroupQueryAttention")
    for node in attentions:
        _check_attention(node)
    types = _tensor_types(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    # Each node's stage: the number of attentions upstream of it. An attention's output is
    # made between stages i and i + 1; its replacement (rotations) belongs to stage i.
    stage_of: dict[str, int] = {}
    placed: list[tuple[int, onnx.NodeProto]] = []
    layers: list[Layer] = []
    for node in graph.node:
        stage = max((stage_of.get(name, 0) for name in node_reads(node)), default=0)
        if node.op_type != "GroupQueryAttention":
            placed.append((stage, node))
            stage_of.update((name, stage) for name in node.output if name)
            continue
        number = len(layers)
        if stage != number:
            raise NotLayerable(f"{node.name} reads the output of a later attention")
        replacement, sizes, layer = _rotations(node, number, head, opset)
        placed += [(stage, n) for n in replacement]
        if sizes is not None:
            initializers[sizes.name] = sizes
        stage_of.update((name, stage) for n in replacement for name in n.output)
        stage_of[layer.output] = number + 1
        types.update({layer.q: TensorProto.FLOAT, layer.k: TensorProto.FLOAT})
        types.update({layer.v: TensorProto.FLOAT, layer.output: TensorProto.FLOAT})
        layers.append(layer)
    if stage_of.get(logits) != len(layers):
        raise NotLayerable(f"{logits} is not computed after the last attention")
    wanted = {logits} | {name for layer in layers for name in (layer.q, layer.k, layer.v)}
    placed = _live(placed, wanted)
    inputs = {value.name: value for value in graph.input}
    graph_outputs = {value.name: value for value in graph.output}
    inputs[POSITIONS] = helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, [1, "S"])
    stages = []
    for number in range(len(layers) + 1):
        nodes = [node for stage, node in placed if stage == number]
        made = {name for node in nodes for name in node.output}
        later = {name for stage, node in placed if stage > number for name in node_reads(node)}
        outputs = sorted(made & later)
        if number < len(layers):
            layer = layers[number]
            outputs += [layer.q, layer.k, layer.v]
        else:
            outputs.append(logits)
        read = {name for node in nodes for name in node_reads(node)} - made - {""}
        stage_inputs = []
        for name in sorted(read - initializers.keys()):
            if name in inputs:
                stage_inputs.append(inputs[name])
            elif name in types:
                stage_inputs.append(helper.make_tensor_value_info(name, types[name], None))
            else:
                raise NotLayerable(f"cannot tell the type of {name}, which stage {number} reads")
        stage_outputs = []
        for name in outputs:
            if name in graph_outputs:  # the logits: their shape (one row) as the copy has it
                stage_outputs.append(graph_outputs[name])
                continue
            if name not in types:
                raise NotLayerable(f"cannot tell the type of {name}, which stage {number} makes")
            stage_outputs.append(helper.make_tensor_value_info(name, types[name], None))
        stage_graph = helper.make_graph(
            nodes,
            f"{graph.name}-stage-{number:02d}",
            stage_inputs,
            stage_outputs,
            initializer=[initializers[name] for name in sorted(read & initializers.keys())],
        )
        stage = helper.make_model(stage_graph, opset_imports=list(model.opset_import))
        stage.ir_version = model.ir_version
        stages.append(stage)
    return stages, layers


def _check_attention(node: onnx.NodeProto) -> None:
    """Refuse an attention the kernel does not compute: separate K/V inputs, interleaved or no
    rotary, a window, a soft cap, a custom scale."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) < 9 or any(node.input[1:3]) or not all(node.input[7:9]):
        raise NotLayerable(f"{node.name}: not packed QKV with rotary caches")
    for name, default in _DEFAULTS.items():
        if attributes.get(name, default) != default:
            raise NotLayerable(f"{node.name}: {name}={attributes[name]} (the kernel: {default})")
    if attributes.get("scale", 0.0) not in (0.0,):
        raise NotLayerable(f"{node.name}: a custom scale")
    if len(node.input) > 9 and any(node.input[9:]):
        raise NotLayerable(f"{node.name}: inputs beyond the rotary caches")


def _rotations(
    node: onnx.NodeProto, number: int, head: int, opset: int
) -> tuple[list[onnx.NodeProto], TensorProto | None, Layer]:
    """Split + RotaryEmbedding in place of the attention ``node`` (layer ``number``), and the
    Split's sizes as an initializer (None below opset 13, where they are an attribute)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    heads, kv_heads = int(attributes["num_heads"]), int(attributes["kv_num_heads"])
    packed, cos, sin = node.input[0], node.input[7], node.input[8]
    base = f"phi3v/layer.{number}"
    layer = Layer(f"{base}/q", f"{base}/k", f"{base}/v", node.output[0], heads, kv_heads, head)
    raw_q, raw_k = f"{base}/q_raw", f"{base}/k_raw"
    widths = [heads * head, kv_heads * head, kv_heads * head]  # packed: q | k | v
    outputs, name = [raw_q, raw_k, layer.v], f"{base}/Split"
    sizes = None
    if opset >= 13:
        sizes = helper.make_tensor(f"{base}/split_sizes", TensorProto.INT64, [3], widths)
        split = helper.make_node("Split", [packed, sizes.name], outputs, name=name, axis=-1)
    else:
        split = helper.make_node("Split", [packed], outputs, name=name, axis=-1, split=widths)
    nodes = [split]
    for raw, out, count in ((raw_q, layer.q, heads), (raw_k, layer.k, kv_heads)):
        nodes.append(
            helper.make_node(
                "RotaryEmbedding",
                [raw, POSITIONS, cos, sin],
                [out],
                name=f"{out}/RotaryEmbedding",
                domain="com.microsoft",
                num_heads=count,
                interleaved=0,
            )
        )
    return nodes, sizes, layer


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor ``node`` reads: its inputs, then what its subgraphs read from outside."""
    return [*node.input, *subgraph_reads(node)]


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """The outer tensors ``node``'s subgraphs (If branches, Loop bodies) read, at any depth:
    the names their nodes read that the body neither takes as an input nor makes itself."""
    names = []
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            own = {name for n in body.node for name in n.output}
            own |= {value.name for value in body.input} | {t.name for t in body.initializer}
            names += [name for n in body.node for name in node_reads(n) if name not in own]
    return names


def _live(placed: list[tuple[int, onnx.NodeProto]], wanted: Iterable[str]):
    """``placed`` without the nodes nothing wanted depends on (what fed the attentions' lengths)."""
    needed, kept = set(wanted), []
    for stage, node in reversed(placed):
        if any(name in needed for name in node.output):
            kept.append((stage, node))
            needed |= set(node_reads(node))
    return kept[::-1]


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the model's tensors: onnx's shape inference where it knows the operator,
    else float for the outputs of :data:`FLOAT_OPS` whose first input is float."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    types = {
        value.name: value.type.tensor_type.elem_type
        for value in [*graph.value_info, *graph.input, *graph.output]
        if value.type.tensor_type.elem_type
    }
    types.update((t.name, t.data_type) for t in graph.initializer)
    for node in graph.node:
        if node.op_type in FLOAT_OPS:
            for name in node.output:
                if name and name not in types:
                    types[name] = TensorProto.FLOAT
    return types


# --- running it -----------------------------------------------------------------------------


class LayeredDecoder:
    """The stages' sessions and the kernel: runs a prompt chunk on a :class:`KVCache` as the
    decoder copy would, the attention by the kernel (``cache.run(layered, embeds)``).

    The stages share one memory arena (onnxruntime's environment allocator), as the layers of
    one session would: 33 sessions with an arena each held 6 GB more on the real model. Tensors
    pass from stage to stage as onnxruntime values, never copied into numpy; the queries, keys
    and values land in numpy buffers the kernel reads.
    """

    def __init__(self, decoder: Path, settings: SessionSettings, attention: CausalAttention):
        from phi3v.sessions import open_session  # sessions imports this module

        self.plan = Plan.from_json(json.loads(plan_path(decoder).read_text()))
        for layer in self.plan.layers:
            attention.check(layer.head)
        self.attention = attention
        _share_one_arena()
        self.sessions = [
            open_session(decoder.with_name(name), settings, spinning=False, shared_arena=True)
            for name in self.plan.stages
        ]
        self._inputs = [[i.name for i in s.get_inputs()] for s in self.sessions]
        self._outputs = [[o.name for o in s.get_outputs()] for s in self.sessions]
        self._bindings = [session.io_binding() for session in self.sessions]
        self._check_inputs()
        last_use: dict[str, int] = {}
        for number, names in enumerate(self._inputs):
            last_use.update((name, number) for name in names)
        # after stage n, the passed tensors no later stage reads
        self._done = [{n for n, last in last_use.items() if last == s} for s in range(len(self))]

    def __len__(self) -> int:
        return len(self.sessions)

    def _check_inputs(self) -> None:
        """Every tensor a stage reads must come from the caller or from an earlier step."""
        plan = self.plan
        known = {plan.embeds, plan.mask, POSITIONS}
        for number, names in enumerate(self._inputs):
            missing = sorted(set(names) - known)
            if missing:
                raise NotLayerable(f"stage {number} reads {', '.join(missing)}, which none makes")
            known |= set(self._outputs[number])
            if number < len(plan.layers):
                known.add(plan.layers[number].output)
        if plan.logits not in self._outputs[-1]:
            raise NotLayerable(f"the last stage does not make {plan.logits}")

    @property
    def name(self) -> str:
        """What computes the prefill's attention, for a status line."""
        return self.attention.name

    def get_inputs(self):
        """The first stage's inputs and the last stage's outputs stand for the decoder's."""
        return self.sessions[0].get_inputs()

    def get_outputs(self):
        return self.sessions[-1].get_outputs()

    def extend(
        self, cache: KVCache, embeds: np.ndarray, run_options: ort.RunOptions | None = None
    ) -> np.ndarray:
        """Run the chunk ``embeds`` [1, S, hidden] after the cache's positions: append their keys
        and values to ``cache`` and return the last position's logits (:meth:`KVCache.run`)."""
        new, start = embeds.shape[1], cache.length
        plan = self.plan
        positions = np.arange(start, start + new, dtype=np.int64)[None]
        values = {
            plan.embeds: ort.OrtValue.ortvalue_from_numpy(embeds),
            plan.mask: ort.OrtValue.ortvalue_from_numpy(cache.mask_for(new)),
            POSITIONS: ort.OrtValue.ortvalue_from_numpy(positions),
        }
        buffers = _Buffers(new, plan.layers[0])
        for number, session in enumerate(self.sessions):
            binding = self._bindings[number]
            for name in self._inputs[number]:
                binding.bind_ortvalue_input(name, values[name])
            layer = plan.layers[number] if number < len(plan.layers) else None
            mine = buffers.outputs(layer) if layer else {}
            for name in self._outputs[number]:
                if name in mine:
                    binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(mine[name]))
                else:
                    binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding, run_options)
            values.update(zip(self._outputs[number], binding.get_outputs(), strict=True))
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name in self._done[number]:
                values.pop(name, None)
            if layer is not None:
                self._attend(cache, number, layer, buffers, start)
                values[layer.output] = ort.OrtValue.ortvalue_from_numpy(buffers.out)
        return cache.append(new, values[plan.logits].numpy())

    def _attend(self, cache: KVCache, number: int, layer: Layer, buffers, start: int) -> None:
        """Layer ``number``'s attention: its keys and values into the cache, then the kernel."""
        keys, values = cache.layer_buffers(number)
        self.attention.store(buffers.k[0], buffers.v[0], keys, values, start)
        self.attention(buffers.q[0], keys, values, buffers.out[0], start, layer.heads)


class _Buffers:
    """One chunk's queries, keys, values (the stages write them) and attention output (the
    kernel writes it), reused by every layer."""

    def __init__(self, new: int, layer: Layer):
        width, kv_width = layer.heads * layer.head, layer.kv_heads * layer.head
        self.q = np.empty((1, new, width), np.float32)
        self.k = np.empty((1, new, kv_width), np.float32)
        self.v = np.empty((1, new, kv_width), np.float32)
        self.out = np.empty((1, new, width), np.float32)

    def outputs(self, layer: Layer) -> dict[str, np.ndarray]:
        """The buffers a stage writes its queries, keys and values into, by output name."""
        return {layer.q: self.q, layer.k: self.k, layer.v: self.v}


_ARENA_LOCK = threading.Lock()
_arena_shared = False


def _share_one_arena() -> None:
    """Register onnxruntime's environment-wide CPU arena, once per process."""
    global _arena_shared
    with _ARENA_LOCK:
        if not _arena_shared:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(info, None)
            _arena_shared = True
