"""WKV-7 kernels (rwkv_jax/wkv.py) against a float64 numpy recurrence (spec §1.4 step 8, §5)."""

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.errors import InputError
from rwkv_jax.wkv import (
    cumulative_log_decay,
    forward_substitution,
    intra_chunk_matrices,
    triangular_solve,
    wkv7_chunk,
    wkv7_chunked,
    wkv7_sequential,
    wkv7_step,
)

DECAY_SCALE = 0.6065306597126334  # e^{-1/2}: ld = -DECAY_SCALE·σ(z)
B, H, N = 2, 2, 64  # small batch/heads, the real head size

# Error bound, relative to the reference's largest |value| (the state can grow to ~60 and y to
# ~300 when decay is ~1). Every output is a sum of N=64 fp32 products of a state that carries
# the rounding of all T earlier steps; decay ≤ 1 and I − a·kk kkᵀ are contractions, so old
# roundings (2^-24 ≈ 6e-8 each) are not amplified and add up like a random walk,
# ~sqrt(T·N)·6e-8 ≈ 1.5e-5 at T=1000. Measured: ≤ 1.5e-6 relative for the sequential and the
# chunked paths at every L, on CPU and on an H200. A wrong term (sign, old vs new state, a
# missing decay) gives errors of order 1.
RTOL = 2e-5

jit_sequential = jax.jit(wkv7_sequential)
jit_chunked = jax.jit(wkv7_chunked, static_argnames="chunk_size")
jit_chunk = jax.jit(wkv7_chunk)


@pytest.fixture(autouse=True)
def strict_jax() -> Iterator[None]:
    """Strict JAX in tests: no implicit rank or dtype promotion inside the kernels."""
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield


