"""Native CPU matmul kernels (rwkv_jax/cpu_kernels.py + native/qmatvec.cc) vs float64 numpy.

The first use compiles the C++ source (~10-30 s on 2 cores, cached in ~/.cache/rwkv_jax/native
or $RWKV_JAX_CACHE/native); everything after that is fast.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from jax import lax

from rwkv_jax import cpu_kernels, quant
from rwkv_jax.errors import RwkvJaxError

FORMATS = [quant.FORMATS[int(getattr(quant, name).GGML_TYPE)] for name in cpu_kernels.FIELDS]
DENSE = {quant.F32, quant.F16, quant.BF16}


@pytest.fixture
def _native():
    """Skip where the kernels cannot be built (the build runs here, not at collection)."""
    if not cpu_kernels.available():
        pytest.skip(f"native CPU kernels: {cpu_kernels.reason()}")


native = pytest.mark.usefixtures("_native")


def _shape(cls: type[quant.Weight], out: int = 37) -> tuple[int, int]:
    """(out, in) with several blocks per row (dense: an in that is not a multiple of 16)."""
    return (out, {quant.QK_K: 512, 32: 96, 1: 71}[cls.BLOCK_ELEMS])


def _raw(cls: type[quant.Weight], shape, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes with finite fp16 scales |v| in [1e-4, 1]; dense: normal(0, 1) values."""
    out, n_in = shape
    if cls in DENSE:
        dtype = {quant.F32: np.float32, quant.F16: np.float16, quant.BF16: ml_dtypes.bfloat16}
        return rng.standard_normal(shape).astype(dtype[cls]).reshape(-1).view(np.uint8)
    raw = rng.integers(0, 256, out * cls.row_bytes(n_in), dtype=np.uint8)
    rec = raw.view(cls.BLOCK)  # [out * nb] records sharing raw's bytes
    for f in cls.BLOCK.names:
        if cls.BLOCK[f] == np.float16:
            mag = 10.0 ** rng.uniform(-4, 0, rec.shape)
            rec[f] = (rng.choice([-1.0, 1.0], rec.shape) * mag).astype(np.float16)
    return raw


def _weight(cls: type[quant.Weight], shape, seed: int) -> tuple[quant.Weight, np.ndarray]:
    """A packed weight and its values per gguf-py (float64 [out, in])."""
    raw = _raw(cls, shape, np.random.default_rng(seed))
    deq = gguf_dequantize(raw.reshape(shape[0], -1), cls.GGML_TYPE)
    return cls.from_raw(raw, shape), deq.astype(np.float64)


def _assert_dot_close(got, x: np.ndarray, deq: np.ndarray) -> None:
    """got = x @ deq.T within the float32 dot-product error bound of tests/test_quant.py."""
    want = x.astype(np.float64) @ deq.T
    # Any order of n f32 multiply-adds has |err| <= gamma_n * sum|x_i w_i|, gamma_n =
    # n*u/(1-n*u), u = 2^-24 (Higham, Thm 3.1), plus the final rounding; the kernels use the
    # exact f32 weight values, so nothing else contributes.
    n, u = x.shape[-1], 2.0**-24
    bound = n * u / (1 - n * u) * (np.abs(x) @ np.abs(deq).T) + u * np.abs(want)
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    bad = ~(np.abs(got - want) <= bound)
    assert not bad.any(), f"{bad.sum()} outside the bound, first at {np.argwhere(bad)[0]}"


_matmul = jax.jit(cpu_kernels.matmul)


def test_available_where_expected():
    """With a C++ compiler, jax.ffi and RWKV_JAX_NATIVE unset, the kernels must build and load."""
    import os

    if os.environ.get("RWKV_JAX_NATIVE", "1") == "0":
        pytest.skip("disabled by RWKV_JAX_NATIVE=0")
    if cpu_kernels._compiler() is None or cpu_kernels._ffi() is None:
        pytest.skip(f"no compiler or jax.ffi here: {cpu_kernels.reason()}")
    assert cpu_kernels.available(), cpu_kernels.reason()
    assert cpu_kernels.reason() == "ok" and "isa=" in cpu_kernels.info()


@native
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_matmul_matches_numpy(cls, rows):
    """Every format, 1 / 3 / 17 activation rows (17: two 8-row passes and a remainder)."""
    shape = _shape(cls)
    w, deq = _weight(cls, shape, seed=int(cls.GGML_TYPE))
    x = np.random.default_rng(rows).standard_normal((rows, shape[1])).astype(np.float32)
    assert cpu_kernels.supports(w)
    _assert_dot_close(_matmul(w, x), x, deq)


