"""One decode token's per-head time-mix work as a single Pallas (Triton) kernel on NVIDIA GPUs.

Between the receptance/key/value matvecs and the output matvec, one decode token of
model.time_mix is a chain of small element-wise steps and four LoRA up-projections: decay,
in-context rate, value residual and gate; the removal key's per-head normalisation; the WKV-7
state update and readout; the per-head group norm, the bonus and the gate. XLA runs them as
~10 kernels per layer of 1.5-3 us each (H200 trace, B = 1), for a few hundred KB of data. Every
one of these steps is per head — the LoRA ups too, once split by output column — so one program
per (row, head) does them all:

    ld = -e^{-1/2} σ(w0 + bf16(hw · w2ᵀ));  a = σ(a0 + bf16(ha · a2ᵀ));  g = bf16(hg · g2ᵀ)
    v_first = v (layer 0);  v += (v_first - v) σ(v0 + bf16(hv · v2ᵀ))
    kk = normalize(k k_k);  k *= 1 + (a - 1) k_a
    S ← S diag(e^{ld}) + v kᵀ + (S(-kk)) (kk a)ᵀ;  y = S r
    out = (groupnorm(y) + (Σ r k r_k) v) g

(bf16(·) = the compute dtype's rounding of a matmul result, as model.matmul does). Only the
summation order differs from the XLA path, which stays the reference and every other
backend's program (tests/test_gpu_time_mix.py checks the kernel against it).

The kernel reads the stacked layers' LoRA matrices, vectors and WKV state in place (whole
arrays and the layer index, as gpu_kernels does): a custom call given the scan's slice of a
layer makes XLA copy it out first. It issues every load before its first reduction (a reduction
across warps is a barrier that later loads would wait behind): 10.3 -> 6.1 us per call at B = 1.

At one row it also takes the grouped r/k/v matvec's split-K partial sums as they are and adds
them (no XLA reduce and slice kernels: B = 1 333.3 -> 339.2 tok/s with the matvecs reading x in
place); with more rows a row's partial sums lie M floats apart and the loads did not coalesce
(B = 64 5987 -> 3880), so those take the summed products.

Batched decode: above MAX_UP_ROWS rows XLA's GEMMs compute the LoRA up products first and
the kernel takes those; from model.WKV_IN_PLACE_MIN_ROWS rows it writes the new state into the
carried stack in place (`in_place`).

Measured on an H200 (2.9b Q4_K_M, bf16, `python -m experiments.gpu_trace --cases tg:1:128
tg:4:64 tg:64:32`, one process per variant on one machine): B = 1 297.9 -> 334.2 tok/s (with the
launch-shape changes of gpu_kernels: 303.7 without this kernel), B = 4 716.0 -> 834.6, B = 64
5323.9 -> 5972.9; 1093 -> 901 kernels per token at B = 1. Float32 decode with and without it
(`python -m experiments.time_mix_check`): logits within 3.4e-6 (B = 1) and 8.4e-6 (B = 8) of
their std over 6 steps.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rwkv_jax import gpu_kernels

Array = jax.Array

# rows (streams) one decode step may have to take this kernel
MAX_ROWS = 64
# LoRA ranks are split into power-of-two pieces of at most this many columns per load
MAX_PIECE = 128
# at most this many rows multiply the LoRA up matrices inside the kernel; more take XLA's
# (tensor-core) matmuls first and hand the kernel their products: each program (one per row and
# head) re-reads its head's columns of all four matrices, 74 KB at the 2.9b's ranks. H200, 2.9b
# Q4_K_M, `python -m experiments.gpu_trace --cases tg:8:64 tg:64:32 [--up-rows N]`, one machine:
# products handed over at B = 64 8124.1 -> 8914.0 tok/s (this kernel 33 us per call, traced with
# another change; 67 us in the previous series; four more GEMMs of ~3 us), at B = 8 1681.8 ->
# 1618.7; on another machine B = 16 3239.7 -> 3180.4, B = 32 5231.6 -> 5375.1. So up to 16 rows
# the ups stay inside.
MAX_UP_ROWS = 16
# H200, 2.9b, generation loop (experiments/gpu_trace --time-mix-warps): 8 warps 6.1 us per call
# at B = 1 (334.2 tok/s), 4 warps 7.0 us (328.7 tok/s)
NUM_WARPS = 8
# from WIDE_ROWS rows (B x H programs, each moving its head's 16 KB of state in and out) fewer
# warps per program keep more of them in flight: H200, `gpu_trace --cases tg:64:32 tg:16:32
# --time-mix-warps W`, per call at B = 64 / 16: 8 warps 33.1 / 19.6 us, 4 32.1 / 24.1, 2 30.0 /
# 49.0, 16 47.5 / 20.9 (B = 64 9935 -> 10127 tok/s with 2)
WIDE_ROWS, WIDE_WARPS = 64, 2
# split-K parts of the grouped r/k/v matvec whose partial sums the kernel adds at one row (None:
# the matvec's own, INT_SPLIT = 10 for the C x C matrices): each of the H programs reads 3 x P x N
# of them. H200, 2.9b, `python -m experiments.gpu_trace --cases tg:1:128 --split-consumed P:0`,
# one call: P = 5 this kernel 7.8 -> 6.8 us, the r/k/v matvec 7.9 -> 8.4 us, 527.2 -> 532.8
# tok/s; P = 2: 6.5 us and 9.9 us, 520.2 tok/s
RKV_SPLIT = 5
# RWKV_JAX_PALLAS=0 keeps the XLA path on GPUs (as for gpu_kernels)
ENABLED = os.environ.get("RWKV_JAX_PALLAS", "1") != "0"


def pieces(d: int) -> tuple[tuple[int, int], ...]:
    """(start, width) power-of-two pieces of [0, d), widest first, each <= MAX_PIECE."""
    out, start = [], 0
    while start < d:
        width = min(MAX_PIECE, 1 << ((d - start).bit_length() - 1))
        out.append((start, width))
        start += width
    return tuple(out)


def _cpu_backend() -> bool:
    """Whether programs are built for the CPU: its program never takes the CUDA branch, and older
    JAX (0.4.x, the Metal plugins' line) lowers every platform_dependent branch, where Pallas'
    Triton lowering fails on the CPU."""
    return jax.default_backend() == "cpu"


def one_decode_token(enabled: bool, cpu: bool, tokens: int, rows: int, max_rows: int) -> bool:
    """What every per-token decode kernel needs (gpu_mix too): switched on, a program not built
    for the CPU, one token, 1..max_rows rows."""
    return enabled and not cpu and tokens == 1 and 1 <= rows <= max_rows


def supports(rows: int, tokens: int, head_size: int, ups: Sequence, stacked: bool = False) -> bool:
    """Whether one decode token of `rows` streams with these LoRA up matrices (quant.Weight,
    (C, D); stacked: [L, C, D]) runs here: dense formats, a power-of-two head size, not the
    CPU."""
    return (
        one_decode_token(ENABLED, _cpu_backend(), tokens, rows, MAX_ROWS)
        and head_size >= 16
        and head_size & (head_size - 1) == 0
        and all(type(w).__name__ in gpu_kernels.DENSE and w.w.ndim == 2 + stacked for w in ups)
    )


def time_mix_heads(
    layer: Array,
    first: bool | None,
    active: Array,
    rkv: Array,
    v_first: Array,
    hidden: tuple[Array, Array, Array, Array],
    ups: tuple[Array, Array, Array, Array] | None,
    vectors: tuple[Array, ...],
    S: Array,
    *,
    eps: float,
    decay_scale: float,
    l2_eps: float,
    dtype,
    round_weights: bool,
    in_place: bool = False,
    interpret: bool = False,
) -> tuple[Array, Array, Array]:
    """The per-head work of one decode token (module docstring), for B rows.

    layer: int32 [] index into the stacks; first: whether this is the first layer (its v is
    v_first), None = layer == 0; active: [B] bool (False: a padding row, whose state must not
    change); rkv: the receptance, key and value matvecs as P split-K partial sums, float32
    [3, P, M >= B, C] (the grouped kernel's `partials` at one row, or P = 1: the products; the
    kernel adds them and rounds to dtype, as the matmul would); v_first: float32 [B, C];
    hidden: the LoRA hiddens after their activations (tanh(xw w1), xa a1, xv v1, σ(xg g1))
    [B, D_i]; ups: the up matrices' stored values [L, C, D_i] (w2, a2, v2, g2), or None: the
    hiddens are the up products already, [B, C] as the matmul returns them; vectors: (w0,
    a0, v0, k_k, k_a, r_k, ln_x_w, ln_x_b) each [L, C] float32; S: the WKV state
    [L, B, H, N, N] float32; dtype: the compute dtype whose rounding the matmul results take;
    round_weights: round the up matrices to dtype first (what the XLA dot does for more than
    quant.MATVEC_MAX_ROWS rows).

    in_place: write layer `layer`'s new state into S itself (the output aliases S, so XLA needs
    no buffer and no copy for it when S is a loop's carried stack) and return the whole stack.

    Returns (out * g [B, C] in dtype — the output matvec's input —, v_first [B, C] float32,
    S [B, H, N, N] — or in_place, the stack [L, B, H, N, N]).
    """
    B, C = v_first.shape
    hidden = tuple(h.astype(dtype) for h in hidden)  # model.matmul casts its input / output
    act = active.astype(jnp.float32).reshape(B, 1)
    index = jnp.asarray(layer, jnp.int32).reshape(1)
    args = (index, act, rkv, v_first, *hidden, *(ups or ()), *vectors, S)
    shapes = tuple(a.shape for a in args)
    call = _call(
        shapes,
        first,
        jnp.dtype(dtype),
        round_weights,
        eps,
        decay_scale,
        l2_eps,
        in_place,
        interpret,
    )
    out, vf, S_new = call(*args)
    return out.reshape(B, C), vf.reshape(B, C), S_new


@functools.cache
def _call(shapes, first, dtype, round_weights, eps, decay_scale, l2_eps, in_place, interpret):
    """The pallas_call for inputs of these shapes: grid (B rows, H heads); every input passed
    whole and indexed in the kernel. in_place: the state output is the state input's buffer
    (each program reads its own row and head of the layer before it writes them back)."""
    f32 = jnp.float32
    _, B, H, N, _ = shapes[-1]  # the state [L, B, H, N, N]
    n_ups = len(shapes) - 17  # 4 up matrices, or none (the hiddens are their products)
    splits = [pieces(s[-1]) for s in shapes[4:8]]  # the hiddens [B, D]
    n_parts = shapes[2][1]  # rkv [3, P, M, C]

    def kernel(layer_ref, act_ref, rkv_ref, vf_ref, *refs):
        h_refs, up_refs = refs[0:4], refs[4 : 4 + n_ups]
        w0_ref, a0_ref, v0_ref, kk_ref, ka_ref, rk_ref, lnw_ref, lnb_ref = refs[
            4 + n_ups : 12 + n_ups
        ]
        s_ref, o_ref, vfo_ref, so_ref = refs[12 + n_ups :]
        layer = layer_ref[0]
        is_first = layer == 0 if first is None else first
        b, h = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(pl.multiple_of(h * N, N), N)

        def rounded(x):  # a matmul result as model.matmul returns it
            return x.astype(dtype).astype(f32)

        def up(pairs):  # [N] columns of hidden · upᵀ for this head, from loaded pieces
            acc = jnp.zeros((N,), f32)
            for w, x in pairs:  # w [N, width], x [width]
                w = w.astype(f32)
                if round_weights:
                    w = rounded(w)
                acc = acc + jnp.sum(w * x.astype(f32)[None, :], axis=1)
            return rounded(acc)

        def sigmoid(z):
            return 1.0 / (1.0 + jnp.exp(-z))

        # every load first: a reduction across warps is a barrier, and loads issued after one
        # wait for it, so interleaving loads with sums makes a chain of memory round trips
        if n_ups:
            ups = [
                [
                    (w_ref[layer, cols, pl.ds(start, width)], x_ref[b, pl.ds(start, width)])
                    for start, width in split
                ]
                for w_ref, x_ref, split in zip(up_refs, h_refs, splits, strict=True)
            ]
        else:  # this head's columns of the products
            ups = [x_ref[b, cols].astype(f32) for x_ref in h_refs]
        S = s_ref[layer, b, h]  # [N (value), N (key)]
        rkv = [[rkv_ref[g, p, b, cols] for p in range(n_parts)] for g in range(3)]
        vf = vf_ref[b, cols]
        w0, a0, v0, k_k, k_a, r_k, lnw, lnb = (
            ref[layer, cols].astype(f32)
            for ref in (w0_ref, a0_ref, v0_ref, kk_ref, ka_ref, rk_ref, lnw_ref, lnb_ref)
        )
        live = act_ref[b, :] != 0.0  # [1]: a padding row leaves its state as it is

        r, k, v = (rounded(functools.reduce(jnp.add, parts)) for parts in rkv)
        zw, za, zv, zg = (up(pairs) for pairs in ups) if n_ups else ups
        ld = -decay_scale * sigmoid(w0 + zw)
        a = sigmoid(a0 + za)
        g = zg
        vf = jnp.where(is_first, v, vf)
        v = v + (vf - v) * sigmoid(v0 + zv)
        kk = k * k_k
        kk = kk / jnp.maximum(jnp.sqrt(jnp.sum(kk * kk)), l2_eps)
        k = k * (1.0 + (a - 1.0) * k_a)

        # padding row: v = beta = 0, no decay
        beta = jnp.where(live, kk * a, 0.0)
        decay = jnp.exp(jnp.where(live, ld, 0.0))
        v_in = jnp.where(live, v, 0.0)
        sa = jnp.sum(S * (-kk)[None, :], axis=1)  # S·alpha with the old state
        S = S * decay[None, :] + v_in[:, None] * k[None, :] + sa[:, None] * beta[None, :]
        y = jnp.sum(S * r[None, :], axis=1)  # readout with the new state

        mu = jnp.mean(y)
        yc = y - mu
        yn = yc * lax.rsqrt(jnp.mean(yc * yc) + eps) * lnw + lnb
        bonus = jnp.sum(r * k * r_k)
        o_ref[...] = ((yn + bonus * v) * g).astype(o_ref.dtype)
        vfo_ref[...] = vf
        if in_place:
            so_ref[layer, b, h] = S
        else:
            so_ref[...] = S

    def whole(shape):  # the whole array: the kernel indexes it itself
        return pl.BlockSpec(shape, lambda b, h: (0,) * len(shape))

    row_head = pl.BlockSpec((None, None, N), lambda b, h: (b, h, 0))
    if in_place:  # the whole stack, aliased to the state input (the last)
        state, state_spec = shapes[-1], whole(shapes[-1])
    else:
        state = (B, H, N, N)
        state_spec = pl.BlockSpec((None, None, N, N), lambda b, h: (b, h, 0, 0))
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((B, H, N), dtype),
            jax.ShapeDtypeStruct((B, H, N), f32),
            jax.ShapeDtypeStruct(state, f32),
        ),
        grid=(B, H),
        in_specs=[whole(s) for s in shapes],
        out_specs=(row_head, row_head, state_spec),
        input_output_aliases={len(shapes) - 1: 2} if in_place else {},
        compiler_params=gpu_kernels.compiler_params(
            WIDE_WARPS if B >= WIDE_ROWS else NUM_WARPS, 1, interpret
        ),
        interpret=interpret,
        name="rwkv_jax_time_mix_heads",
    )
