"""Generation: the onnxruntime-genai oracle, both layouts and KV modes, stopping, sampling,
streaming deltas, releasing a generation, and the errors of a request."""

import gc
import json
import threading
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
from PIL import Image

import phi3v.engine
import phi3v.kv_cache
import phi3v.machine
from phi3v import ImageError, LimitError, Pipeline, PromptError, preprocess_image
from phi3v.engine import FOLLOW_UP_ROOM
from phi3v.kv_cache import KVCache, lazy_buffer
from phi3v.sampling import Sampling, sample
from phi3v.tokenizer import TextDeltas
from tests.model_folders import copy_model, edit_config

IMAGE_PROMPT = "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n"
TWO_IMAGE_PROMPT = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n"
TEXT_PROMPT = "<|user|>\nWho are you?<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """PNG test images: name -> path."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    paths = {}
    for name, (width, height) in {
        "landscape": (320, 240), "wide": (500, 300), "portrait": (400, 700),
        "tiny": (60, 50), "extreme": (3000, 100), "large": (1900, 1200),
    }.items():  # fmt: skip
        path = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir)


@pytest.fixture(scope="module")
def legacy_pipe(tiny_legacy_model_dir) -> Pipeline:
    return Pipeline.load(tiny_legacy_model_dir)


@pytest.fixture(scope="module")
def genai_model(tiny_model_dir):
    return og.Model(str(tiny_model_dir))


def genai_generate(model, prompt: str, image_paths: list[str], max_new_tokens: int):
    """onnxruntime-genai 0.18 greedy generation: (processor inputs, generated ids)."""
    processor = model.create_multimodal_processor()
    inputs = processor(prompt, images=og.Images.open(*image_paths) if image_paths else None)
    prompt_length = inputs["input_ids"].as_numpy().shape[-1]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_length + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return inputs, tokens


def assert_same_greedy_tokens(ours, reference, stop_ids):
    """Equal ids; where we stopped early, it was on a stop id that genai does not stop on."""
    assert ours.token_ids == reference[: len(ours.token_ids)]
    if len(ours.token_ids) < len(reference):
        assert ours.stop_reason == "eos" and reference[len(ours.token_ids)] in stop_ids


# --- the oracle: onnxruntime-genai 0.18 on the same input ids and images ---


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("prompt", "image_names"),
    [(TEXT_PROMPT, []), (IMAGE_PROMPT, ["landscape"]), (TWO_IMAGE_PROMPT, ["landscape", "wide"])],
    ids=["text", "one image", "two images"],
)
def test_greedy_tokens_equal_onnxruntime_genai(pipe, genai_model, images, prompt, image_names):
    paths = [images[name] for name in image_names]
    inputs, reference = genai_generate(genai_model, prompt, paths, max_new_tokens=48)
    input_ids = inputs["input_ids"].as_numpy().reshape(-1).tolist()
    ours = pipe.generate(input_ids=input_ids, images=paths, max_new_tokens=48)
    assert ours.input_ids == input_ids
    assert_same_greedy_tokens(ours, reference, pipe.stop_ids)
    assert len(ours.token_ids) >= 16


@pytest.mark.oracle
def test_two_image_oracle_prompt_crosses_the_long_rope_switch(genai_model, images):
    inputs, _ = genai_generate(
        genai_model, TWO_IMAGE_PROMPT, [images["landscape"], images["wide"]], 1
    )
    assert inputs["input_ids"].as_numpy().size > 4096  # 1921 + 2353 image tokens + text


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["landscape", "wide", "portrait", "tiny", "extreme", "large"])
def test_pixel_values_are_bit_identical_to_onnxruntime_genai(genai_model, images, name):
    processor = genai_model.create_multimodal_processor()
    inputs = processor(IMAGE_PROMPT, images=og.Images.open(images[name]))
    ours = preprocess_image(images[name])
    np.testing.assert_array_equal(ours.pixel_values, inputs["pixel_values"].as_numpy()[0])
    assert list(ours.image_size) == inputs["image_sizes"].as_numpy()[0].tolist()
    assert ours.num_image_tokens == int(inputs["num_image_tokens"].as_numpy().reshape(-1)[0])