@native
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
def test_identity_rows_give_ggml_values_exactly(cls):
    """x = I gives y = Wᵀ bit for bit: each weight is dequantized to exactly ggml's float32.

    One nonzero product 1*w per output plus sums of zeros, so any deviation is a wrong value.
    M = in (512 rows for K-quants) also runs the many-row path (8-row passes over row tiles).
    """
    shape = _shape(cls)
    w, deq = _weight(cls, shape, seed=50 + int(cls.GGML_TYPE))
    got = np.asarray(_matmul(w, jnp.eye(shape[1], dtype=jnp.float32)))
    np.testing.assert_array_equal(got, deq.T.astype(np.float32))


@native
@pytest.mark.parametrize(
    "cls, out, rows",
    [
        (quant.Q4_K, 1, 1),  # a single output
        (quant.Q4_K, 17, 20),  # out not a multiple of 16 (reduction groups), M > 8
        (quant.Q6_K, 1000, 1),  # large enough to be split between threads, odd split
        (quant.Q8_0, 999, 2),
        (quant.F16, 1001, 1),
        (quant.Q4_0, 33, 9),
    ],
)
def test_odd_shapes(cls, out, rows):
    """Outputs that do not divide into the thread split or 16-row groups; out = 1."""
    shape = _shape(cls, out)
    w, deq = _weight(cls, shape, seed=out)
    x = np.random.default_rng(out).standard_normal((rows, shape[1])).astype(np.float32)
    _assert_dot_close(_matmul(w, x), x, deq)


@native
@pytest.mark.parametrize(
    "cls, shape",
    [
        (quant.F32, (64, 768)),  # the 0.1b's LoRA downs and ups: two chunks of rows, one per
        (quant.F32, (768, 64)),  # thread (for_rows, kChunkMacs)
        (quant.F16, (32, 768)),  # 32 rows: two chunks of 16
        (quant.F16, (768, 128)),  # four chunks
        (quant.F16, (48, 768)),  # three chunks of 16 rows (the step rounds down to 16)
    ],
)
def test_small_calls_split_between_threads(cls, shape):
    """Calls from 2^16 multiply-adds take the pool in one or two chunks per thread: every row
    is computed once (a row missed or written by the wrong chunk breaks the dot bound)."""
    w, deq = _weight(cls, shape, seed=shape[0] + shape[1])
    x = np.random.default_rng(shape[0]).standard_normal((1, shape[1])).astype(np.float32)
    _assert_dot_close(_matmul(w, x), x, deq)


def _q4k_parts(raw: np.ndarray, out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """|dl_j q| and ml_j per element of a Q4_K weight (float64 [out, in]), exact."""
    deq = gguf_dequantize(raw.reshape(out, -1), quant.Q4_K.GGML_TYPE).astype(np.float64)
    rec = raw.view(quant.Q4_K.BLOCK).reshape(out, -1)  # [out, nb]
    sc, mn = (np.asarray(a, np.float64) for a in quant._scale_min_k4(jnp.asarray(rec["scales"])))
    ml = rec["dmin"].astype(np.float64)[..., None] * mn  # [out, nb, 8]
    ml = np.repeat(ml, 32, axis=-1).reshape(out, n_in)
    return np.abs(deq + ml), ml


def _x_digit_error(x: np.ndarray) -> np.ndarray:
    """Per element, how far x_int16_digits' x^ may be from x (float64, x's shape): 2^(e_j - 1)
    with e_j = max(E_j, -100) - 26 and max |x| over the 32-value sub-block < 2^E_j."""
    m = np.abs(x.astype(np.float64)).reshape(*x.shape[:-1], -1, 32).max(axis=-1)
    e = np.maximum(np.where(m > 0, np.frexp(m)[1], -100), -100) - 26  # frexp: m < 2^E
    return np.repeat(np.ldexp(1.0, e - 1), 32, axis=-1)


def _int16_x(cls: type[quant.Weight]) -> bool:
    """Whether this build's one-row kernel for cls takes x as int16 digits (AVX2 Q4_K, Q6_K)."""
    return f"{cls.__name__.lower()}_int16_x=1" in cpu_kernels.info().split()


def _one_row_case(cls: type[quant.Weight], out: int, n_in: int, seed: int):
    """(raw block bytes, their values per gguf-py as float64 [out, in], the packed weight, one
    standard-normal float32 activation row [1, in]), all from one generator."""
    rng = np.random.default_rng(seed)
    raw = _raw(cls, (out, n_in), rng)
    deq = gguf_dequantize(raw.reshape(out, -1), cls.GGML_TYPE).astype(np.float64)
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    return raw, deq, cls.from_raw(raw, (out, n_in)), x


@native
@pytest.mark.parametrize("out, n_in", [(17, 512), (1000, 768)])
def test_q4k_one_row_factored(out, n_in):
    """Q4_K at one activation row takes the factored kernel (AVX-512, AVX2): per sub-block j,
    dl_j * sum(q x) - ml_j * sum(x). Same weight values, another rounding: any order of these
    n + 2 roundings per term stays within gamma_{n+2} * sum (|dl_j q| + |ml_j|) |x| (Higham,
    Thm 3.1), a bound on the parts instead of on |w| = |dl_j q - ml_j|; on AVX2 over x^ (x as
    int16 digits, test_one_row_x_digits) plus sum |dl_j q| |x^ - x|. out = 17: a 16-row
    lane sum and a lone row; out = 1000: split between threads."""
    raw, deq, w, x = _one_row_case(quant.Q4_K, out, n_in, seed=out)
    dlq, ml = _q4k_parts(raw, out, n_in)
    want = x.astype(np.float64) @ deq.T
    ex = _x_digit_error(x) if _int16_x(quant.Q4_K) else np.zeros(x.shape)
    n, u = n_in + 2, 2.0**-24
    ax = np.abs(x.astype(np.float64)) + ex
    bound = n * u / (1 - n * u) * (ax @ (dlq + np.abs(ml)).T) + ex @ dlq.T + u * np.abs(want)
    got = np.asarray(_matmul(w, x))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= bound)
    # rows 2.. take the 8-row passes (exact weight values): the same numbers up to rounding
    x3 = np.concatenate([x, x, x])
    np.testing.assert_allclose(np.asarray(_matmul(w, x3))[0], got[0], rtol=1e-4, atol=1e-4)


