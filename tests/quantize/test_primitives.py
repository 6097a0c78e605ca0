"""Weight storage (int8 / nibbles) and dyadic numbers: exact round-trips and error bounds."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize.checkpoint import decode_weight, encode_weight, storage_bits
from quantize.primitives import dyadic, dyadic_many, dyadic_requantize, qmax_signed


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_weight_storage_round_trip_every_width(bits: int, shape: list[int], seed: int) -> None:
    q = qmax_signed(bits)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-q, q + 1, tuple(shape), generator=gen, dtype=torch.int32)
    stored = encode_weight(codes, bits)
    numel = math.prod(shape)
    # <= 4 bits: two nibbles per byte (odd counts padded by one nibble); else one int8 each.
    assert stored.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert stored.nbytes == math.ceil(numel * storage_bits(bits) / 8)
    assert torch.equal(decode_weight(stored, tuple(shape)), codes)


def test_nibbles_are_twos_complement_low_first() -> None:
    stored = encode_weight(torch.tensor([-1, 2, 7, -8 + 1, 3]), 4)
    # -1 -> 0xF (low), 2 -> 0x2 (high) => 0x2F; 7, -7 -> 0x7 | 0x9 << 4 = 0x97; 3 -> 0x03
    assert stored.tolist() == [0x2F, 0x97, 0x03]


def test_encode_refuses_codes_outside_the_grid() -> None:
    import pytest

    with pytest.raises(ValueError):
        encode_weight(torch.tensor([8]), 4)


@settings(max_examples=300, deadline=None)
@given(m=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_dyadic_error_bound(m: float) -> None:
    b, c = dyadic(m)
    assert 0 <= c <= 31
    assert -(2**31) <= b <= 2**31 - 1  # fits int32
    # half a step of the 2^-c grid, measured exactly
    assert abs(Fraction(b, 2**c) - Fraction(m)) <= Fraction(1, 2 ** (c + 1))


_multiplier = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(
    lambda m: m == 0 or abs(m) >= 1e-12)
# exact ties of the finest grid (odd / 2^32: half a step at c = 31) and of coarser ones
_tie = st.builds(lambda j, k: (2 * j + 1) / 2.0 ** k, st.integers(-(2**20), 2**20),
                 st.integers(1, 40))


@settings(max_examples=200, deadline=None)
@given(ms=st.lists(st.one_of(_multiplier, _tie), min_size=1, max_size=12),
       max_bits=st.sampled_from([31, 30, 16]))
def test_dyadic_many_equals_dyadic(ms: list[float], max_bits: int) -> None:
    """The vectorised form gives the scalar function's (b, c) for every element, ties
    included (both round half to even)."""
    try:
        expected = [dyadic(m, max_bits=max_bits) for m in ms]
    except ValueError:  # some multiplier does not fit: both refuse
        with pytest.raises(ValueError):
            dyadic_many(torch.tensor(ms, dtype=torch.float64), max_bits=max_bits)
        return
    b, c = dyadic_many(torch.tensor(ms, dtype=torch.float64), max_bits=max_bits)
    assert list(zip(b.tolist(), c.tolist(), strict=True)) == expected


def test_dyadic_many_refuses_non_finite() -> None:
    with pytest.raises(ValueError):
        dyadic_many(torch.tensor([1.0, float("inf")]))


@settings(max_examples=100, deadline=None)
@given(
    m=st.floats(min_value=1e-6, max_value=4.0),
    acc=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=16),
)
def test_dyadic_requantize_rounds_half_up(m: float, acc: list[int]) -> None:
    b, c = dyadic(m)
    out = dyadic_requantize(torch.tensor(acc), torch.tensor(b), torch.tensor(c))
    for a, o in zip(acc, out.tolist(), strict=True):
        exact = Fraction(a * b, 2**c)
        assert o == math.floor(exact + Fraction(1, 2))  # round half towards +inf
