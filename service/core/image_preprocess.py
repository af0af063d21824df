"""Where image bytes become a `uint8 [3,S,S]` tensor, exactly as open_clip would make it.

open_clip's preprocess is: Resize(S, bicubic) on the shortest side, CenterCrop(S),
convert to RGB, ToTensor, Normalize. We do the PIL half here (decode, resize, crop,
RGB) and leave /255 and mean/std to the exported graph, so the result is
bit-identical to open_clip's while the wire carries 4× fewer bytes than float32.

Two ways around the decode, both chosen by the caller or the operator:
- `PresizedPixels`: a client ran this very module itself (`image_pixels`) and sends the
  model's S×S RGB pixels; the gateway checks their length and decodes nothing.
- `ImageSpec.fast_jpeg`: large JPEGs are decoded at a reduced size by libjpeg's DCT
  scaling (`draft`), never below 2× the model's size, before the same resize and crop.
  Not open_clip's result bit for bit (bench/results/gateway-cpu.md gives the measured
  cosine); off by default.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.admission import PixelBudget
from service.errors import InvalidInput

#: Bumped whenever the bytes → tensor path changes; part of every image cache key.
PREPROCESS_VERSION = "1"

#: The formats we decode. Anything else (SVG, PDF, ICO, ...) is refused by name.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# Past this many resized pixels (~50 MB of RGB) a full resize would allocate far more
# than the crop keeps (1x20000 → 224x4480000), so only the part that becomes the crop is
# resampled (`_resize_only_the_crop`, within 1 of open_clip per channel). Below it the
# path is open_clip's, bit for bit.
_FULL_RESIZE_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ImageSpec:
    """What the model's preprocess needs: output size and resampling filter."""

    image_size: int
    interpolation: str = "bicubic"
    #: Decode large JPEGs at a reduced size first (`draft`): faster, not bit-identical.
    fast_jpeg: bool = False


@dataclass(frozen=True)
class PresizedPixels:
    """An image its caller already preprocessed with `image_pixels`: the model's input
    tensor `uint8 [3, S, S]` as raw bytes, planar (the S×S red plane row by row, then
    green, then blue); exactly S·S·3 bytes.

    Planar, not interleaved (R, G, B per pixel as PIL and numpy images lay them out):
    it is the layout the graph takes, so the gateway reshapes without a copy; an
    interleaved wire cost it a transpose of ~0.2 ms per 224×224 image, measured.
    """

    data: bytes


def pixels_length(image_size: int) -> int:
    """The exact byte length of `PresizedPixels` for a model of this image size."""
    return image_size * image_size * 3


def check_pixels(pixels: PresizedPixels, image_size: int) -> None:
    """InvalidInput unless `pixels` holds exactly S·S·3 bytes (nothing else can be checked:
    every byte value is a valid pixel)."""
    expected = pixels_length(image_size)
    if len(pixels.data) != expected:
        raise InvalidInput(
            f"pixels are {len(pixels.data)} bytes; this model takes {image_size}x{image_size} "
            f"RGB uint8 pixels = {expected} bytes (ModelInfo.image_size = {image_size}), "
            "or send the encoded image instead"
        )


def unpack_pixels(pixels: PresizedPixels, image_size: int) -> np.ndarray:
    """Checked `PresizedPixels` → `uint8 [3,S,S]`, the tensor `preprocess_image_bytes` makes
    (a read-only view of the bytes: nothing is copied)."""
    check_pixels(pixels, image_size)
    return np.frombuffer(pixels.data, dtype=np.uint8).reshape(3, image_size, image_size)


def image_pixels(image_bytes: bytes, spec: ImageSpec, limits: ImageLimits) -> bytes:
    """Encoded image → the bytes of its `PresizedPixels`, by the gateway's own path
    (`preprocess_image_bytes`), so the vector equals the one of the encoded image."""
    return preprocess_image_bytes(image_bytes, spec, limits).tobytes()


@dataclass(frozen=True)
class ImageLimits:
    """Caller-facing limits checked before and during decoding."""

    max_bytes: int
    max_pixels: int
    exif_transpose: bool = True


def open_image(image_bytes: bytes, limits: ImageLimits) -> Image.Image:
    """Decode the header, check format and canvas size, then load the first frame."""
    return _load_first_frame(_read_header(image_bytes, limits), limits)


