"""genai_config.json parsing, layout detection, and every way a model folder can be wrong."""

import shutil
from pathlib import Path

import pytest

from phi3v import ConfigError, ModelFolderError, Phi3VError, Pipeline, load_config
from tests.conftest import FIXTURES
from tests.model_folders import copy_model, edit_config


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return copy_model(tiny_model_dir, tmp_path / "model")


def test_redesigned_layout_is_detected(tiny_model_dir):
    config = load_config(tiny_model_dir)
    assert config.layout == "redesigned"
    assert config.embedding.image_features == "image_features"
    assert config.vision.features == "image_features"


def test_legacy_layout_is_detected(tiny_legacy_model_dir):
    config = load_config(tiny_legacy_model_dir)
    assert config.layout == "legacy"
    assert config.embedding.image_features is None
    assert config.vision.features == "visual_features"


def test_the_real_june_2024_config_parses_as_legacy(tmp_path):
    # The released config of Phi-3-vision-128k-instruct-onnx-cpu (tests/fixtures, see SOURCE.txt).
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(FIXTURES / "phi3v-tokenizer" / "genai_config.json", folder)
    with pytest.raises(ModelFolderError, match="incomplete: missing phi-3-v-128k-instruct-vision"):
        load_config(folder)  # no .onnx files here: parsing succeeded, the file check failed


def test_typed_values_come_from_the_config(tiny_model_dir):
    config = load_config(tiny_model_dir)
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (32007,), 32000)
    assert (config.vocab_size, config.context_length) == (32064, 131072)
    assert config.past_present_share_buffer is True
    assert config.num_crops == 16
    decoder = config.decoder
    assert (decoder.hidden_size, decoder.num_attention_heads, decoder.num_key_value_heads) == (
        64, 4, 2,
    )  # fmt: skip
    assert decoder.past_names(3) == ("past_key_values.3.key", "past_key_values.3.value")
    assert decoder.present_names(0) == ("present.0.key", "present.0.value")


def test_eos_token_id_may_be_a_list(model_copy):
    edit_config(model_copy, lambda c: c["model"].update(eos_token_id=[2, 32000, 32007]))
    assert load_config(model_copy).eos_token_ids == (2, 32000, 32007)


def test_processor_config_num_crops_sets_the_default(model_copy):
    path = model_copy / "processor_config.json"
    path.write_text(path.read_text().replace('"num_crops": 16', '"num_crops": 4'))
    assert load_config(model_copy).num_crops == 4


def test_missing_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelFolderError, match=r"does not exist: run `python download_models.py`"):
        load_config(tmp_path / "nowhere")


def test_folder_without_config_says_how_to_get_one(tmp_path):
    with pytest.raises(
        ModelFolderError, match=r"has no genai_config.json: run `python download_mo"
    ):
        load_config(tmp_path)


def test_invalid_json_is_reported(model_copy):
    (model_copy / "genai_config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(model_copy)


def test_other_model_types_are_refused(model_copy):
    edit_config(model_copy, lambda c: c["model"].update(type="phi3"))
    with pytest.raises(ConfigError, match=r"model.type is 'phi3', expected 'phi3v'"):
        load_config(model_copy)


def test_a_config_mixing_the_layouts_names_the_key(model_copy):
    def legacy_vision(config):
        config["model"]["vision"]["outputs"] = {"visual_features": "visual_features"}

    edit_config(model_copy, legacy_vision)
    mixed = r"embedding.inputs has 'image_features' but model.vision.outputs has 'visual_features'"
    with pytest.raises(ConfigError, match=mixed):
        load_config(model_copy)


def test_redesigned_vision_without_embedding_input_names_the_key(model_copy):
    edit_config(model_copy, lambda c: c["model"]["embedding"]["inputs"].pop("image_features"))
    with pytest.raises(ConfigError, match=r"lacks 'image_features'"):
        load_config(model_copy)


def test_unknown_vision_output_names_the_key(model_copy):
    edit_config(model_copy, lambda c: c["model"]["vision"].update(outputs={"features": "x"}))
    with pytest.raises(ConfigError, match=r"model.vision.outputs must name 'visual_features'"):
        load_config(model_copy)


def test_a_missing_section_is_named(model_copy):
    edit_config(model_copy, lambda c: c["model"].pop("decoder"))
    with pytest.raises(ConfigError, match=r"model.decoder is missing"):
        load_config(model_copy)


def test_a_missing_number_is_named(model_copy):
    edit_config(model_copy, lambda c: c["model"]["decoder"].pop("head_size"))
    with pytest.raises(ConfigError, match=r"model.decoder.head_size is missing"):
        load_config(model_copy)


def test_a_name_pattern_without_layer_number_is_refused(model_copy):
    edit_config(
        model_copy,
        lambda c: c["model"]["decoder"]["inputs"].update(past_key_names="past_key_values.key"),
    )
    with pytest.raises(ConfigError, match=r"past_key_names must contain one '%d'"):
        load_config(model_copy)


def test_bad_eos_is_refused(model_copy):
    edit_config(model_copy, lambda c: c["model"].update(eos_token_id="end"))
    with pytest.raises(ConfigError, match="eos_token_id must be an integer or a list"):
        load_config(model_copy)


def test_bad_processor_num_crops_is_refused(model_copy):
    path = model_copy / "processor_config.json"
    path.write_text(path.read_text().replace('"num_crops": 16', '"num_crops": 40'))
    with pytest.raises(ConfigError, match="num_crops must be an integer from 1 to 16, got 40"):
        load_config(model_copy)


def test_a_missing_model_file_is_listed(model_copy):
    (model_copy / "phi-3-v-128k-instruct-text.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"incomplete: missing phi-3-v-128k-instruct-text"):
        load_config(model_copy)


def test_missing_external_data_is_reported_by_load(model_copy):
    (model_copy / "phi-3-v-128k-instruct-text.onnx.data").unlink()
    with pytest.raises(
        ModelFolderError, match=r"could not load .*text.onnx .*\.data sits beside it"
    ):
        Pipeline.load(model_copy)


@pytest.mark.parametrize("precision", ["exact", "fast", "auto"])
def test_a_corrupt_model_file_is_reported_by_load(model_copy, precision):
    (model_copy / "phi-3-v-128k-instruct-vision.onnx").unlink()
    (model_copy / "phi-3-v-128k-instruct-vision.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelFolderError, match=r"could not load .*vision\.onnx .*re-download"):
        Pipeline.load(model_copy, precision=precision)


def test_a_tensor_name_the_model_lacks_is_named(model_copy):
    edit_config(model_copy, lambda c: c["model"]["decoder"]["outputs"].update(logits="scores"))
    with pytest.raises(ModelFolderError, match="has no tensor named scores"):
        Pipeline.load(model_copy)


def test_a_broken_tokenizer_is_reported(model_copy):
    (model_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="not a usable tokenizer.json"):
        Pipeline.load(model_copy)


def test_every_error_is_a_phi3v_error():
    for error in (ConfigError, ModelFolderError):
        assert issubclass(error, Phi3VError)
