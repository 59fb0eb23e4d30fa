"""WKV-7 recurrence (spec §1.4 step 8): token-by-token reference scan and chunked DPLR form (§5).

Layout (BlinkDL / ggml): state ``S`` float32 [B, H, N, N], ``S[b, h, i, j]`` with i = value index
(row) and j = key index (column). Per-token inputs are float32 [B, T, H, N]: receptance ``r``,
key ``k``, value ``v``, ``alpha = -kk``, ``beta = kk * a`` and the log-decay
``ld = log(wd) = -exp(-1/2) * sigmoid(z)`` in (-0.6066, 0]. One token does

    sa = S·alpha;   S ← S·diag(exp(ld)) + v kᵀ + sa betaᵀ;   y = S·r   (the new state).

The chunked form (fla's ``chunk_dplr``) is written with the paper's quantities in fla's
transposed layout Σ = Sᵀ; the einsums below index S directly (``v`` = value, ``k`` = key axis),
so no transposes are needed. Every contraction runs at ``Precision.HIGHEST`` so that TF32/bf16
matmul passes on GPU/TPU do not replace the fp32 arithmetic of the sequential kernel.

Design choices (CPU: this 2-core machine, jax 0.10.2, best of 5-15 runs under load from other
jobs, so ±30%; GPU: one H200, jax 0.11.2, best of 20; B=1, H=12, N=64, T=512 unless noted):
- Intra-chunk decay factors: factorised matmuls ``e^{G_i-c}·e^{c-G_j}`` centred at the chunk's
  middle row c = G[L/2] for every L (equal cost to the chunk-start reference, and exponents stay
  within ±(L/2+1)·0.61 ≈ ±20 at L=64). The pairwise masked ``e^{G_i-G_j}`` (an [L, L, N] tensor
  per head) was 7-60x slower on CPU (67 / 133 / 910 ms vs 10 / 13 / 15 ms for L = 16 / 32 / 64)
  with the same error.
- (I - Aab)⁻¹ on CPU: forward substitution in a ``fori_loop`` over the L rows beat
  ``jax.scipy.linalg.solve_triangular(unit_diagonal=True)``: 1.0 / 1.7 / 3.8 ms vs
  2.8 / 3.0 / 5.4 ms for L = 16 / 32 / 64 (the solve alone, all chunks × 12 heads at once).
  On CUDA the trsm wins (whole chunked WKV, L = 64: 0.40 vs 1.12 ms; B=1, H=40, T=4096:
  3.7 vs 4.8 ms), so ``solve_unit_lower`` picks per platform; every other platform (Metal
  included) gets the forward substitution, which needs nothing beyond basic ops.
- The state-independent half of each chunk (A matrices, U, W) is computed for all chunks at
  once before the ``lax.scan``, which then only carries the state (``chunk_state_pass``).
  Same speed as scanning the whole ``wkv7_chunk`` on CPU; 1.1-2x faster on the H200 (L = 16 /
  64: 0.80 / 0.42 vs 1.44 / 0.68 ms; B=1, H=40, T=4096: 6.3 / 3.6 vs 12.8 / 5.7 ms). Before
  the CUDA trsm, the 64-step forward-substitution loop per chunk made a scan of ``wkv7_chunk``
  10-26x slower there (L = 64: 10.6 ms).
- Whole WKV, sequential vs chunked L = 16 / 32 / 64:
  CPU, T=512:             5.0 ms vs 10.0 / 13.2 / 15.9 ms (the token scan is the faster prefill)
  H200, T=512:            3.0 ms vs 0.80 / 0.49 / 0.40 ms
  H200, H=40, T=4096:     28 ms  vs 6.3 / 4.0 / 3.7 ms
  H200, B=8, H=40, T=1024: 12.6 ms vs 4.7 / 3.9 / 4.4 ms
- Error vs a float64 recurrence stays ≤ 1.5e-6 × max|value| for every L and T ≤ 1000, on CPU
  and on the H200 (tests/test_wkv.py).
"""

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rwkv_jax.errors import InputError

# fp32 products on every backend (see module docstring).
PRECISION = lax.Precision.HIGHEST
# Any power of two up to 64: the centred factorisation keeps exponents within ±(L/2+1)·0.61,
# which fp32 holds comfortably up to L=64 (fla's bound); 16/32/64 are the sizes we measure.
CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64)

Array = jax.Array