@pytest.mark.oracle
def test_sixteen_bit_greyscale_pixel_values_are_bit_identical(genai_model, tmp_path):
    """A 16-bit PNG (Pillow: mode I;16) through every level from black to white."""
    levels = np.arange(300 * 400, dtype=np.uint64) * 65535 // (300 * 400 - 1)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels.astype(np.uint16).reshape(300, 400)).save(path)
    processor = genai_model.create_multimodal_processor()
    inputs = processor(IMAGE_PROMPT, images=og.Images.open(str(path)))
    ours = preprocess_image(path)
    np.testing.assert_array_equal(ours.pixel_values, inputs["pixel_values"].as_numpy()[0])


# --- layouts and KV-cache modes agree with each other ---


def test_legacy_layout_gives_the_tokens_of_the_redesigned_one(pipe, legacy_pipe, images):
    # Same decoder and embedding weights; the legacy path fuses features itself, per image.
    paths = [images["landscape"], images["tiny"]]
    prompt = "<|image_1|>\nand<|image_2|>\nCompare."
    redesigned = pipe.generate(prompt, paths, max_new_tokens=24)
    legacy = legacy_pipe.generate(prompt, paths, max_new_tokens=24)
    assert legacy.input_ids == redesigned.input_ids
    assert legacy.token_ids == redesigned.token_ids


def test_growing_kv_cache_gives_the_tokens_of_the_shared_buffer(
    pipe, tiny_model_dir, tmp_path, images
):
    folder = copy_model(tiny_model_dir, tmp_path / "grow")
    edit_config(folder, lambda c: c["search"].update(past_present_share_buffer=False))
    growing = Pipeline.load(folder)
    assert not growing.config.past_present_share_buffer
    prompt, paths = "What is it?", [images["portrait"]]
    assert (
        growing.generate(prompt, paths, max_new_tokens=24).token_ids
        == pipe.generate(prompt, paths, max_new_tokens=24).token_ids
    )


@pytest.mark.parametrize("fixture", ["pipe", "legacy_pipe"])
def test_tag_order_does_not_change_which_image_is_where(request, images, fixture):
    # <|image_2|> first: the features of images[1] must fill the first placeholder run.
    pipeline = request.getfixturevalue(fixture)
    a, b = images["landscape"], images["tiny"]
    swapped = pipeline.generate("<|image_2|> vs <|image_1|>", [a, b], max_new_tokens=16)
    in_order = pipeline.generate("<|image_1|> vs <|image_2|>", [b, a], max_new_tokens=16)
    assert swapped.token_ids == in_order.token_ids


def test_each_image_changes_the_answer(pipe, images):
    first = pipe.generate("Describe.", [images["landscape"]], max_new_tokens=12).token_ids
    second = pipe.generate("Describe.", [images["wide"]], max_new_tokens=12).token_ids
    assert first != second


# --- stopping ---


def test_max_new_tokens_stops_with_reason_length(pipe):
    result = pipe.generate("Hello", max_new_tokens=7)
    assert (len(result.token_ids), result.stop_reason) == (7, "length")


def test_a_config_eos_id_stops_generation_and_is_not_returned(pipe, tiny_model_dir, tmp_path):
    free_run = pipe.generate("Hello", max_new_tokens=12).token_ids
    stop_at = next(i for i, t in enumerate(free_run) if t not in free_run[:i] and i >= 3)
    folder = copy_model(tiny_model_dir, tmp_path / "eos")
    edit_config(folder, lambda c: c["model"].update(eos_token_id=[32007, free_run[stop_at]]))
    stopped = Pipeline.load(folder).generate("Hello", max_new_tokens=12)
    assert stopped.stop_reason == "eos"
    assert stopped.token_ids == free_run[:stop_at]


def test_end_and_endoftext_are_always_stop_ids(pipe):
    assert {32007, 32000} <= pipe.stop_ids


