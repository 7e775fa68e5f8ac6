"""Phi-3 Vision image preprocessing: the HD transform, CLIP normalisation, global image and crops.

The arithmetic follows onnxruntime-extensions' ``Phi3ImageTransform`` (what onnxruntime-genai runs)
step for step, so PNG input gives bit-identical ``pixel_values``:

1. resize with Pillow's antialiased bilinear filter to ``scale*336`` on the long side, where
   ``scale`` is the largest s with ``s * ceil(s / ratio) <= num_crops``;
2. pad the short side with white up to a multiple of 336, centred (portrait images are padded in
   width; they are never transposed, as the extensions' port does);
3. normalise with the CLIP mean/std in float32;
4. the global image is the normalised HD image resized per channel to 336x336 with Pillow's
   bicubic filter on float ("F") images;
5. the local crops are the 336x336 tiles of the HD image, row-major;
6. ``pixel_values`` = [global, crops..., zeros] with ``num_crops + 1`` entries.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from phi3v.errors import ImageError

# CLIP ViT-L/14-336 works on 336x336 tiles (Phi-3-V's img_processor;
# docs/ARCHITECTURE.md#the-hd-transform).
TILE = 336
# Each tile becomes 12x12 = 144 tokens after the 2x2 merge of 24x24 patches
# (docs/ARCHITECTURE.md#the-image-token-formula).
TOKENS_PER_TILE = 144
# One learned "newline" token per row of 12 tokens (sub_GN / glb_GN,
# docs/ARCHITECTURE.md#the-image-token-formula).
TOKENS_PER_ROW = 12
# The HD transform's crop budget, hd_num (Hub preprocessor_config.json; onnxruntime-extensions
# hard-codes it): at most 16 tiles, so pixel_values has at most 16 + 1 entries (global first).
MAX_CROPS = 16
# OpenAI CLIP normalisation constants (Hub preprocessor_config.json; onnxruntime-extensions).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# Upper bound on input size: larger images are refused before decoding (a decompression bomb,
# or a photo far beyond what 16 crops of 336 can show). 64 MP is a 9000x7000 photo.
MAX_PIXELS = 64_000_000
DOWNSCALE = "downscale it first"  # the advice that ends a refusal for too many pixels
# Upper bound on an image file's size, checked before it is read: 64 MP of 16-bit RGBA,
# uncompressed, is 512 MB; anything larger is not an image this can use.
MAX_FILE_BYTES = 512 * 2**20

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


class ProcessedImage:
    """One image ready for the vision model.

    ``pixel_values``: float32 [num_crops + 1, 3, 336, 336] (global image, crops, zero padding).
    An image recognised by its source (below) computes them only when first read, which a
    request whose features are kept never does.
    ``image_size``: (height, width) of the padded HD image, both multiples of 336.
    ``num_image_tokens``: how many feature rows the vision model returns for it.
    ``num_crops``: the crop budget it was made with.
    ``digest``: identifies the pixel values (a 256-bit hash of the HD image and num_crops they
    derive from), so a cached prefix or cached features can tell the same image from another.
    ``source``: identifies what it was made from (:func:`source_digest`: the input's bytes and
    num_crops; empty for a PIL image), so a later call with the same file or bytes is known
    before anything is decoded.
    """

    __slots__ = ("image_size", "num_image_tokens", "num_crops", "digest", "source", "_pixels")

    def __init__(
        self,
        pixel_values: np.ndarray | Callable[[], np.ndarray],
        image_size: tuple[int, int],
        num_image_tokens: int,
        digest: bytes = b"",
        *,
        num_crops: int | None = None,
        source: bytes = b"",
    ):
        if num_crops is None:
            if callable(pixel_values):
                raise TypeError("num_crops is needed when the pixel values come later")
            num_crops = pixel_values.shape[0] - 1
        self.image_size, self.num_image_tokens = image_size, num_image_tokens
        self.num_crops, self.digest, self.source = num_crops, digest, source
        self._pixels = pixel_values

    @property
    def pixel_values(self) -> np.ndarray:
        if callable(self._pixels):
            # Two threads may both compute them; either result is the same array's values.
            self._pixels = self._pixels()
        return self._pixels

    @property
    def used_crops(self) -> int:
        """Entries of ``pixel_values`` the HD grid uses: the global image and h*w tiles."""
        height, width = self.image_size
        return 1 + (height // TILE) * (width // TILE)

    def __repr__(self) -> str:
        height, width = self.image_size
        return (
            f"ProcessedImage({width}x{height} HD, num_crops={self.num_crops}, "
            f"{self.num_image_tokens} image tokens)"
        )


def num_image_tokens(height: int, width: int) -> int:
    """Feature rows for an HD image of (height, width): crops, global, newlines
    (docs/ARCHITECTURE.md#the-image-token-formula)."""
    rows, cols = height // TILE, width // TILE
    return (rows * cols + 1) * TOKENS_PER_TILE + 1 + (rows + 1) * TOKENS_PER_ROW


def preprocess_image(image: ImageInput, num_crops: int = MAX_CROPS) -> ProcessedImage:
    """Turn a path, raw bytes or PIL image into the vision model's inputs.

    ``num_crops`` (1..16) bounds the number of 336x336 tiles; fewer tiles mean fewer image
    tokens and a faster, coarser answer. Raises :class:`ImageError` for anything unreadable.
    """
    check_num_crops(num_crops)
    data = read_image(image)
    return preprocess_data(data, num_crops, describe_image(image), source_digest(data, num_crops))


def preprocess_data(
    data: bytes | Image.Image, num_crops: int, what: str, source: bytes
) -> ProcessedImage:
    """:func:`preprocess_image` of what :func:`read_image` returned, for a caller that has its
    :func:`source_digest` already (``source``); ``what`` names the image in error messages."""
    rgb = hd_transform(load_rgb(data, what), num_crops)
    pixels = normalize(rgb)
    height, width = pixels.shape[1:]
    crops = split_crops(pixels)
    pixel_values = np.zeros((num_crops + 1, 3, TILE, TILE), dtype=np.float32)
    pixel_values[0] = global_image(pixels)
    pixel_values[1 : 1 + len(crops)] = crops
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=32, salt=bytes([num_crops]))
    digest.update(f"{width}x{height}".encode())
    return ProcessedImage(
        pixel_values,
        (height, width),
        num_image_tokens(height, width),
        digest.digest(),
        source=source,
    )


