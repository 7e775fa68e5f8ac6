"""Image preprocessing: the HD transform, normalisation, crops, and every input kind and error."""

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from phi3v import ImageError, preprocess_image
from phi3v.image import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    TILE,
    ProcessedImage,
    normalize,
    source_digest,
)


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)


def png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


# Input size -> padded HD (height, width) and image tokens, with 16 crops
# (docs/ARCHITECTURE.md#the-image-token-formula).
@pytest.mark.parametrize(
    ("size", "hd_size", "tokens"),
    [
        ((1344, 1008), (1008, 1344), 1921),
        ((640, 480), (1008, 1344), 1921),  # upscaled
        ((480, 640), (1344, 1008), 1933),  # portrait: padded in width, more newline tokens
        ((1000, 300), (672, 2016), 1909),
        ((336, 336), (1344, 1344), 2509),
        ((1920, 1080), (1008, 1680), 2353),
    ],
)
def test_hd_size_and_token_count_follow_the_spec_table(size, hd_size, tokens):
    processed = preprocess_image(noise(*size))
    assert processed.image_size == hd_size
    assert processed.num_image_tokens == tokens
    assert processed.pixel_values.shape == (17, 3, TILE, TILE)
    assert processed.pixel_values.dtype == np.float32


def test_crops_beyond_the_hd_grid_are_zero():
    processed = preprocess_image(noise(640, 480))  # 3 x 4 = 12 crops + global
    assert np.all(processed.pixel_values[13:] == 0)
    assert np.all(np.abs(processed.pixel_values[1:13]).sum(axis=(1, 2, 3)) > 0)


def test_white_padding_normalises_to_the_clip_white_point():
    processed = preprocess_image(noise(1000, 300))  # 604 px high, padded 34 + 34 to 672
    white = (1.0 - CLIP_MEAN) / CLIP_STD  # about (1.93, 2.07, 2.15), see ARCHITECTURE.md
    top_rows = processed.pixel_values[1, :, :34, :]  # first crop, top padding
    np.testing.assert_allclose(
        top_rows, np.broadcast_to(white[:, None, None], top_rows.shape), rtol=1e-6
    )
    assert not np.allclose(processed.pixel_values[1, :, 34:40, :], white[:, None, None])


def test_crops_are_the_tiles_of_the_hd_image_in_row_major_order():
    image = noise(1344, 1008)  # already HD size: no resize, no padding
    processed = preprocess_image(image)
    hd = normalize(image)
    for row in range(3):
        for col in range(4):
            tile = hd[:, row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE]
            np.testing.assert_array_equal(processed.pixel_values[1 + row * 4 + col], tile)


def test_global_image_is_the_whole_image_shrunk():
    left_dark = np.zeros((1008, 1344, 3), dtype=np.uint8)
    left_dark[:, 672:] = 255
    processed = preprocess_image(Image.fromarray(left_dark))
    global_image = processed.pixel_values[0]
    assert global_image[:, :, :160].mean() < -1.5  # black normalises to about -1.7
    assert global_image[:, :, 176:].mean() > 1.8


@pytest.mark.parametrize(("num_crops", "tokens"), [(1, 313), (4, 757), (16, 2509)])
def test_num_crops_can_be_lowered(num_crops, tokens):
    # 336x336 with 1 crop: 1 tile, (1+1)*144 + 1 + 2*12 = 313 tokens; 4 crops: 2x2 tiles
    # (docs/ARCHITECTURE.md#the-image-token-formula).
    processed = preprocess_image(noise(336, 336), num_crops=num_crops)
    assert processed.pixel_values.shape == (num_crops + 1, 3, TILE, TILE)
    assert processed.num_image_tokens == tokens


def test_path_bytes_and_pil_image_give_the_same_result(tmp_path):
    image = noise(500, 300)
    path = tmp_path / "noise.png"
    image.save(path)
    from_path = preprocess_image(path)
    from_str = preprocess_image(str(path))
    from_bytes = preprocess_image(path.read_bytes())
    from_pil = preprocess_image(image)
    for other in (from_str, from_bytes, from_pil):
        np.testing.assert_array_equal(from_path.pixel_values, other.pixel_values)


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (400, 300), (0, 0, 0, 0))
    white = Image.new("RGB", (400, 300), (255, 255, 255))
    np.testing.assert_array_equal(
        preprocess_image(clear).pixel_values, preprocess_image(white).pixel_values
    )


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_greyscale_alpha_and_palette_transparency_are_composited_on_white(mode):
    if mode == "LA":
        image = Image.new("LA", (200, 100), (0, 0))
    else:
        image = Image.new("P", (200, 100), 0)
        image.info["transparency"] = 0
    white = Image.new("RGB", (200, 100), (255, 255, 255))
    np.testing.assert_array_equal(
        preprocess_image(image).pixel_values, preprocess_image(white).pixel_values
    )