def _q6k_parts(raw: np.ndarray, out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """|dl_s| and q (0..63) per element of a Q6_K weight (float64 [out, in]), exact."""
    deq = gguf_dequantize(raw.reshape(out, -1), quant.Q6_K.GGML_TYPE).astype(np.float64)
    rec = raw.view(quant.Q6_K.BLOCK).reshape(out, -1)  # [out, nb]
    dl = rec["d"].astype(np.float64)[..., None] * rec["scales"]  # [out, nb, 16], exact
    dl = np.repeat(dl, 16, axis=-1).reshape(out, n_in)  # per element
    # q - 32 = w / dl exactly (an integer quotient of exact values); dl = 0 leaves w = 0
    q = np.divide(deq, dl, out=np.zeros_like(deq), where=dl != 0) + 32
    return np.abs(dl), q


@native
@pytest.mark.parametrize("cls", [quant.Q4_K, quant.Q6_K], ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", ["outliers", "tiny", "zeros", "huge", "inf", "nan"])
def test_one_row_x_digits(cls, case):
    """The AVX2 one-row Q4_K / Q6_K kernels hold x as x^ = 2^e_j (4096 hi + lo) per 32 values
    (x_int16_digits): |x^ - x| <= 2^(e_j - 1) <= max(2^-26 max_j |x|, 2^-127), then exact
    integer sums. The result stays within the factored kernel's bound computed on |x| + that
    error, plus sum |dl q| * that error (test_q4k_one_row_factored, test_q6k_one_row_factored)
    — over activations with a wide range inside each group (one value 1e4 times the rest), tiny
    ones (the -100 clamp: subnormals included), all-zero groups and values near the float32
    limit. Infinite or NaN x take the float path and give what numpy does. Other builds (float32
    x throughout): the bound without that term."""
    out, n_in = 300, 512
    raw, deq, w, x = _one_row_case(cls, out, n_in, seed=7)
    if case == "outliers":
        x[0, ::32] *= 1e4
    elif case == "tiny":
        x[0, :256] *= np.float32(1e-39)  # subnormal float32
        x[0, 256:] *= np.float32(1e-32)
    elif case == "zeros":
        x[0, 64:192] = 0.0
    elif case == "huge":
        x *= np.float32(1e30)  # products with the weights stay finite
    elif case == "inf":
        x[0, 5] = np.inf
    else:
        x[0, 300] = np.nan
    got = np.asarray(_matmul(w, x))
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(np.float64) @ deq.T
    if case in ("inf", "nan"):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)].astype(np.float32))
        return
    int16_x = _int16_x(cls)
    if cls is quant.Q4_K:
        dlq, ml = _q4k_parts(raw, out, n_in)
        parts, digit_part = dlq + np.abs(ml), dlq
    else:
        dl, q = _q6k_parts(raw, out, n_in)
        parts, digit_part = dl * (q + (32 if int16_x else 160)), dl * q
    ex = _x_digit_error(x) if int16_x else np.zeros(x.shape)
    n, u = n_in + 2, 2.0**-24
    ax = np.abs(x.astype(np.float64)) + ex
    bound = n * u / (1 - n * u) * (ax @ parts.T) + ex @ digit_part.T + u * np.abs(want)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    bad = ~(np.abs(got - want) <= bound)
    assert not bad.any(), f"{bad.sum()} outside the bound, first at {np.argwhere(bad)[0]}"


