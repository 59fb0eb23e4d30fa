"""Pallas decode matvecs (rwkv_jax/gpu_kernels.py): numbers in Pallas' interpreter on the CPU,
and the Triton lowering for CUDA (lowered here, not run: no GPU on CI)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from rwkv_jax import backends, gpu_kernels, quant
from tests.jaxprs import equations
from tests.test_quant import _bound_matrix, _random_raw, _reference

KERNEL_FORMATS = [quant.Q4_K, quant.Q6_K]


@pytest.fixture(params=["bytes", "words"])
def layout(request):
    """Weights built in the test store their quants as bytes (default profile) or as uint32
    words (the gpu profile: integer dot products for bf16 x at <= MAX_ROWS rows)."""
    before = backends.requested_profile()
    backends.set_profile("gpu" if request.param == "words" else "default")
    yield request.param
    backends.set_profile(before)


def _x_scales(x: np.ndarray, cls) -> np.ndarray:
    """_split_plane's s per element of x [rows, n] (sub-blocks of 32 values for Q4_K, 16 for
    Q6_K): 2^(e + 1) for the exponent e of max|x| / 127 in float32, within [2^-99, 2^122]."""
    block = 32 if cls is quant.Q4_K else 16
    rows, n = x.shape
    amax = np.abs(x.astype(np.float32)).reshape(rows, n // block, block).max(-1)
    _, e = np.frexp(amax * np.float32(1 / 127))  # y = m 2^e, m in [0.5, 1): s = 2^e
    s = np.ldexp(1.0, np.clip(np.where(amax > 0, e, -99), -99, 122))  # 0: the smallest s
    return np.repeat(s, block, axis=-1)


@pytest.mark.parametrize("cls", KERNEL_FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("rows", "split", "tile"), [(1, 1, 16), (3, 1, 32), (4, 2, 16), (2, 5, 16)]
)
@pytest.mark.parametrize("factored", [False, True], ids=["elementwise", "factored"])
@pytest.mark.parametrize("x_dtype", [np.float32, jnp.bfloat16], ids=["x_f32", "x_bf16"])
def test_matvec_matches_float64(cls, rows, split, tile, factored, x_dtype, layout):
    """Kernel vs float64 x @ deq^T, within the float32 summation bound of its own terms (both
    accumulations: the factored one never forms a value, so it also differs from ggml's rounded
    values by <= u |value x| per term — inside the same 2n-term bound). Quants as words with
    bf16 x take the integer dot products: x is then held as w s / 256 with |x - w s / 256| <=
    s / 512 (s: _split_plane's scale of its sub-block), which adds at most sum |terms| s / 512."""
    rng = np.random.default_rng(700 + rows + 10 * split + int(cls.GGML_TYPE))
    shape = (64, 1280)  # 5 super-blocks per row: split 2 falls back to 1, split 5 is one each
    raw = _random_raw(cls, shape, rng)
    deq = _reference(cls, raw, shape).astype(np.float64)
    w = cls.from_raw(raw, shape)
    # x in its own dtype and layout: the kernel picks each plane and widens it to float32
    x = rng.standard_normal((rows, shape[1])).astype(x_dtype)
    got = np.asarray(
        gpu_kernels.matmul(
            w, jnp.asarray(x), interpret=True, split=split, block_rows=tile, factored=factored
        )
    )
    x = x.astype(np.float32)
    want = x.astype(np.float64) @ deq.T
    # float32 products and sums of n terms (two per element for Q4_K's scale and offset parts):
    # |error| <= 2n u/(1 - 2n u) * sum |terms| + u |result| (Higham's bound for a sum; u = 2^-24)
    n, u = 2 * shape[1], 2.0**-24
    terms = _bound_matrix(cls, raw, shape).T
    ints = layout == "words" and x_dtype == jnp.bfloat16
    err_x = _x_scales(x, cls) / 512 if ints else 0 * x  # the integer planes' rounding of x
    # the float32 terms now multiply x's integer value: |x| + err_x bounds it
    bound = n * u / (1 - n * u) * ((np.abs(x) + err_x) @ terms) + u * np.abs(want)
    bound = bound + err_x @ terms
    assert got.shape == (rows, shape[0]) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound)
    if ints:  # the x term is the bound that matters, and it is not vacuous
        assert np.all(err_x @ terms < 1e-3 * (np.abs(x) @ terms))