def read_image(image: ImageInput) -> bytes | Image.Image:
    """The bytes of a file or buffer, read once (what :func:`source_digest` recognises is then
    what is decoded), or a PIL image as it is. Raises ImageError for a missing, unreadable or
    oversized file and for anything that is not an image input."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise ImageError(f"image file {path} is a folder; give the path of an image file")
        if not path.is_file():
            raise ImageError(f"image file {path} does not exist")
        if (size := path.stat().st_size) > MAX_FILE_BYTES:
            raise ImageError(
                f"image file {path} is {size:,} bytes, more than the limit of "
                f"{MAX_FILE_BYTES:,}; no image of at most {MAX_PIXELS:,} pixels needs that many"
            )
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ImageError(f"image file {path} could not be read ({err})") from err
    else:
        raise ImageError(
            f"expected an image as a file path, raw bytes or a PIL image, "
            f"got {type(image).__name__}"
        )
    if not data:
        what = "the image data" if isinstance(image, (bytes, bytearray, memoryview)) else None
        raise ImageError(f"{what or describe_image(image)} is empty (0 bytes)")
    return data


def source_digest(data: bytes | Image.Image, num_crops: int) -> bytes:
    """What an input is recognised by: a 256-bit BLAKE2b of its bytes salted with num_crops
    (the same bytes at the same crop count make the same pixel values); b"" for a PIL image,
    whose pixels could change under the same object."""
    if isinstance(data, Image.Image):
        return b""
    return hashlib.blake2b(data, digest_size=32, salt=bytes([num_crops])).digest()


def check_num_crops(num_crops: object) -> None:
    """Raise ImageError unless ``num_crops`` is an integer from 1 to MAX_CROPS."""
    if (
        not isinstance(num_crops, int)
        or isinstance(num_crops, bool)
        or not 1 <= num_crops <= MAX_CROPS
    ):
        raise ImageError(f"num_crops must be an integer from 1 to {MAX_CROPS}, got {num_crops!r}")


def load_rgb(image: ImageInput, what: str | None = None) -> Image.Image:
    """Decode any Pillow-readable image to RGB: first frame, EXIF orientation applied,
    transparency composited on white, 16-bit and CMYK data converted. ``what`` names the
    image in error messages (default: from ``image`` itself)."""
    what = what or describe_image(image)
    opened = _open(read_image(image), what)
    try:
        opened.seek(0)  # animated images: the first frame
        opened = ImageOps.exif_transpose(opened)
        return _to_rgb(opened)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{what} is corrupt or truncated ({err})") from err


def hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    """Resize so the long side is ``scale * 336`` and pad the short side with white to a
    multiple of 336, where ``scale`` is the largest s with ``s * ceil(s / ratio) <= num_crops``."""
    width, height = image.size
    ratio = max(width, height) / min(width, height)
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    long_side = scale * TILE
    # Truncation as in the references; an extreme strip still keeps one row of pixels.
    short_side = max(1, int(long_side / ratio))
    if width >= height:
        resized = image.resize((long_side, short_side), Image.Resampling.BILINEAR)
    else:
        resized = image.resize((short_side, long_side), Image.Resampling.BILINEAR)
    return _pad_to_tiles(resized)


def normalize(image: Image.Image) -> np.ndarray:
    """RGB uint8 image -> CLIP-normalised float32 CHW array, computed in float32 like the
    references: ``(u8 / 255 - mean) / std``."""
    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
    # In place, one operation at a time: the same float32 results with one 16 MB buffer, not five.
    chw /= np.float32(255.0)
    chw -= CLIP_MEAN[:, None, None]
    chw /= CLIP_STD[:, None, None]
    return chw


def global_image(pixels: np.ndarray) -> np.ndarray:
    """The whole normalised HD image shrunk to one 336x336 tile, bicubic per channel."""
    channels = [
        np.asarray(Image.fromarray(channel).resize((TILE, TILE), Image.Resampling.BICUBIC))
        for channel in pixels
    ]
    return np.stack(channels)


def split_crops(pixels: np.ndarray) -> np.ndarray:
    """Cut a [3, H, W] array into its 336x336 tiles, row-major: [rows*cols, 3, 336, 336]."""
    _, height, width = pixels.shape
    rows, cols = height // TILE, width // TILE
    tiles = pixels.reshape(3, rows, TILE, cols, TILE).transpose(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, 3, TILE, TILE)


def _pad_to_tiles(image: Image.Image) -> Image.Image:
    width, height = image.size
    target_w, target_h = _round_up(width), _round_up(height)
    if (target_w, target_h) == (width, height):
        return image
    canvas = Image.new("RGB", (target_w, target_h), (255, 255, 255))
    canvas.paste(image, ((target_w - width) // 2, (target_h - height) // 2))
    return canvas


def _round_up(size: int) -> int:
    return math.ceil(size / TILE) * TILE


def _open(data: bytes | Image.Image, what: str) -> Image.Image:
    if isinstance(data, Image.Image):
        _check_pixels(data, what)
        return data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow refuses before it reads the size for us; its message has the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(err))
        count = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageError(
            f"{what} has {count}, more than the limit of {MAX_PIXELS:,}; {DOWNSCALE} (16 crops "
            "of 336 pixels cannot show more)"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageError(
            f"{what} is not an image Pillow can read (PNG, JPEG, WebP, GIF, ...)"
        ) from err
    except OSError as err:
        raise ImageError(f"{what} could not be read ({err})") from err
    _check_pixels(opened, what)
    return opened


def _check_pixels(image: Image.Image, what: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{what} is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{what} has {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{MAX_PIXELS:,}; {DOWNSCALE} (16 crops of 336 pixels cannot show more)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode.startswith("I;16"):  # 16-bit greyscale, as a 16-bit PNG opens
        # Its high byte, as onnxruntime-genai's decoder keeps it (rounding v / 257 instead
        # would give other pixel values, and a near-black picture would not stay near black).
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    elif image.mode in ("I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """32-bit integer or float greyscale (no file format the reference reads) -> uint8, by the
    range the values imply: 0-1 or 0-255 for floats, 0-255 or 0-65535 for integers."""
    if values.dtype.kind == "f":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    top = 255 if values.max(initial=0) <= 255 else 65535
    return np.clip(np.rint(values.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)


def describe_image(image: ImageInput) -> str:
    """How error messages name ``image``: its file, its size in bytes, or "the image"."""
    if isinstance(image, (str, os.PathLike)):
        return f"image file {Path(image)}"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"the image data ({len(image):,} bytes)"
    return "the image"