@native
@pytest.mark.parametrize("out, n_in", [(17, 512), (1000, 768), (40, 3072)])
def test_q6k_one_row_factored(out, n_in):
    """Q6_K at one activation row takes the factored kernel (AVX-512 BW, AVX2). AVX-512: q placed
    under the exponent of 1.0 is f = 1 + q/64, so per 16-value sub-block s, dl_s * sum((q - 32)
    x) = 64 dl_s * sum(f x) - 96 dl_s * sum(x); any order of these n + 2 roundings per term
    stays within gamma_{n+2} * sum |dl_s| (q + 160) |x| (Higham, Thm 3.1), a bound on the parts
    64 dl_s f and 96 dl_s instead of on |w| = |dl_s (q - 32)|. AVX2: dl_s * sum(q x^) - 32 dl_s
    * sum(x) with x^ as int16 digits (test_one_row_x_digits): gamma_{n+2} * sum |dl_s| (q +
    32) (|x| + |x^ - x|) plus sum |dl_s| q |x^ - x|. out = 17: a 16-row lane sum and a lone
    row; 1000: split between threads; 3072: the FFN value shape (12 blocks per row)."""
    raw, deq, w, x = _one_row_case(quant.Q6_K, out, n_in, seed=out)
    dl, q = _q6k_parts(raw, out, n_in)
    want = x.astype(np.float64) @ deq.T
    n, u = n_in + 2, 2.0**-24
    gamma = n * u / (1 - n * u)
    if _int16_x(quant.Q6_K):
        ex = _x_digit_error(x)
        ax = np.abs(x.astype(np.float64)) + ex
        bound = gamma * (ax @ (dl * (q + 32)).T) + ex @ (dl * q).T
        bound += u * np.abs(want)
    else:
        bound = gamma * (np.abs(x) @ (dl * (q + 160)).T) + u * np.abs(want)
    got = np.asarray(_matmul(w, x))
    assert got.dtype == np.float32 and got.shape == want.shape
    bad = ~(np.abs(got - want) <= bound)
    assert not bad.any(), f"{bad.sum()} outside the bound, first at {np.argwhere(bad)[0]}"
    # rows 2.. take the 8-row passes (unfactored, the plain dot bound): the same numbers up to
    # both bounds, the factored one the larger
    x3 = np.concatenate([x, x, x])
    got3 = np.asarray(_matmul(w, x3))
    _assert_dot_close(got3, x3, deq)
    assert np.all(np.abs(got3[0] - got[0]) <= 2 * bound[0])


def _info_int(key: str) -> int:
    """A number from cpu_kernels.info() ('... tile_min_rows=8 tile_kc=4096 ...')."""
    fields = dict(kv.split("=", 1) for kv in cpu_kernels.info().split() if "=" in kv)
    return int(fields[key])


@native
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
def test_tiled_path_every_format(cls):
    """Many activation rows (the prefill path: dequantized tiles, blocked microkernel) for
    every format, with edge blocks in both directions (out = 37, M = tile_min_rows + 5);
    dense formats with in a multiple of 16 (the only ones the tiled path takes)."""
    out, n_in = _shape(cls)
    n_in = 96 if cls in DENSE else n_in
    w, deq = _weight(cls, (out, n_in), seed=70 + int(cls.GGML_TYPE))
    rows = _info_int("tile_min_rows") + 5
    x = np.random.default_rng(7).standard_normal((rows, n_in)).astype(np.float32)
    _assert_dot_close(_matmul(w, x), x, deq)


@native
@pytest.mark.parametrize(
    "cls, n_in, rows",
    [
        (quant.Q4_K, 1024, 8),  # rows 4 KiB apart: x is copied to padded rows first
        (quant.Q4_K, 256 * 17, 9),  # in > tile_kc: partial sums carried between input blocks
        (quant.F32, 4096 + 1024, 12),  # float32 rows used in place as the tile, two blocks
        (quant.Q6_K, 2048, 16),
    ],
)
def test_tiled_path_long_rows(cls, n_in, rows):
    """Long weight rows on the tiled path: padded activation rows, several input blocks."""
    assert n_in > _info_int("tile_kc") or n_in % 1024 == 0
    w, deq = _weight(cls, (20, n_in), seed=n_in)
    x = np.random.default_rng(n_in).standard_normal((rows, n_in)).astype(np.float32)
    _assert_dot_close(_matmul(w, x), x, deq)
    _assert_dot_close(_matmul(w, x[:1]), x[:1], deq)  # one row: the direct path, same bound