def test_new_tokens_are_bounded_by_the_context(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "short")
    edit_config(folder, lambda c: c["model"].update(context_length=16))
    result = Pipeline.load(folder).generate("Hi", max_new_tokens=100)  # 9 prompt ids
    assert (len(result.input_ids), len(result.token_ids), result.stop_reason) == (9, 7, "length")


def test_kv_cache_is_sized_for_the_request_not_the_context(tiny_model_dir, monkeypatch):
    sizes = []

    class Recording(phi3v.engine.KVCache):
        def __init__(self, config, capacity, *args):
            sizes.append(capacity)
            super().__init__(config, capacity, *args)

    monkeypatch.setattr(phi3v.engine, "KVCache", Recording)
    result = Pipeline.load(tiny_model_dir).generate("Hello", max_new_tokens=5)
    assert sizes == [len(result.input_ids) + 5 + FOLLOW_UP_ROOM]  # room for one more turn


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_reserved_kv_room_costs_no_memory_until_used(pipe):
    before = resident_mib()
    cache = KVCache(pipe.config.decoder, 2_000_000, True, 32064)
    embeds = np.zeros((1, 600, pipe.config.decoder.hidden_size), np.float32)
    cache.run(pipe.sessions.decoder, embeds)
    reserved_mib = 2_000_000 * 2 * 2 * 2 * 16 * 4 / 2**20  # positions x layers x K,V x heads x dim
    assert reserved_mib > 900
    assert resident_mib() - before < 100  # the 600 written positions and a 16 MB mask
    cache.close()


def test_a_shared_prefix_is_read_only_and_its_copies_continue_it_exactly(pipe):
    hidden = pipe.config.decoder.hidden_size
    prompt = np.random.default_rng(0).standard_normal((1, 8, hidden)).astype(np.float32)
    step = np.random.default_rng(1).standard_normal((1, 1, hidden)).astype(np.float32)
    prefix = KVCache(pipe.config.decoder, 64, True, pipe.config.vocab_size)
    prefix.run(pipe.sessions.decoder, prompt)
    copied = prefix.copy(64, 8)  # before freezing: copied byte by byte
    expected = copied.run(pipe.sessions.decoder, step).copy()
    prefix.freeze()
    with pytest.raises(RuntimeError, match="read-only"):
        prefix.run(pipe.sessions.decoder, step)
    for _ in range(2):  # a frozen prefix's copies map it copy-on-write; each writes its own
        view = prefix.copy(64, 8)
        np.testing.assert_array_equal(view.run(pipe.sessions.decoder, step), expected)
        assert (view.length, prefix.length) == (9, 8)
    bigger = prefix.copy(128, 8)  # another layout: copied byte by byte again
    np.testing.assert_array_equal(bigger.run(pipe.sessions.decoder, step), expected)


def test_reserved_room_stays_free_even_inside_a_huge_page():
    # Real Phi-3-V head blocks: 32 heads x 3000 positions x 96 dims, 1.1 MB each, smaller than a
    # 2 MB transparent huge page. Write the first 2000 positions of eight such buffers.
    before = resident_mib()
    buffers = [lazy_buffer((1, 32, 3000, 96)) for _ in range(8)]
    for buffer in buffers:
        buffer[:, :, :2000] = 1.0
    written_mib = 8 * 32 * 2000 * 96 * 4 / 2**20  # 188 MiB of 281 MiB reserved
    assert resident_mib() - before < written_mib + 40


# --- sampling ---


def test_same_seed_same_tokens_other_seed_other_tokens(pipe):
    def run(seed):
        return pipe.generate("Tell me", temperature=1.0, seed=seed, max_new_tokens=16).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_k_one_is_greedy(pipe):
    greedy = pipe.generate("Tell me", max_new_tokens=12).token_ids
    assert pipe.generate(
        "Tell me", temperature=1.5, top_k=1, seed=1, max_new_tokens=12
    ).token_ids == (greedy)


def test_tiny_top_p_is_greedy(pipe):
    greedy = pipe.generate("Tell me", max_new_tokens=12).token_ids
    assert pipe.generate(
        "Tell me", temperature=1.0, top_p=1e-9, seed=2, max_new_tokens=12
    ).token_ids == (greedy)


