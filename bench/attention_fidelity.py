"""What prefill attention in lower precision does to a trained network's answers (issue 16).

``attention_forms.py`` measured each attention form's speed and its tensor error; this measures
what the forms' numerics change in the next-token choices and distributions, by the method of
``accuracy.py``: the trained decoder proxy (SmolLM2-135M as a Phi-3-V int4 decoder,
:mod:`phi3v.testing.proxies`), the evaluation texts of ``bench/texts/``, teacher-forced answers,
KL and top-1 against truth (int4 weights, fp32 activations), with bootstrap intervals over the
documents (``paired.py``).

Each form is an **emulation in ONNX operators** inside the fast decoder copy (the default
numerics, as this CPU stores them): every ``GroupQueryAttention`` keeps writing the KV cache, but
its output is replaced by attention computed from the rotated queries and the cache's keys and
values, causal, with the operands rounded as the form's kernel would round them: to bfloat16
(``Cast``), or to int8 with one scale per query and per key (``Round`` of ``x / scale``, which
in fp32 gives the int8 GEMM's sums: a head of 64 sums products below 2^24). So the figures hold
on any CPU, AMX or not; the speed of the kernels is ``attention_forms.py``'s. What it cannot show:
the kernels' own summation order (an online softmax over key blocks), which changes the output
at the level of fp32 rounding; and Phi-3-vision's own attention (32 heads of 96, its outliers),
which the proxy (9 heads of 64, 3 key/value heads) only stands in for.

The forms:

* ``fp32``: the emulation with no rounding. It must agree with GroupQueryAttention to rounding:
  the check that the emulation computes attention as GroupQueryAttention does.
* ``bf16``: Q (already scaled by 1/sqrt(head)), K, V and the softmax weights P rounded to
  bfloat16, products summed in fp32: the kernel's (``phi3v/kernels/attention.c``) bf16 variants,
  on AMX tiles or AVX-512 BF16 dot products.
* ``int8 QK``: Q and K int8, one scale per query row and per key; P and V in bfloat16.
* ``int8 QK, K smoothed``: the same after subtracting the keys' mean per channel (exact under the
  softmax, as SageAttention does).
* ``int8 QK and PV``: smoothed int8 Q·Kᵀ, then P as uint8 with one scale per query row and V
  int8 with one scale per channel.

Beside the emulations, the fast copy as the product runs it with the kernel (``fused kernel
fp32``, and ``fused kernel bf16`` where the CPU has bf16): cut in stages with our kernel computing
attention between them (:mod:`phi3v.layered`), its own summation order included. Left out, with
the reason, where the kernel cannot run.

    python bench/attention_fidelity.py     # -> bench/results/attention_fidelity.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import accuracy
import numpy as np
import onnx
import onnxruntime as ort
import paired
import tables
from onnx import TensorProto, helper, numpy_helper
from provenance import commit, save

from phi3v import attention, convert, machine
from phi3v.config import TOKENIZER, load_config
from phi3v.fast_check import kl_divergence, teacher_forced_logits
from phi3v.layered import LayeredDecoder, write_stages
from phi3v.sessions import Sessions, open_session
from phi3v.testing import proxies
from phi3v.tokenizer import PromptTokenizer

BASE = "GroupQueryAttention"  # the fast copy as it ships
# Path names: a form emulated in the fast copy, or in truth's decoder (fp32 activations).
FAST, ALONE = "fast copy:", "fp32 activations:"
NOISE = f"{FAST} fp32"  # the fast copy with exact fp32 attention: the paired base of its forms
# the copy in stages, phi3v/layered.py: the kernel's numerics -> the path's name
KERNELS = {
    "fp32": "fused kernel fp32 (the product)",
    "bf16": "fused kernel bf16 (the product, PHI3V_FUSED_ATTENTION=bf16)",
}
# form -> (how Q and K are rounded, how P and V are rounded)
FORMS = {
    "fp32": ("fp32", "fp32"),
    "bf16": ("bf16", "bf16"),
    "int8 QK": ("int8", "bf16"),
    "int8 QK, K smoothed": ("int8 smoothed", "bf16"),
    "int8 QK and PV": ("int8 smoothed", "int8"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", nargs="*", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--answer-tokens", type=int, default=accuracy.ANSWER_TOKENS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "cpu": machine.describe_cpu(),
            "command": "python bench/attention_fidelity.py " + " ".join(sys.argv[1:]),
            "load_before": os.getloadavg(),
            "decoder_numerics": convert.stored_for_this_cpu(
                convert.DEFAULT_NUMERICS.decoder
            ).describe(),
            "forms": {name: FORMS[name] for name in args.forms},
            **fidelity(Path(work), args.forms, args.answer_tokens),
        }
    result["load_after"] = os.getloadavg()
    save("attention_fidelity", result, report(result))
    print(report(result))


def fidelity(folder: Path, forms: list[str], answer_tokens: int) -> dict:
    """Per split: each path against truth, and against exact and the shipped fast copy on the
    same positions."""
    proxies.build_decoder_proxy(folder)
    config = load_config(folder)
    tokenizer = PromptTokenizer(config.path(TOKENIZER))
    exact = Sessions(config)
    source = config.path(config.decoder.filename)
    truth = accuracy._with_decoders(
        exact, open_session(source, exact.options, fp32_activations=True)
    )
    fast = folder / "fast" / source.name
    fast.parent.mkdir()
    numerics = convert.stored_for_this_cpu(convert.DEFAULT_NUMERICS.decoder)
    convert.convert_model(source, fast, numerics, last_position_output=config.decoder.logits)
    paths = {"exact": exact, BASE: _prefill_on(exact, fast)}
    for name in forms:  # in the fast copy: what the product would compute
        paths[f"{FAST} {name}"] = _prefill_on(exact, emulate(fast, name, *FORMS[name]))
    not_run = {}
    write_stages(fast, config.decoder)
    threads = exact.options.threads
    for numerics, name in KERNELS.items():
        try:
            layered = LayeredDecoder(fast, exact.options, attention.kernel(threads, numerics))
            paths[f"{FAST} {name}"] = accuracy._with_decoders(exact, exact.decoder, layered)
        except attention.KernelUnavailable as error:
            not_run[name] = str(error)
    for name in forms:  # in truth's decoder: the attention numerics alone
        emulated = emulate(source, name, *FORMS[name])
        emulated = open_session(emulated, exact.options, fp32_activations=True)
        paths[f"{ALONE} {name}"] = accuracy._with_decoders(exact, truth.decoder, emulated)
    vocab = min(config.vocab_size, tokenizer.vocab_size)
    report = {}
    for split in ("tune", "held_out"):
        pairs = accuracy._prompts(tokenizer, proxies.evaluation_texts(split), answer_tokens)
        report[split] = _split(paths, truth, pairs, vocab, split)
    report["not_run"] = not_run
    return report


def _split(paths: dict[str, Sessions], truth: Sessions, pairs: list, vocab: int, split: str):
    """One split's summaries: each path against truth, and against exact and the shipped copy."""
    references = [teacher_forced_logits(truth, *pair)[:, :vocab] for pair in pairs]
    margins = [paired.top_two_margin(t.astype(np.float64)) for t in references]
    choices = {"truth": [t.argmax(axis=-1) for t in references]}
    kl: dict[str, list[np.ndarray]] = {}
    for path, sessions in paths.items():
        started = time.perf_counter()
        choices[path], kl[path] = [], []
        for pair, reference in zip(pairs, references, strict=True):
            logits = teacher_forced_logits(sessions, *pair)[:, :vocab]
            choices[path].append(logits.argmax(axis=-1))
            kl[path].append(kl_divergence(reference, logits))
        print(f"{split} {path}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    weights = paired.document_weights(len(pairs))

    def totals(path: str, base: str) -> list[dict]:
        chosen = zip(choices["truth"], choices[base], choices[path], kl[path], margins, strict=True)
        return [paired.document_totals(*document) for document in chosen]

    return {
        "documents": len(pairs),
        "paths": {p: paired.path_summary(totals(p, "exact"), weights) for p in paths},
        "against": {
            base: {
                p: paired.paired_summary(totals(base, base), totals(p, base), weights)
                for p in paths
                if p not in ("exact", base)
            }
            for base in ("exact", BASE, NOISE)
            if base in paths
        },
    }


def _prefill_on(sessions: Sessions, path: Path) -> Sessions:
    return accuracy._with_decoders(sessions, sessions.decoder, open_session(path, sessions.options))


# --- the emulation -------------------------------------------------------------------------------


def emulate(source: Path, name: str, qk: str, pv: str) -> Path:
    """A copy of the decoder at ``source`` whose GroupQueryAttention outputs are replaced by
    causal attention with Q·Kᵀ rounded as ``qk`` says and P·V as ``pv`` says; beside ``source``,
    sharing its weights file."""
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type == "GroupQueryAttention":
            nodes += _Emulation(node, initializers, opset, qk, pv).nodes
    del graph.node[:]
    graph.node.extend(nodes)
    target = source.with_name(f"{name.replace(' ', '_').replace(',', '')}.onnx")
    target.write_bytes(model.SerializeToString())  # the initializers still name source's data
    return target


class _Emulation:
    """The nodes computing one GroupQueryAttention's output (which they take over) from its
    packed QKV input, its present key and value and its rotary caches."""

    def __init__(self, node, initializers, opset: int, qk: str, pv: str):
        attrs = {a.name: a for a in node.attribute}
        heads, kv_heads = attrs["num_heads"].i, attrs["kv_num_heads"].i
        if attrs.get("rotary_interleaved") and attrs["rotary_interleaved"].i:
            raise ValueError("the emulation rotates halves (rotary_interleaved=0) only")
        qkv, total, cos, sin = node.input[0], node.input[6], node.input[7], node.input[8]
        head = 2 * initializers[cos].dims[1]
        self.prefix, self.opset, self.nodes, self.constants = f"{node.name}/emulated", opset, [], []
        output = node.output[0]
        node.output[0] = f"{output}/replaced"
        c = self._const
        t = self._op("Reshape", [self._op("Cast", [total], to=TensorProto.INT64), c([])])
        s = self._op("Gather", [self._op("Shape", [qkv]), c(1)], axis=0)
        positions = self._op("Range", [self._op("Sub", [t, s]), t, c(1)])
        # Queries [1, H, S, d], rotated (halves) with the caches' rows at their positions.
        q = self._op("Slice", [qkv, c([0]), c([heads * head]), c([2])])
        q = self._op(
            "Transpose", [self._op("Reshape", [q, c([1, -1, heads, head])])], perm=[0, 2, 1, 3]
        )
        half = head // 2
        first = self._op("Slice", [q, c([0]), c([half]), c([3])])
        second = self._op("Slice", [q, c([half]), c([head]), c([3])])
        cosine = self._op("Gather", [cos, positions], axis=0)
        sine = self._op("Gather", [sin, positions], axis=0)
        rotated = self._op(
            "Concat",
            [
                self._op(
                    "Sub", [self._op("Mul", [first, cosine]), self._op("Mul", [second, sine])]
                ),
                self._op(
                    "Add", [self._op("Mul", [second, cosine]), self._op("Mul", [first, sine])]
                ),
            ],
            axis=3,
        )
        q = self._op("Mul", [rotated, self._const(head**-0.5, np.float32)])
        q = self._op("Reshape", [q, c([1, kv_heads, heads // kv_heads, -1, head])])
        # Keys and values [1, KV, 1, T, d]: the cache's first T positions.
        length = self._op("Reshape", [t, c([1])])
        k, v = (
            self._op("Unsqueeze", [self._op("Slice", [cache, c([0]), length, c([2])]), c([2])])
            for cache in node.output[1:3]
        )
        q, k = self._round_qk(q, k, qk)
        scores = self._op("MatMul", [q, self._op("Transpose", [k], perm=[0, 1, 2, 4, 3])])
        rows = self._op("Unsqueeze", [positions, c([1])])
        columns = self._op("Unsqueeze", [self._op("Range", [c(0), t, c(1)]), c([0])])
        future = self._op("Greater", [columns, rows])
        weights = self._op(
            "Softmax",
            [self._op("Where", [future, self._const(-np.inf, np.float32), scores])],
            axis=-1,
        )
        weights, v = self._round_pv(weights, v, pv)
        out = self._op("MatMul", [weights, v])  # [1, KV, G, S, d]
        out = self._op("Reshape", [out, c([1, heads, -1, head])])
        out = self._op("Transpose", [out], perm=[0, 2, 1, 3])
        self.nodes.append(
            helper.make_node("Reshape", [out, c([1, -1, heads * head])], [output], name=output)
        )
        self.nodes[:0] = [
            helper.make_node("Constant", [], [t.name], name=t.name, value=t) for t in self.constants
        ]

    def _round_qk(self, q: str, k: str, form: str) -> tuple[str, str]:
        if form == "fp32":
            return q, k
        if form == "bf16":
            return self._bf16(q), self._bf16(k)
        if form == "int8 smoothed":  # the keys' mean per channel: every score of a row moves alike
            k = self._op("Sub", [k, self._reduce("ReduceMean", k, 3)])
        return self._int8(q, 4, 127), self._int8(k, 4, 127)

    def _round_pv(self, p: str, v: str, form: str) -> tuple[str, str]:
        if form == "fp32":
            return p, v
        if form == "bf16":
            return self._bf16(p), self._bf16(v)
        return self._int8(p, 4, 255), self._int8(v, 3, 127)  # P >= 0: uint8; V per channel

    def _bf16(self, x: str) -> str:
        return self._op(
            "Cast", [self._op("Cast", [x], to=TensorProto.BFLOAT16)], to=TensorProto.FLOAT
        )

    def _int8(self, x: str, axis: int, levels: int) -> str:
        """``x`` on a grid of ``levels`` steps of its largest magnitude along ``axis`` (one
        scale per every other index): what an int8 (or uint8) operand holds."""
        peak = self._reduce("ReduceMax", self._op("Abs", [x]), axis)
        tiny, steps = self._const(1e-30, np.float32), self._const(levels, np.float32)
        step = self._op("Div", [self._op("Max", [peak, tiny]), steps])
        return self._op("Mul", [self._op("Round", [self._op("Div", [x, step])]), step])

    def _reduce(self, op: str, x: str, axis: int) -> str:
        if self.opset >= 18:
            return self._op(op, [x, self._const([axis])], keepdims=1)
        return self._op(op, [x], axes=[axis], keepdims=1)

    def _const(self, value, dtype=np.int64) -> str:
        tensor = numpy_helper.from_array(
            np.array(value, dtype), f"{self.prefix}/c{len(self.constants)}"
        )
        self.constants.append(tensor)
        return tensor.name

    def _op(self, op: str, inputs: list[str], **attrs) -> str:
        out = f"{self.prefix}/{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


# --- the report ----------------------------------------------------------------------------------


def report(result: dict) -> str:
    tune, held = result["tune"], result["held_out"]
    exact = tune["paths"]["exact"]

    def against_truth(path: str, label: str) -> list[str]:
        numbers = tune["paths"][path]
        low, high = numbers["top1_interval"]
        return [
            label,
            f"{numbers['top1']:.1%} [{low:.1%}, {high:.1%}]",
            f"{numbers['mean_kl']:.2e}",
            f"{numbers['mean_kl'] / exact['mean_kl']:.3f}x",
            f"{numbers['first_kl'] / exact['first_kl']:.3f}x",
            f"{held['paths'][path]['top1']:.1%}",
        ]

    header = ["path", "top-1 (tune)", "mean KL (tune)", "KL / exact's", "first-token KL / exact's"]
    header.append("top-1 (held out)")
    alone = [against_truth("exact", "exact (for scale)")]
    alone += [
        against_truth(p, p.removeprefix(ALONE).strip())
        for p in tune["paths"]
        if p.startswith(ALONE)
    ]
    in_copy = [against_truth(p, p) for p in ("exact", BASE) if p in tune["paths"]]
    paired_header = [f"top-1 minus {NOISE}'s, points", f"KL / {NOISE}'s", "same top-1"]
    for path in (p for p in tune["paths"] if p.startswith(FAST)):
        row = against_truth(path, path.removeprefix(FAST).strip())
        against = tune["against"][NOISE].get(path)
        if against:
            low, high = against["top1_difference"]["interval"]
            kl_low, kl_high = against["kl_ratio"]["interval"]
            row += [
                f"{against['top1_difference']['value']:+.1f} [{low:+.1f}, {high:+.1f}]",
                f"{against['kl_ratio']['value']:.2f}x [{kl_low:.2f}, {kl_high:.2f}]",
                f"{against['same_as_exact']['value']:.1%}",
            ]
        else:
            row += ["(the base)", "", ""]
        in_copy.append(row)
    for row in in_copy[:2]:
        row += ["", "", ""]
    noise = tune["against"][BASE].get(NOISE)
    noise_line = (
        f"The emulation with no rounding against {BASE} in the same copy: "
        f"{noise['same_as_exact']['value']:.1%} the same top-1, KL ratio "
        f"{noise['kl_ratio']['value']:.2f}x [{noise['kl_ratio']['interval'][0]:.2f}, "
        f"{noise['kl_ratio']['interval'][1]:.2f}]. Both compute attention in fp32 and differ "
        "only in rounding (`tests/test_attention_fidelity.py` checks the emulation against "
        f"{BASE} to 1e-5 relative); in the fast copy such differences move some per-row int8 "
        "roundings of the next projection's input, so this is the noise floor of any comparison "
        "inside the "
        f"copy, which is why the forms there are paired with `{NOISE}` rather than {BASE}."
        if noise
        else ""
    )
    return f"""# Prefill attention numerics on the trained decoder proxy

{result["date"]}; phi3v {result["commit"]}; {result["cpu"]}; `{result["command"]}`; the fast
decoder copy in {result["decoder_numerics"]}; load average {result["load_before"][0]:.2f} ->
{result["load_after"][0]:.2f}. {tune["documents"]} tuning and {held["documents"]} held-out texts;
in brackets, 95 % intervals from a bootstrap over the documents.

**The attention numerics alone**: each form emulated in truth's decoder (int4 weights, fp32
activations everywhere else), against truth. exact's own distance from truth is the scale.

{tables._table(header, alone)}

**In the fast copy** (what the product would compute), against truth, and paired with the same
copy computing attention in fp32 by the same emulation:

{tables._table(header + paired_header, in_copy)}

{noise_line}{kernel_line(result)}"""


def kernel_line(result: dict) -> str:
    """What the product's kernel paths do against GroupQueryAttention in the same copy, or why
    they did not run."""
    lines = []
    for name in KERNELS.values():
        not_run = result.get("not_run", {}).get(name)
        if not_run:
            lines.append(f"Not run: {name}: {not_run}.")
            continue
        against = result["tune"]["against"][BASE].get(f"{FAST} {name}")
        if not against:
            continue
        low, high = against["kl_ratio"]["interval"]
        t_low, t_high = against["top1_difference"]["interval"]
        lines.append(
            f"The copy in stages with our fused kernel (`{name}`), paired with {BASE} in the "
            f"same copy: KL to truth {against['kl_ratio']['value']:.2f}x [{low:.2f}, {high:.2f}], "
            f"top-1 {against['top1_difference']['value']:+.1f} points [{t_low:+.1f}, "
            f"{t_high:+.1f}], {against['same_as_exact']['value']:.1%} the same top-1."
        )
    return "".join(f"\n\n{line}" for line in lines)


if __name__ == "__main__":
    ort.set_default_logger_severity(3)
    main()