@native
def test_leading_axes_dtype_and_platform_dependent():
    """x [2, 3, in] in float16 -> float32 [2, 3, out] (x widened, exact weights); works as the
    cpu branch of lax.platform_dependent inside jit, as Weight.matmul will call it."""
    shape = _shape(quant.Q4_K, 40)
    w, deq = _weight(quant.Q4_K, shape, seed=3)
    x = np.random.default_rng(0).standard_normal((2, 3, shape[1])).astype(np.float16)

    @jax.jit
    def f(w, x):
        return lax.platform_dependent(
            x,
            cpu=lambda x: cpu_kernels.matmul(w, x),
            default=lambda x: w.matmul(x.astype(jnp.float32)),
        )

    got = f(w, jnp.asarray(x))
    assert got.shape == (2, 3, 40) and got.dtype == jnp.float32
    _assert_dot_close(np.asarray(got).reshape(6, 40), x.reshape(6, -1).astype(np.float32), deq)


@native
def test_stacked_weight_with_index():
    """A stack [L, ...] indexed inside lax.scan equals each weight alone; the index clamps."""
    shape = _shape(quant.Q4_K, 48)
    pairs = [_weight(quant.Q4_K, shape, seed=10 + i) for i in range(3)]
    ws = quant.stack([w for w, _ in pairs])
    assert cpu_kernels.supports(ws, stacked=True) and not cpu_kernels.supports(ws)
    x = np.random.default_rng(1).standard_normal((2, shape[1])).astype(np.float32)

    @jax.jit
    def per_layer(ws, x):
        return lax.scan(lambda c, i: (c, cpu_kernels.matmul(ws, x, index=i)), 0, jnp.arange(3))[1]

    ys = per_layer(ws, x)
    for (w, deq), y in zip(pairs, ys, strict=True):
        _assert_dot_close(y, x, deq)
        np.testing.assert_array_equal(y, _matmul(w, x))  # same kernel, same order
    # out-of-range indices clamp like a dynamic slice
    np.testing.assert_array_equal(_matmul(ws, x, -4), ys[0])
    np.testing.assert_array_equal(_matmul(ws, x, 7), ys[2])


@native
def test_vmap_over_activations():
    """vmap of the matmul over a batch of x runs one call per slice (vmap_method=sequential)."""
    shape = _shape(quant.Q8_0, 20)
    w, deq = _weight(quant.Q8_0, shape, seed=4)
    xs = np.random.default_rng(2).standard_normal((3, 2, shape[1])).astype(np.float32)
    got = jax.jit(jax.vmap(lambda x: cpu_kernels.matmul(w, x)))(xs)
    for x, y in zip(xs, got, strict=True):
        _assert_dot_close(y, x, deq)


@native
def test_unsupported_weights_are_refused_and_int8_bytes_accepted():
    """Field layouts the kernels do not know are refused (supports() False, matmul raises);
    uint8 fields viewed as int8 (quant.py's metal-safe storage) are the same bytes."""
    w, deq = _weight(quant.Q4_K, _shape(quant.Q4_K, 16), seed=5)
    fields = {"shape": w.shape, "d": w.d, "dmin": w.dmin, "scales": w.scales, "qs": w.qs}
    for bad in (
        quant.Q4_K(**{**fields, "d": w.d.astype(jnp.float32)}),  # wrong dtype
        quant.Q4_K(**{**fields, "scales": w.scales[..., :11]}),  # wrong per-block size
        quant.Q4_K(**{**fields, "qs": w.qs[:8]}),  # rows disagree with the shape
    ):
        assert not cpu_kernels.supports(bad)
        with pytest.raises(RwkvJaxError, match="cannot run"):
            cpu_kernels.matmul(bad, jnp.zeros((1, 512)))
    assert not cpu_kernels.supports(jnp.zeros((4, 4)))  # not a weight at all
    as_int8 = quant.Q4_K(**{**fields, "scales": w.scales.view(jnp.int8), "qs": w.qs.view(jnp.int8)})
    x = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    np.testing.assert_array_equal(_matmul(as_int8, x), _matmul(w, x))