def test_top_k_samples_only_among_the_k_likeliest():
    logits = np.arange(10, dtype=np.float32)  # ids 9, 8, 7 are the three likeliest
    rng = np.random.default_rng(0)
    drawn = {sample(logits, Sampling(temperature=5.0, top_k=3), rng) for _ in range(300)}
    assert drawn == {7, 8, 9}


def test_top_p_samples_only_within_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(0)
    drawn = {sample(np.log(probs), Sampling(temperature=1.0, top_p=0.75), rng) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are cut


def test_ids_without_a_token_are_never_chosen(pipe):
    assert pipe.vocab_limit == 32045  # logits has 32064 rows; the tokenizer ends at 32044


# --- streaming ---


def test_deltas_concatenate_to_the_final_text(pipe):
    with pipe.stream("Write something long.", max_new_tokens=96) as stream:
        deltas = list(stream)
    assert len(deltas) > 10
    byte_tokens = [t for t in stream.token_ids if pipe.tokenizer.id_to_token(t)[:3] == "<0x"]
    assert byte_tokens and any(ord(char) > 127 for char in stream.text)  # multi-byte output
    assert "".join(deltas) == stream.text == pipe.tokenizer.decode(stream.token_ids)


def test_multibyte_characters_arrive_whole(pipe):
    text = "Ça coûte 5 € 😀🇫🇷, 日本語 ok"
    ids = pipe.tokenizer.encode_text(text)
    assert any(pipe.tokenizer.id_to_token(i).startswith("<0x") for i in ids)  # bytes
    deltas = TextDeltas(pipe.tokenizer)
    pieces = [deltas.push(i) for i in ids] + [deltas.flush()]
    assert "".join(pieces) == pipe.tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "😀" in pieces or any(piece.endswith("😀") for piece in pieces)


def test_an_incomplete_character_at_the_end_is_flushed(pipe):
    ids = pipe.tokenizer.encode_text("a😀")[:-1]  # cut inside the emoji's bytes
    deltas = TextDeltas(pipe.tokenizer)
    pieces = [deltas.push(i) for i in ids] + [deltas.flush()]
    assert "".join(pieces) == pipe.tokenizer.decode(ids)


def test_stream_reports_progress_while_running(pipe, images):
    with pipe.stream("Describe.", [images["landscape"]], max_new_tokens=40) as stream:
        assert stream.stop_reason is None and stream.token_ids == []
        next(stream)
        assert stream.token_ids and stream.stop_reason is None
        timings = stream.timings
        assert timings.vision > 0 and timings.prefill > 0 and timings.time_to_first_token > 0
        assert stream.input_ids.count(-1) == 1921
        result = stream.result()
    assert result.stop_reason in ("eos", "length")
    assert result.timings.decode_tokens_per_second > 0


@pytest.fixture
def closed(pipe, monkeypatch) -> list[bool]:
    """Records each KV cache released; the pipeline starts with none kept from earlier tests.
    (A stopped generation of a conversation keeps its cache for the follow-up, test_cache.py; these
    tests stop one-off calls, which keep nothing.)"""
    closed = []

    class Recording(phi3v.engine.KVCache):
        def close(self):
            closed.append(True)
            super().close()

    monkeypatch.setattr(phi3v.engine, "KVCache", Recording)
    pipe.clear_cache()  # so the next generation allocates its own cache
    return closed


def test_closing_a_stream_ends_the_generation_and_frees_its_cache(pipe, closed):
    stream = pipe.stream("Hello", max_new_tokens=500, remember=False)
    next(stream)
    stream.close()
    assert closed == [True]
    assert stream.stop_reason == "cancelled"
    assert len(stream.token_ids) < 500
    with pytest.raises(StopIteration):
        next(stream)


def test_a_consumer_that_drops_the_stream_frees_the_cache_without_the_gc(pipe, closed):
    gc.disable()
    try:
        for count, _delta in enumerate(pipe.stream("Hello", max_new_tokens=500, remember=False)):
            if count == 2:
                break
        assert closed == [True]  # freed by reference counting, before any GC cycle
    finally:
        gc.enable()


def test_cancel_during_the_vision_model_ends_before_any_token(pipe, images, closed, monkeypatch):
    run = pipe.sessions.vision.run
    stream = pipe.stream("Describe.", [images["landscape"]], max_new_tokens=50, remember=False)

    def vision_then_cancel(*args, **kwargs):
        stream.cancel()  # as if Stop were pressed while the image is being read
        return run(*args, **kwargs)

    monkeypatch.setattr(pipe.sessions.vision, "run", vision_then_cancel)
    assert list(stream) == []
    assert (stream.stop_reason, stream.token_ids, closed) == ("cancelled", [], [True])
    assert stream.timings.prefill == 0  # the embedding and the decoder were never let finish


def test_cancel_aborts_the_running_prefill(pipe, images, closed, monkeypatch):
    stream = pipe.stream("Describe.", [images["landscape"]], max_new_tokens=50, remember=False)
    run = pipe.sessions.decoder.run_with_iobinding

    def cancelled_while_running(binding, run_options=None):
        stream.cancel()  # lands while onnxruntime holds this call
        return run(binding, run_options)

    monkeypatch.setattr(pipe.sessions.decoder, "run_with_iobinding", cancelled_while_running)
    assert list(stream) == []
    assert stream.timings.prefill == 0  # onnxruntime gave up instead of finishing the prefill
    assert (stream.stop_reason, closed) == ("cancelled", [True])


def test_cancel_from_another_thread_ends_a_running_stream(pipe, closed):
    stream = pipe.stream("Write at length.", max_new_tokens=100_000, remember=False)
    started, received = threading.Event(), []

    def consume():
        for delta in stream:
            received.append(delta)
            started.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(30)
    stream.close()  # from this thread, while the worker may be inside next()
    worker.join(30)
    assert not worker.is_alive()
    assert stream.stop_reason == "cancelled" and closed == [True]
    assert len(stream.token_ids) < 100_000


def test_generate_and_stream_agree(pipe, images):
    result = pipe.generate("Describe.", [images["wide"]], max_new_tokens=20)
    streamed = "".join(pipe.stream("Describe.", [images["wide"]], max_new_tokens=20))
    assert result.text == streamed
    assert json.dumps(result.to_dict())  # the CLI's --json


# --- request errors, raised before any model runs ---


def test_a_prompt_longer_than_the_context_is_refused_before_the_models_run(pipe, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(pipe.sessions.vision, "run", fail)
    monkeypatch.setattr(pipe.sessions.embedding, "run", fail)
    with pytest.raises(PromptError, match=r"the prompt is 131,072 tokens; the model's context is"):
        pipe.stream(input_ids=[1] * 131072)
    with pytest.raises(PromptError, match=r"the prompt is [\d,]+ tokens"):
        pipe.stream("word " * 140_000)


def test_a_prompt_over_the_servers_limit_is_refused_with_what_to_do(tiny_model_dir, images):
    limited = Pipeline.load(tiny_model_dir, max_prompt_tokens=100)
    with pytest.raises(LimitError, match=r"at most 100\. Shorten the text or start a new"):
        limited.stream("word " * 200)
    with pytest.raises(LimitError, match=r"\([\d,]+ of them for images\); .* Use fewer or"):
        limited.stream("<|image_1|>\nWhat is this?", [images["landscape"]], num_crops=4)
    assert limited.generate("Hi", max_new_tokens=2).token_ids  # a short one is answered


def test_the_default_prompt_limit_is_what_half_the_free_memory_holds(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(phi3v.machine, "available_memory", lambda: 2 * 1000 * 1024)
    limited = Pipeline.load(tiny_model_dir, precision="exact")
    per_position = phi3v.kv_cache.bytes_per_position(limited.config.decoder)
    assert limited.max_prompt_tokens == 1000 * 1024 // per_position


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"temperature": -1}, "temperature must be a number from 0 to 100"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"seed": -3}, "seed must be a non-negative integer"),
    ],
)
def test_bad_generation_settings_are_refused(pipe, options, message):
    with pytest.raises(PromptError, match=message):
        pipe.stream("Hi", **options)


