"""The compact vector formats against references written out here: numpy's packbits for
the sign bits, Sentence-Transformers' offset-binary rule, the per-vector int8 scale."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import vector_formats as vf


def _unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("dim", [64, 512, 13, 1])
def test_ubinary_is_numpys_packbits_of_the_sign_bits(dim: int) -> None:
    vectors = _unit_vectors(5, dim)
    packed = vf.quantize(vectors, vf.UBINARY)
    assert packed.dtype == np.uint8 and packed.shape == (5, (dim + 7) // 8)
    np.testing.assert_array_equal(packed, np.packbits(vectors > 0, axis=-1))
    # Bit by bit: dimension i is bit 7 - i % 8 of byte i // 8; padding bits are 0.
    for row, vector in zip(packed, vectors, strict=True):
        for i in range(len(row) * 8):
            bit = (int(row[i // 8]) >> (7 - i % 8)) & 1
            assert bit == (i < dim and vector[i] > 0)


def test_the_first_dimension_is_the_most_significant_bit_and_zero_counts_as_negative() -> None:
    vector = np.zeros(16, np.float32)
    vector[0] = 0.5
    vector[15] = 0.5
    vector[3] = -0.5
    assert vf.quantize(vector, vf.UBINARY).tolist() == [0b1000_0000, 0b0000_0001]
    assert vf.quantize(vector, vf.BINARY).tolist() == [0, -127]


def test_binary_is_ubinary_minus_128_as_int8() -> None:
    vectors = _unit_vectors(50, 512, seed=1)
    ubinary = vf.quantize(vectors, vf.UBINARY)
    binary = vf.quantize(vectors, vf.BINARY)
    assert binary.dtype == np.int8
    np.testing.assert_array_equal(binary.astype(np.int16), ubinary.astype(np.int16) - 128)
    # The ends of the range: all signs negative → -128, all positive → 127.
    assert vf.quantize(-np.ones(8, np.float32), vf.BINARY).tolist() == [-128]
    assert vf.quantize(np.ones(8, np.float32), vf.BINARY).tolist() == [127]


def test_int8_scales_each_vector_by_its_largest_component() -> None:
    vectors = _unit_vectors(20, 512, seed=2)
    ints = vf.quantize(vectors, vf.INT8)
    assert ints.dtype == np.int8 and ints.shape == vectors.shape
    reference = np.rint(vectors / np.abs(vectors).max(axis=1, keepdims=True) * 127)
    np.testing.assert_array_equal(ints, reference.astype(np.int8))
    assert (np.abs(ints).max(axis=1) == 127).all()  # the whole range is used
    assert ints.min() >= -127  # symmetric: -128 never appears
    # Signs are kept, and the scale drops out of cosine similarity.
    assert (np.sign(ints) == np.sign(reference)).all()
    floats = ints.astype(np.float32)
    floats /= np.linalg.norm(floats, axis=1, keepdims=True)
    cosine = vectors @ vectors.T
    np.testing.assert_allclose(floats @ floats.T, cosine, atol=0.01)


def test_uint8_is_int8_plus_128() -> None:
    vectors = _unit_vectors(20, 64, seed=3)
    ints = vf.quantize(vectors, vf.INT8).astype(np.int16)
    uints = vf.quantize(vectors, vf.UINT8)
    assert uints.dtype == np.uint8
    np.testing.assert_array_equal(uints.astype(np.int16), ints + 128)


def test_a_zero_vector_quantizes_to_zeros_not_nan() -> None:
    zero = np.zeros(8, np.float32)
    assert vf.quantize(zero, vf.INT8).tolist() == [0] * 8
    assert vf.quantize(zero, vf.UINT8).tolist() == [128] * 8
    assert vf.quantize(zero, vf.UBINARY).tolist() == [0]


@pytest.mark.parametrize("fmt", vf.FORMATS)
def test_bytes_round_trip_and_their_size(fmt: str) -> None:
    vector = _unit_vectors(1, 77, seed=4)[0]
    packed = vf.to_bytes(vector, fmt)
    assert len(packed) == vf.packed_bytes(77, fmt)
    values = vf.from_bytes(packed, fmt)
    if fmt in (vf.FLOAT32, vf.FLOAT16):
        np.testing.assert_allclose(values, vector, atol=1e-3 if fmt == vf.FLOAT16 else 0)
    else:
        np.testing.assert_array_equal(values, vf.quantize(vector, fmt))


def test_sizes_are_4x_and_32x_smaller_than_float32() -> None:
    assert vf.packed_bytes(512, vf.FLOAT32) == 2048
    assert vf.packed_bytes(512, vf.INT8) == vf.packed_bytes(512, vf.UINT8) == 512
    assert vf.packed_bytes(512, vf.BINARY) == vf.packed_bytes(512, vf.UBINARY) == 64
    assert vf.packed_bytes(13, vf.UBINARY) == 2


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown vector format 'int4'"):
        vf.quantize(np.ones(4, np.float32), "int4")
