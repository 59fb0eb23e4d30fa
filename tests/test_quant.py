"""Packed ggml formats (rwkv_jax.quant) against gguf-py's numpy dequantizers."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from rwkv_jax import quant
from rwkv_jax.errors import GGUFError, UnsupportedTypeError

# Exactness per format (jitted JAX vs gguf.quants.dequantize, float32, np.array_equal):
#   F32, F16, BF16  exact: a pure widening conversion (none for F32), NaN payloads aside.
#   Q4_0, Q5_0, Q8_0  exact: one product d * q of exact f32 operands, one rounding either side.
#   Q4_1, Q5_1  exact: d * q + m, same op order as gguf (round the product, then the sum); XLA
#     CPU and XLA GPU (checked on an H200) do not contract it into an FMA, which would round once
#     and could differ.
#   Q3_K, Q6_K  exact: (d * sc) rounded to f32 first, then * q — gguf's order.
#   Q2_K, Q4_K, Q5_K  exact: (d * sc) * q - (dmin * mn), each product rounded as gguf does.
# So every format is asserted bit-exact; no format needs the 1-ulp fallback.
ALL = list(quant.FORMATS.values())
DENSE = {quant.F32, quant.F16, quant.BF16}


@pytest.fixture(autouse=True)
def _strict_jax():
    """Run every test with strict rank and dtype promotion (house style)."""
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield


def _shapes(cls: type[quant.Weight]) -> list[tuple[int, int]]:
    """Multi-row test shapes: several blocks per row and more than one row."""
    if cls.BLOCK_ELEMS == quant.QK_K:
        return [(3, 512), (5, 256)]
    if cls.BLOCK_ELEMS == 32:
        return [(4, 64), (2, 96)]
    return [(4, 64), (3, 7)]


def _random_raw(cls: type[quant.Weight], shape, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes whose fp16 scale fields (d, m, dmin) are finite, |v| in [1e-4, 1]."""
    out, n_in = shape
    raw = rng.integers(0, 256, out * cls.row_bytes(n_in), dtype=np.uint8)
    if cls in DENSE:
        return raw  # every bit pattern, NaN/inf/subnormal included
    rec = raw.view(cls.BLOCK)  # [out * nb] records sharing raw's bytes
    for f in cls.BLOCK.names:
        if cls.BLOCK[f] == np.float16:
            mag = 10.0 ** rng.uniform(-4, 0, rec.shape)
            rec[f] = (rng.choice([-1.0, 1.0], rec.shape) * mag).astype(np.float16)
    return raw


def _finite_raw(cls: type[quant.Weight], shape, rng: np.random.Generator) -> np.ndarray:
    """Bytes with finite values everywhere (dense: normal(0,1) values; quant: _random_raw)."""
    if cls not in DENSE:
        return _random_raw(cls, shape, rng)
    dtype = {quant.F32: np.float32, quant.F16: np.float16, quant.BF16: ml_dtypes.bfloat16}[cls]
    return rng.standard_normal(shape).astype(dtype).reshape(-1).view(np.uint8)


def _reference(cls: type[quant.Weight], raw: np.ndarray, shape) -> np.ndarray:
    """gguf-py's dequantization of raw bytes -> float32 [out, in]."""
    ref = gguf_dequantize(raw.reshape(shape[0], -1), cls.GGML_TYPE)
    assert ref.shape == shape and ref.dtype == np.float32
    return ref


_dequantize = eqx.filter_jit(lambda w: w.dequantize())
_rows = eqx.filter_jit(lambda w, idx: w.rows(idx))
_matmul = eqx.filter_jit(lambda w, x: w.matmul(x))


def _bound_matrix(cls, raw: np.ndarray, shape) -> np.ndarray:
    """|terms| per weight element: |d*sc*q| + |dmin*mn| (Q4_K), |d*sc*(q-32)| (Q6_K) — what a
    kernel with the scales factored out of each sub-block's sum rounds against."""
    if cls is quant.Q6_K:
        return np.abs(_reference(cls, raw, shape)).astype(np.float64)
    # Q4_K value = d*sc*q - dmin*mn: with |d| and -|dmin| gguf's dequantization gives the sum
    # of both terms' magnitudes
    mag = raw.copy()
    rec = mag.view(cls.BLOCK)
    rec["d"] = np.abs(rec["d"])
    rec["dmin"] = -np.abs(rec["dmin"])
    return _reference(cls, mag, shape).astype(np.float64)


