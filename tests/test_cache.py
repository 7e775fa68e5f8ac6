"""Reusing the previous generation's KV cache for a follow-up turn: exact, and only when right.

Every case compares against a pipeline that never reuses anything: reuse may only save time.
"""

import numpy as np
import pytest
from PIL import Image

from phi3v import Pipeline
from phi3v.engine import FOLLOW_UP_ROOM
from phi3v.kv_cache import KVCache
from tests.model_folders import copy_model, edit_config


@pytest.fixture(scope="module")
def fresh(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, reuse_prefix=False)


@pytest.fixture
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(11)
    paths = []
    for index, (width, height) in enumerate([(320, 240), (500, 300)]):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    copy = folder / "copy-of-0.png"  # the same pixels as picture 0, in a differently encoded file
    Image.open(paths[0]).save(copy, compress_level=1)
    return [*paths, str(copy)]


def count_vision_runs(pipe: Pipeline, monkeypatch) -> list[int]:
    calls = []
    run = pipe.sessions.vision.run

    def counting(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(pipe.sessions.vision, "run", counting)
    return calls


def follow_up(first_question: str, answer: str, second_question: str) -> list[dict]:
    return [
        {"role": "user", "content": first_question},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": second_question},
    ]


def test_a_follow_up_turn_skips_the_image_and_gives_the_same_tokens(
    pipe, fresh, pictures, monkeypatch
):
    first = pipe.generate("<|image_1|>\nWhat is it?", pictures[:1], max_new_tokens=24)
    assert first.reused_tokens == 0
    vision_runs = count_vision_runs(pipe, monkeypatch)
    messages = follow_up("<|image_1|>\nWhat is it?", first.text, "And the colours?")
    second = pipe.generate(messages, pictures[:1], max_new_tokens=24)
    assert second.reused_tokens > 1921  # the image block and more came from the cache
    assert vision_runs == []
    assert second.token_ids == fresh.generate(messages, pictures[:1], max_new_tokens=24).token_ids


def test_the_same_pixels_count_as_the_same_image(pipe, pictures):
    pipe.generate("<|image_1|>\nWhat is it?", [pictures[0]], max_new_tokens=4)
    again = pipe.generate("<|image_1|>\nWhat is it?", [pictures[2]], max_new_tokens=4)
    assert again.reused_tokens == len(again.input_ids) - 1  # only the last position reruns


def test_a_different_image_is_recomputed(pipe, fresh, pictures):
    pipe.generate("<|image_1|>\nWhat is it?", [pictures[0]], max_new_tokens=8)
    other = pipe.generate("<|image_1|>\nWhat is it?", [pictures[1]], max_new_tokens=8)
    assert other.reused_tokens == 4  # "<s><|user|>\n", up to the image block
    assert (
        other.token_ids
        == fresh.generate("<|image_1|>\nWhat is it?", [pictures[1]], max_new_tokens=8).token_ids
    )


def test_a_prompt_across_the_long_rope_switch_is_recomputed(pipe, fresh, pictures):
    pipe.generate("<|image_1|>\nWhat is it?", pictures[:1], max_new_tokens=8)  # 1935 < 4096
    both = "<|image_1|>\nWhat is it?<|image_2|>\nAnd this?"
    longer = pipe.generate(both, pictures[:2], max_new_tokens=8)  # > 4096: the long RoPE cache
    assert len(longer.input_ids) > 4096 and longer.reused_tokens == 0
    assert longer.token_ids == fresh.generate(both, pictures[:2], max_new_tokens=8).token_ids


def test_long_prompts_reuse_each_other(pipe, fresh, pictures):
    both = "<|image_1|>\n<|image_2|>\nCompare."
    first = pipe.generate(both, pictures[:2], max_new_tokens=8)
    messages = follow_up(both, first.text, "Which is brighter?")
    second = pipe.generate(messages, pictures[:2], max_new_tokens=16)
    assert second.reused_tokens > 4096
    assert second.token_ids == fresh.generate(messages, pictures[:2], max_new_tokens=16).token_ids


def test_a_follow_up_within_the_reserved_room_keeps_the_same_cache(pipe, pictures, monkeypatch):
    moves = []
    monkeypatch.setattr(KVCache, "grown_to", lambda self, n: moves.append(n))
    first = pipe.generate("<|image_1|>\nHi", pictures[:1], max_new_tokens=2)
    messages = follow_up("<|image_1|>\nHi", first.text, "Tell me more, at length.")
    assert pipe.generate(messages, pictures[:1], max_new_tokens=64).reused_tokens > 1921
    assert moves == []


def test_the_cache_grows_when_a_follow_up_needs_more_room(pipe, fresh, pictures, monkeypatch):
    moves = []
    grow = KVCache.grown_to

    def recording(self, capacity):
        moves.append((self.capacity, capacity))
        return grow(self, capacity)

    monkeypatch.setattr(KVCache, "grown_to", recording)
    first = pipe.generate("<|image_1|>\nHi", pictures[:1], max_new_tokens=2)
    messages = follow_up("<|image_1|>\nHi", first.text, "Tell me more, at length.")
    long = FOLLOW_UP_ROOM + 500  # more than the room reserved by the first turn
    second = pipe.generate(messages, pictures[:1], max_new_tokens=long)
    assert len(moves) == 1 and moves[0][1] >= len(second.input_ids) + long
    assert second.reused_tokens > 1921
    assert second.token_ids == fresh.generate(messages, pictures[:1], max_new_tokens=long).token_ids


def test_a_follow_up_after_stop_reuses_what_the_stopped_answer_computed(
    pipe, fresh, pictures, monkeypatch
):
    stream = pipe.stream("<|image_1|>\nWhat is it?", pictures[:1], max_new_tokens=100)
    shown = "".join(delta for _, delta in zip(range(5), stream, strict=False))
    stream.cancel()
    assert list(stream) == [] and stream.stop_reason == "cancelled"
    vision_runs = count_vision_runs(pipe, monkeypatch)
    messages = follow_up("<|image_1|>\nWhat is it?", shown, "And the colours?")
    second = pipe.generate(messages, pictures[:1], max_new_tokens=12)
    assert second.reused_tokens > 1921  # the picture and the question came from the cache
    assert vision_runs == []
    assert second.token_ids == fresh.generate(messages, pictures[:1], max_new_tokens=12).token_ids


def test_stop_while_the_picture_is_read_keeps_only_finished_chunks(pipe, fresh, pictures):
    stream = pipe.stream("<|image_1|>\nWhat is it?", pictures[:1], max_new_tokens=4)
    stream.cancel()  # before the first model call
    assert list(stream) == []
    again = pipe.generate("<|image_1|>\nWhat is it?", pictures[:1], max_new_tokens=4)
    assert (
        again.token_ids
        == fresh.generate("<|image_1|>\nWhat is it?", pictures[:1], max_new_tokens=4).token_ids
    )


def test_clear_cache_releases_the_kept_cache(pipe):
    pipe.generate("Hello there", max_new_tokens=4)
    pipe.clear_cache()
    assert pipe.generate("Hello there", max_new_tokens=4).reused_tokens == 0


def test_forget_releases_only_that_conversations_cache(pipe):
    pipe.generate("Hello there", max_new_tokens=4, conversation="a")
    pipe.generate("Hello there", max_new_tokens=4, conversation="b")
    pipe.forget("a")
    assert pipe.generate("Hello there", max_new_tokens=4, conversation="a").reused_tokens == 0
    assert pipe.generate("Hello there", max_new_tokens=4, conversation="b").reused_tokens > 0


def test_a_call_that_does_not_remember_neither_continues_nor_keeps_a_cache(pipe):
    pipe.clear_cache()
    pipe.generate("Hello there", max_new_tokens=4)
    kept = len(pipe._prefix)
    assert pipe.generate("Hello there", max_new_tokens=4, remember=False).reused_tokens == 0
    assert len(pipe._prefix) == kept  # nothing new kept
    assert pipe.generate("Hello there", max_new_tokens=4).reused_tokens > 0  # the default's


def test_a_growing_kv_cache_config_does_not_reuse(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "grow")
    edit_config(folder, lambda c: c["search"].update(past_present_share_buffer=False))
    pipe = Pipeline.load(folder)
    assert not pipe.reuse_prefix
    pipe.generate("Hello there", max_new_tokens=4)
    assert pipe.generate("Hello there", max_new_tokens=4).reused_tokens == 0


def test_legacy_layout_reuses_too(tiny_legacy_model_dir, fresh, pictures):
    pipe = Pipeline.load(tiny_legacy_model_dir)
    first = pipe.generate("<|image_1|>\nWhat is it?", pictures[:1], max_new_tokens=12)
    messages = follow_up("<|image_1|>\nWhat is it?", first.text, "Why?")
    second = pipe.generate(messages, pictures[:1], max_new_tokens=12)
    assert second.reused_tokens > 1921
    assert second.token_ids == fresh.generate(messages, pictures[:1], max_new_tokens=12).token_ids


# --- prefault: the prompt's pages written before the prefill writes them ---------------------


def test_prefault_zeroes_exactly_the_positions_the_next_run_takes(pipe):
    cache = KVCache(pipe.config.decoder, 40, True, pipe.config.vocab_size)
    for buffer in cache._buffers:
        buffer[...] = 7.0
    cache.length = 10  # ten positions held: they must survive
    cache.prefault(12, threads=2)
    for buffer in cache._buffers:
        assert (buffer[:, :, :10] == 7.0).all()
        assert (buffer[:, :, 10:22] == 0.0).all()
        assert (buffer[:, :, 22:] == 7.0).all()
    cache.prefault(100)  # past the capacity: up to it, and run() still refuses the overflow
    assert all((buffer[:, :, 10:] == 0.0).all() for buffer in cache._buffers)
    cache.close()


def test_prefault_leaves_a_frozen_prefix_alone(pipe):
    cache = KVCache(pipe.config.decoder, 16, True, pipe.config.vocab_size)
    for buffer in cache._buffers:
        buffer[...] = 3.0
    cache.freeze()
    cache.prefault(8)
    assert all((buffer == 3.0).all() for buffer in cache._buffers)
    cache.close()


def test_the_prefill_prefaults_its_prompt_and_answers_the_same(pipe, fresh, pictures, monkeypatch):
    asked = []
    original = KVCache.prefault

    def recording(self, new, threads=2):
        asked.append((self.length, new))
        original(self, new, threads)

    expected = fresh.generate("What is shown?", [pictures[1]], max_new_tokens=6).token_ids
    monkeypatch.setattr(KVCache, "prefault", recording)
    answer = pipe.generate("What is shown?", [pictures[1]], max_new_tokens=6)
    assert asked and asked[0] == (0, len(answer.input_ids))
    assert answer.token_ids == expected