@pytest.mark.parametrize("cls", KERNEL_FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("rows", "split"), [(5, 1), (16, 5), (64, 2), (40, None)])
def test_mma_matches_rounded_weights(cls, rows, split, layout):
    """Tensor-core path (bf16 x, > MAX_ROWS rows): the XLA path's numbers — weights rounded to
    bf16, float32 accumulation — against float64 on the same rounded values. split None: the
    launch's own choice of parts (_mma_parts at 64 padded rows)."""
    rng = np.random.default_rng(800 + rows + (split or 0) + int(cls.GGML_TYPE))
    shape = (64, 1280)
    raw = _random_raw(cls, shape, rng)
    deq = _reference(cls, raw, shape)
    w_b = deq.astype(jnp.bfloat16).astype(np.float64)
    x = rng.standard_normal((rows, shape[1])).astype(jnp.bfloat16)
    w = cls.from_raw(raw, shape)
    got = np.asarray(gpu_kernels.matmul(w, jnp.asarray(x), interpret=True, split=split))
    xd = x.astype(np.float64)
    want = xd @ w_b.T
    # float32 accumulation of n products: n u sum|terms| (u = 2^-24); plus, where the kernel's
    # float32 value of a weight (d*sc*q - dmin*mn, possibly one FMA) differs from gguf's by an
    # ulp and rounds to the other bf16 neighbour, one bf16 ulp (2^-8 relative) of that term
    n, u = shape[1], 2.0**-24
    bound = n * u * (np.abs(xd) @ np.abs(w_b).T) + 2.0**-8 * (np.abs(xd) @ np.abs(deq).T)
    assert got.shape == (rows, shape[0]) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound)
    # and typically far tighter: a layout slip would be O(1), a rounding slip rare
    rel = np.abs(got - want) / (np.abs(xd) @ np.abs(w_b).T)
    assert np.median(rel) < 1e-5


def test_mma_parts():
    """Split-K parts of the tensor-core kernel at the 2.9b's decode matrices: from MMA_WIDE_M
    rows the fewest giving MMA_PROGRAMS programs (or all super-blocks), below it MMA_SPLIT."""
    P = gpu_kernels.MMA_PROGRAMS
    # (super-blocks per row, row tiles of 64): r/k/v grouped, output, FFN key, FFN value, head
    for nb, tiles in [(10, 120), (10, 40), (10, 160), (40, 40), (10, 1024)]:
        wide = gpu_kernels._mma_parts(nb, tiles, 64)
        assert nb % wide == 0 and (tiles * wide >= P or wide == nb)
        assert wide == 1 or tiles * (max(p for p in range(1, wide) if nb % p == 0)) < P
        assert gpu_kernels._mma_parts(nb, tiles, 16) == gpu_kernels._parts(
            nb, gpu_kernels.MMA_SPLIT
        )
    assert gpu_kernels._mma_parts(10, 1024, 64) == 1  # the head: programs enough without a split


