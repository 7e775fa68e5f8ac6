"""Parse a model folder's genai_config.json (and processor_config.json) into typed objects.

Two export layouts exist (docs/ARCHITECTURE.md#two-export-layouts):

* ``legacy``: the June-2024 export of ``microsoft/Phi-3-vision-128k-instruct-onnx-cpu``. The vision
  model outputs ``visual_features`` [1, N, hidden] for one image, the embedding model takes only
  ``input_ids``, and the runtime pastes the image features into the embeddings itself.
* ``redesigned``: the Sep-2024 re-export (``microsoft/Phi-3-vision-128k-instruct-onnx``,
  ``microsoft/Phi-3.5-vision-instruct-onnx``). The vision model outputs ``image_features``
  [sum N, hidden] for all images at once, and the embedding model takes ``input_ids`` +
  ``image_features`` and does the merge.

The layout is detected from the config; anything else is refused with the offending key named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from phi3v.errors import ConfigError, ModelFolderError
from phi3v.image import MAX_CROPS

Layout = Literal["legacy", "redesigned"]

GENAI_CONFIG = "genai_config.json"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER = "tokenizer.json"

DEFAULT_NUM_CROPS = MAX_CROPS  # when processor_config.json does not say


@dataclass(frozen=True)
class DecoderConfig:
    filename: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    num_hidden_layers: int
    inputs_embeds: str
    attention_mask: str
    past_key_names: str  # a %d pattern, e.g. "past_key_values.%d.key"
    past_value_names: str
    logits: str
    present_key_names: str
    present_value_names: str

    def past_names(self, layer: int) -> tuple[str, str]:
        return self.past_key_names % layer, self.past_value_names % layer

    def present_names(self, layer: int) -> tuple[str, str]:
        return self.present_key_names % layer, self.present_value_names % layer


@dataclass(frozen=True)
class EmbeddingConfig:
    filename: str
    input_ids: str
    inputs_embeds: str
    image_features: str | None  # only in the redesigned layout


@dataclass(frozen=True)
class VisionConfig:
    filename: str
    pixel_values: str
    image_sizes: str
    features: str  # "visual_features" (legacy) or "image_features" (redesigned) output name


@dataclass(frozen=True)
class ModelConfig:
    """Everything the pipeline needs to know about a model folder, read once."""

    model_dir: Path
    layout: Layout
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int
    context_length: int
    past_present_share_buffer: bool
    num_crops: int
    decoder: DecoderConfig
    embedding: EmbeddingConfig
    vision: VisionConfig

    def path(self, filename: str) -> Path:
        return self.model_dir / filename


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``genai_config.json`` (+ ``processor_config.json``) into a :class:`ModelConfig`.

    Raises :class:`ModelFolderError` when the folder or a file it names is missing and
    :class:`ConfigError` when the config is malformed or of neither known layout.
    """
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise ModelFolderError(
            f"{model_dir} is a file; pass the model folder that holds it "
            f"({model_dir.parent}) or another that holds genai_config.json"
        )
    if not model_dir.is_dir():
        raise ModelFolderError(
            f"model folder {model_dir} does not exist: run `python download_models.py` "
            "or pass the folder that holds genai_config.json"
        )
    raw = _read_json(model_dir / GENAI_CONFIG)
    model = _section(raw, "model")
    model_type = model.get("type")
    if model_type != "phi3v":
        raise ConfigError(
            f"{model_dir / GENAI_CONFIG}: model.type is {model_type!r}, expected 'phi3v'; "
            "this folder is not a Phi-3 Vision model set"
        )
    search = raw.get("search", {})
    config = ModelConfig(
        model_dir=model_dir,
        layout=_detect_layout(model, model_dir),
        bos_token_id=_int(model, "bos_token_id", "model"),
        eos_token_ids=_eos_ids(model),
        pad_token_id=_int(model, "pad_token_id", "model"),
        vocab_size=_int(model, "vocab_size", "model"),
        context_length=_int(model, "context_length", "model"),
        past_present_share_buffer=bool(search.get("past_present_share_buffer", True)),
        num_crops=_num_crops(model_dir / PROCESSOR_CONFIG),
        decoder=_decoder(_section(model, "decoder", "model")),
        embedding=_embedding(_section(model, "embedding", "model")),
        vision=_vision(_section(model, "vision", "model")),
    )
    _check_files(config)
    return config


def _detect_layout(model: dict, model_dir: Path) -> Layout:
    where = f"{model_dir / GENAI_CONFIG}"
    vision_outputs = _section(_section(model, "vision", "model"), "outputs", "model.vision")
    embedding_inputs = _section(_section(model, "embedding", "model"), "inputs", "model.embedding")
    if "visual_features" in vision_outputs and "image_features" not in embedding_inputs:
        return "legacy"
    if "image_features" in vision_outputs and "image_features" in embedding_inputs:
        return "redesigned"
    if "visual_features" in vision_outputs:
        raise ConfigError(
            f"{where}: model.embedding.inputs has 'image_features' but model.vision.outputs has "
            "'visual_features': the config mixes the June-2024 and the re-designed export layouts"
        )
    if "image_features" in vision_outputs:
        raise ConfigError(
            f"{where}: model.vision.outputs has 'image_features' but model.embedding.inputs lacks "
            "'image_features': the re-designed layout needs both"
        )
    raise ConfigError(
        f"{where}: model.vision.outputs must name 'visual_features' (June-2024 layout) or "
        f"'image_features' (re-designed layout); found {sorted(vision_outputs)}"
    )