def test_disabled_and_missing_compiler(monkeypatch):
    """RWKV_JAX_NATIVE=0 or no compiler: no library, and the reason says why (no exception)."""
    monkeypatch.setenv("RWKV_JAX_NATIVE", "0")
    state = cpu_kernels._load()
    assert state.lib is None and "RWKV_JAX_NATIVE=0" in state.reason
    monkeypatch.delenv("RWKV_JAX_NATIVE")
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    if cpu_kernels._ffi() is not None:
        state = cpu_kernels._load()
        assert state.lib is None and "no C++ compiler" in state.reason


@native
def test_build_is_cached():
    """A second build with the same source, compiler and CPU reuses the library (0 s)."""
    path, seconds = cpu_kernels._build(cpu_kernels._ffi())
    assert path.exists() and seconds == 0.0
    assert shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _host_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


# Builds other than the host's own (-march=native): a plain one (no arch flag: SSE2 on x86-64,
# the 16-lane vectors as 4 x 128 bit under GCC) and, where the CPU runs it, AVX2 without
# AVX-512 (2 x 256 bit, the AVX2 one-row kernels and 3 x 4 tile microkernel), which an
# AVX-512 host's own build never compiles. (arch flags, what info() must say, CPU flags needed)
OTHER_BUILDS = [
    ("", "v16=", set()),
    (
        "-mavx2 -mfma -mf16c",
        "isa=avx2 v16=2x256bit tile=3x4 q4k_factored=1 q4k_int16_x=1 q6k_factored=1",
        {"avx2", "fma", "f16c"},
    ),
]


@native
@pytest.mark.slow
@pytest.mark.parametrize("arch, info, needs", OTHER_BUILDS, ids=["plain", "avx2"])
def test_other_builds_pass_the_kernel_tests(arch, info, needs):
    """The kernel and per-head tests of this suite, run in a subprocess against another build
    (RWKV_JAX_NATIVE_ARCH): each vector width's code is checked where the host can run it, not
    only the host's own. Several minutes each (a build, then ~200 tests)."""
    if not needs <= _host_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - _host_flags())}")
    env = dict(os.environ, RWKV_JAX_NATIVE_ARCH=arch)
    root = Path(__file__).resolve().parent.parent
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rwkv_jax import cpu_kernels as c; print(c.info() or c.reason())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=root,
    )
    got = probe.stdout.split()
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert all(any(g.startswith(want) for g in got) for want in info.split()), probe.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-m",
            "not slow",
            "-p",
            "no:cacheprovider",
            "tests/test_cpu_kernels.py",
            "tests/test_cpu_time_mix.py",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=root,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@native
def test_direct_entry_point_matches_ffi():
    """rwkv_qmatvec_direct (the kernels without XLA, for profiling) computes the same numbers."""
    import ctypes

    shape = _shape(quant.Q6_K, 40)
    w, _ = _weight(quant.Q6_K, shape, seed=6)
    fields = [np.ascontiguousarray(getattr(w, n)) for n, _, _ in cpu_kernels.FIELDS["Q6_K"]]
    x = np.random.default_rng(3).standard_normal((3, shape[1])).astype(np.float32)
    y = np.zeros((3, shape[0]), np.float32)
    ptrs = (ctypes.c_void_p * len(fields))(*[f.ctypes.data for f in fields])
    lib = cpu_kernels._state().lib  # argtypes set at load
    rc = lib.rwkv_qmatvec_direct(b"Q6_K", x.ctypes.data, ptrs, 3, shape[1], shape[0], y.ctypes.data)
    assert rc == 0
    np.testing.assert_array_equal(y, _matmul(w, x))


# ---------------------------------------------------------------------------------------------
# bfloat16 activations: y = bf16(x) @ bf16(W)ᵀ accumulated in float32, W rounded to bfloat16 as
# XLA's dequantize(bfloat16) does (avx512_bf16: vdpbf16ps; elsewhere / `portable`: the float32
# kernels on the rounded values).