def _einsum(spec: str, *operands: Array) -> Array:
    """Einsum at full fp32 precision."""
    return jnp.einsum(spec, *operands, precision=PRECISION)


def _f32(*xs: Array) -> tuple[Array, ...]:
    """Cast every input to float32 (the WKV state and its math are always fp32)."""
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _inputs(S: Array, xs: tuple[Array, ...], where: str) -> tuple[Array, tuple[Array, ...]]:
    """Validated float32 (S, (r, k, v, alpha, beta, ld)) for a sequence kernel."""
    xs = _f32(*xs)
    _check_shapes(S, xs, where)
    (S,) = _f32(S)
    return S, xs


def _check_shapes(S: Array, xs: tuple[Array, ...], where: str) -> None:
    """Raise InputError unless S is [B, H, N, N] and every x is [B, T, H, N] alike."""
    names = ("r", "k", "v", "alpha", "beta", "ld")
    if S.ndim != 4 or S.shape[2] != S.shape[3]:
        raise InputError(f"{where}: state S must be [B, H, N, N], got shape {S.shape}")
    B, H, N, _ = S.shape
    ref = xs[0].shape
    if len(ref) != 4:
        raise InputError(f"{where}: r must be [B, T, H, N], got shape {ref}")
    for name, x in zip(names, xs, strict=True):
        if x.shape != ref:
            raise InputError(f"{where}: {name} has shape {x.shape} but r has {ref}; pass all alike")
    if ref[0] != B or ref[-2:] != (H, N):
        raise InputError(
            f"{where}: inputs of shape {ref} do not match state {S.shape}; "
            f"expected batch {B} first and (H, N) = ({H}, {N}) last"
        )


# --------------------------------------------------------------------------------------------
# Sequential reference (§1.4 step 8)


def wkv7_step(
    S: Array, r: Array, k: Array, v: Array, alpha: Array, beta: Array, ld: Array
) -> tuple[Array, Array]:
    """One token: sa = S·α; S ← S·diag(e^ld) + v kᵀ + sa βᵀ; y = S_new·r. Inputs [B, H, N]."""
    S, r, k, v, alpha, beta, ld = _f32(S, r, k, v, alpha, beta, ld)
    # sa uses the OLD state, before decay: [B, H, N] over the value index
    sa = _einsum("bhij,bhj->bhi", S, alpha)
    # decay multiplies the key axis (columns); both updates are outer products [B, H, N, N]
    S = (
        S * jnp.exp(ld)[:, :, None, :]
        + v[:, :, :, None] * k[:, :, None, :]
        + sa[:, :, :, None] * beta[:, :, None, :]
    )
    # readout with the NEW state: y [B, H, N]
    y = _einsum("bhij,bhj->bhi", S, r)
    return y, S


def wkv7_sequential(
    S: Array, r: Array, k: Array, v: Array, alpha: Array, beta: Array, ld: Array
) -> tuple[Array, Array]:
    """Reference path: lax.scan of wkv7_step over T; inputs [B, T, H, N] -> (y [B, T, H, N], S)."""
    S, xs = _inputs(S, (r, k, v, alpha, beta, ld), "wkv7_sequential")

    def body(S: Array, x: tuple[Array, ...]) -> tuple[Array, Array]:
        y, S = wkv7_step(S, *x)
        return S, y

    # scan over the time axis: [T, B, H, N]
    S, y = lax.scan(body, S, tuple(jnp.moveaxis(x, 1, 0) for x in xs))
    return jnp.moveaxis(y, 0, 1), S


# --------------------------------------------------------------------------------------------
# Chunked DPLR form (§5.1). Below "..." = any batch dims (chunks, B, H); L = chunk length.


def cumulative_log_decay(ld: Array) -> tuple[Array, Array]:
    """G_i = Σ_{s≤i} ld_s (inclusive) and Ĝ_i = G_i − ld_i (exclusive); [..., L, N] each."""
    G = jnp.cumsum(ld, axis=-2)
    return G, G - ld