def _assert_exact(got, want) -> None:
    """Bit-exact float32 equality (NaN == NaN, since random dense bytes hold NaNs)."""
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    bad = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    assert not bad.any(), f"{bad.sum()} mismatches, first at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", ["random", "zeros"])
def test_dequantize_and_rows_match_gguf(cls, case):
    """dequantize() and rows() equal gguf.quants.dequantize bit for bit, eager and jitted."""
    rng = np.random.default_rng(int(cls.GGML_TYPE))
    for shape in _shapes(cls):
        raw = _random_raw(cls, shape, rng) if case == "random" else _zero_raw(cls, shape)
        ref = _reference(cls, raw, shape)
        w = cls.from_raw(raw, shape)
        _assert_exact(w.dequantize(), ref)  # eager: op by op
        _assert_exact(_dequantize(w), ref)  # jitted: fused, as the model runs it
        idx = np.array([shape[0] - 1, 0, 1, shape[0] - 1])
        _assert_exact(_rows(w, jnp.asarray(idx)), ref[idx])
        idx2 = idx.reshape(2, 2)  # any index shape, e.g. [batch, time] token ids
        _assert_exact(_rows(w, jnp.asarray(idx2)), ref[idx2])


def _zero_raw(cls: type[quant.Weight], shape) -> np.ndarray:
    """All-zero bytes (every scale and quant 0; Q3_K's clear hmask bits mean q2 - 4)."""
    return np.zeros(shape[0] * cls.row_bytes(shape[1]), np.uint8)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_matmul_matches_numpy(cls):
    """matmul(x) = x @ deq.T within the float32 dot-product error bound."""
    rng = np.random.default_rng(100 + int(cls.GGML_TYPE))
    shape = _shapes(cls)[0]
    raw = _finite_raw(cls, shape, rng)
    deq = _reference(cls, raw, shape).astype(np.float64)
    w = cls.from_raw(raw, shape)
    x = rng.standard_normal((2, 3, shape[1])).astype(np.float32)  # leading batch axes
    got = np.asarray(_matmul(w, jnp.asarray(x)))
    assert got.shape == (2, 3, shape[0]) and got.dtype == np.float32
    want = x.astype(np.float64) @ deq.T  # exact enough: float64 reference
    # Any order of n f32 multiply-adds has |err| <= gamma_n * sum|x_i w_i| with
    # gamma_n = n*u/(1-n*u), u = 2^-24 (Higham, Thm 3.1); plus the final rounding. The bound is
    # relative to |x| @ |W|^T rather than |y|, since sums with cancellation have no small rtol.
    n, u = shape[1], 2.0**-24
    bound = n * u / (1 - n * u) * (np.abs(x) @ np.abs(deq).T) + u * np.abs(want)
    assert np.all(np.abs(got - want) <= bound)


BLOCKED = [c for c in ALL if issubclass(c, quant._Blocked)]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_matvec_matches_numpy(cls, rows):
    """The GPU decode path (unpack-multiply-reduce), run here on the CPU: same error bound."""
    rng = np.random.default_rng(300 + int(cls.GGML_TYPE))
    shape = _shapes(cls)[0]
    raw = _finite_raw(cls, shape, rng)
    deq = _reference(cls, raw, shape).astype(np.float64)
    x = rng.standard_normal((rows, shape[1])).astype(np.float32)
    got = np.asarray(jax.jit(lambda w, x: w.matvec_fused(x))(cls.from_raw(raw, shape), x))
    want = x.astype(np.float64) @ deq.T
    n, u = shape[1], 2.0**-24  # as test_matmul_matches_numpy
    bound = n * u / (1 - n * u) * (np.abs(x) @ np.abs(deq).T) + u * np.abs(want)
    assert got.shape == (rows, shape[0]) and np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_dense_decode_matmul_on_cuda_is_a_reduction(rows, monkeypatch):
    """On CUDA a dense weight times <= MATVEC_MAX_ROWS rows lowers to multiply + reduce (no dot:
    XLA would copy a stacked layer's matrix out for its GEMM), more rows to a dot."""
    from jax import export

    monkeypatch.setattr(quant, "_cpu_native", lambda w: False)  # as jax.default_backend() != cpu
    w = quant.F16(shape=(64, 256), w=jnp.ones((64, 256), jnp.float16))
    x = jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16)
    f = jax.jit(lambda w, x: w.matmul(x))
    text = export.export(f, platforms=["cuda"])(w, x).mlir_module()
    fused = rows <= quant.MATVEC_MAX_ROWS
    assert ("dot_general" in text) != fused and ("stablehlo.reduce" in text) == fused