def _bf16(a) -> np.ndarray:
    """Round to bfloat16 (round-to-nearest-even, as XLA's convert), back as float64."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _assert_bf16_dot_close(got, xb: np.ndarray, deq: np.ndarray) -> None:
    """got = xb @ bf16(deq).T within the float32 summation bound.

    Each product of two bfloat16 values (8 significant bits each) is exact in float32 (16 <= 24
    bits), whether vdpbf16ps or an FMA forms it, so only the n additions round: any order has
    |err| <= gamma_n * sum|x_i w_i| (Higham, Thm 3.1), plus the final rounding u|y|. vdpbf16ps
    also treats subnormal inputs and results as zero; the data here (normal(0, 1) activations,
    |weights| >= ~1e-8) has none. A kernel using the unrounded float32 weights misses this
    reference by ~2^-9 |x||w| per term, far outside the bound (see test_bf16_rounding_is_exact).
    """
    w = _bf16(deq)
    x = np.asarray(xb, np.float64)
    want = x @ w.T
    n, u = x.shape[-1], 2.0**-24
    bound = n * u / (1 - n * u) * (np.abs(x) @ np.abs(w).T) + u * np.abs(want)
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    bad = ~(np.abs(got - want) <= bound)
    assert not bad.any(), f"{bad.sum()} outside the bound, first at {np.argwhere(bad)[0]}"


def _x_bf16(rows: int, n_in: int, seed: int) -> np.ndarray:
    """Activations [rows, n_in] as ml_dtypes.bfloat16."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, n_in)).astype(ml_dtypes.bfloat16)


def _direct(w: quant.Weight, x: np.ndarray, x_kind: int) -> np.ndarray:
    """rwkv_qmatvec_direct_x: the kernels without XLA; x_kind 0 float32, 1 bfloat16 (this
    build's path), 2 bfloat16 on the portable path."""
    import ctypes

    fmt = w.format_name
    fields = [np.ascontiguousarray(getattr(w, n)) for n, _, _ in cpu_kernels.FIELDS[fmt]]
    ptrs = (ctypes.c_void_p * len(fields))(*[f.ctypes.data for f in fields])
    x = np.ascontiguousarray(x if x_kind == 0 else x.view(np.uint16))
    m, n_in = x.shape
    y = np.full((m, w.shape[0]), np.nan, np.float32)
    lib = cpu_kernels._state().lib
    rc = lib.rwkv_qmatvec_direct_x(
        fmt.encode(), x_kind, x.ctypes.data, ptrs, m, n_in, w.shape[0], y.ctypes.data
    )
    assert rc == 0
    return y


@native
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("rows", [1, 2, 5, 13])
def test_bf16_matmul_matches_numpy(cls, rows):
    """Every format through the bfloat16 FFI target: 1, 2, 5 rows (the few-row kernels: 1-4
    rows per pass, 5 = 4 + 1) and 13 (the tiled path with edge blocks; out = 37). Dense
    formats: in = 96 (runs paired across blocks; tiles) at odd row counts, in = 71 (the
    portable path: in % 32 != 0) at 2 rows."""
    shape = _shape(cls)
    n_in = 96 if cls in DENSE and rows % 2 else shape[1]
    w, deq = _weight(cls, (shape[0], n_in), seed=90 + int(cls.GGML_TYPE))
    x = _x_bf16(rows, n_in, seed=rows)
    got = _matmul(w, jnp.asarray(x))
    _assert_bf16_dot_close(got, x, deq)


@native
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_bf16_portable_path_matches_numpy(cls, rows):
    """The portable bfloat16 path (what builds without avx512_bf16 run: the float32 kernels on
    the rounded weights), forced through the direct entry point, obeys the same bound."""
    shape = _shape(cls)
    w, deq = _weight(cls, shape, seed=110 + int(cls.GGML_TYPE))
    x = _x_bf16(rows, shape[1], seed=20 + rows)
    _assert_bf16_dot_close(_direct(w, x, 2), x, deq)
    _assert_bf16_dot_close(_direct(w, x, 1), x, deq)  # and this build's path, unjitted


@native
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
def test_bf16_rounding_is_exact(cls):
    """Identity activations give y = bf16(W)ᵀ bit for bit on both the tiled path (x = I, M = in)
    and the few-row path (4 identity rows per call): the weights are ggml's float32 values
    rounded to nearest even, exactly as XLA's dequantize(bfloat16). One nonzero product per
    output, so any other rounding (or none) shows."""
    out, n_in = _shape(cls, 21)
    n_in = 96 if cls in DENSE else n_in
    w, deq = _weight(cls, (out, n_in), seed=130 + int(cls.GGML_TYPE))
    want = _bf16(deq).T.astype(np.float32)  # [in, out]
    # the XLA bfloat16 dequantization agrees with this rounding (the reference the engine uses)
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.bfloat16), np.float32).T, want)
    eye = np.eye(n_in, dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(_matmul(w, jnp.asarray(eye))), want)
    rows = np.concatenate([_direct(w, eye[k : k + 4], 1) for k in range(0, n_in, 4)])
    np.testing.assert_array_equal(rows, want)