def test_a_bad_image_among_several_is_numbered(pipe, images):
    with pytest.raises(
        ImageError, match=r"image 2 of 2: the image data \(4 bytes\) is not an image"
    ):
        pipe.stream("Compare", [images["tiny"], b"oops"])


def test_images_must_be_a_list(pipe, images):
    with pytest.raises(PromptError, match="images must be a list"):
        pipe.stream("Hi", images=images["tiny"])


def test_input_ids_placeholders_must_match_the_images(pipe, images):
    tokens = preprocess_image(images["tiny"]).num_image_tokens
    with pytest.raises(PromptError, match=f"image 1 needs {tokens} placeholder ids"):
        pipe.stream(input_ids=[1, -1, -1, 32001], images=[images["tiny"]])
    with pytest.raises(PromptError, match="placeholder -2 but only 1 image"):
        pipe.stream(input_ids=[1] + [-1] * tokens + [-2], images=[images["tiny"]])
    with pytest.raises(PromptError, match="must be contiguous"):
        pipe.stream(input_ids=[-1] + [1] + [-1] * (tokens - 1), images=[images["tiny"]])


def test_input_ids_beyond_the_vocabulary_are_refused(pipe):
    with pytest.raises(PromptError, match="beyond the vocabulary"):
        pipe.stream(input_ids=[1, 40000])
    with pytest.raises(PromptError, match="input_ids is empty"):
        pipe.stream(input_ids=[])