@pytest.mark.parametrize("rows", [4, 5])
def test_matmul_bf16_input_keeps_dtype(rows):
    """bf16 x gives a bf16 result of x @ W^T with f32 accumulation; above MATVEC_MAX_ROWS with
    W rounded to bf16 (the dot's operand), up to it with W's float32 values (every backend's
    decode: matvec_fused, the CUDA kernels, the CPU's float32 kernels)."""
    rng = np.random.default_rng(7)
    shape = (5, 256)
    raw = _random_raw(quant.Q4_K, shape, rng)
    deq = _reference(quant.Q4_K, raw, shape).astype(np.float64)
    x = rng.standard_normal((rows, 256)).astype(ml_dtypes.bfloat16)
    got = _matmul(quant.Q4_K.from_raw(raw, shape), jnp.asarray(x))
    assert got.dtype == jnp.bfloat16 and got.shape == (rows, 5)
    want = x.astype(np.float64) @ deq.T
    # W rounded to bf16 (rel. err <= 2^-8, bf16's unit roundoff with its 8-bit significand;
    # none up to MATVEC_MAX_ROWS), products and sums in f32 (gamma_n with u = 2^-24), the
    # result rounded to bf16 (<= 2^-8 |y|, plus the W error it carries). (This bound said 2^-9
    # before; the W term's slack hid it, and the float32 weights of few rows showed it.)
    # Up to MATVEC_MAX_ROWS the CPU's kernel factors each sub-block's scales out of its sum:
    # its float32 roundings are relative to the terms |d*sc*q| + |dmin*mn| (_bound_matrix).
    n, ub = shape[1], 2.0**-8
    few = rows <= quant.MATVEC_MAX_ROWS
    uw, mag = (0.0, _bound_matrix(quant.Q4_K, raw, shape)) if few else (ub, np.abs(deq))
    bound = (uw + n * 2.0**-24 * 1.01) * (np.abs(x.astype(np.float64)) @ mag.T) * (
        1 + ub
    ) + ub * np.abs(want)
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_few_bf16_rows_multiply_float32_weights_on_the_cpu(rows, monkeypatch):
    """CPU: up to MATVEC_MAX_ROWS bf16 rows take the float32 native kernel (x widened), more
    the bfloat16 one; without native kernels XLA's dot runs on float32 values, bit for bit
    what the widened product gives. (The metal-safe profile has neither branch: matvec_fused.)"""
    from rwkv_jax import backends, cpu_kernels

    if backends.current_profile().matvec != "platform":
        pytest.skip("this profile runs matvec_fused for few rows: no CPU branch to check")
    rng = np.random.default_rng(70 + rows)
    shape = (64, 512)
    w = quant.Q4_K.from_raw(_random_raw(quant.Q4_K, shape, rng), shape)
    x = jnp.asarray(rng.standard_normal((rows, shape[1])), jnp.bfloat16)
    few = rows <= quant.MATVEC_MAX_ROWS
    f = jax.jit(lambda w, x: w.matmul(x))
    if cpu_kernels.available():
        text = f.lower(w, x).as_text()
        assert ("rwkv_jax_qmatvec_Q4_K" in text) == few
        assert ("rwkv_jax_qmatvec_bf16_Q4_K" in text) != few
    monkeypatch.setattr(quant, "_cpu_native", lambda w: False)
    got = np.asarray(jax.jit(lambda w, x: w.matmul(x))(w, x), np.float32)
    wide = jax.jit(lambda w, x: w._matmul_xla(x.astype(jnp.float32)).astype(x.dtype))(w, x)
    rounded = jax.jit(lambda w, x: w._matmul_xla(x))(w, x)
    assert np.array_equal(got, np.asarray(wide if few else rounded, np.float32))
    assert not np.array_equal(np.asarray(wide, np.float32), np.asarray(rounded, np.float32))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_fields_layout(cls):
    """Fields are jax arrays named after the C struct; fp16 scales are float16; nbytes = raw."""
    shape = _shapes(cls)[0]
    out, nb = shape[0], shape[1] // cls.BLOCK_ELEMS
    raw = _random_raw(cls, shape, np.random.default_rng(1))
    w = cls.from_raw(raw, shape)
    assert w.shape == shape and w.nbytes == raw.size
    for name in cls.BLOCK.names:
        a = getattr(w, name)
        sub = cls.BLOCK[name]
        assert isinstance(a, jax.Array)
        assert a.shape == (out, nb, *sub.shape) if cls not in DENSE else a.shape == shape
        # e.g. Q4_K d float16 [out, nb], qs uint8 [out, nb, 128] (int8 under the metal-safe profile)
        assert a.dtype == quant.field_dtype(sub.base)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_from_readonly_memmap(cls, tmp_path):
    """from_raw accepts a read-only memmap slice and copies it (the file can go away)."""
    shape = _shapes(cls)[1]
    raw = _random_raw(cls, shape, np.random.default_rng(2))
    path = tmp_path / "t.bin"
    path.write_bytes(b"pad!" + raw.tobytes())  # 4 bytes in: the tensor starts mid-file
    mm = np.memmap(path, dtype=np.uint8, mode="r")[4:]  # an offset view, like a GGUF tensor
    w = cls.from_raw(mm, shape)
    del mm
    path.unlink()
    _assert_exact(_dequantize(w), _reference(cls, raw, shape))


