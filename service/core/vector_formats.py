"""Vector formats: a float32 vector → the numbers or bytes a caller asked for.

The pipeline and the cache hold float32 vectors only; a format is applied when an
answer is written (gRPC `VectorFormat`, HTTP `encoding_format`), so one cached vector
serves every format and nothing is quantized twice. Both transports call `quantize` /
`to_bytes` here: the rules live in one place.

The compact formats follow Sentence-Transformers' `quantize_embeddings` (and Cohere's
and Mistral's `int8` / `uint8` / `binary` / `ubinary`, which vLLM's users ask for):

- `ubinary`: one sign bit per dimension (1 where the value is > 0), packed 8 per byte,
  the first dimension in the most significant bit of the first byte (`numpy.packbits`,
  big bit order), the last byte padded with 0 bits: ceil(D / 8) bytes, `uint8`.
- `binary`: the same bytes as signed `int8` in offset binary (`ubinary − 128`), exactly
  Sentence-Transformers' `binary`.
- `int8`: a per-vector symmetric scale, `round(x × 127 / max|x|)`, values in
  [-127, 127], 0 stays 0 and signs are kept. Sentence-Transformers instead takes
  per-dimension [min, max] ranges from calibration embeddings, which a server answering
  one request cannot know. A fixed [-1, 1] range (valid for any L2-normalized vector)
  wastes most of the 256 steps: CLIP's components are about 1/√D in size, so
  ViT-B-32's 512 dimensions would use about ±6 of ±127. The per-vector scale uses the
  whole range; it drops out of cosine similarity (what vector stores use for int8), and
  `bench/quantization.py` measures what it costs in recall against float32, with the
  fixed range beside it.
- `uint8`: `int8 + 128` (offset binary, values in [1, 255]), the relation
  Sentence-Transformers' `uint8` and `int8` have for one range.
"""

from __future__ import annotations

import numpy as np

#: Every format, by the name HTTP's `encoding_format` and the client use.
FLOAT32 = "float32"
FLOAT16 = "float16"
INT8 = "int8"
UINT8 = "uint8"
BINARY = "binary"
UBINARY = "ubinary"
FORMATS: tuple[str, ...] = (FLOAT32, FLOAT16, INT8, UINT8, BINARY, UBINARY)

#: The numpy type each format's values have (little-endian where it matters).
DTYPES: dict[str, np.dtype] = {
    FLOAT32: np.dtype("<f4"),
    FLOAT16: np.dtype("<f2"),
    INT8: np.dtype(np.int8),
    UINT8: np.dtype(np.uint8),
    BINARY: np.dtype(np.int8),
    UBINARY: np.dtype(np.uint8),
}

_INT8_MAX = 127


def width(dim: int, fmt: str) -> int:
    """Values (numbers in a list, or bytes packed) of one `dim`-dimensional vector."""
    if fmt in (BINARY, UBINARY):
        return (dim + 7) // 8
    return dim


def packed_bytes(dim: int, fmt: str) -> int:
    """Bytes of one `dim`-dimensional vector packed in `fmt`."""
    return width(dim, fmt) * DTYPES[fmt].itemsize


def quantize(vectors: np.ndarray, fmt: str) -> np.ndarray:
    """`[N, D]` (or `[D]`) float vectors → `[N, width(D)]` (or `[width(D)]`) in `fmt`'s dtype."""
    floats = np.asarray(vectors, dtype=np.float32)
    if fmt in (FLOAT32, FLOAT16):
        return floats.astype(DTYPES[fmt])
    if fmt in (UBINARY, BINARY):
        bits = np.packbits(floats > 0, axis=-1)
        return bits if fmt == UBINARY else (bits.astype(np.int16) - 128).astype(np.int8)
    if fmt in (INT8, UINT8):
        peak = np.max(np.abs(floats), axis=-1, keepdims=True)
        # An all-zero vector (never L2-normalized output) stays zero instead of dividing by 0.
        scale = np.divide(_INT8_MAX, peak, out=np.zeros_like(peak), where=peak > 0)
        ints = np.clip(np.rint(floats * scale), -_INT8_MAX, _INT8_MAX).astype(np.int16)
        return ints.astype(np.int8) if fmt == INT8 else (ints + 128).astype(np.uint8)
    raise ValueError(f"unknown vector format {fmt!r}; one of {', '.join(FORMATS)}")


def to_bytes(vector: np.ndarray, fmt: str) -> bytes:
    """One float vector packed in `fmt` (little-endian floats, one byte per 8-bit value)."""
    return quantize(vector, fmt).tobytes()


def from_bytes(packed: bytes, fmt: str) -> np.ndarray:
    """Packed bytes of one vector → its values in `fmt`'s dtype (floats as float32)."""
    values = np.frombuffer(packed, dtype=DTYPES[fmt])
    return values.astype(np.float32) if fmt in (FLOAT32, FLOAT16) else values.copy()