def test_sixteen_bit_greyscale_keeps_its_high_byte_so_dark_stays_dark():
    """As onnxruntime-genai decodes a 16-bit PNG (its oracle test: test_generate.py). A picture
    whose values all sit below 256 is near black, not an 8-bit picture."""

    def grey(value: int) -> np.ndarray:
        image = Image.fromarray(np.full((64, 64), value, dtype=np.uint16))
        return preprocess_image(png_bytes(image)).pixel_values

    black, darker, dark = grey(0), grey(200), grey(300)
    np.testing.assert_array_equal(darker, black)  # 200 >> 8 == 0
    assert (dark > darker).all()  # 300 >> 8 == 1: brighter, never darker
    one = Image.new("RGB", (64, 64), (1, 1, 1))
    np.testing.assert_array_equal(dark, preprocess_image(one).pixel_values)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits():
    half = np.full((100, 200), 32896, dtype=np.uint16)  # 128 * 257: mid grey
    image = Image.fromarray(half)  # uint16 -> mode I;16
    grey = Image.new("RGB", (200, 100), (128, 128, 128))
    np.testing.assert_array_equal(
        preprocess_image(png_bytes(image)).pixel_values, preprocess_image(grey).pixel_values
    )


@pytest.mark.parametrize("mode", ["L", "CMYK", "1", "I"])
def test_other_modes_are_converted(mode):
    processed = preprocess_image(Image.new(mode, (300, 200)))
    assert processed.image_size == (1008, 1344)


def test_exif_orientation_is_applied():
    landscape = noise(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the picture is really portrait
    buffer = io.BytesIO()
    landscape.save(buffer, format="JPEG", exif=exif)
    assert preprocess_image(buffer.getvalue()).image_size == (1680, 1008)
    assert preprocess_image(landscape).image_size == (1008, 1680)


def test_animated_images_use_their_first_frame():
    frames = [Image.new("RGB", (120, 80), color) for color in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(
        preprocess_image(buffer.getvalue()).pixel_values, preprocess_image(frames[0]).pixel_values
    )


def test_extreme_aspect_ratio_keeps_one_row_of_pixels():
    processed = preprocess_image(noise(5000, 1))
    assert processed.image_size == (336, 5376)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match=r"image file .*nope\.png does not exist"):
        preprocess_image(tmp_path / "nope.png")


def test_bytes_that_are_not_an_image_are_refused():
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        preprocess_image(b"%PDF-1.7 definitely not a picture")


def test_empty_bytes_are_refused():
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        preprocess_image(b"")


def test_truncated_image_is_reported_as_corrupt():
    data = png_bytes(noise(300, 200))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        preprocess_image(data[: len(data) // 2])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels and holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("width", "height", "count"),
    [
        (9000, 8000, "9000x8000 = 72,000,000"),  # under Pillow's own bomb limit: ours refuses
        (30000, 30000, "900,000,000"),  # beyond it: Pillow refuses before the size is read
    ],
)
def test_too_many_pixels_are_refused_before_decoding_with_advice(width, height, count):
    expected = f"has {count} pixels, more than the limit of {MAX_PIXELS:,}; downscale it first"
    with pytest.raises(ImageError, match=re.escape(expected)):
        preprocess_image(png_header_only(width, height))


def test_a_folder_is_not_an_image_file(tmp_path):
    with pytest.raises(ImageError, match="is a folder; give the path of an image file"):
        preprocess_image(tmp_path)


def test_an_empty_file_is_named(tmp_path):
    (tmp_path / "blank.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"image file .*blank\.png is empty \(0 bytes\)"):
        preprocess_image(tmp_path / "blank.png")


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:
        file.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk, and reading it would take seconds
    with pytest.raises(ImageError, match=f"more than the limit of {MAX_FILE_BYTES:,}"):
        preprocess_image(huge)


def test_a_corrupt_file_is_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes(noise(300, 200))[:500])
    with pytest.raises(ImageError, match=r"image file .*broken\.png is corrupt or truncated"):
        preprocess_image(broken)


def test_the_source_is_the_bytes_and_the_crop_count(tmp_path):
    data = png_bytes(noise(300, 200))
    (tmp_path / "a.png").write_bytes(data)
    from_file, from_bytes = preprocess_image(tmp_path / "a.png", 4), preprocess_image(data, 4)
    assert from_file.source == from_bytes.source == source_digest(data, 4)
    assert preprocess_image(data, 5).source != from_bytes.source
    assert preprocess_image(png_bytes(noise(300, 200, seed=1)), 4).source != from_bytes.source
    assert preprocess_image(Image.open(io.BytesIO(data)), 4).source == b""  # a PIL object


def test_pixel_values_can_come_later_and_are_computed_once():
    made = preprocess_image(noise(300, 200), 4)
    calls = []
    later = ProcessedImage(
        lambda: calls.append(1) or made.pixel_values,
        made.image_size,
        made.num_image_tokens,
        made.digest,
        num_crops=4,
    )
    assert later.used_crops == made.used_crops and calls == []
    assert later.pixel_values is made.pixel_values and later.pixel_values is made.pixel_values
    assert calls == [1]
    assert repr(later) == "ProcessedImage(672x672 HD, num_crops=4, 757 image tokens)"
    with pytest.raises(TypeError, match="num_crops is needed"):
        ProcessedImage(lambda: made.pixel_values, made.image_size, made.num_image_tokens)


def test_unsupported_input_type_is_refused():
    with pytest.raises(ImageError, match="file path, raw bytes or a PIL image, got int"):
        preprocess_image(42)


@pytest.mark.parametrize("num_crops", [0, 17, 2.5, True])
def test_num_crops_out_of_range_is_refused(num_crops):
    with pytest.raises(ImageError, match="num_crops must be an integer from 1 to 16"):
        preprocess_image(noise(10, 10), num_crops=num_crops)