def test_registry_and_block_info():
    """FORMATS covers exactly the 13 formats; block_info agrees with gguf and the structs."""
    names = {c.GGML_TYPE.name for c in quant.FORMATS.values()}
    assert names == {
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    }  # fmt: skip
    for t, cls in quant.FORMATS.items():
        assert t == int(cls.GGML_TYPE)
        assert quant.block_info(t) == (cls.BLOCK_ELEMS, cls.BLOCK.itemsize)
        assert quant.block_info(t) == GGML_QUANT_SIZES[cls.GGML_TYPE]
    # unsupported-but-known types still have sizes (a reader needs them to walk the file)
    assert quant.block_info(int(GGMLQuantizationType.IQ2_XXS)) == (256, 66)
    with pytest.raises(UnsupportedTypeError, match="999"):
        quant.block_info(999)


@pytest.mark.parametrize(
    ("ggml_type", "type_name"),
    [(16, "IQ2_XXS"), (int(GGMLQuantizationType.TQ1_0), "TQ1_0"), (9, "Q8_1"), (999, "unknown")],
)
def test_unsupported_type_error(ggml_type, type_name):
    """An unsupported type names the tensor, the type and the supported list, with a fix."""
    name = "blk.0.time_mix_key.weight"
    with pytest.raises(UnsupportedTypeError) as err:
        quant.weight_from_raw(np.zeros(66, np.uint8), ggml_type, (1, 256), name)
    msg = str(err.value)
    assert f"'{name}'" in msg and f"{type_name} ({ggml_type})" in msg
    assert "Q4_K" in msg and "re-quantize" in msg
    assert isinstance(err.value, GGUFError)


def test_bad_raw_errors():
    """Wrong byte counts and rows that are not whole blocks raise GGUFError naming the tensor."""
    t = int(GGMLQuantizationType.Q4_K)
    with pytest.raises(GGUFError, match=r"'blk\.1\.x' \(Q4_K, shape 2x256\) needs 288 bytes"):
        quant.weight_from_raw(np.zeros(287, np.uint8), t, (2, 256), "blk.1.x")
    with pytest.raises(GGUFError, match=r"'blk\.1\.x'.*row length 100.*block size 256"):
        quant.weight_from_raw(np.zeros(144, np.uint8), t, (1, 100), "blk.1.x")
    with pytest.raises(GGUFError, match="uint8"):
        quant.weight_from_raw(np.zeros(72, np.float32), t, (2, 256), "blk.1.x")
    w = quant.weight_from_raw(np.zeros(288, np.uint8), t, (2, 256), "blk.1.x")
    assert isinstance(w, quant.Q4_K)


