"""A picture is read by the vision model once: kept features, and examples warmed for everyone.

Kept features serve later calls of the same owner (else conversation) only; what
``Pipeline.warm`` prepared serves every caller. Every answer is compared with a pipeline that
keeps nothing: the caches may only save time.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import phi3v.image as image_module
from phi3v import Pipeline, preprocess_image
from phi3v.feature_cache import FeatureCache
from phi3v.image import source_digest
from tests.test_cache import count_vision_runs

EXAMPLES = Path(__file__).resolve().parent.parent / "data" / "examples"
CHART, SCENE = str(EXAMPLES / "bar_chart.png"), str(EXAMPLES / "scene.png")
QUESTION = "<|image_1|>\nWhich month had the most rain?"
OTHER_QUESTION = "<|image_1|>\nWhat colour are the bars?"


@pytest.fixture(scope="module")
def fresh(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, reuse_prefix=False, feature_cache_bytes=0)


@pytest.fixture
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir)


def ask(pipe: Pipeline, question: str, picture: str, **options):
    return pipe.generate(question, [picture], max_new_tokens=16, **options)


# --- kept features -------------------------------------------------------------------------------


def test_a_second_conversation_about_the_same_picture_skips_the_vision_model(
    pipe, fresh, monkeypatch
):
    ask(pipe, QUESTION, CHART, owner="ada", conversation="first")
    vision_runs = count_vision_runs(pipe, monkeypatch)
    second = ask(pipe, OTHER_QUESTION, CHART, owner="ada", conversation="second")
    assert vision_runs == []
    assert second.reused_tokens == 0  # a conversation of its own: only its text was prefilled
    assert second.token_ids == ask(fresh, OTHER_QUESTION, CHART).token_ids


def test_another_picture_is_read(pipe, monkeypatch):
    ask(pipe, QUESTION, CHART, owner="ada", conversation="first")
    vision_runs = count_vision_runs(pipe, monkeypatch)
    ask(pipe, QUESTION, SCENE, owner="ada", conversation="second")
    assert len(vision_runs) == 1


def test_the_same_picture_at_another_crop_count_is_read_again(pipe, monkeypatch):
    ask(pipe, QUESTION, CHART, owner="ada", conversation="first", num_crops=4)
    vision_runs = count_vision_runs(pipe, monkeypatch)
    ask(pipe, QUESTION, CHART, owner="ada", conversation="second", num_crops=2)
    assert len(vision_runs) == 1


def test_one_owners_picture_is_never_a_hit_for_another(pipe, fresh, monkeypatch):
    ask(pipe, QUESTION, CHART, owner="ada", conversation="ada's")
    vision_runs = count_vision_runs(pipe, monkeypatch)
    bob = ask(pipe, QUESTION, CHART, owner="bob", conversation="bob's")
    assert len(vision_runs) == 1
    assert bob.reused_tokens == 0
    assert bob.token_ids == ask(fresh, QUESTION, CHART).token_ids


def test_without_an_owner_features_are_kept_for_the_conversation_only(pipe, monkeypatch):
    ask(pipe, QUESTION, CHART, conversation="first")
    vision_runs = count_vision_runs(pipe, monkeypatch)
    ask(pipe, QUESTION, CHART, conversation="second")
    assert len(vision_runs) == 1


def test_a_one_off_call_keeps_no_features(pipe, monkeypatch):
    vision_runs = count_vision_runs(pipe, monkeypatch)
    ask(pipe, QUESTION, CHART, remember=False)
    ask(pipe, QUESTION, CHART, remember=False)
    assert len(vision_runs) == 2


def test_forget_drops_the_conversations_features(pipe, monkeypatch):
    ask(pipe, QUESTION, CHART, conversation="first")
    pipe.forget("first")
    vision_runs = count_vision_runs(pipe, monkeypatch)
    ask(pipe, OTHER_QUESTION, CHART, conversation="first")
    assert len(vision_runs) == 1


def test_beyond_the_budget_the_least_recently_used_picture_goes(tiny_model_dir, monkeypatch):
    rows = preprocess_image(CHART).num_image_tokens  # the scene has the same size: as many rows
    pipe = Pipeline.load(tiny_model_dir)
    one_picture = rows * pipe.config.decoder.hidden_size * 4  # float32 features
    pipe = Pipeline.load(tiny_model_dir, feature_cache_bytes=one_picture)
    ask(pipe, QUESTION, CHART, owner="ada", conversation="1")
    ask(pipe, QUESTION, SCENE, owner="ada", conversation="2")  # pushes the chart out
    vision_runs = count_vision_runs(pipe, monkeypatch)
    ask(pipe, OTHER_QUESTION, SCENE, owner="ada", conversation="3")
    assert vision_runs == []
    ask(pipe, OTHER_QUESTION, CHART, owner="ada", conversation="4")
    assert len(vision_runs) == 1


def test_kept_features_give_the_tokens_of_a_fresh_run_in_fast_precision(
    tiny_int4_model_dir, monkeypatch
):
    pipe = Pipeline.load(tiny_int4_model_dir, precision="fast")
    fresh = Pipeline.load(
        tiny_int4_model_dir, precision="fast", reuse_prefix=False, feature_cache_bytes=0
    )
    ask(pipe, QUESTION, CHART, owner="ada", conversation="first")
    vision_runs = count_vision_runs(pipe, monkeypatch)
    second = ask(pipe, OTHER_QUESTION, CHART, owner="ada", conversation="second")
    assert vision_runs == []
    assert second.token_ids == ask(fresh, OTHER_QUESTION, CHART).token_ids


# --- pictures known by their bytes ----------------------------------------------------------


def count_decodes(monkeypatch) -> list[int]:
    """Record each time a picture is decoded and transformed (``phi3v.image.hd_transform``)."""
    calls = []
    transform = image_module.hd_transform

    def counting(*args, **kwargs):
        calls.append(1)
        return transform(*args, **kwargs)

    monkeypatch.setattr(image_module, "hd_transform", counting)
    return calls


def test_a_picture_seen_before_is_not_decoded_again(pipe, fresh, monkeypatch):
    ask(pipe, QUESTION, CHART, owner="ada", conversation="first")
    decodes, vision_runs = count_decodes(monkeypatch), count_vision_runs(pipe, monkeypatch)
    second = ask(pipe, OTHER_QUESTION, CHART, owner="ada", conversation="second")
    assert decodes == [] and vision_runs == []
    assert second.token_ids == ask(fresh, OTHER_QUESTION, CHART).token_ids


def test_every_turn_of_a_conversation_reads_its_picture_once(pipe, monkeypatch):
    decodes = count_decodes(monkeypatch)
    first = ask(pipe, QUESTION, CHART, conversation="chat")
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And the least?"},
    ]
    second = pipe.generate(history, [CHART], max_new_tokens=4, conversation="chat")
    assert second.reused_tokens > 0
    assert len(decodes) == 1


def test_the_same_bytes_are_known_whichever_way_they_come(pipe, monkeypatch):
    ask(pipe, QUESTION, CHART, owner="ada", conversation="from a file")
    decodes = count_decodes(monkeypatch)
    ask(pipe, QUESTION, Path(CHART).read_bytes(), owner="ada", conversation="from bytes")
    assert decodes == []


def test_a_file_changed_under_the_same_name_is_read_anew(pipe, fresh, tmp_path, monkeypatch):
    picture = tmp_path / "upload.png"
    picture.write_bytes(Path(CHART).read_bytes())
    ask(pipe, QUESTION, picture, owner="ada", conversation="first")
    picture.write_bytes(Path(SCENE).read_bytes())
    decodes, vision_runs = count_decodes(monkeypatch), count_vision_runs(pipe, monkeypatch)
    answer = ask(pipe, QUESTION, picture, owner="ada", conversation="second")
    assert len(decodes) == 1 and len(vision_runs) == 1
    assert answer.token_ids == ask(fresh, QUESTION, SCENE).token_ids


def test_another_owner_decodes_the_same_picture_again(pipe, monkeypatch):
    ask(pipe, QUESTION, CHART, owner="ada", conversation="ada's")
    decodes = count_decodes(monkeypatch)
    ask(pipe, QUESTION, CHART, owner="bob", conversation="bob's")
    assert len(decodes) == 1


def test_a_picture_twice_in_one_prompt_is_read_by_the_vision_model_once(pipe, fresh, monkeypatch):
    question = "<|image_1|>\n<|image_2|>\nAre these the same?"
    vision_runs = count_vision_runs(pipe, monkeypatch)
    answer = pipe.generate(question, [CHART, CHART], max_new_tokens=8, conversation="twice")
    assert len(vision_runs) == 1
    assert answer.token_ids == fresh.generate(question, [CHART, CHART], max_new_tokens=8).token_ids


def test_a_pil_picture_is_decoded_each_time_but_its_features_are_kept(pipe, monkeypatch):
    picture = Image.open(CHART)
    ask(pipe, QUESTION, picture, owner="ada", conversation="first")
    decodes, vision_runs = count_decodes(monkeypatch), count_vision_runs(pipe, monkeypatch)
    ask(pipe, QUESTION, picture, owner="ada", conversation="second")
    assert len(decodes) == 1  # an object's pixels may change under it: no bytes to know it by
    assert vision_runs == []


def test_a_known_picture_whose_features_went_is_computed_from_its_bytes():
    """The features can be pushed out between the request's start and its vision step: the
    recalled image then computes its pixel values from the bytes it was recognised by."""
    cache = FeatureCache()
    image = preprocess_image(CHART, 4)
    cache.get_or_encode("ada", [image], lambda missing: [np.ones((3, 2), np.float32)])
    computed = []

    def pixels():
        computed.append(1)
        return preprocess_image(CHART, 4).pixel_values

    known = cache.recall("ada", source_digest(Path(CHART).read_bytes(), 4), pixels)
    assert (known.digest, known.image_size, known.num_crops) == (image.digest, image.image_size, 4)
    assert known.num_image_tokens == image.num_image_tokens and computed == []
    cache.clear()
    assert cache.recall("ada", known.source, pixels) is None
    np.testing.assert_array_equal(known.pixel_values, image.pixel_values)
    assert computed == [1]


def test_a_source_is_forgotten_with_its_features():
    cache = FeatureCache(budget_bytes=24)
    chart, scene = preprocess_image(CHART, 1), preprocess_image(SCENE, 1)
    features = lambda missing: [np.zeros((3, 2), np.float32) for _ in missing]  # noqa: E731
    cache.get_or_encode("ada", [chart], features)
    assert cache.recall("ada", chart.source, lambda: None) is not None
    assert cache.recall("bob", chart.source, lambda: None) is None
    cache.get_or_encode("ada", [scene], features)  # 24 bytes each: the chart goes
    assert cache.recall("ada", chart.source, lambda: None) is None
    assert cache.recall("ada", scene.source, lambda: None) is not None
    cache.release("ada")
    assert cache.recall("ada", scene.source, lambda: None) is None
    assert cache._sources == {}


# --- warmed examples -----------------------------------------------------------------------------


def test_warming_an_example_produces_no_tokens(pipe):
    warmed = pipe.warm(QUESTION, [CHART]).result()
    assert warmed.token_ids == [] and warmed.text == ""


def test_a_warmed_example_is_answered_from_its_prefix_by_anyone(pipe, fresh, monkeypatch):
    pipe.warm(QUESTION, [CHART]).result()
    vision_runs = count_vision_runs(pipe, monkeypatch)
    answer = ask(pipe, QUESTION, CHART, owner="bob", conversation="bob's")
    assert answer.reused_tokens == len(answer.input_ids)  # the whole prompt, logits and all
    assert vision_runs == []
    assert answer.token_ids == ask(fresh, QUESTION, CHART).token_ids


def test_a_warmed_examples_first_token_needs_no_model_run(pipe, fresh, monkeypatch):
    pipe.warm(QUESTION, [CHART]).result()
    decoder_runs = []
    run = pipe.sessions.decoder.run_with_iobinding
    monkeypatch.setattr(
        pipe.sessions.decoder,
        "run_with_iobinding",
        lambda *args, **kwargs: decoder_runs.append(1) or run(*args, **kwargs),
    )
    first = pipe.generate(QUESTION, [CHART], max_new_tokens=1, conversation="one token")
    assert decoder_runs == []
    assert first.token_ids == fresh.generate(QUESTION, [CHART], max_new_tokens=1).token_ids


def test_an_example_warmed_twice_is_still_answered_from_its_prefix(pipe, fresh):
    pipe.warm(QUESTION, [CHART]).result()
    pipe.warm(QUESTION, [CHART]).result()  # reads nothing: the kept prefix is kept again
    answer = ask(pipe, QUESTION, CHART, conversation="after two")
    assert answer.reused_tokens == len(answer.input_ids)
    assert answer.token_ids == ask(fresh, QUESTION, CHART).token_ids


def test_a_one_off_call_reuses_a_warmed_example_too(pipe):
    pipe.warm(QUESTION, [CHART]).result()
    answer = ask(pipe, QUESTION, CHART, remember=False)
    assert answer.reused_tokens == len(answer.input_ids)


def test_another_question_about_a_warmed_picture_reuses_the_picture(pipe, fresh, monkeypatch):
    pipe.warm(QUESTION, [CHART]).result()
    vision_runs = count_vision_runs(pipe, monkeypatch)
    answer = ask(pipe, OTHER_QUESTION, CHART, conversation="other")
    image_end = answer.input_ids.index(-1) + preprocess_image(CHART).num_image_tokens
    assert image_end <= answer.reused_tokens < len(answer.input_ids) - 1
    assert vision_runs == []
    assert answer.token_ids == ask(fresh, OTHER_QUESTION, CHART).token_ids


def test_a_prompt_about_another_picture_reuses_nothing_of_a_warmed_example(pipe):
    pipe.warm(QUESTION, [CHART]).result()
    assert ask(pipe, QUESTION, SCENE, conversation="other").reused_tokens == 0
    assert pipe.generate("Hello", max_new_tokens=4, conversation="text").reused_tokens == 0


def test_what_one_conversation_writes_never_reaches_a_warmed_example(pipe, fresh):
    pipe.warm(QUESTION, [CHART]).result()
    ask(pipe, OTHER_QUESTION, CHART, conversation="writer")  # writes over the question's places
    answer = ask(pipe, QUESTION, CHART, conversation="reader")
    assert answer.reused_tokens == len(answer.input_ids)
    assert answer.token_ids == ask(fresh, QUESTION, CHART).token_ids


def test_a_cancelled_warm_up_leaves_no_prefix(pipe):
    warming = pipe.warm(QUESTION, [CHART])
    warming.cancel()
    assert warming.result().stop_reason == "cancelled"
    assert ask(pipe, QUESTION, CHART, conversation="after").reused_tokens == 0