@pytest.mark.parametrize("cls", KERNEL_FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("rows", "stacked"), [(1, True), (3, False), (16, True), (8, False)])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16], ids=["x_f32", "x_bf16"])
def test_group_equals_separate_products(cls, rows, stacked, x_dtype, layout):
    """Three products in one launch (matmul_group) give exactly the three separate launches'
    results: each program runs one group's loads and arithmetic."""
    rng = np.random.default_rng(950 + rows + int(stacked) + int(cls.GGML_TYPE))
    shape = (48, 768)  # 16-row tiles, 3 row tiles per group
    dtype = jnp.bfloat16 if rows > gpu_kernels.MAX_ROWS else x_dtype
    xs = [jnp.asarray(rng.standard_normal((rows, shape[1])), dtype) for _ in range(3)]
    if stacked:  # layer 1 of three stacks of two layers each
        stacks = [
            quant.stack([cls.from_raw(_random_raw(cls, shape, rng), shape) for _ in range(2)])
            for _ in range(3)
        ]
        layer = jnp.int32(1)
        got = gpu_kernels.matmul_group(stacks, xs, layer=layer, interpret=True, split=2)
        want = [
            gpu_kernels.matmul(w, x, layer=layer, interpret=True, split=2)
            for w, x in zip(stacks, xs, strict=True)
        ]
    else:
        ws = [cls.from_raw(_random_raw(cls, shape, rng), shape) for _ in range(3)]
        got = gpu_kernels.matmul_group(ws, xs, interpret=True, split=2)
        want = [
            gpu_kernels.matmul(w, x, interpret=True, split=2) for w, x in zip(ws, xs, strict=True)
        ]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert not np.array_equal(np.asarray(got[0]), np.asarray(got[1]))  # groups kept apart


def test_group_needs_one_format_and_shape():
    """A group mixing shapes (or formats) is refused, not silently mis-read."""
    rng = np.random.default_rng(12)
    a = quant.Q4_K.from_raw(_random_raw(quant.Q4_K, (32, 256), rng), (32, 256))
    b = quant.Q4_K.from_raw(_random_raw(quant.Q4_K, (64, 256), rng), (64, 256))
    x = jnp.ones((1, 256), jnp.float32)
    with pytest.raises(ValueError, match="one format and shape"):
        gpu_kernels.matmul_group([a, b], [x, x], interpret=True)


def test_matvec_keeps_leading_axes_and_row_tiles():
    """[B, T, in] activations come back [B, T, out]; out = 48 takes 16-row tiles."""
    rng = np.random.default_rng(5)
    shape = (48, 256)
    raw = _random_raw(quant.Q4_K, shape, rng)
    w = quant.Q4_K.from_raw(raw, shape)
    x = rng.standard_normal((2, 1, 256)).astype(np.float32)
    got = np.asarray(gpu_kernels.matmul(w, jnp.asarray(x), interpret=True))
    want = x.astype(np.float64) @ _reference(quant.Q4_K, raw, shape).astype(np.float64).T
    assert got.shape == (2, 1, 48)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("cls", KERNEL_FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("rows", "split"), [(2, 1), (4, 5), (16, 2)])
