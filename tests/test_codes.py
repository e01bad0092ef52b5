"""The hash-code owner module: sign, packing, bit order, Hamming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duch_core import codes


@pytest.mark.parametrize("bits", [8, 16, 64, 128, 256])
def test_pack_unpack_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    pm1 = np.where(rng.random((37, bits)) < 0.5, -1, 1).astype(np.int8)
    packed = codes.pack(pm1)
    assert packed.shape == (37, bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(codes.unpack(packed, bits), pm1)


def test_sign_maps_zero_to_plus_one_and_accepts_tensors() -> None:
    h = torch.tensor([[0.0, -0.0, -1e-7, 0.3, -0.9, 1.0, 0.0, -2.0]])
    np.testing.assert_array_equal(codes.sign(h), [[1, 1, -1, 1, -1, 1, 1, -1]])
    # bit order "big": the first code bit is the most significant bit of byte 0
    assert codes.pack(h)[0, 0] == 0b11010110


def test_hamming_matches_inner_product_form() -> None:
    rng = np.random.default_rng(0)
    a = np.where(rng.random((9, 64)) < 0.5, -1, 1)
    b = np.where(rng.random((13, 64)) < 0.5, -1, 1)
    expected = codes.hamming_pm1(a, b)
    np.testing.assert_array_equal(codes.hamming(codes.pack(a), codes.pack(b)), expected)
    brute = np.array([[int((x != y).sum()) for y in b] for x in a])
    np.testing.assert_array_equal(expected, brute)


def test_topk_reference_breaks_ties_by_position() -> None:
    db = codes.pack(np.ones((6, 16)))
    db[3, 0] ^= 0b1  # distance 1 from the all-ones query
    q = codes.pack(np.ones((1, 16)))
    dist, pos = codes.topk_reference(q, db, 4)
    np.testing.assert_array_equal(dist, [[0, 0, 0, 0]])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 4]])
    dist, pos = codes.topk_reference(q, db, 100)
    assert dist.shape == (1, 6) and pos[0, -1] == 3 and dist[0, -1] == 1


@pytest.mark.parametrize(
    "arr,bits",
    [
        (np.zeros((2, 7), np.uint8), 64),
        (np.zeros((2, 8), np.int64), 64),
        (np.zeros((2, 2, 8), np.uint8), 64),
    ],
)
def test_check_packed_rejects_wrong_shapes(arr: np.ndarray, bits: int) -> None:
    with pytest.raises(codes.CodeLengthError, match="expected|uint8"):
        codes.check_packed(arr, bits)


@pytest.mark.parametrize("bits", [0, -8, 12, 7])
def test_bad_code_lengths(bits: int) -> None:
    with pytest.raises(codes.CodeLengthError):
        codes.check_bits(bits)