def _read_header(image_bytes: bytes, limits: ImageLimits) -> Image.Image:
    """The image with only its header read: format and canvas size checked, no pixels."""
    if not image_bytes:
        raise InvalidInput("image is empty (0 bytes)")
    if len(image_bytes) > limits.max_bytes:
        raise InvalidInput(
            f"image is {len(image_bytes)} bytes, over the limit of {limits.max_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(image_bytes), formats=None)
    except UnidentifiedImageError:
        raise InvalidInput(
            "not a decodable image; send JPEG, PNG, WebP, GIF, BMP or TIFF bytes"
        ) from None
    except Image.DecompressionBombError as exc:
        raise InvalidInput(
            f"image declares a canvas over the limit of {limits.max_pixels} pixels ({exc})"
        ) from None
    except Exception as exc:  # PIL raises many types for broken headers
        raise InvalidInput(f"cannot read image header: {exc}") from None
    fmt = (image.format or "").upper()
    if fmt not in ALLOWED_FORMATS:
        raise InvalidInput(
            f"image format {fmt or 'unknown'} is not supported; "
            "send JPEG, PNG, WebP, GIF, BMP or TIFF"
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has an empty canvas ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InvalidInput(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} pixels"
        )
    return image


def _load_first_frame(image: Image.Image, limits: ImageLimits) -> Image.Image:
    """Decode the pixels of the first frame (GIF) or page (TIFF), rotated by EXIF."""
    try:
        image.seek(0)  # first frame of GIF / first page of TIFF
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            if limits.exif_transpose:
                # In place: a copy of the whole canvas when there is nothing to rotate
                # would double the peak memory of every large image.
                ImageOps.exif_transpose(image, in_place=True)
    except Image.DecompressionBombError as exc:
        raise InvalidInput(
            f"image declares a canvas over the limit of {limits.max_pixels} pixels ({exc})"
        ) from None
    except Exception as exc:
        raise InvalidInput(f"image data is corrupt or truncated: {exc}") from None
    return image


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): shortest side to `size`, the other by int() of the ratio."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision CenterCrop's offsets: int(round((n - size) / 2))."""
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return left, top, left + size, top + size


def to_model_pixels(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize + center-crop + RGB as open_clip does; returns `uint8 [3,S,S]` (C-contiguous)."""
    size = spec.image_size
    resample = _INTERPOLATIONS[spec.interpolation]
    try:
        return _resize_crop_rgb(image, size, resample)
    except ValueError:
        # A mode PIL cannot resample (open_clip itself would fail here): go via RGB.
        return _resize_crop_rgb(image.convert("RGB"), size, resample)


def _resize_only_the_crop(
    image: Image.Image,
    resized: tuple[int, int],
    crop: tuple[int, int, int, int],
    resample: Image.Resampling,
) -> Image.Image:
    """`image.resize(resized).crop(crop)` without the full resize (extreme aspect ratios).

    Pillow resizes in two passes, horizontal then vertical, rounding to uint8 between
    them; one `resize(box=...)` call over the crop's source box may run the passes in the
    other order and differ by up to ~20/255 on detailed images. So: the horizontal pass
    on the crop's columns, over the source rows the vertical pass reads (plus a margin
    wider than any filter's reach, so no kernel is clipped at the strip's edge), then the
    vertical pass on the crop's rows. Each pass computes what the full resize computes
    there; only the filter's float offsets differ, so channels agree within 1.
    """
    width, height = image.size
    sx, sy = width / resized[0], height / resized[1]
    top, bottom = crop[1] * sy, crop[3] * sy
    # Filters reach at most 3 source pixels (Lanczos), times the scale when shrinking.
    margin = 3.0 * max(sy, 1.0) + 2.0
    first = max(0, int(top - margin))
    last = min(height, int(bottom + margin) + 1)
    strip = image.crop((0, first, width, last))
    rows = last - first
    columns = strip.resize(
        (crop[2] - crop[0], rows), resample, box=(crop[0] * sx, 0, crop[2] * sx, rows)
    )
    return columns.resize(
        (crop[2] - crop[0], crop[3] - crop[1]),
        resample,
        box=(0, top - first, crop[2] - crop[0], bottom - first),
    )


def _resize_crop_rgb(image: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    width, height = image.size
    new_w, new_h = _resized_size(width, height, size)
    crop = _center_crop_box(new_w, new_h, size)
    if new_w * new_h > _FULL_RESIZE_MAX_PIXELS:
        image = _resize_only_the_crop(image, (new_w, new_h), crop, resample)
    else:
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample)
        image = image.crop(crop)
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _draft_large_jpeg(image: Image.Image, size: int) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (its DCT scaling), the
    smallest that keeps the short side at least 2 × `size`; other images are untouched.

    Pillow's `draft` picks the largest scale s in (8, 4, 2, 1) with s ≤ w // req_w and
    s ≤ h // req_h, and decodes ceil(w / s) × ceil(h / s): asking for a short side of
    exactly 2 × `size` keeps ceil(short / s) ≥ 2 × `size`.
    """
    if (image.format or "").upper() not in ("JPEG", "MPO"):
        return
    width, height = image.size
    short = min(width, height)
    floor = 2 * size
    if short < 2 * floor:  # not even a 1/2 scale would stay above the floor
        return
    image.draft(image.mode, (width * floor // short, height * floor // short))


def preprocess_image_bytes(
    image_bytes: bytes,
    spec: ImageSpec,
    limits: ImageLimits,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """Bytes → `uint8 [3,S,S]`; raises InvalidInput with the reason on bad input.

    With a `budget`, the decode waits until its canvas fits in the pixels that all
    decodes together may hold, so N large images cannot pass the memory bound.
    """
    image = _read_header(image_bytes, limits)
    if spec.fast_jpeg:
        _draft_large_jpeg(image, spec.image_size)
    width, height = image.size  # after a draft: the reduced canvas, all that is decoded
    with budget.hold(width * height) if budget is not None else contextlib.nullcontext():
        image = _load_first_frame(image, limits)
        try:
            return to_model_pixels(image, spec)
        except InvalidInput:
            raise
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"image could not be converted: {exc}") from None
        finally:
            image.close()  # the decoded canvas goes now, not at the next collection