@native
@pytest.mark.parametrize(
    "cls, n_in, rows",
    [
        (quant.Q4_K, 2048, 8),  # bfloat16 rows 4 KiB apart: copied to padded rows first
        (quant.Q4_K, 256 * 17, 9),  # in > tile_kc: partial sums carried between input blocks
        (quant.Q6_K, 256 * 17, 16),
        (quant.F32, 4096 + 1024, 12),  # dense: tiles of rounded values, two input blocks
    ],
)
def test_bf16_tiled_long_rows(cls, n_in, rows):
    """Long weight rows on the bfloat16 tiled path: padded rows, several input blocks."""
    assert n_in > _info_int("tile_kc") or n_in % 2048 == 0
    w, deq = _weight(cls, (20, n_in), seed=n_in + 1)
    x = _x_bf16(rows, n_in, seed=n_in)
    _assert_bf16_dot_close(_matmul(w, jnp.asarray(x)), x, deq)
    _assert_bf16_dot_close(_matmul(w, jnp.asarray(x[:3])), x[:3], deq)  # the few-row path


@native
@pytest.mark.parametrize(
    "cls, out, n_in, rows",
    [
        (quant.F16, 768, 64, 24),  # a LoRA up-projection: whole 32-row panels, 3 x 8 rows
        (quant.F32, 37, 32, 9),  # a 5-row partial panel (masked lanes), 8 + 1 rows
        (quant.Q4_K, 50, 256, 13),  # a block format at the short-row limit, 8 + 5 rows
        (quant.Q8_0, 33, 128, 15),
    ],
)
def test_bf16_short_rows(cls, out, n_in, rows):
    """Many activation rows against short weight rows (in <= 256, bfloat16): the kernel with
    lanes along the outputs (transposed bfloat16 pairs, no lane sums), every edge case."""
    w, deq = _weight(cls, (out, n_in), seed=out + n_in)
    x = _x_bf16(rows, n_in, seed=rows)
    _assert_bf16_dot_close(_matmul(w, jnp.asarray(x)), x, deq)


@native
def test_bf16_threads_and_stack():
    """A weight large enough to be split between threads, read from a stack by index, and an
    out not a multiple of 16 (lane-sum groups); the Q6_K head shape class at one row."""
    shape = (1000, 512)
    pairs = [_weight(quant.Q6_K, shape, seed=140 + i) for i in range(2)]
    ws = quant.stack([w for w, _ in pairs])
    x = _x_bf16(1, 512, seed=5)
    for i, (_, deq) in enumerate(pairs):
        _assert_bf16_dot_close(_matmul(ws, jnp.asarray(x), i), x, deq)


@native
def test_bf16_model_step_matches_xla_bf16(synth_model, monkeypatch):
    """A whole bfloat16 prefill + decode step of the tiny Q4_K_M model (Q4_K and Q6_K matrices)
    with the native kernels against the XLA bfloat16 path (native kernels off, as with
    RWKV_JAX_NATIVE=0): the same bfloat16 products, summed in another order.

    Tolerance: each matmul output is rounded to bfloat16 (quant.Weight.matmul casts back to x's
    dtype), so a summation-order difference flips some roundings by one bfloat16 ulp (2^-8
    relative) and the flips propagate. Measured against the XLA path: max|Δlogit| 0.0625 (one
    bfloat16 ulp of a logit in [8, 16)), mean 0.008, argmax equal everywhere, logits sd 3.0; the
    float32 engine differs from the XLA bfloat16 path by mean 0.011. The bounds (max 0.25, mean
    0.02, argmax >= 90%) catch wiring errors (a wrong layer of the stack, format, dtype target or
    output row: differences of the logits' own size); the rounding of the weights themselves
    (mean 0.012 without it) is checked per matmul by test_bf16_rounding_is_exact.
    """
    import rwkv_jax

    path = synth_model("tiny", "Q4_K_M")
    ids = list(range(100, 124))

    def run():
        model = rwkv_jax.load(path, dtype="bfloat16")
        logits, state = model.forward(ids, all_logits=True)
        step, _ = model.step([7], state)
        return np.asarray(logits, np.float32)[0], np.asarray(step, np.float32)[0]

    jax.clear_caches()  # _cpu_native is decided while tracing
    native_p, native_s = run()
    monkeypatch.setattr(cpu_kernels, "supports", lambda *a, **k: False)
    jax.clear_caches()
    xla_p, xla_s = run()
    monkeypatch.undo()
    jax.clear_caches()
    for got, want in ((native_p, xla_p), (native_s, xla_s)):
        diff = np.abs(got - want)
        assert diff.max() <= 0.25 and diff.mean() <= 0.02, (diff.max(), diff.mean())
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
