"""Crafted inputs for the hostile-input corpus and the fuzz test."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from tests.support.images import encode, photo_like


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header declares a canvas of width × height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


def truncated(blob: bytes, keep: float = 0.5) -> bytes:
    """The first part of an encoded image."""
    return blob[: max(8, int(len(blob) * keep))]


def animated_gif() -> tuple[bytes, bytes]:
    """(an animated 3-frame GIF, its first frame alone as a GIF)."""
    frames = [photo_like(seed=i).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue(), encode(frames[0], "GIF")


def multipage_tiff() -> tuple[bytes, bytes]:
    """(a 3-page TIFF, its first page alone)."""
    pages = [photo_like(seed=10 + i) for i in range(3)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue(), encode(pages[0], "TIFF")


def exif_rotated_jpeg() -> tuple[bytes, bytes]:
    """(a JPEG with EXIF orientation 6 = rotate 90° clockwise, the upright image as PNG)."""
    image = photo_like(200, 120, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    upright = Image.open(io.BytesIO(rotated))
    upright.load()
    return rotated, encode(upright.transpose(Image.Transpose.ROTATE_270), "PNG")


def sixteen_bit_png() -> bytes:
    """A 16-bit grayscale PNG (mode I;16)."""
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")  # uint16 → mode I;16


def palette_with_transparency() -> bytes:
    """A P-mode PNG with a transparent palette entry."""
    image = photo_like(64, 64).convert("P")
    return encode(image, "PNG", transparency=0)


SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<rect width="10" height="10"/></svg>'
)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def ico() -> bytes:
    """A Windows icon: PIL decodes it, but it is not a format we accept."""
    return encode(photo_like(32, 32), "ICO")