def _decoder(section: dict) -> DecoderConfig:
    inputs = _section(section, "inputs", "model.decoder")
    outputs = _section(section, "outputs", "model.decoder")
    return DecoderConfig(
        filename=_str(section, "filename", "model.decoder"),
        hidden_size=_int(section, "hidden_size", "model.decoder"),
        num_attention_heads=_int(section, "num_attention_heads", "model.decoder"),
        num_key_value_heads=_int(section, "num_key_value_heads", "model.decoder"),
        head_size=_int(section, "head_size", "model.decoder"),
        num_hidden_layers=_int(section, "num_hidden_layers", "model.decoder"),
        inputs_embeds=_str(inputs, "inputs_embeds", "model.decoder.inputs"),
        attention_mask=_str(inputs, "attention_mask", "model.decoder.inputs"),
        past_key_names=_pattern(inputs, "past_key_names", "model.decoder.inputs"),
        past_value_names=_pattern(inputs, "past_value_names", "model.decoder.inputs"),
        logits=_str(outputs, "logits", "model.decoder.outputs"),
        present_key_names=_pattern(outputs, "present_key_names", "model.decoder.outputs"),
        present_value_names=_pattern(outputs, "present_value_names", "model.decoder.outputs"),
    )


def _embedding(section: dict) -> EmbeddingConfig:
    inputs = _section(section, "inputs", "model.embedding")
    outputs = _section(section, "outputs", "model.embedding")
    features = inputs.get("image_features")
    return EmbeddingConfig(
        filename=_str(section, "filename", "model.embedding"),
        input_ids=_str(inputs, "input_ids", "model.embedding.inputs"),
        inputs_embeds=_str(outputs, "inputs_embeds", "model.embedding.outputs"),
        image_features=str(features) if features is not None else None,
    )


def _vision(section: dict) -> VisionConfig:
    inputs = _section(section, "inputs", "model.vision")
    outputs = _section(section, "outputs", "model.vision")
    key = "visual_features" if "visual_features" in outputs else "image_features"
    return VisionConfig(
        filename=_str(section, "filename", "model.vision"),
        pixel_values=_str(inputs, "pixel_values", "model.vision.inputs"),
        image_sizes=_str(inputs, "image_sizes", "model.vision.inputs"),
        features=_str(outputs, key, "model.vision.outputs"),
    )


def _eos_ids(model: dict) -> tuple[int, ...]:
    value = model.get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(
            f"genai_config.json: model.eos_token_id must be an integer or a list of integers, "
            f"got {value!r}"
        )
    return tuple(values)


def _num_crops(path: Path) -> int:
    """The Phi3ImageTransform ``num_crops`` of processor_config.json, or 16 when absent."""
    if not path.exists():
        return DEFAULT_NUM_CROPS
    raw = _read_json(path)
    transforms = raw.get("processor", {}).get("transforms", [])
    for transform in transforms:
        operation = transform.get("operation", {}) if isinstance(transform, dict) else {}
        if operation.get("type") == "Phi3ImageTransform":
            num_crops = operation.get("attrs", {}).get("num_crops", DEFAULT_NUM_CROPS)
            if not isinstance(num_crops, int) or not 1 <= num_crops <= DEFAULT_NUM_CROPS:
                raise ConfigError(
                    f"{path}: Phi3ImageTransform num_crops must be an integer from 1 to "
                    f"{DEFAULT_NUM_CROPS}, got {num_crops!r}"
                )
            return num_crops
    return DEFAULT_NUM_CROPS


def _check_files(config: ModelConfig) -> None:
    names = [config.vision.filename, config.embedding.filename, config.decoder.filename, TOKENIZER]
    missing = [name for name in names if not config.path(name).is_file()]
    if missing:
        raise ModelFolderError(
            f"model folder {config.model_dir} is incomplete: missing {', '.join(missing)}; "
            "run `python download_models.py` to fetch the model set"
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFolderError(
            f"model folder {path.parent} has no {path.name}: run `python download_models.py` "
            "or pass the folder that holds the model files"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); re-download the model set") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _section(parent: dict, key: str, where: str = "") -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        name = f"{where}.{key}" if where else key
        raise ConfigError(f"genai_config.json: {name} is missing or not an object")
    return value


def _str(parent: dict, key: str, where: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"genai_config.json: {where}.{key} is missing or not a string")
    return value


def _pattern(parent: dict, key: str, where: str) -> str:
    value = _str(parent, key, where)
    if value.count("%d") != 1:
        raise ConfigError(
            f"genai_config.json: {where}.{key} must contain one '%d' for the layer number, "
            f"got {value!r}"
        )
    return value


def _int(parent: dict, key: str, where: str) -> int:
    value: Any = parent.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(
            f"genai_config.json: {where}.{key} is missing or not a non-negative integer "
            f"(got {value!r})"
        )
    return value