def test_num_crops_per_request_lowers_the_image_tokens(pipe, images):
    with pipe.stream("Hi", [images["tiny"]], num_crops=1, max_new_tokens=4) as few:
        assert few.input_ids.count(-1) == 313  # 1 tile: 2*144 + 1 + 2*12, see ARCHITECTURE.md
        assert len(few.result().token_ids) == 4


def test_num_crops_may_be_given_per_image(pipe, images):
    pictures = [images["landscape"], images["landscape"], images["tiny"]]
    with pipe.stream("Hi", pictures, num_crops=[1, None, 4], max_new_tokens=1) as each:
        counts = [each.input_ids.count(-n) for n in (1, 2, 3)]
    assert counts[0] == 313 and counts[1] == 1921  # None: the model's 16
    with pipe.stream("Hi", [images["tiny"]], num_crops=4, max_new_tokens=1) as alone:
        assert counts[2] == alone.input_ids.count(-1)
    with pytest.raises(ImageError, match=r"one per image \(3\), got a list of 2"):
        pipe.stream("Hi", pictures, num_crops=[1, 2])
    with pytest.raises(ImageError, match="from 1 to 16, got 0"):
        pipe.stream("Hi", pictures, num_crops=[1, 0, 2])


def test_a_continued_reply_is_answered_with_the_text_that_goes_after_it(pipe):
    """The answer to a conversation ending with an assistant message is what follows that
    message: the text of the whole reply's ids, less the text it already had, also where the
    first new token begins with a space (which an answer of its own would drop)."""
    spaced = 0
    for seed, opening in enumerate(("Well", "The picture shows", "It is", "Yes")):
        messages = [
            {"role": "user", "content": "Say something."},
            {"role": "assistant", "content": opening},
        ]
        result = pipe.generate(messages, max_new_tokens=6, temperature=1.0, seed=seed)
        assert result.input_ids[-1] != pipe.tokenizer.token_id("<|assistant|>")  # left open
        tail = result.input_ids[-4:]
        whole = pipe.tokenizer.decode(tail + result.token_ids)
        assert result.text == whole[len(pipe.tokenizer.decode(tail)) :]
        first = pipe.tokenizer.id_to_token(result.token_ids[0]) if result.token_ids else ""
        spaced += bool(first and first.startswith("▁"))
    assert spaced, "no answer began with a spaced token: the check above proved nothing"
