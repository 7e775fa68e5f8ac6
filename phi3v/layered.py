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

The vision copy is cut the same way at each MultiHeadAttention of its CLIP encoder
(:func:`write_vision_stages`), whose queries, keys and values leave a stage as they are; between
two stages the kernel attends each crop's tokens to all of its tokens, without a mask
(:class:`LayeredVision`, run as the vision session would be).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from phi3v.attention import AttentionKernel

if TYPE_CHECKING:
    from phi3v.config import DecoderConfig, VisionConfig
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
    "MultiHeadAttention",
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
    input names (the decoder's: embeddings, mask; the vision model's: pixels, image sizes) and
    the output the last stage makes (logits, image features)."""

    stages: tuple[str, ...]
    layers: tuple[Layer, ...]
    inputs: tuple[str, ...]
    output: str

    def to_json(self) -> dict:
        return {
            "stages": list(self.stages),
            "layers": [vars(layer) for layer in self.layers],
            "inputs": list(self.inputs),
            "output": self.output,
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(
            stages=tuple(data["stages"]),
            layers=tuple(Layer(**layer) for layer in data["layers"]),
            inputs=tuple(data["inputs"]),
            output=data["output"],
        )


def plan_path(model: Path) -> Path:
    """Where the plan of the copy at ``model`` (the decoder's or the vision model's) is written."""
    return model.with_name(model.name + PLAN_SUFFIX)


# --- cutting the graph ----------------------------------------------------------------------


def write_stages(decoder: Path, config: DecoderConfig) -> Plan:
    """Cut the decoder copy at ``decoder`` at each GroupQueryAttention and write the stages beside
    it (``<name>.stage-NN.onnx``) and their plan (:func:`plan_path`); :class:`NotLayerable` when
    its attention is not what the kernel computes."""
    model = onnx.load(str(decoder), load_external_data=False)
    inputs = (config.inputs_embeds, config.attention_mask)
    stages, layers = cut(model, config.head_size, *inputs, config.logits)
    return _save(decoder, stages, Plan((), tuple(layers), inputs, config.logits))


def write_vision_stages(vision: Path, config: VisionConfig) -> Plan:
    """Cut the vision copy at ``vision`` at each MultiHeadAttention (the CLIP encoder's) and write
    the stages and their plan beside it, as :func:`write_stages` does for the decoder."""
    model = onnx.load(str(vision), load_external_data=False)
    stages, layers = cut_vision(model, config.features)
    inputs = (config.pixel_values, config.image_sizes)
    return _save(vision, stages, Plan((), tuple(layers), inputs, config.features))


def _save(model: Path, stages: list[onnx.ModelProto], plan: Plan) -> Plan:
    names = []
    for number, stage in enumerate(stages):
        name = f"{model.stem}.stage-{number:02d}.onnx"
        onnx.save(stage, str(model.with_name(name)))
        names.append(name)
    plan = replace(plan, stages=tuple(names))
    plan_path(model).write_text(json.dumps(plan.to_json(), indent=1))
    return plan


def cut(
    model: onnx.ModelProto, head: int, embeds: str, mask: str, logits: str
) -> tuple[list[onnx.ModelProto], list[Layer]]:
    """The stages of the decoder ``model`` (each a model whose initializers are ``model``'s,
    external data included) and the attention between each two; ``head`` is the attention's
    head size. Each GroupQueryAttention becomes the rotations of its queries and keys."""
    attentions = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not attentions:
        raise NotLayerable("the decoder has no GroupQueryAttention")
    for node in attentions:
        _check_attention(node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    positions = helper.make_tensor_value_info(POSITIONS, TensorProto.INT64, [1, "S"])

    def rotations(node, number):
        return _rotations(node, number, head, opset)

    return _cut(model, "GroupQueryAttention", rotations, logits, [positions])


def cut_vision(model: onnx.ModelProto, features: str) -> tuple[list[onnx.ModelProto], list[Layer]]:
    """The stages of the vision ``model`` and the attention between each two: each
    MultiHeadAttention (queries, keys and values as three inputs, no mask, bias or past) leaves
    the graph, its inputs the stage's outputs."""
    attentions = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    if not attentions:
        raise NotLayerable("the vision model has no MultiHeadAttention")
    for node in attentions:
        _check_unmasked(node)

    made_by = {name: node for node in model.graph.node for name in node.output}
    weights = {tensor.name: tensor for tensor in model.graph.initializer}

    def unmasked(node, number):
        heads = int(node_attributes(node)["num_heads"])
        width = _width(made_by, weights, node.input[0])
        if width % heads:
            raise NotLayerable(f"{node.name}: width {width} is not a multiple of {heads} heads")
        q, k, v = node.input[:3]
        return [], None, Layer(q, k, v, node.output[0], heads, heads, width // heads)

    return _cut(model, "MultiHeadAttention", unmasked, features, [])


def _cut(
    model: onnx.ModelProto,
    op_type: str,
    layer_at: Callable[[onnx.NodeProto, int], tuple[list, TensorProto | None, Layer]],
    final: str,
    added_inputs: list[onnx.ValueInfoProto],
) -> tuple[list[onnx.ModelProto], list[Layer]]:
    """Cut ``model`` at each ``op_type`` node: ``layer_at(node, number)`` gives the nodes that
    stand in its place in the stage before it (with an initializer they need, or None) and the
    :class:`Layer` the kernel computes; the last stage makes ``final``; ``added_inputs`` are
    inputs the stand-ins read that the graph does not have."""
    graph = model.graph
    types = _tensor_types(model)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    # Each node's stage: the number of attentions upstream of it. An attention's output is
    # made between stages i and i + 1; its replacement (rotations) belongs to stage i.
    stage_of: dict[str, int] = {}
    placed: list[tuple[int, onnx.NodeProto]] = []
    layers: list[Layer] = []
    for node in graph.node:
        stage = max((stage_of.get(name, 0) for name in node_reads(node)), default=0)
        if node.op_type != op_type:
            placed.append((stage, node))
            stage_of.update((name, stage) for name in node.output if name)
            continue
        number = len(layers)
        if stage != number:
            raise NotLayerable(f"{node.name} reads the output of a later attention")
        replacement, sizes, layer = layer_at(node, number)
        placed += [(stage, n) for n in replacement]
        if sizes is not None:
            initializers[sizes.name] = sizes
        stage_of.update((name, stage) for n in replacement for name in n.output)
        stage_of[layer.output] = number + 1
        types.update({layer.q: TensorProto.FLOAT, layer.k: TensorProto.FLOAT})
        types.update({layer.v: TensorProto.FLOAT, layer.output: TensorProto.FLOAT})
        layers.append(layer)
    if stage_of.get(final) != len(layers):
        raise NotLayerable(f"{final} is not computed after the last attention")
    wanted = {final} | {name for layer in layers for name in (layer.q, layer.k, layer.v)}
    placed = _live(placed, wanted)
    inputs = {value.name: value for value in [*graph.input, *added_inputs]}
    graph_outputs = {value.name: value for value in graph.output}
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
            outputs.append(final)
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
            if name in graph_outputs:  # the logits or features: their shape as the copy has it
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
    attributes = node_attributes(node)
    if len(node.input) < 9 or any(node.input[1:3]) or not all(node.input[7:9]):
        raise NotLayerable(f"{node.name}: not packed QKV with rotary caches")
    for name, default in _DEFAULTS.items():
        if attributes.get(name, default) != default:
            raise NotLayerable(f"{node.name}: {name}={attributes[name]} (the kernel: {default})")
    if attributes.get("scale", 0.0) not in (0.0,):
        raise NotLayerable(f"{node.name}: a custom scale")
    if len(node.input) > 9 and any(node.input[9:]):
        raise NotLayerable(f"{node.name}: inputs beyond the rotary caches")


def _check_unmasked(node: onnx.NodeProto) -> None:
    """Refuse a MultiHeadAttention the kernel's unmasked attention does not compute: packed or
    missing inputs, a bias, a mask, past keys and values, a custom scale, a causal mask."""
    if len(node.input) < 3 or not all(node.input[:3]) or any(node.input[3:]):
        raise NotLayerable(f"{node.name}: not three separate inputs (queries, keys, values)")
    if any(node.output[1:]):
        raise NotLayerable(f"{node.name}: it returns its keys and values too")
    attributes = node_attributes(node)
    if attributes.get("scale", 0.0) != 0.0:
        raise NotLayerable(f"{node.name}: a custom scale")
    if attributes.get("unidirectional", 0):
        raise NotLayerable(f"{node.name}: a causal mask (unidirectional)")


def node_attributes(node: onnx.NodeProto) -> dict:
    """``node``'s attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _width(made_by: dict[str, onnx.NodeProto], weights: dict[str, TensorProto], tensor: str) -> int:
    """The last dimension of ``tensor`` [..., width] as the weights that make it say: a bias
    added to it, a projection's weight, or a Split's size, found by walking back through
    operators that keep it (reshapes, casts); ``made_by`` maps each tensor to the node making
    it, ``weights`` each initializer's name to it. :class:`NotLayerable` where none says."""

    def dims(name: str) -> list[int]:
        return list(weights[name].dims) if name in weights else []

    name = tensor
    for _ in range(16):  # a few operators between the projection and the attention at most
        node = made_by.get(name)
        if node is None:
            break
        if node.op_type == "Add":
            biases = [dims(i) for i in node.input if len(dims(i)) == 1]
            if biases:
                return biases[0][0]
        elif node.op_type in ("MatMul", "MatMulInteger", "MatMulIntegerToFloat"):
            if len(dims(node.input[1])) == 2:
                return dims(node.input[1])[1]
        elif node.op_type == "MatMulNBits":
            return int(node_attributes(node)["N"])
        elif node.op_type == "Split":
            if len(node.input) > 1 and node.input[1] in weights:
                sizes = onnx.numpy_helper.to_array(weights[node.input[1]])
            else:
                sizes = node_attributes(node).get("split")
            if sizes is not None:
                return int(sizes[list(node.output).index(name)])
            break
        elif node.op_type not in ("Reshape", "Identity", "Cast"):
            break
        name = node.input[0]
    raise NotLayerable(f"cannot tell the width of {tensor} from the weights that make it")


def _rotations(
    node: onnx.NodeProto, number: int, head: int, opset: int
) -> tuple[list[onnx.NodeProto], TensorProto | None, Layer]:
    """Split + RotaryEmbedding in place of the attention ``node`` (layer ``number``), and the
    Split's sizes as an initializer (None below opset 13, where they are an attribute)."""
    attributes = node_attributes(node)
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
    float for the outputs of :data:`FLOAT_OPS` (contrib operators it does not know), and again
    inference from those, so that the operators after them are typed too (the vision model's
    residual stream is an Add of a contrib projection's output)."""
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    types: dict[str, int] = {}
    for _ in range(8):  # each round types the operators after the last round's guesses
        graph = onnx.shape_inference.infer_shapes(typed, strict_mode=False).graph
        types = {
            value.name: value.type.tensor_type.elem_type
            for value in [*graph.value_info, *graph.input, *graph.output]
            if value.type.tensor_type.elem_type
        }
        types.update((t.name, t.data_type) for t in graph.initializer)
        guessed = [
            name
            for node in graph.node
            if node.op_type in FLOAT_OPS
            for name in node.output
            if name and name not in types
        ]
        if not guessed:
            break
        float_values = (helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in guessed)
        typed.graph.value_info.extend(float_values)
        types.update(dict.fromkeys(guessed, TensorProto.FLOAT))
    return types


# --- running it -----------------------------------------------------------------------------


class _Stages:
    """The stages' sessions and the kernel: runs the stages in order, the kernel's attention
    between each two (the subclass says which).

    The stages share one memory arena (onnxruntime's environment allocator), as the layers of
    one session would: 33 sessions with an arena each held 6 GB more on the real model. Tensors
    pass from stage to stage as onnxruntime values, never copied into numpy; the queries, keys
    and values land in numpy buffers the kernel reads.
    """

    def __init__(
        self,
        model: Path,
        settings: SessionSettings,
        attention: AttentionKernel,
        added_inputs: Iterable[str] = (),
    ):
        from phi3v.sessions import open_session  # sessions imports this module

        self.plan = Plan.from_json(json.loads(plan_path(model).read_text()))
        for layer in self.plan.layers:
            attention.check(layer.head)
        self.attention = attention
        _share_one_arena()
        self.sessions = [
            open_session(model.with_name(name), settings, spinning=False, shared_arena=True)
            for name in self.plan.stages
        ]
        self._inputs = [[i.name for i in s.get_inputs()] for s in self.sessions]
        self._outputs = [[o.name for o in s.get_outputs()] for s in self.sessions]
        self._bindings = [session.io_binding() for session in self.sessions]
        self._check_inputs({*self.plan.inputs, *added_inputs})
        last_use: dict[str, int] = {}
        for number, names in enumerate(self._inputs):
            last_use.update((name, number) for name in names)
        # after stage n, the passed tensors no later stage reads
        self._done = [{n for n, last in last_use.items() if last == s} for s in range(len(self))]

    def __len__(self) -> int:
        return len(self.sessions)

    def _check_inputs(self, known: set[str]) -> None:
        """Every tensor a stage reads must come from the caller or from an earlier step."""
        plan = self.plan
        for number, names in enumerate(self._inputs):
            missing = sorted(set(names) - known)
            if missing:
                raise NotLayerable(f"stage {number} reads {', '.join(missing)}, which none makes")
            known |= set(self._outputs[number])
            if number < len(plan.layers):
                known.add(plan.layers[number].output)
        if plan.output not in self._outputs[-1]:
            raise NotLayerable(f"the last stage does not make {plan.output}")

    def get_inputs(self):
        """The graph inputs the stages read and the last stage's outputs stand for the model's
        (the vision model's image sizes, say, are read by its last stage only)."""
        made = {name for names in self._outputs for name in names}
        made |= {layer.output for layer in self.plan.layers}
        seen: dict[str, object] = {}
        for session in self.sessions:
            for value in session.get_inputs():
                if value.name not in made:
                    seen.setdefault(value.name, value)
        return list(seen.values())

    def get_outputs(self):
        return self.sessions[-1].get_outputs()

    def _run(
        self,
        values: dict[str, ort.OrtValue],
        buffers: _Buffers | None,
        attend: Callable[[int, Layer, _Buffers], None],
        run_options: ort.RunOptions | None,
    ) -> np.ndarray:
        """Run every stage from the graph's inputs in ``values``, ``attend(number, layer,
        buffers)`` between each two (the kernel writes ``buffers.out``), and return the last
        stage's output. ``buffers`` holds the queries, keys and values each stage makes; None
        where their shape is known only once the first stage has run (its are then copied into
        buffers made to fit)."""
        plan = self.plan
        for number, session in enumerate(self.sessions):
            binding = self._bindings[number]
            for name in self._inputs[number]:
                binding.bind_ortvalue_input(name, values[name])
            layer = plan.layers[number] if number < len(plan.layers) else None
            mine = buffers.outputs(layer) if layer and buffers else {}
            for name in self._outputs[number]:
                if name in mine:
                    binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(mine[name]))
                else:
                    binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding, run_options)
            values.update(zip(self._outputs[number], binding.get_outputs(), strict=True))
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            if layer is not None and buffers is None:
                made = (values.pop(name) for name in (layer.q, layer.k, layer.v))
                buffers = _Buffers.holding(layer, *made)
            for name in self._done[number]:
                values.pop(name, None)
            if layer is not None:
                attend(number, layer, buffers)
                values[layer.output] = ort.OrtValue.ortvalue_from_numpy(buffers.out)
        return values[plan.output].numpy()


class LayeredDecoder(_Stages):
    """The decoder copy in stages: runs a prompt chunk on a :class:`KVCache` as the decoder copy
    would, the attention by the kernel, causal over the cache (``cache.run(layered, embeds)``)."""

    def __init__(self, decoder: Path, settings: SessionSettings, attention: AttentionKernel):
        super().__init__(decoder, settings, attention, added_inputs=[POSITIONS])

    @property
    def name(self) -> str:
        """What computes the prefill's attention, for a status line."""
        return self.attention.name

    def extend(
        self, cache: KVCache, embeds: np.ndarray, run_options: ort.RunOptions | None = None
    ) -> np.ndarray:
        """Run the chunk ``embeds`` [1, S, hidden] after the cache's positions: append their keys
        and values to ``cache`` and return the last position's logits (:meth:`KVCache.run`)."""
        new, start = embeds.shape[1], cache.length
        embeds_name, mask_name = self.plan.inputs
        positions = np.arange(start, start + new, dtype=np.int64)[None]
        values = {
            embeds_name: ort.OrtValue.ortvalue_from_numpy(embeds),
            mask_name: ort.OrtValue.ortvalue_from_numpy(cache.mask_for(new)),
            POSITIONS: ort.OrtValue.ortvalue_from_numpy(positions),
        }

        def attend(number: int, layer: Layer, buffers: _Buffers) -> None:
            """Layer ``number``'s keys and values into the cache, then the kernel over it."""
            keys, values = cache.layer_buffers(number)
            self.attention.store(buffers.k[0], buffers.v[0], keys, values, start)
            self.attention(buffers.q[0], keys, values, buffers.out[0], start, layer.heads)

        buffers = _Buffers((1, new), self.plan.layers[0])
        return cache.append(new, self._run(values, buffers, attend, run_options))


class LayeredVision(_Stages):
    """The vision copy in stages, run as its session would be (``run(outputs, feeds)``): each
    crop's attention by the kernel without a mask, every token seeing every token."""

    def __init__(self, vision: Path, settings: SessionSettings, attention: AttentionKernel):
        super().__init__(vision, settings, attention)
        self._lock = threading.Lock()  # the stages' bindings: one image at a time

    @property
    def name(self) -> str:
        """What computes the vision encoder's attention, for a status line."""
        return f"fused {self.attention.arithmetic}"

    def run(
        self,
        output_names: list[str],
        feeds: dict[str, np.ndarray],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        """The vision model's output (the one its plan names) for ``feeds``, as
        ``InferenceSession.run`` gives it."""
        if list(output_names) != [self.plan.output]:
            raise ValueError(f"the layered vision model makes {self.plan.output} only")
        values = {name: ort.OrtValue.ortvalue_from_numpy(feeds[name]) for name in self.plan.inputs}
        with self._lock:
            return [self._run(values, None, self._attend, run_options)]

    def _attend(self, number: int, layer: Layer, buffers: _Buffers) -> None:
        """Layer ``number``'s attention, crop by crop: q, k, v [crops, tokens, width]."""
        for crop in range(buffers.q.shape[0]):
            self.attention.full(
                buffers.q[crop], buffers.k[crop], buffers.v[crop], buffers.out[crop], layer.heads
            )


class _Buffers:
    """The queries, keys, values (the stages write them) and attention output (the kernel writes
    it) of one run, [*lead, width] each, reused by every layer."""

    def __init__(self, lead: tuple[int, ...], layer: Layer):
        width, kv_width = layer.heads * layer.head, layer.kv_heads * layer.head
        self.q = np.empty((*lead, width), np.float32)
        self.k = np.empty((*lead, kv_width), np.float32)
        self.v = np.empty((*lead, kv_width), np.float32)
        self.out = np.empty((*lead, width), np.float32)

    @classmethod
    def holding(cls, layer: Layer, q: ort.OrtValue, k: ort.OrtValue, v: ort.OrtValue) -> _Buffers:
        """Buffers shaped like the first stage's q, k, v, holding a copy of them."""
        buffers = cls(tuple(q.shape()[:-1]), layer)
        for buffer, value in ((buffers.q, q), (buffers.k, k), (buffers.v, v)):
            buffer[...] = value.numpy()
        return buffers

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
