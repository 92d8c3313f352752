"""Kernels against the NumPy oracle in naive.py: hand-computed cases, edge cases, random cases."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed import kernels as K
from tests import naive

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays
except ImportError:  # hypothesis is a test extra; the example-based tests still run without it
    given = None

F32 = np.float32


def rand(n, seed=0, dist="normal"):
    rng = np.random.default_rng(seed)
    if dist == "int":  # many ties, both signs, zeros
        return rng.integers(-3, 4, n).astype(F32)
    return rng.standard_normal(n).astype(F32)


# -- topk_abs -----------------------------------------------------------------------------------


def test_topk_hand_computed():
    x = np.array([0.5, -3.0, 2.0, 3.0, -0.0, 1.0], F32)
    idx, vals = K.topk_abs(x, 3)
    # |x| = .5 3 2 3 0 1: the two 3s (indices 1, 3) then 2 (index 2)
    assert idx.tolist() == [1, 2, 3] and vals.tolist() == [-3.0, 2.0, 3.0]
    # tie at the boundary: lower index wins
    idx, _ = K.topk_abs(np.array([1, -1, 1, 1], F32), 2)
    assert idx.tolist() == [0, 1]


@pytest.mark.parametrize(
    "n",
    [1, 2, 7, 100, 5000, 40_000, pytest.param(300_000, marks=pytest.mark.slow)],  # slow without JIT
)
@pytest.mark.parametrize("dist", ["normal", "int"])
def test_topk_matches_naive(n, dist):
    x = rand(n, seed=n, dist=dist)
    for k in sorted({0, 1, n // 100, n // 17, n // 2, n - 1, n}):
        if 0 <= k <= n:
            idx, vals = K.topk_abs(x, k)
            ref_idx, ref_vals = naive.topk_abs(x, k)
            assert idx.dtype == np.int64 and vals.dtype == F32
            np.testing.assert_array_equal(idx, ref_idx)
            np.testing.assert_array_equal(vals, ref_vals)


def test_topk_all_equal_and_negative():
    # all-equal defeats the sampled threshold (every element is a candidate): exact fallback
    x = np.full(100_000, -2.5, F32)
    idx, vals = K.topk_abs(x, 1000)
    np.testing.assert_array_equal(idx, np.arange(1000))
    assert (vals == -2.5).all()


def test_topk_errors():
    x = rand(10)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[3] = bad
        for k in (0, 1, 5, 10):
            with pytest.raises(ValueError, match="NaN or Inf"):
                K.topk_abs(y, k)
    y = np.zeros(100_000, F32)
    y[77_777] = np.nan  # in the fast path's candidate set
    with pytest.raises(ValueError, match="NaN or Inf"):
        K.topk_abs(y, 100)
    with pytest.raises(TypeError):
        K.topk_abs(x.astype(np.float64), 1)
    with pytest.raises(ValueError, match="contiguous"):
        K.topk_abs(np.zeros(20, F32)[::2], 1)
    with pytest.raises(ValueError, match="1-D"):
        K.topk_abs(np.zeros((2, 2), F32), 1)
    with pytest.raises(ValueError):
        K.topk_abs(x, 11)
    with pytest.raises(TypeError):
        K.topk_abs(x, 1.5)


# -- quantisers ---------------------------------------------------------------------------------


def test_uniform_hand_computed():
    # 2 bits, scale 1: levels -1, -1/3, 1/3, 1
    x = np.array([-1.0, -0.5, -0.2, 0.0, 0.2, 0.9, 5.0], F32)
    q = K.quantize_uniform(x, 2, 1.0)
    assert q.tolist() == [0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_allclose(
        K.dequantize_uniform(q, 2, 1.0), [-1, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1, 1], rtol=1e-6
    )
    assert K.quantize_uniform(x, 3, 0.0).tolist() == [0] * 7
    assert (K.dequantize_uniform(np.zeros(3, np.uint8), 3, 0.0) == 0).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("stochastic", [False, True])
def test_uniform_matches_naive_and_bound(bits, stochastic):
    x = rand(3000, seed=bits)
    scale = K.absmax(x)
    assert scale == np.abs(x).max()
    q = K.quantize_uniform(x, bits, scale, stochastic=stochastic, seed=42)
    np.testing.assert_array_equal(q, naive.quantize_uniform(x, bits, scale, stochastic, 42))
    d = K.dequantize_uniform(q, bits, scale)
    np.testing.assert_array_equal(d, naive.dequantize_uniform(q, bits, scale))
    step = 2 * scale / ((1 << bits) - 1)
    bound = step if stochastic else step / 2
    assert np.abs(d - x).max() <= bound * (1 + 1e-5)


def test_stochastic_rounding_unbiased_and_reproducible():
    x = np.linspace(-1, 1, 101).astype(F32)
    a = K.quantize_uniform(x, 2, 1.0, stochastic=True, seed=7)
    np.testing.assert_array_equal(a, K.quantize_uniform(x, 2, 1.0, stochastic=True, seed=7))
    assert not np.array_equal(a, K.quantize_uniform(x, 2, 1.0, stochastic=True, seed=8))
    # a prefix gets the same draws as the whole: counter-based, not a stream
    np.testing.assert_array_equal(a[:40], K.quantize_uniform(x[:40].copy(), 2, 1.0, stochastic=True, seed=7))
    mean = np.mean(
        [
            K.dequantize_uniform(K.quantize_uniform(x, 2, 1.0, stochastic=True, seed=s), 2, 1.0)
            for s in range(2000)
        ],
        axis=0,
    )
    # per-element std of the mean <= (2/3)/2/sqrt(2000) ~ 0.0075
    assert np.abs(mean - x).max() < 0.035


def test_sign():
    x = np.array([-2.0, -0.0, 0.0, 3.0], F32)
    q = K.quantize_sign(x)
    assert q.tolist() == [0, 1, 1, 1] == naive.quantize_sign(x).tolist()
    assert K.mean_abs(x) == pytest.approx(1.25)
    np.testing.assert_array_equal(K.dequantize_sign(q, 1.25), naive.dequantize_sign(q, 1.25))
    y = rand(10_001)
    assert K.mean_abs(y) == pytest.approx(float(np.abs(y.astype(np.float64)).mean()), rel=1e-12)


def test_median_hand_computed():
    v = np.array([0.1, -0.2, 0.4, 0.8, -0.9, 0.0, 0.3, -0.5], F32)
    # non-zero |v| sorted .1 .2 .3 .4 .5 .8 .9 -> lower median .4: keep .4 .8 -.9 -.5
    keep, sym, cb = K.quantize_median(v, 1)
    assert keep.tolist() == [False, False, True, True, True, False, False, True]
    # q = 1: one level per sign, the lower median: negatives (-.9, -.5) -> -.9; positives -> .4
    np.testing.assert_array_equal(cb, np.array([-0.9, 0.4], F32))
    assert sym[keep].tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("q", [1, 2, 3, 5])
@pytest.mark.parametrize("dist", ["normal", "int"])
def test_median_matches_naive(q, dist):
    v = rand(999, seed=q, dist=dist)
    for got, ref in zip(K.quantize_median(v, q), naive.quantize_median(v, q), strict=True):
        np.testing.assert_array_equal(got, ref)
    keep, sym, cb = K.quantize_median(np.zeros(5, F32), q)
    assert not keep.any() and (cb == 0).all()


def test_quantiser_errors():
    x = rand(10)
    x[0] = np.nan
    for fn in (
        lambda: K.quantize_uniform(x, 4, 1.0),
        lambda: K.quantize_sign(x),
        lambda: K.quantize_median(x, 2),
    ):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn()
    with pytest.raises(ValueError):
        K.quantize_uniform(rand(4), 9, 1.0)
    with pytest.raises(ValueError):
        K.quantize_uniform(rand(4), 4, float("inf"))
    with pytest.raises(TypeError):
        K.quantize_uniform(rand(4).astype(np.float64), 4, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        K.quantize_sign(rand(8)[::2])
    with pytest.raises(ValueError):
        K.dequantize_uniform(np.array([4], np.uint8), 2, 1.0)


# -- bit packing, gaps, Rice --------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_matches_naive(bits, n):
    q = np.random.default_rng(n).integers(0, 1 << bits, n).astype(np.uint8)
    packed = K.pack_bits(q, bits)
    np.testing.assert_array_equal(packed, naive.pack_bits(q, bits))
    assert packed.size == K.packed_size(n, bits)
    np.testing.assert_array_equal(K.unpack_bits(packed, bits, n), q)
    if bits == 1:
        np.testing.assert_array_equal(packed, np.packbits(q, bitorder="little"))


def test_pack_errors():
    with pytest.raises(ValueError, match="does not fit"):
        K.pack_bits(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError):
        K.unpack_bits(np.zeros(3, np.uint8), 4, 7)
    with pytest.raises(TypeError):
        K.pack_bits(np.array([1], np.int64), 2)


def test_gaps_and_rice():
    idx = np.array([0, 3, 4, 10, 99], np.int64)
    g = K.gaps_encode(idx, 100)
    assert g.tolist() == [0, 2, 0, 5, 88] == naive.gaps(idx).tolist()
    np.testing.assert_array_equal(K.gaps_decode(g, 100), idx)
    # r = 2: 0 -> "0 00", 2 -> "0 01", 5 -> "10 10" (LSB first)
    np.testing.assert_array_equal(K.rice_encode(g[:4], 2), naive.rice_encode(g[:4], 2))
    for seed, n, k in [(0, 1_000_000, 10_000), (1, 50, 50), (2, 1000, 1), (3, 10, 0)]:
        idx, _ = K.topk_abs(rand(n, seed), k)
        g = K.gaps_encode(idx, n)
        r = K.rice_parameter(g)
        coded = K.rice_encode(g, r)
        if k < 3000:
            np.testing.assert_array_equal(coded, naive.rice_encode(g, r))
        np.testing.assert_array_equal(K.gaps_decode(K.rice_decode(coded, r, k), n), idx)


def test_gaps_rice_errors():
    with pytest.raises(ValueError):
        K.gaps_encode(np.array([3, 3], np.int64), 10)
    with pytest.raises(ValueError):
        K.gaps_encode(np.array([10], np.int64), 10)
    with pytest.raises(ValueError):
        K.gaps_decode(np.array([5, 5], np.uint64), 10)
    with pytest.raises(ValueError):
        K.gaps_decode(np.array([2**64 - 1], np.uint64), 10)
    coded = K.rice_encode(np.array([5, 9, 1], np.uint64), 2)
    with pytest.raises(ValueError):
        K.rice_decode(coded[:-1], 2, 3)
    with pytest.raises(ValueError):
        K.rice_decode(np.concatenate([coded, np.zeros(1, np.uint8)]), 2, 3)
    with pytest.raises(ValueError):
        K.rice_decode(np.full(4, 255, np.uint8), 2, 1)


# -- property tests -----------------------------------------------------------------------------

if given is not None:
    finite = st.floats(-1e6, 1e6, width=32, allow_nan=False)

    @settings(max_examples=60, deadline=None)
    @given(arrays(F32, st.integers(1, 300), elements=finite), st.data())
    def test_topk_property(x, data):
        k = data.draw(st.integers(0, x.size))
        got, ref = K.topk_abs(x, k), naive.topk_abs(x, k)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])

    @settings(max_examples=40, deadline=None)
    @given(arrays(F32, st.integers(0, 200), elements=finite), st.integers(1, 8), st.booleans())
    def test_quantise_pack_property(x, bits, stochastic):
        scale = K.absmax(x)
        q = K.quantize_uniform(x, bits, scale, stochastic=stochastic, seed=5)
        np.testing.assert_array_equal(q, naive.quantize_uniform(x, bits, scale, stochastic, 5))
        np.testing.assert_array_equal(K.unpack_bits(K.pack_bits(q, bits), bits, q.size), q)

    @settings(max_examples=40, deadline=None)
    @given(arrays(F32, st.integers(1, 200), elements=finite), st.integers(1, 4))
    def test_median_property(x, q):
        for got, ref in zip(K.quantize_median(x, q), naive.quantize_median(x, q), strict=True):
            np.testing.assert_array_equal(got, ref)


# -- fused quantise+pack, packed histogram ------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 17, 1001])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_pack_matches_two_step_and_naive(bits, n, stochastic):
    x = rand(n, seed=n + bits)
    for scale in (K.absmax(x), 0.5, 0.0):  # 0.5 clips the tails to the end levels
        for seed in (0, 7, 2**64 - 1):
            got = K.quantize_pack_uniform(x, bits, scale, stochastic=stochastic, seed=seed)
            two = K.pack_bits(K.quantize_uniform(x, bits, scale, stochastic=stochastic, seed=seed), bits)
            assert got.dtype == np.uint8 and got.size == K.packed_size(n, bits)
            np.testing.assert_array_equal(got, two)
            if n <= 17 or seed == 7:
                np.testing.assert_array_equal(
                    got, naive.quantize_pack_uniform(x, bits, scale, stochastic, seed)
                )
            if not stochastic:
                break  # the seed only matters for stochastic rounding


def test_quantize_pack_large_and_ties():
    # a size past every unrolled block, and values on the rounding boundaries (ties, clipping)
    x = np.concatenate([rand(100_003, seed=3), np.linspace(-1.5, 1.5, 4097).astype(F32)])
    for bits in range(1, 9):
        for stochastic in (False, True):
            np.testing.assert_array_equal(
                K.quantize_pack_uniform(x, bits, 1.0, stochastic=stochastic, seed=11),
                K.pack_bits(K.quantize_uniform(x, bits, 1.0, stochastic=stochastic, seed=11), bits),
            )


def test_quantize_pack_errors():
    for bad in (np.nan, np.inf, -np.inf):
        for pos in (0, 5, 16):  # inside a whole unit and in the tail
            x = rand(17)
            x[pos] = bad
            for bits in (1, 3, 4, 8):
                with pytest.raises(ValueError, match="NaN or Inf"):
                    K.quantize_pack_uniform(x, bits, 1.0)
    with pytest.raises(ValueError):
        K.quantize_pack_uniform(rand(4), 9, 1.0)
    with pytest.raises(ValueError):
        K.quantize_pack_uniform(rand(4), 4, float("nan"))
    with pytest.raises(ValueError):
        K.quantize_pack_uniform(rand(4), 4, -1.0)
    with pytest.raises(TypeError):
        K.quantize_pack_uniform(rand(4).astype(np.float64), 4, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        K.quantize_pack_uniform(rand(8)[::2], 4, 1.0)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1001])
def test_pack_one_bit_equals_numpy(n):
    q = np.random.default_rng(n).integers(0, 2, n + 3).astype(np.uint8)
    for view in (q[:n], q[3:]):  # the second starts off an 8-byte boundary
        np.testing.assert_array_equal(K.pack_bits(view, 1), np.packbits(view, bitorder="little"))
    for bad_at in range(min(n, 17)):
        for bad in (2, 3, 128, 255):
            b = q[:n].copy()
            b[bad_at] = bad
            with pytest.raises(ValueError, match="does not fit"):
                K.pack_bits(b, 1)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 9, 1001])
def test_packed_counts_matches_naive(bits, n):
    q = np.random.default_rng(n + 10 * bits).integers(0, 1 << bits, n).astype(np.uint8)
    packed = K.pack_bits(q, bits)
    got = K.packed_counts(packed, bits, n)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.bincount(q, minlength=1 << bits))
    if n <= 9:
        np.testing.assert_array_equal(got, naive.packed_counts(packed, bits, n))
    with pytest.raises(ValueError):
        K.packed_counts(packed, bits, n + 8)


if given is not None:

    @settings(max_examples=40, deadline=None)
    @given(
        arrays(F32, st.integers(0, 200), elements=st.floats(-1e6, 1e6, width=32)),
        st.integers(1, 8),
        st.booleans(),
        st.integers(0, 2**64 - 1),
    )
    def test_quantize_pack_property(x, bits, stochastic, seed):
        scale = K.absmax(x)
        got = K.quantize_pack_uniform(x, bits, scale, stochastic=stochastic, seed=seed)
        np.testing.assert_array_equal(got, naive.quantize_pack_uniform(x, bits, scale, stochastic, seed))


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [1, 5, 8])
def test_quantize_below_float32_normal_range(bits, stochastic):
    """A scale near float32's smallest normal (found by hypothesis): the inverse step overflows;
    every symbol is 0 in the kernel and the reference alike, instead of NaN cast to a byte."""
    x = np.full(5, -1.1754944e-38, np.float32)
    x[1] = 1.1754944e-38
    scale = K.absmax(x)
    got = K.quantize_pack_uniform(x, bits, scale, stochastic=stochastic, seed=3)
    np.testing.assert_array_equal(got, naive.quantize_pack_uniform(x, bits, scale, stochastic, 3))
    if ((1 << bits) - 1) / (2.0 * float(scale)) > np.finfo(np.float32).max:  # overflowing grids: all 0
        assert not got.any()
        assert not K.quantize_uniform(x, bits, scale, stochastic=stochastic, seed=3).any()