def intra_chunk_matrices(
    r: Array, k: Array, alpha: Array, beta: Array, G: Array, G_hat: Array
) -> tuple[Array, Array, Array, Array]:
    """Aqk, Aqb (j ≤ i) and Aak, Aab (j < i), each [..., L, L], by centred factorised matmuls."""
    L = r.shape[-2]
    # reference row c = G[L/2]: e^{G_i−G_j} = e^{G_i−c}·e^{c−G_j}, every factor within e^{±20}
    c = G[..., L // 2 : L // 2 + 1, :]  # [..., 1, N]
    e_back = jnp.exp(c - G)  # [..., L, N], the key-side factor e^{c−G_j}
    r_c = r * jnp.exp(G - c)  # query side at G_i
    alpha_c = alpha * jnp.exp(G_hat - c)  # removal side at Ĝ_i (the state before token i)
    k_c, beta_c = k * e_back, beta * e_back
    row, col = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    # masked-out entries hold e^{G_i−G_j} > 1 (j > i), at most e^{0.61·L}: finite, then dropped
    Aqk = jnp.where(col <= row, _einsum("...id,...jd->...ij", r_c, k_c), 0.0)
    Aqb = jnp.where(col <= row, _einsum("...id,...jd->...ij", r_c, beta_c), 0.0)
    Aak = jnp.where(col < row, _einsum("...id,...jd->...ij", alpha_c, k_c), 0.0)
    Aab = jnp.where(col < row, _einsum("...id,...jd->...ij", alpha_c, beta_c), 0.0)
    return Aqk, Aqb, Aak, Aab


def forward_substitution(Aab: Array, rhs: Array) -> Array:
    """X = (I − Aab)⁻¹·rhs for strictly lower Aab [..., L, L], rhs [..., L, M]; row recursion."""
    L = Aab.shape[-1]

    def row(i: Array, X: Array) -> Array:
        # X_i = rhs_i + Σ_{j<i} Aab[i, j]·X_j  (rows ≥ i of X are still zero)
        X_i = rhs[..., i, :] + _einsum("...j,...jm->...m", Aab[..., i, :], X)
        return X.at[..., i, :].set(X_i)

    return lax.fori_loop(0, L, row, jnp.zeros_like(rhs))


def triangular_solve(Aab: Array, rhs: Array) -> Array:
    """X = (I − Aab)⁻¹·rhs by the backend's triangular solve (cuBLAS trsm on CUDA)."""
    eye = jnp.broadcast_to(jnp.eye(Aab.shape[-1], dtype=Aab.dtype), Aab.shape)
    M = eye - Aab  # unit lower triangular [..., L, L]
    return jax.scipy.linalg.solve_triangular(M, rhs, lower=True, unit_diagonal=True)


def solve_unit_lower(Aab: Array, rhs: Array) -> Array:
    """(I − Aab)⁻¹·rhs: trsm on CUDA, forward substitution elsewhere (faster on CPU, see top)."""
    return lax.platform_dependent(Aab, rhs, cuda=triangular_solve, default=forward_substitution)


class ChunkIntra(NamedTuple):
    """State-independent quantities of one chunk (§5.1 steps 1–3); batch dims "..." first."""

    Aqk: Array  # [..., L, L] r_i·k_j e^{G_i−G_j}, j ≤ i
    Aqb: Array  # [..., L, L] r_i·β_j e^{G_i−G_j}, j ≤ i
    U: Array  # [..., L, N value] (I − Aab)⁻¹·Aak·v
    W: Array  # [..., L, N key]   (I − Aab)⁻¹·(α ⊙ e^Ĝ)
    v: Array  # [..., L, N value]
    r_g: Array  # [..., L, N key] r ⊙ e^G        (reads the chunk-start state)
    k_g: Array  # [..., L, N key] k ⊙ e^{G_L−G}  (writes into the chunk-end state)
    beta_g: Array  # [..., L, N key] β ⊙ e^{G_L−G}
    decay_L: Array  # [..., N key] e^{G_L}, the whole chunk's decay


def chunk_intra(r: Array, k: Array, v: Array, alpha: Array, beta: Array, ld: Array) -> ChunkIntra:
    """§5.1 steps 1–3 without the state: G, Ĝ, the A matrices, U and W; inputs [..., L, N]."""
    G, G_hat = cumulative_log_decay(ld)
    Aqk, Aqb, Aak, Aab = intra_chunk_matrices(r, k, alpha, beta, G, G_hat)
    G_L = G[..., -1:, :]  # [..., 1, N]
    # one solve for both right-hand sides: [Aak·v | α ⊙ e^Ĝ] is [..., L, 2N]
    rhs = jnp.concatenate([_einsum("...ij,...jv->...iv", Aak, v), alpha * jnp.exp(G_hat)], -1)
    UW = solve_unit_lower(Aab, rhs)
    N = v.shape[-1]
    to_end = jnp.exp(G_L - G)  # [..., L, N], exponent ≤ 0
    return ChunkIntra(
        Aqk=Aqk,
        Aqb=Aqb,
        U=UW[..., :N],
        W=UW[..., N:],
        v=v,
        r_g=r * jnp.exp(G),
        k_g=k * to_end,
        beta_g=beta * to_end,
        decay_L=jnp.exp(G_L[..., 0, :]),
    )


def chunk_state_pass(S: Array, c: ChunkIntra) -> tuple[Array, Array]:
    """§5.1 steps 3–5 given the chunk-start state S [..., N, N]: ṽ, O [..., L, N], S_L."""
    # pseudo-values ṽ_i = S_{i−1}·α_i (the per-token sa): ṽ = U + W·Σ₀, [..., L, N value]
    v_tilde = c.U + _einsum("...ik,...vk->...iv", c.W, S)
    # O = (r ⊙ e^G)·Σ₀ + Aqk·v + Aqb·ṽ, [..., L, N value]
    o = (
        _einsum("...ik,...vk->...iv", c.r_g, S)
        + _einsum("...ij,...jv->...iv", c.Aqk, c.v)
        + _einsum("...ij,...jv->...iv", c.Aqb, v_tilde)
    )
    # S_L = S₀·diag(e^{G_L}) + vᵀ(k ⊙ e^{G_L−G}) + ṽᵀ(β ⊙ e^{G_L−G}), [..., N value, N key]
    S = (
        S * c.decay_L[..., None, :]
        + _einsum("...iv,...ik->...vk", c.v, c.k_g)
        + _einsum("...iv,...ik->...vk", v_tilde, c.beta_g)
    )
    return o, S


def wkv7_chunk(
    S: Array, r: Array, k: Array, v: Array, alpha: Array, beta: Array, ld: Array
) -> tuple[Array, Array]:
    """One chunk of L tokens by the DPLR chunk algorithm; inputs [B, L, H, N] -> (y, S)."""
    S, xs = _inputs(S, (r, k, v, alpha, beta, ld), "wkv7_chunk")
    # head-major for the per-head matrices: [B, H, L, N]
    xs = tuple(jnp.swapaxes(x, 1, 2) for x in xs)
    o, S = chunk_state_pass(S, chunk_intra(*xs))
    return jnp.swapaxes(o, 1, 2), S


def wkv7_chunked(
    S: Array,
    r: Array,
    k: Array,
    v: Array,
    alpha: Array,
    beta: Array,
    ld: Array,
    chunk_size: int = 16,
) -> tuple[Array, Array]:
    """Whole sequence in chunks: neutral padding to a multiple of chunk_size, scan over chunks."""
    # integers only (numpy ints too); True would pass as 1 and 16.0 as 16
    if (
        not hasattr(chunk_size, "__index__")
        or isinstance(chunk_size, bool)
        or (operator.index(chunk_size) not in CHUNK_SIZES)
    ):
        raise InputError(
            f"wkv7_chunked: chunk_size={chunk_size!r} is not supported; "
            f"pass an int power of two up to 64, one of {CHUNK_SIZES}"
        )
    S, xs = _inputs(S, (r, k, v, alpha, beta, ld), "wkv7_chunked")
    B, T, H, N = xs[0].shape
    L = operator.index(chunk_size)
    n = -(-T // L)  # number of chunks
    # padded steps (r=k=v=α=β=0, ld=0 so decay 1) leave S unchanged and output 0
    pad = ((0, 0), (0, n * L - T), (0, 0), (0, 0))
    # [B, n·L, H, N] -> [B, n, L, H, N] -> [n, B, H, L, N]: chunks first for the scan
    xs = tuple(jnp.pad(x, pad).reshape(B, n, L, H, N).transpose(1, 0, 3, 2, 4) for x in xs)
    intra = chunk_intra(*xs)  # every chunk at once, no state needed

    def body(S: Array, c: ChunkIntra) -> tuple[Array, Array]:
        o, S = chunk_state_pass(S, c)
        return S, o

    S, o = lax.scan(body, S, intra)
    # [n, B, H, L, N] -> [B, n, L, H, N] -> [B, n·L, H, N], padded outputs dropped
    y = o.transpose(1, 0, 3, 2, 4).reshape(B, n * L, H, N)[:, :T]
    return y, S