def test_stacked_layer_equals_its_slice(cls, rows, split, layout):
    """Layer i read in place from a stack (`layer=i`) gives exactly the unstacked layer's
    result: the same loads and arithmetic at an offset."""
    rng = np.random.default_rng(900 + rows + split + int(cls.GGML_TYPE))
    shape = (64, 1280)
    ws = [cls.from_raw(_random_raw(cls, shape, rng), shape) for _ in range(3)]
    stack = quant.stack(ws)
    dtype = jnp.bfloat16 if rows > gpu_kernels.MAX_ROWS or layout == "words" else jnp.float32
    x = jnp.asarray(rng.standard_normal((rows, shape[1])), dtype)
    for i in range(3):
        kw = dict(interpret=True, split=split)
        got = gpu_kernels.matmul(stack, x, layer=jnp.int32(i), **kw)
        want = gpu_kernels.matmul(ws[i], x, **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_supports():
    """Only Q4_K/Q6_K, unstacked, few rows, rows divisible by 16, whole super-blocks."""
    rng = np.random.default_rng(6)

    def make(cls, shape):
        return cls.from_raw(_random_raw(cls, shape, rng), shape)

    w = make(quant.Q4_K, (64, 512))
    assert gpu_kernels.supports(w, 1) and gpu_kernels.supports(w, gpu_kernels.MAX_ROWS)
    assert not gpu_kernels.supports(w, 0)
    assert gpu_kernels.supports(w, 8) and gpu_kernels.supports(w, gpu_kernels.MMA_MAX_ROWS)
    assert not gpu_kernels.supports(w, 8, jnp.float32)  # tensor cores: bf16/f16 only
    assert not gpu_kernels.supports(w, gpu_kernels.MMA_MAX_ROWS + 1)
    assert not gpu_kernels.supports(make(quant.Q4_K, (24, 256)), 2)  # 24 rows: no 16-row tile
    assert not gpu_kernels.supports(make(quant.Q8_0, (32, 256)), 2)
    assert not gpu_kernels.supports(quant.stack([w, w]), 2)


@pytest.mark.parametrize("cls", KERNEL_FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("rows", "split", "factored", "x_dtype"),
    # bf16 at every row count; float32 where the float32-accumulator kernels take it (<= 4 rows)
    [(r, sp, f, jnp.bfloat16) for r, sp, f in [(1, 1, 0), (3, 4, 0), (8, 4, 0), (64, 1, 0)]]
    + [(r, sp, f, jnp.bfloat16) for r, sp, f in [(1, 2, 1), (4, 1, 1)]]
    + [(1, 1, 0, jnp.float32), (3, 4, 0, jnp.float32), (1, 2, 1, jnp.float32)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_lowers_to_triton_for_cuda(cls, rows, split, factored, x_dtype, layout):
    """The kernels pass Pallas' Triton lowering (power-of-two tensors, supported ops) for CUDA;
    over words with bf16 x at <= MAX_ROWS rows the integer path's dp4a is in the kernel."""
    shape = (2560, 1024)
    w = cls.from_raw(_random_raw(cls, shape, np.random.default_rng(7)), shape)
    x = jnp.ones((rows, shape[1]), x_dtype)
    f = jax.jit(lambda w, x: gpu_kernels.matmul(w, x, split=split, factored=bool(factored)))
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(f, platforms=["cuda"], disabled_checks=allow)(w, x).mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 1
    ints = layout == "words" and x_dtype == jnp.bfloat16 and rows <= gpu_kernels.MAX_ROWS
    assert ("dp4a" in text) == ints
    # the tensor-core kernel (more rows) is pipelined MMA_STAGES deep, the others NUM_STAGES
    assert gpu_kernels.MMA_STAGES != gpu_kernels.NUM_STAGES  # else this tells nothing
    mma = rows > gpu_kernels.MAX_ROWS
    stages = gpu_kernels.MMA_STAGES if mma else gpu_kernels.NUM_STAGES
    call = [ln for ln in text.splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert f"num_stages = {stages} : i32" in call[0]


@pytest.mark.parametrize("rows", [3, 16])
def test_stacked_layer_lowers_to_triton_reading_the_stack(rows):
    """A LayerOf matmul on CUDA passes the whole [L, ...] fields to one Triton call (no slice of
    the layer is made for it), with the layer index as its first operand."""
    shape = (256, 512)
    rng = np.random.default_rng(10)
    stack = quant.stack(
        [quant.Q4_K.from_raw(_random_raw(quant.Q4_K, shape, rng), shape) for _ in range(3)]
    )
    x = jnp.ones((rows, shape[1]), jnp.bfloat16)
    f = jax.jit(lambda w, i, x: gpu_kernels.matmul(w, x, layer=i))
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(f, platforms=["cuda"], disabled_checks=allow)(
        stack, jnp.int32(1), x
    ).mlir_module()
    call = [ln for ln in text.splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert len(call) == 1
    assert "tensor<3x256x2x2x2x32xui8>" in call[0]  # qs [L, out, nb, 2, 2, 32]: whole stack
    assert "dynamic_slice" not in text


def test_decode_takes_the_kernel_on_cuda_only(monkeypatch):
    """On a GPU host, 2 rows through Weight.matmul lower to the Triton call for CUDA only."""
    monkeypatch.setattr(quant, "_cpu_native", lambda w: False)  # as jax.default_backend() != cpu
    shape = (64, 512)
    w = quant.Q4_K.from_raw(_random_raw(quant.Q4_K, shape, np.random.default_rng(8)), shape)
    x = jnp.ones((2, shape[1]), jnp.float32)
    f = jax.jit(lambda w, x: w.matmul(x))
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    cuda = export.export(f, platforms=["cuda"], disabled_checks=allow)(w, x).mlir_module()
    assert "__gpu$xla.gpu.triton" in cuda
    assert "triton" not in f.lower(w, x).as_text()


def test_layer_of_takes_the_stacked_kernel_on_cuda(monkeypatch):
    """quant.LayerOf (the scan over stacked layers) hands the kernel the whole stack on CUDA and
    equals the sliced layer's matmul elsewhere."""
    monkeypatch.setattr(quant, "_cpu_native", lambda w: False)  # as jax.default_backend() != cpu
    shape = (64, 512)
    rng = np.random.default_rng(11)
    ws = [quant.Q6_K.from_raw(_random_raw(quant.Q6_K, shape, rng), shape) for _ in range(2)]
    stack = quant.stack(ws)
    x = jnp.asarray(rng.standard_normal((2, shape[1])), jnp.float32)
    f = jax.jit(lambda w, i, x: quant.LayerOf(jax.tree.map(lambda a: a[i], w), w, i).matmul(x))
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    cuda = export.export(f, platforms=["cuda"], disabled_checks=allow)(stack, jnp.int32(1), x)
    call = [ln for ln in cuda.mlir_module().splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert len(call) == 1 and "tensor<2x64x2x2x2x2x16xui8>" in call[0]  # ql, whole stack
    got = f(stack, jnp.int32(1), x)
    want = jax.jit(lambda w, x: w.matmul(x))(ws[1], x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_quant_group_is_one_launch_on_cuda(monkeypatch):
    """quant.matmul_group: three alike LayerOf matrices lower to one Triton call for CUDA (three
    calls when one differs in shape: then each pair takes its own); off CUDA it is the separate
    matmuls, bit for bit."""
    monkeypatch.setattr(quant, "_cpu_native", lambda w: False)  # as jax.default_backend() != cpu
    rng = np.random.default_rng(13)

    def stack(shape):
        return quant.stack(
            [quant.Q4_K.from_raw(_random_raw(quant.Q4_K, shape, rng), shape) for _ in range(2)]
        )

    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.float32)
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for shapes, calls in [([(64, 512)] * 3, 1), ([(64, 512), (64, 512), (32, 512)], 3)]:
        stacks = [stack(s) for s in shapes]

        def f(stacks, i, x):
            of = [quant.LayerOf(jax.tree.map(lambda a: a[i], w), w, i) for w in stacks]
            return quant.matmul_group([(w, x) for w in of])

        text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=allow)(
            stacks, jnp.int32(1), x
        )
        assert text.mlir_module().count("__gpu$xla.gpu.triton") == calls
        got = jax.jit(f)(stacks, jnp.int32(1), x)
        want = [
            jax.jit(lambda w, x: w.matmul(x))(jax.tree.map(lambda a: a[1], w), x) for w in stacks
        ]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_tensor_core_path_needs_a_capable_card(monkeypatch):
    """bf16 tensor cores need sm_80+ (f16: sm_70+); older cards keep the XLA dot for > 4 rows."""
    shape = (64, 512)
    w = quant.Q4_K.from_raw(_random_raw(quant.Q4_K, shape, np.random.default_rng(9)), shape)

    class Card:
        def __init__(self, cc: str):
            self.compute_capability = cc

    monkeypatch.setattr(jax, "devices", lambda *a: [Card("7.5")])
    assert not gpu_kernels.supports(w, 8, jnp.bfloat16)
    assert gpu_kernels.supports(w, 8, jnp.float16)
    assert gpu_kernels.supports(w, 2, jnp.bfloat16)  # float32 FMAs run on any card
    monkeypatch.setattr(jax, "devices", lambda *a: [Card("9.0")])
    assert gpu_kernels.supports(w, 8, jnp.bfloat16)


def test_split_plane_holds_x():
    """_split_plane: x per sub-block as s / 256 * (256 hi + lo), within s / 512 everywhere and
    exact for every bfloat16 value >= s / 2; float32 sums; an inf or NaN makes its sub-block's
    scale NaN and leaves the others alone; a zero sub-block is all zeros."""
    rng = np.random.default_rng(30)
    # 12 sub-blocks of 32 values [12, 8 words, 4 bytes], magnitudes 1e-30 .. 1e30, one zero
    mag = 10.0 ** rng.uniform(-30, 30, (12, 1, 1))
    x = (rng.standard_normal((12, 8, 4)) * mag).astype(jnp.bfloat16).astype(np.float32)
    x[3] = 0.0
    x[5, 2, 1] = 127.0 * 2.0**-20  # max|x| / 127 a power of two: s is twice it
    hi, lo, scale, total = (np.asarray(a) for a in gpu_kernels._split_plane(jnp.asarray(x)))
    assert hi.shape == lo.shape == (12, 8) and scale.shape == total.shape == (12, 1)

    def unpack(words, signed):
        b = (words[..., None].astype(np.int64) >> (8 * np.arange(4))) & 0xFF
        return np.where(b > 127, b - 256, b) if signed else b

    w = 256 * unpack(hi, True) + unpack(lo, False)  # [12, 8, 4]
    s = _x_scales(x.reshape(1, -1), quant.Q4_K).reshape(12, 32)[:, :1]  # per sub-block
    np.testing.assert_array_equal(scale, (s / 256).astype(np.float32))
    held = scale[:, :, None].astype(np.float64) * w
    err = np.abs(held - x)
    assert np.all(err <= scale[:, :, None] / 2)
    big = np.abs(x) >= s[:, :, None] / 2
    assert big.sum() > 200 and np.all(err[big] == 0)
    assert np.all(w[3] == 0) and np.all(np.abs(w) <= 256 * 127)
    np.testing.assert_allclose(total[:, 0], x.reshape(12, -1).sum(-1), rtol=1e-6)
    for bad in (np.inf, np.nan):
        y = x.copy()
        y[7, 0, 0] = bad
        sc = np.asarray(gpu_kernels._split_plane(jnp.asarray(y))[2])
        assert np.isnan(sc[7, 0]) and np.array_equal(np.delete(sc, 7, 0), np.delete(scale, 7, 0))


def test_dot4_interpreted_sums_byte_products():
    """_dot4 in Pallas' interpreter (the CUDA kernel runs dp4a twice): per word, the sum over
    its bytes of q_b (unsigned) * (256 hi_b (signed) + lo_b (unsigned)), in int32."""
    rng = np.random.default_rng(31)
    q, hi, lo = (rng.integers(0, 2**32, (5, 7), dtype=np.uint64) for _ in range(3))

    def b(words, signed=False):
        v = (words[..., None] >> (8 * np.arange(4, dtype=np.uint64))) & 0xFF
        v = v.astype(np.int64)
        return np.where(v > 127, v - 256, v) if signed else v

    q = q & 0x3F3F3F3F  # 6-bit quants at most (Q6_K)
    want = np.sum(b(q) * (256 * b(hi, True) + b(lo)), axis=-1)
    got = gpu_kernels._dot4(
        *(jnp.asarray(a.astype(np.uint32).view(np.int32)) for a in (q, hi, lo)), True
    )
    np.testing.assert_array_equal(np.asarray(got), want)


def test_decode_over_words_matches_xla(cuda_branch, decode_steps, synth_model):
    """A bf16 model loaded under the gpu profile (quants as words) decodes through the one-row
    integer-dot kernel (interpreted: the product whose partial sums the prologue kernel takes)
    as XLA's path over the same words does: the
    two differ by float32 summation and x's 16-bit integer values (~1e-5 of a product), and
    where that moves a bf16 rounding by an ulp (2^-8) it travels on: bounds of 3% of the
    logits' largest and KL < 1e-3 with the top token kept (seen: 0.47% and KL 3.7e-4). A plane
    or byte mixed up anywhere in the kernel's layout moves them by far more."""
    import rwkv_jax

    before = backends.requested_profile()
    backends.set_profile("gpu")
    try:
        m = rwkv_jax.load(synth_model("tiny", "Q4_K_M"), stack_layers=True, dtype="bfloat16")
        qs = m.params.blocks.receptance.qs  # a Q4_K receptance: its quants as words
        assert np.dtype(qs.dtype) == np.uint32
        toks = jnp.asarray(np.random.default_rng(3).integers(0, m.config.vocab_size, (3, 1)))
        want, _ = decode_steps(m, toks.astype(jnp.int32))
        from rwkv_jax import gpu_mix

        # the prologue kernels take the output product's partial sums at one row
        calls = cuda_branch([(gpu_mix, "mix_prologue", lambda a, kw: "mix")], grouped=True)
        jax.clear_caches()
        got, _ = decode_steps(m, toks.astype(jnp.int32))
        jax.clear_caches()
    finally:
        backends.set_profile(before)
    # a one-row product over words ran (its partial sums handed on)
    assert any(c[0] == "partials" for c in calls if isinstance(c, tuple))
    want, got = want.astype(np.float64)[:, 0], got.astype(np.float64)[:, 0]
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    assert np.array_equal(got.argmax(-1), want.argmax(-1))

    def logp(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    kl = (np.exp(logp(want)) * (logp(want) - logp(got))).sum(-1)
    assert kl.max() < 1e-3


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=["x_bf16", "x_f32"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("out", [32, 2560])
def test_integer_path_splits_long_rows_into_int_split_parts(x_dtype, rows, out, layout):
    """Rows of a 40-super-block matrix (the FFN value's shape) are split into INT_SPLIT parts on
    the integer path (words, bf16 x), SPLIT parts on the float path; into INT_SPLIT_ONE_ROW at
    one row of Q4_K where the launch then takes row loops (2560 rows: 80 row tiles), not where
    it does not (32 rows: one tile)."""
    shape = (out, 40 * 256)
    w = quant.Q4_K.from_raw(np.zeros(out * 40 * 144, np.uint8), shape)
    x = jnp.ones((rows, shape[1]), x_dtype)
    got = jax.eval_shape(
        lambda w, x: gpu_kernels.matmul_group([w], [x], interpret=True, partials=True), w, x
    ).shape[1]
    ints = layout == "words" and x_dtype == jnp.bfloat16
    looped = rows == 1 and out == 2560
    int_split = gpu_kernels.INT_SPLIT_ONE_ROW if looped else gpu_kernels.INT_SPLIT
    split = int_split if ints else gpu_kernels.SPLIT
    assert gpu_kernels.INT_SPLIT != gpu_kernels.INT_SPLIT_ONE_ROW  # else this tells less
    assert gpu_kernels.INT_SPLIT != gpu_kernels.SPLIT
    assert got == gpu_kernels._parts(40, split)


@pytest.mark.parametrize("cls", KERNEL_FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layout", ["words"], indirect=True)
def test_integer_path_takes_every_row_at_once(cls, layout):
    """Over words with bf16 x, 2-4 rows go through each plane's dp4a call together: the kernel
    holds as many dp4a calls at 4 rows as at one (row by row it held 4x as many, and each added
    row cost about what the weights' unpacking does)."""
    shape = (2560, 256)
    w = cls.from_raw(_random_raw(cls, shape, np.random.default_rng(9)), shape)
    counts = []
    for rows in (1, 2, 4):
        x = jnp.ones((rows, shape[1]), jnp.bfloat16)
        names = [eqn.primitive.name for eqn in equations(jax.make_jaxpr(gpu_kernels.matmul)(w, x))]
        counts.append((names.count("pallas_call"), names.count("elementwise_inline_asm_p")))
    assert counts[0][1] > 0 and counts == [(1, counts[0][1])] * 3


def test_consumer_split_sets_the_parts(layout):
    """The parts a consumer of the partial sums asks for (gpu_time_mix.RKV_SPLIT for the r/k/v
    group) override the matvec's own: one row of a 10-super-block matrix (C x C at the 2.9b
    model) in 5 parts, not 10."""
    from rwkv_jax import gpu_time_mix

    shape = (32, 10 * 256)
    w = quant.Q4_K.from_raw(_random_raw(quant.Q4_K, shape, np.random.default_rng(4)), shape)
    x = jnp.ones((1, shape[1]), jnp.bfloat16)

    def parts(split):
        return jax.eval_shape(
            lambda w, x: gpu_kernels.matmul_group(
                [w], [x], interpret=True, partials=True, split=split
            ),
            w,
            x,
        ).shape[1]

    assert parts(None) == 10
    assert parts(gpu_time_mix.RKV_SPLIT) == 5


@pytest.mark.parametrize("cls", KERNEL_FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("rows", "stacked", "split"), [(1, True, 1), (1, False, 2), (3, True, 2)])
@pytest.mark.parametrize("layout", ["words"], indirect=True)
def test_integer_path_row_loop_equals_one_tile_per_program(cls, rows, stacked, split, layout):
    """Several tiles of rows per program on the integer path (row_loop: x's digits made once
    for all of them) give exactly one tile per program's results, with that many times fewer
    programs, over one super-block per program (split 2) or a loop over two (split 1); a loop
    the row tiles do not divide into falls back to one that does."""
    rng = np.random.default_rng(960 + rows + int(stacked) + int(cls.GGML_TYPE))
    shape = (64, 512)  # 16-row tiles: 4 per matrix
    ws = [cls.from_raw(_random_raw(cls, shape, rng), shape) for _ in range(2)]
    w, layer = (quant.stack(ws), jnp.int32(1)) if stacked else (ws[1], None)
    x = jnp.asarray(rng.standard_normal((rows, shape[1])), jnp.bfloat16)

    def run(loop):
        kw = dict(layer=layer, interpret=True, block_rows=16, split=split, row_loop=loop)
        f = lambda w, x: gpu_kernels.matmul(w, x, **kw)  # noqa: E731
        (call,) = [
            e for e in equations(jax.make_jaxpr(f)(w, x)) if e.primitive.name == "pallas_call"
        ]
        return np.asarray(f(w, x)), call.params["grid_mapping"].grid

    want, grid = run(1)
    assert grid == (4, split)
    for loop, programs in ((2, 2), (4, 1), (8, 1)):  # 8 does not divide 4 tiles: 4
        got, grid = run(loop)
        assert grid == (programs, split)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["words"], indirect=True)
def test_integer_path_default_row_loop(layout):
    """By default a program of the integer path takes INT_ROW_LOOP (row tile, super-block)
    pairs where the launch keeps INT_LOOP_PROGRAMS programs: at the 2.9b model's shapes 4 tiles
    of one super-block for the FFN key (3200 programs at one tile each) and the r/k/v group in
    10 parts, 2 tiles of two super-blocks for the group in 5 parts; one tile for the output
    matrix (800 programs) and more rows than one; the FFN value in INT_SPLIT_ONE_ROW = 20 parts
    (two super-blocks per program) and 2 tiles, as Q6_K in INT_SPLIT = 10 parts and one tile."""
    C, F = 2560, 10240

    def programs(shape, group=1, split=None, rows=1, cls=quant.Q4_K):
        n = shape[0] * shape[1] // 256 * cls.BLOCK.itemsize
        w = cls.from_raw(np.zeros(n, np.uint8), shape)
        x = jnp.ones((rows, shape[1]), jnp.bfloat16)
        jaxpr = jax.make_jaxpr(
            lambda w, x: gpu_kernels.matmul_group([w] * group, [x] * group, split=split)
        )(w, x)
        (call,) = [e for e in equations(jaxpr) if e.primitive.name == "pallas_call"]
        return math.prod(call.params["grid_mapping"].grid)

    assert gpu_kernels.INT_ROW_LOOP == 4  # the figures below
    assert programs((F, C)) == 320 * 10 // 4
    assert programs((C, C), group=3) == 240 * 10 // 4
    assert programs((C, C), group=3, split=5) == 240 * 5 // 2
    assert programs((C, C)) == 80 * 10
    assert gpu_kernels.INT_SPLIT_ONE_ROW == 20
    assert programs((C, F)) == 80 * 20 // 2
    assert programs((C, F), cls=quant.Q6_K) == 80 * 10
    assert programs((F, C), rows=2) == programs((F, C), rows=4) == 320 * 10