@pytest.mark.parametrize("cls", [quant.Q4_K, quant.Q5_0, quant.BF16], ids=lambda c: c.__name__)
def test_stack(cls):
    """stack() adds a leading axis: dequantize/rows work batched, lax.scan slices it back."""
    rng = np.random.default_rng(3)
    shape = _shapes(cls)[1]
    raws = [_finite_raw(cls, shape, rng) for _ in range(3)]
    refs = np.stack([_reference(cls, r, shape) for r in raws])  # [3, out, in]
    ws = [cls.from_raw(r, shape) for r in raws]
    st = quant.stack(ws)
    assert type(st) is cls and st.nbytes == 3 * ws[0].nbytes
    _assert_exact(_dequantize(st), refs)
    idx = jnp.array([1, 0])
    _assert_exact(_rows(st, idx), refs[:, [1, 0]])

    x = jnp.asarray(rng.standard_normal((2, shape[1])).astype(np.float32))

    def body(carry, w):
        return carry, w.matmul(x)

    _, ys = jax.lax.scan(body, None, st)  # [3, 2, out]
    for i in range(3):
        assert np.array_equal(np.asarray(ys[i]), np.asarray(_matmul(ws[i], x)))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_from_raw_with_layer_axis(cls):
    """raw [L, out, row_bytes] gives the same pytree as stack() of the L single weights."""
    rng = np.random.default_rng(4)
    shape = _shapes(cls)[1]
    raws = [_random_raw(cls, shape, rng).reshape(shape[0], -1) for _ in range(2)]
    st = cls.from_raw(np.stack(raws), shape)
    ref = quant.stack([cls.from_raw(r, shape) for r in raws])
    assert jax.tree.structure(st) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    assert jax.tree.leaves(st)[0].ndim == cls.leaf_ndim() + 1  # one stacked axis
    with pytest.raises(GGUFError, match=r"\[\.\.\., "):
        cls.from_raw(np.stack(raws)[:, :-1], shape)  # one row short


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_dense_weight(dtype):
    """dense_weight wraps [..., out, in] values in the matching dense format, unchanged."""
    v = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4).astype(dtype)
    w = quant.dense_weight(v)
    assert w.shape == (3, 4) and w.dequantize(dtype).dtype == dtype
    assert w.format_name == {jnp.float32: "F32", jnp.float16: "F16", jnp.bfloat16: "BF16"}[dtype]
    assert np.array_equal(np.asarray(w.dequantize()), np.asarray(v, np.float32))
    with pytest.raises(ValueError, match="int32"):
        quant.dense_weight(jnp.zeros((2, 2), jnp.int32))


def test_stack_rejects_mismatches():
    """Different formats or shapes cannot be stacked."""
    a = quant.Q8_0.from_raw(np.zeros(2 * 34, np.uint8), (2, 32))
    b = quant.Q4_0.from_raw(np.zeros(2 * 18, np.uint8), (2, 32))
    c = quant.Q8_0.from_raw(np.zeros(34, np.uint8), (1, 32))
    with pytest.raises(ValueError, match="Q4_0"):
        quant.stack([a, b])
    with pytest.raises(ValueError, match=r"\(1, 32\)"):
        quant.stack([a, c])
    with pytest.raises(ValueError):
        quant.stack([])


@pytest.mark.parametrize("cls", [quant.Q4_K, quant.Q6_K], ids=lambda c: c.__name__)
def test_word_fields_decode_like_bytes(cls):
    """Under the gpu profile the quants (WORD_FIELDS) are little-endian uint32 words; every XLA
    path decodes them to what the bytes give: dequantize, rows, and the matmul, bit for bit."""
    from rwkv_jax import backends

    rng = np.random.default_rng(40)
    shape = (32, 512)
    raw = _random_raw(cls, shape, rng)
    x = jnp.asarray(rng.standard_normal((3, shape[1])), jnp.float32)
    idx = jnp.asarray([[3, 0], [31, 3]])
    before = backends.requested_profile()
    got = {}
    try:
        for prof in ("default", "gpu"):
            backends.set_profile(prof)
            w = cls.from_raw(raw, shape)
            dtypes = {np.dtype(getattr(w, f).dtype) for f in cls.WORD_FIELDS}
            assert dtypes == {np.dtype(np.uint32 if prof == "gpu" else np.uint8)}
            got[prof] = [
                np.asarray(a)
                for a in (
                    w.dequantize(),
                    w.rows(idx),
                    jax.jit(lambda w, x: w._matmul_xla(x))(w, x),
                    jax.jit(lambda w, x: w.matvec_fused(x))(w, x),
                )
            ]
    finally:
        backends.set_profile(before)
    for a, b in zip(got["default"], got["gpu"], strict=True):
        _assert_exact(b, a)
    _assert_exact(got["gpu"][0], _reference(cls, raw, shape))