def reference_wkv7(
    S: np.ndarray, r: np.ndarray, k: np.ndarray, v: np.ndarray, alpha: np.ndarray,
    beta: np.ndarray, ld: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Float64 token-by-token WKV-7 (BlinkDL layout S[b,h,value,key]); inputs [B, T, H, N]."""
    S = S.astype(np.float64)
    ys = []
    for t in range(r.shape[1]):
        sa = np.einsum("bhij,bhj->bhi", S, alpha[:, t])  # old state, before decay
        S = (
            S * np.exp(ld[:, t])[:, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
            + sa[:, :, :, None] * beta[:, t, :, None, :]
        )
        ys.append(np.einsum("bhij,bhj->bhi", S, r[:, t]))  # new state
    return np.stack(ys, axis=1).reshape(r.shape), S


def make_inputs(seed: int, T: int, case: str = "random") -> list[np.ndarray]:
    """Realistic S0, r, k, v, alpha, beta, ld (float32 values held in float64 arrays)."""
    rng = np.random.default_rng(seed)
    shape = (B, T, H, N)
    r = rng.normal(0.0, 0.5, shape)
    k = rng.normal(0.0, 0.5, shape)
    v = rng.normal(0.0, 1.0, shape)
    kk = rng.normal(size=shape)
    a = rng.uniform(0.0, 1.0, shape)
    z = rng.normal(0.0, 2.0, shape)
    if case == "fast_decay":  # σ(z) ≈ 1: ld ≈ −0.6065 every step, the chunk exponents' worst case
        z = rng.normal(10.0, 1.0, shape)
    elif case == "no_decay":  # σ(z) ≈ 0: ld ≈ −4e-6, the state grows without forgetting
        z = rng.normal(-12.0, 1.0, shape)
    elif case == "repeated_kk":  # one kk for all steps, a ≈ 1 and no decay: M = I − Aab far from I
        kk = np.broadcast_to(kk[:, :1], shape).copy()
        a = rng.uniform(0.95, 1.0, shape)
        z = rng.normal(-12.0, 1.0, shape)
    else:
        assert case == "random", case
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)  # unit norm per head
    ld = -DECAY_SCALE / (1.0 + np.exp(-z))
    S0 = rng.normal(0.0, 1.0, (B, H, N, N))  # non-zero initial state
    # round through float32 so the JAX kernels and the float64 reference see identical inputs
    return [x.astype(np.float32).astype(np.float64) for x in (S0, r, k, v, -kk, kk * a, ld)]


def to_jax(xs: list[np.ndarray]) -> list[jax.Array]:
    """Float32 device copies."""
    return [jnp.asarray(x, jnp.float32) for x in xs]


def assert_close(got: jax.Array, ref: np.ndarray, what: str) -> float:
    """Assert max|got − ref| ≤ RTOL·max(1, max|ref|); return the measured max error."""
    err = float(np.max(np.abs(np.asarray(got, np.float64) - ref), initial=0.0))
    bound = RTOL * max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    assert err <= bound, f"{what}: max abs error {err:.3e} > bound {bound:.3e}"
    return err


@pytest.mark.parametrize("case", ["random", "fast_decay", "no_decay", "repeated_kk"])
def test_step_matches_reference(case: str) -> None:
    """wkv7_step on one token equals the float64 recurrence."""
    xs = make_inputs(1, 1, case)
    y_ref, S_ref = reference_wkv7(*xs)
    S0, *tok = to_jax(xs)
    y, S = jax.jit(wkv7_step)(S0, *(x[:, 0] for x in tok))
    assert y.shape == (B, H, N) and S.shape == (B, H, N, N)
    assert_close(y, y_ref[:, 0], "y")
    assert_close(S, S_ref, "S")


@pytest.mark.parametrize("case", ["random", "fast_decay", "no_decay", "repeated_kk"])
def test_sequential_matches_reference(case: str) -> None:
    """wkv7_sequential over 130 tokens equals the float64 recurrence."""
    xs = make_inputs(2, 130, case)
    y_ref, S_ref = reference_wkv7(*xs)
    y, S = jit_sequential(*to_jax(xs))
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert_close(y, y_ref, "y")
    assert_close(S, S_ref, "S")


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 63, 130])
def test_chunked_matches_reference(T: int, chunk_size: int) -> None:
    """wkv7_chunked for awkward lengths equals the float64 recurrence."""
    xs = make_inputs(100 + T, T)
    y_ref, S_ref = reference_wkv7(*xs)
    y, S = jit_chunked(*to_jax(xs), chunk_size=chunk_size)
    assert y.shape == (B, T, H, N)
    assert_close(y, y_ref, "y")
    assert_close(S, S_ref, "S")


@pytest.mark.parametrize("case", ["fast_decay", "no_decay", "repeated_kk"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunked_extreme_decay(case: str, chunk_size: int) -> None:
    """Decay at either end of its range (and a near-singular-looking M) stays accurate."""
    xs = make_inputs(3, 130, case)  # T=130 reuses a compiled shape
    y_ref, S_ref = reference_wkv7(*xs)
    y, S = jit_chunked(*to_jax(xs), chunk_size=chunk_size)
    assert_close(y, y_ref, "y")
    assert_close(S, S_ref, "S")


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("case", ["random", "no_decay"])
def test_chunked_long_sequence(case: str, chunk_size: int) -> None:
    """T=1000: errors do not grow with the number of chunks."""
    xs = make_inputs(4, 1000, case)
    y_ref, S_ref = reference_wkv7(*xs)
    y, S = jit_chunked(*to_jax(xs), chunk_size=chunk_size)
    assert_close(y, y_ref, "y")
    assert_close(S, S_ref, "S")


@pytest.mark.parametrize("L", [16, 32, 64])
def test_one_chunk_matches_reference(L: int) -> None:
    """wkv7_chunk on exactly L tokens equals the float64 recurrence."""
    xs = make_inputs(5, L, "fast_decay")
    y_ref, S_ref = reference_wkv7(*xs)
    y, S = jit_chunk(*to_jax(xs))
    assert_close(y, y_ref, "y")
    assert_close(S, S_ref, "S")


@pytest.mark.parametrize("solve", [forward_substitution, triangular_solve])
@pytest.mark.parametrize("case", ["random", "repeated_kk"])
def test_unit_lower_solvers(case: str, solve: object) -> None:
    """Both (I − Aab)⁻¹ paths (CPU/other: forward substitution; CUDA: trsm) match float64."""
    _, r, k, _, alpha, beta, ld = make_inputs(11, 64, case)
    # per-head [B, H, L, N] inputs give a realistic Aab [B, H, 64, 64]
    x = [jnp.asarray(np.swapaxes(t, 1, 2), jnp.float32) for t in (r, k, alpha, beta, ld)]
    G, G_hat = cumulative_log_decay(x[4])
    Aab = intra_chunk_matrices(x[0], x[1], x[2], x[3], G, G_hat)[3]
    rhs = jnp.asarray(np.random.default_rng(12).normal(size=(B, H, 64, 2 * N)), jnp.float32)
    X = jax.jit(solve)(Aab, rhs)  # type: ignore[arg-type]
    M = np.eye(64) - np.asarray(Aab, np.float64)
    X_ref = np.linalg.solve(M, np.asarray(rhs, np.float64))
    # |X| stays O(10) (M is well conditioned, unit diagonal); a few hundred fp32 ulps of slack
    assert_close(X, X_ref, "X")


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_split_invariance(chunk_size: int) -> None:
    """chunked(a+b) == chunked(b, state=chunked(a).state), split off chunk boundaries."""
    a, b = 17, 113
    S0, *x = to_jax(make_inputs(6, a + b))
    y_ab, S_ab = jit_chunked(S0, *x, chunk_size=chunk_size)
    y_a, S_a = jit_chunked(S0, *(t[:, :a] for t in x), chunk_size=chunk_size)
    y_b, S_b = jit_chunked(S_a, *(t[:, a:] for t in x), chunk_size=chunk_size)
    y_ab, S_ab = np.asarray(y_ab, np.float64), np.asarray(S_ab, np.float64)
    # both sides are fp32 runs of the same math, so the reference bound applies to each
    assert_close(jnp.concatenate([y_a, y_b], axis=1), y_ab, "y")
    assert_close(S_b, S_ab, "S")


def test_padding_is_neutral() -> None:
    """Padded steps (r=k=v=α=β=0, ld=0) keep S bit-exact and output exactly 0."""
    L, T = 16, 11
    S0, *x = to_jax(make_inputs(7, T))
    pad = ((0, 0), (0, L - T), (0, 0), (0, 0))
    y, S = jit_chunk(S0, *(jnp.pad(t, pad) for t in x))
    # a chunk of padding alone is the identity on the state
    zeros = jnp.zeros((B, L, H, N), jnp.float32)
    y0, S_same = jit_chunk(S, *([zeros] * 6))
    np.testing.assert_array_equal(np.asarray(S_same), np.asarray(S))
    np.testing.assert_array_equal(np.asarray(y0), 0.0)
    # padded positions output exactly 0; real positions and state match the unpadded recurrence
    np.testing.assert_array_equal(np.asarray(y[:, T:]), 0.0)
    y_ref, S_ref = reference_wkv7(*make_inputs(7, T))
    assert_close(y[:, :T], y_ref, "y")
    assert_close(S, S_ref, "S")


def test_zero_length_sequence() -> None:
    """T=0 returns an empty y and the state unchanged."""
    S0, *x = to_jax(make_inputs(8, 0))
    for y, S in (jit_sequential(S0, *x), jit_chunked(S0, *x, chunk_size=16)):
        assert y.shape == (B, 0, H, N)
        np.testing.assert_array_equal(np.asarray(S), np.asarray(S0))


@pytest.mark.parametrize("chunk_size", [0, 12, 48, 128, True, 16.0])
def test_chunk_size_validated(chunk_size: object) -> None:
    """Unsupported chunk sizes raise InputError naming the valid ones."""
    S0, *x = to_jax(make_inputs(9, 4))
    with pytest.raises(InputError, match="chunk_size"):
        wkv7_chunked(S0, *x, chunk_size=chunk_size)  # type: ignore[arg-type]


def test_shape_mismatch_raises() -> None:
    """Inputs that do not fit the state, or each other, raise InputError."""
    S0, r, k, v, alpha, beta, ld = to_jax(make_inputs(10, 5))
    with pytest.raises(InputError, match="do not match state"):
        wkv7_sequential(S0[:, :1], r, k, v, alpha, beta, ld)
    with pytest.raises(InputError, match=r"must be \[B, T, H, N\]"):
        wkv7_sequential(S0, r[:, 0], k[:, 0], v[:, 0], alpha[:, 0], beta[:, 0], ld[:, 0])
    with pytest.raises(InputError, match="ld has shape"):
        partial(wkv7_chunked, chunk_size=16)(S0, r, k, v, alpha, beta, ld[:, :4])
