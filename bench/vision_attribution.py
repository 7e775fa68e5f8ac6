"""Where the fast vision copy's error comes from, on the DINOv2 ViT-S/14 int4 proxy.

The fast copy changes two things at once against **truth** (the same int4 weights with fp32
activations): its weights are int8 per output channel, requantized from the int4 blocks, and its
activations are 8-bit with one scale per row, optionally after a block-Hadamard rotation. This
separates them. Each projection is rewritten in float arithmetic that rounds exactly where the
integer GEMM rounds (a simulation: ``x -> rotate -> round(x / s) * s`` per row, times the
effective weights ``q * s_w`` or ``q * s_w + r * s_r``), with only the chosen part rounded, on the
chosen projections only; the rest stay truth. So each row says how much error that part alone
brings, as a multiple of **exact**'s (onnxruntime-genai's int4 kernel: int8 activations per
block of 32). Real integer-GEMM copies of the same numerics sit beside the simulation, to show
it matches.

* sources: weights only, activations only, both; by rotation (none, blocks of 32/64/128, and a
  random orthogonal rotation of the whole K, which an online block rotation can only approach);
* roles (qkv, out, fc1, fc2) and layers (0-11): one at a time, at the default rotation;
* the remainder weight (``Numerics.fine_weights``) on a few sets of roles and rotations.

Errors add about in quadrature (independent roundings): the total's square is near the sum of the
parts' squares, which is how a target on the total splits into targets on the parts.

    python bench/vision_attribution.py   # ~5 min, 1 thread -> bench/results/vision_attribution.*
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tables
import vision_proxy
from onnx import helper, numpy_helper
from provenance import commit, save

from phi3v import convert, integer_gemm, machine
from phi3v.sessions import open_session

ROLES = tuple(integer_gemm.ROLES)  # attention_in (q, k, v), attention_out, mlp_in, mlp_out
ROLE_NAMES = {"attention_in": "qkv", "attention_out": "out", "mlp_in": "fc1", "mlp_out": "fc2"}
ROTATIONS = (0, 32, 64, 128, "whole")
DEFAULT_VISION = convert.DEFAULT_NUMERICS.vision
DEFAULT_ROTATION = DEFAULT_VISION.rotation


@dataclass(frozen=True)
class Rounding:
    """What one simulated projection rounds: its weights ("int4": as they are, "int8",
    "remainder": int8 plus an int8 remainder), its activations (8 bits, a scale per row), after
    a rotation (0, a block size, or "whole": a random orthogonal K x K)."""

    weights: str = "int4"
    activations: bool = False
    rotation: int | str = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    vision_proxy.add_draws_argument(parser)
    parser.add_argument(
        "--name", default="vision_attribution", help="results file stem (default: %(default)s)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        study = Study(Path(work), args.draws)
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "cpu": machine.describe_cpu(),
            "photos": len(study.proxy.photos),
            "draws": study.proxy.draws,
            "default_rotation": DEFAULT_ROTATION,
            "exact_error": study.proxy.exact_error,
            "sources": sources(study),
            "roles": roles(study),
            "layers": layers(study),
            "remainder": remainders(study),
            "copies": copies(study),
            "divergence": divergence(study, DEFAULT_VISION),
        }
    result["seconds"] = round(time.perf_counter() - started)
    save(args.name, result, tables.vision_attribution(result))
    print(tables.vision_attribution(result))


# --- the measurements ----------------------------------------------------------------------------


def sources(study: Study) -> list[dict]:
    """Weights only, activations only and both, on every projection, by rotation."""
    rows = []
    for rotation in ROTATIONS:
        for label, rounding in (
            ("weights int8", Rounding("int8", False, rotation)),
            ("activations per row", Rounding("int4", True, rotation)),
            ("both (the fast copy)", Rounding("int8", True, rotation)),
            ("both, weights + remainder", Rounding("remainder", True, rotation)),
        ):
            rows.append(
                {"part": label, "rotation": rotation, **study.ratio(lambda _, r=rounding: r)}
            )
    return rows


def roles(study: Study) -> list[dict]:
    """Each role alone rounded (weights, activations, both) at the default rotation."""
    rows = []
    for role in ROLES:
        row = {"role": ROLE_NAMES[role], "flops_share": study.flops_share(role)}
        for label, rounding in _parts(DEFAULT_ROTATION).items():
            row[label] = study.ratio(lambda name, r=rounding, o=role: _role(name, o, r))["ratio"]
        rows.append(row)
    return rows


def layers(study: Study) -> list[dict]:
    """Each layer alone rounded (weights, activations, both) at the default rotation."""
    rows = []
    for layer in study.layers():
        row = {"layer": layer}
        for label, rounding in _parts(DEFAULT_ROTATION).items():
            row[label] = study.ratio(lambda name, r=rounding, n=layer: _layer(name, n, r))["ratio"]
        rows.append(row)
    return rows


def remainders(study: Study) -> list[dict]:
    """The whole copy with a remainder weight on some roles, by rotation: error and the share of
    the vision GEMM work the remainder adds."""
    sets = [
        ("attention_out",),
        ("mlp_out",),
        ("attention_in",),
        ("attention_out", "mlp_out"),
        ("attention_in", "attention_out"),
        ROLES,
    ]
    rows = []
    for rotation in (DEFAULT_ROTATION, 64, 128, "whole"):
        for fine in sets:

            def plan(name, fine=fine, rotation=rotation):
                weights = "remainder" if integer_gemm.projection_role(name) in fine else "int8"
                return Rounding(weights, True, rotation)

            rows.append(
                {
                    "rotation": rotation,
                    "remainder": "+".join(ROLE_NAMES[r] for r in fine),
                    "added_gemm_share": sum(study.flops_share(r) for r in fine),
                    **study.ratio(plan),
                }
            )
    # The layers nearest the output carry the most error (layers()): every role there instead.
    last = study.layers()
    for count, roles_too in ((1, ()), (2, ()), (3, ()), (2, ("attention_out",))):
        numerics = integer_gemm.Numerics(
            rotation=DEFAULT_ROTATION, fine_weights=roles_too, fine_layers=tuple(range(-count, 0))
        )
        label = f"all of the last {count} layer{'s' if count > 1 else ''}"
        share = count / len(last) + sum(study.flops_share(r) for r in roles_too) * (
            1 - count / len(last)
        )
        rows.append(
            {
                "rotation": DEFAULT_ROTATION,
                "remainder": "+".join([label, *(ROLE_NAMES[r] for r in roles_too)]),
                "added_gemm_share": share,
                **study.ratio(_plan_of(numerics, len(last))),
            }
        )
    return rows


def copies(study: Study) -> list[dict]:
    """Real integer-GEMM copies beside their simulation: the simulation's check. Each pair also
    says how far apart their features are (mean over photos and draws, as a multiple of exact's
    error): as far as either is from truth when the two are separate draws of the same noise."""
    rows = []
    for numerics in (
        integer_gemm.Numerics(),
        integer_gemm.Numerics(rotation=32),
        integer_gemm.Numerics(rotation=64),
        integer_gemm.Numerics(rotation=32, fine_weights=("attention_out", "mlp_out")),
        DEFAULT_VISION,
    ):
        copy = study.proxy.features(study.proxy.session(study.copy(numerics)))
        plan = _plan_of(numerics, len(study.layers()))
        simulated = study.proxy.features(study.simulated_session(plan))
        apart = study.proxy.relative(copy, simulated).mean() / study.proxy.exact_error
        rows.append(
            {
                "numerics": numerics.describe(),
                "copy": study.proxy.ratio(study.proxy.relative(copy, study.proxy.truth))["ratio"],
                "simulated": study.proxy.ratio(study.proxy.relative(simulated, study.proxy.truth))[
                    "ratio"
                ],
                "apart": float(apart),
            }
        )
    return rows


def divergence(study: Study, numerics: integer_gemm.Numerics) -> list[dict]:
    """How the real copy of ``numerics`` and its simulation drift apart through the layers, on
    the photos as they are (draw 0): the relative difference of each layer's MLP output (and of
    the first projection's), and each one's relative difference from truth there."""
    projections = [n for n in study.model.graph.node if n.op_type == "MatMulNBits"]
    watched = [projections[0]] + [
        n for n in projections if integer_gemm.projection_role(n.name or n.output[0]) == "mlp_out"
    ]
    outputs = [n.output[0] for n in watched]
    pixels = study.proxy.inputs[0]
    copy, simulated, truth = (
        _run(study.folder / f"watched-{kind}.onnx", model, outputs, pixels, kind == "truth")
        for kind, model in (
            ("copy", onnx.load(str(study.copy(numerics)))),
            ("simulated", study.simulated(_plan_of(numerics, len(study.layers())))),
            ("truth", onnx.load(str(study.source))),
        )
    )
    rows = []
    for node, name in zip(watched, outputs, strict=True):
        scale = np.linalg.norm(truth[name])
        rows.append(
            {
                "projection": ROLE_NAMES[integer_gemm.projection_role(node.name or name)],
                "layer": integer_gemm.projection_layer(node.name or name),
                "apart": float(np.linalg.norm(copy[name] - simulated[name]) / scale),
                "copy_error": float(np.linalg.norm(copy[name] - truth[name]) / scale),
                "simulated_error": float(np.linalg.norm(simulated[name] - truth[name]) / scale),
            }
        )
    return rows


def _plan_of(numerics: integer_gemm.Numerics, layers: int):
    """The simulation of a real copy's numerics (per row, a rotation, remainders) in a model of
    ``layers`` layers."""

    def plan(name):
        fine = numerics.refines(name, layers)
        return Rounding("remainder" if fine else "int8", True, numerics.rotation)

    return plan


def _run(path: Path, model: onnx.ModelProto, names: list[str], pixels, truth: bool) -> dict:
    """``model`` with ``names`` as extra outputs, saved at ``path`` and run on ``pixels``
    (``truth``: with fp32 activations)."""
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    session = open_session(path, vision_proxy.SETTINGS, fp32_activations=truth)
    values = session.run(names, {session.get_inputs()[0].name: pixels})
    return dict(zip(names, values, strict=True))


def _parts(rotation) -> dict[str, Rounding]:
    return {
        "weights": Rounding("int8", False, rotation),
        "activations": Rounding("int4", True, rotation),
        "both": Rounding("int8", True, rotation),
    }


def _role(name: str, role: str, rounding: Rounding) -> Rounding | None:
    return rounding if integer_gemm.projection_role(name) == role else None


def _layer(name: str, layer: int, rounding: Rounding) -> Rounding | None:
    return rounding if integer_gemm.projection_layer(name) == layer else None


# --- the study: the proxy, its truth, and simulated copies ---------------------------------------


class Study:
    """The vision proxy's measure (bench/vision_proxy.py), the proxy's graph and int4 weights,
    and the simulator."""

    def __init__(self, folder: Path, draws: int):
        self.folder = folder
        self.proxy = vision_proxy.VisionProxy(folder / "int4", draws)
        self.source = self.proxy.source
        self.model = onnx.load(str(self.source))
        self.weights = convert.int4_weights(self.source)
        self._orthogonal: dict[int, np.ndarray] = {}
        self._copies: dict[integer_gemm.Numerics, Path] = {}

    def layers(self) -> list[int]:
        return sorted({integer_gemm.projection_layer(name) for name in self.weights} - {None})

    def flops_share(self, role: str) -> float:
        """The role's share of the projections' multiply-adds (every row sees every weight)."""
        sizes = {name: w.size for name, w in self.weights.items()}
        mine = sum(s for n, s in sizes.items() if integer_gemm.projection_role(n) == role)
        return mine / sum(sizes.values())

    def ratio(self, plan) -> dict:
        """The simulated model's error as a multiple of exact's (pooled over photos and draws,
        the worst photo's, the single draws' range). ``plan(node name)``: each projection's
        Rounding (None: truth)."""
        started = time.perf_counter()
        found = self.proxy.ratio(self.proxy.errors(self.simulated_session(plan)))
        print(f"  {time.perf_counter() - started:.1f} s: {found['ratio']:.3f}x", file=sys.stderr)
        return {key: found[key] for key in ("ratio", "worst_ratio", "draw_range")}

    def simulated_session(self, plan) -> ort.InferenceSession:
        return ort.InferenceSession(
            self.simulated(plan).SerializeToString(), _options(), providers=["CPUExecutionProvider"]
        )

    def copy(self, numerics: integer_gemm.Numerics) -> Path:
        """A real integer-GEMM copy of ``numerics`` made by the converter (once), stored for
        this CPU."""
        if numerics not in self._copies:
            target = self.folder / "copies" / f"{len(self._copies)}.onnx"
            target.parent.mkdir(exist_ok=True)
            convert.convert_model(self.source, target, convert.stored_for_this_cpu(numerics))
            self._copies[numerics] = target
        return self._copies[numerics]

    def simulated(self, plan) -> onnx.ModelProto:
        """The proxy with every MatMulNBits as float MatMul nodes rounding what ``plan`` says."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        nodes, weights = [], []
        for node in graph.node:
            if node.op_type != "MatMulNBits":
                nodes.append(node)
                continue
            name = node.name or node.output[0]
            rounding = plan(name) or Rounding()
            new_nodes, new_weights = self._projection(node, name, rounding)
            nodes += new_nodes
            weights += new_weights
        replaced = {
            n for node in graph.node if node.op_type == "MatMulNBits" for n in node.input[1:]
        }
        kept = [t for t in graph.initializer if t.name not in replaced]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept + weights + _constants())
        return model

    def _projection(self, node, name: str, rounding: Rounding):
        """Nodes and weights for one projection: x -> [rotate] -> [round] -> @ W_effective."""
        weights = self.weights[name]
        k = weights.shape[0]
        x, out, made = node.input[0], node.output[0], []
        tensors = []
        if rounding.rotation:
            rotation = self._rotation(rounding.rotation, k)
            weights = rotation.T @ weights
            tensors.append(numpy_helper.from_array(rotation, f"{name}/rotation"))
            made.append(helper.make_node("MatMul", [x, f"{name}/rotation"], [f"{name}/rotated"]))
            x = f"{name}/rotated"
        if rounding.activations:
            made += _round_rows(x, name)
            x = f"{name}/rounded"
        tensors.append(numpy_helper.from_array(_effective(weights, rounding.weights), f"{name}/w"))
        made.append(helper.make_node("MatMul", [x, f"{name}/w"], [out]))
        return made, tensors

    def _rotation(self, rotation: int | str, k: int) -> np.ndarray:
        """K x K: block-diagonal Hadamard, or a seeded random orthogonal matrix ("whole")."""
        if rotation == "whole":
            if k not in self._orthogonal:
                gaussian = np.random.default_rng(k).standard_normal((k, k))
                self._orthogonal[k] = np.linalg.qr(gaussian)[0].astype(np.float32)
            return self._orthogonal[k]
        block = integer_gemm.fitting_block(rotation, k)
        return np.kron(np.eye(k // block, dtype=np.float32), integer_gemm.hadamard(block))


def _effective(weights: np.ndarray, form: str) -> np.ndarray:
    """The float weights the integer GEMM multiplies with, in ``form``."""
    if form == "int4":
        return weights
    if form == "int8":
        quantized, step = integer_gemm.quantize_per_channel(weights)
        return quantized * step
    quantized, step, remainder, fine = integer_gemm.quantize_with_remainder(weights)
    return quantized * step + remainder.astype(np.float32) * fine


def _round_rows(x: str, name: str) -> list[onnx.NodeProto]:
    """x -> round(x / s) * s with s = max|x| / 127 per row: the fast copy's activations (its
    uint8 around 128, QuantizeLinear's round half to even), in float."""
    t = lambda suffix: f"{name}/{suffix}"  # noqa: E731
    return [
        helper.make_node("Abs", [x], [t("abs")]),
        helper.make_node("ReduceMax", [t("abs")], [t("peak")], axes=[-1], keepdims=1),
        helper.make_node("Max", [t("peak"), "sim/tiny"], [t("safe_peak")]),
        helper.make_node("Mul", [t("safe_peak"), "sim/inv127"], [t("step")]),
        helper.make_node("Div", [x, t("step")], [t("scaled")]),
        helper.make_node("Round", [t("scaled")], [t("levels")]),
        helper.make_node("Mul", [t("levels"), t("step")], [t("rounded")]),
    ]


def _constants() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array(1e-12, np.float32), "sim/tiny"),
        numpy_helper.from_array(np.array(1 / integer_gemm.INT8_PEAK, np.float32), "sim/inv127"),
    ]


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = vision_proxy.SETTINGS.num_threads
    return options


if __name__ == "__main__":
    ort.set_default_logger_severity(3)
    main()
