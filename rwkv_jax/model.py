"""The RWKV-7 forward pass as pure functions over `Params` and `State` (spec §1).

Reads top-down like BlinkDL's `rwkv_v7_numpy.py`: layer_norm, token_shift, time_mix (with the
WKV-7 recurrence from `wkv.py`), channel_mix, block, forward. Every function is batched over
[B, T] tokens. Matrices are multiplied only through `Weight.matmul`, so nothing here depends on
the storage format. The residual stream and all normalisations run in float32; `dtype` is the
compute dtype of the matrix products and of the token-shift state; the WKV state is float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from rwkv_jax import backends, cpu_kernels, gpu_dense, gpu_mix, gpu_time_mix, quant, wkv
from rwkv_jax.gguf import ModelConfig
from rwkv_jax.params import Block, Params
from rwkv_jax.state import State

DECAY_SCALE = math.exp(-0.5)  # wd = exp(-e^{-1/2} * sigmoid(z)), spec §1.4-7
L2_EPS = 1e-12  # F.normalize clamp of the removal-key norm
# Layers per iteration of the scan over stacked layers. On GPUs each loop iteration costs a
# device-to-host sync of the loop condition (~17 us measured on an H200: experiments/decode_profile)
LAYER_SCAN_UNROLL = 1
# ... for one decode token on a GPU: XLA also fuses across the unrolled layers (the layer index
# and state slices and writes). H200, 2.9b Q4_K_M, `python -m experiments.gpu_trace --cases
# tg:1:128 --layer-unroll N`, one machine: N = 1 404.5 / 407.2, 2 443.0, 4 452.7 tok/s (517 ->
# 365 kernels per token), first call 9.4 / 8.8 / 9.5 s; tg:4:64 at 2 873.9 (~815 at 1). Later,
# with the integer one-row kernels (`--cases tg:64:32 tg:1:128 tg:8:64`, one process per N, one
# machine, no compilation cache): N = 4 10043.6 / 522.3 / 1831.8 (again at the end: 9977.8 /
# 524.2 / 1855.7), 8 10046.3 / 532.4 / 1871.2, 16 9809.9 / 531.0 / 1886.0 tok/s; first calls
# 9.9-12.4 s at 4, 10.7-13.2 at 8, 11.9-17.5 at 16; another call, `--cases tg:4:64 tg:2:64`, 4 /
# 8 / 4 / 8: 889.5 / 900.6 / 889.4 / 900.4 and 698.8 / 711.9 / 699.7 / 712.3. Prefill keeps
# LAYER_SCAN_UNROLL: its body is large (compile time grows with each copy).
DECODE_LAYER_UNROLL = 8
# decode steps of at least this many rows whose per-head work takes the gpu_time_mix kernel
# carry the WKV state stack through the layer scan and update it in place (see `layers`); fewer
# rows (or 0: none) take it as the scan's per-layer outputs. H200, 2.9b Q4_K_M, `python -m
# experiments.gpu_trace --cases tg:1:128 tg:4:64 tg:64:32 [--wkv-min-rows 0]`, one machine: B = 64
# 6681.1 -> 8207.2 tok/s (busy 310.0 -> 245.7 ms per call), B = 1 459.8 -> 459.2, B = 4 961.0 ->
# 939.0 (busy 269.1 -> 267.3 ms but wall 266.4 -> 272.6 ms: not explained), so from 5 rows.
WKV_IN_PLACE_MIN_ROWS = 5

# (S, r, k, v, alpha, beta, log_decay) -> (y, S), inputs [B, T, H, N], S [B, H, N, N]
WkvFn = Callable[..., tuple[Array, Array]]


class LayerState(NamedTuple):
    """One layer's slice of `State`."""

    att_shift: Array  # [B, C]
    ffn_shift: Array  # [B, C]
    wkv: Array  # [B, H, N, N] float32


class Span(NamedTuple):
    """How one call runs over its [B, T] tokens: the same for every layer."""

    valid: Array  # [B, T] bool: position t < lengths[b]
    lengths: Array  # [B] valid tokens per row
    wkv_fn: WkvFn  # the WKV-7 kernel for these T tokens
    dtype: object  # compute dtype of the matrix products


def lead(v: Array, ndim: int) -> Array:
    """Explicit broadcast of a weight vector/matrix to `ndim` dims (leading axes of size 1)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def layer_norm(x: Array, w: Array, b: Array, eps: float) -> Array:
    """LN over the last axis with biased variance (PyTorch semantics), in float32."""
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * lead(w, x.ndim) + lead(b, x.ndim)


def group_norm(y: Array, w: Array, b: Array, eps: float) -> Array:
    """ln_x: per-head normalisation of y [..., H, N], then the affine over C = H*N."""
    mu = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mu), axis=-1, keepdims=True)
    yn = ((y - mu) * lax.rsqrt(var + eps)).reshape(*y.shape[:-2], -1)  # [..., C]
    return yn * lead(w, yn.ndim) + lead(b, yn.ndim)


def _last_valid(u: Array, lengths: Array) -> Array:
    """u [B, T, C] at each row's last valid position (position 0 for an empty row) -> [B, C].

    One token (decode) needs no gather: the index is 0 whatever `lengths` says."""
    if u.shape[1] == 1:
        return u[:, 0]
    return jnp.take_along_axis(u, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]


def token_shift(u: Array, prev: Array, lengths: Array) -> tuple[Array, Array]:
    """d = shifted(u) - u and the new shift state (u at each sequence's last valid token).

    u [B, T, C]; prev [B, C] (the previous call's last u); lengths [B] valid tokens per row.
    """
    shifted = jnp.concatenate([prev[:, None, :].astype(u.dtype), u[:, :-1]], axis=1)  # [B, T, C]
    last = _last_valid(u, lengths)
    new_prev = jnp.where((lengths > 0)[:, None], last.astype(prev.dtype), prev)
    return shifted - u, new_prev


def matmul(w: quant.Weight, x: Array, dtype) -> Array:
    """y = W x in the compute dtype (float32 accumulation), returned as float32."""
    return w.matmul(x.astype(dtype)).astype(jnp.float32)


def matmuls(pairs: list[tuple[quant.Weight, Array]], dtype) -> list[Array]:
    """matmul() of each (W, x); on NVIDIA GPUs those of one format and shape in one launch."""
    ys = quant.matmul_group([(w, x.astype(dtype)) for w, x in pairs])
    return [y.astype(jnp.float32) for y in ys]


class LayerAt(NamedTuple):
    """Where the scan's layer lies in the stacks: the GPU decode kernels read it in place."""

    blocks: Block  # every layer, stacked [L, ...]
    wkv: Array  # the WKV state of every layer [L, B, H, N, N]
    att_shift: Array  # [L, B, C]
    ffn_shift: Array  # [L, B, C]
    index: Array  # int32 []: this layer
    # wkv is the scan's carried stack: the time mix writes this layer's new state into it and
    # returns the whole stack (see `layers`)
    wkv_carried: bool = False


def time_mix(
    blk: Block,
    cfg: ModelConfig,
    x: Array,
    st: LayerState,
    v_first: Array,
    is_first: Array | bool,
    span: Span,
    at: LayerAt | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Attention replacement of one layer up to its output matmul: returns (the output
    matmul's input in the compute dtype, v_first, att_shift, wkv state — this layer's, or with
    at.wkv_carried the whole updated stack)."""
    (xr, xk, xv), hidden, att_shift = att_inputs(blk, cfg, x, st.att_shift, span, at)
    rkv = [(blk.receptance, xr), (blk.key, xk), (blk.value, xv)]
    out, v_first, S = heads_step(blk, cfg, rkv, v_first, is_first, hidden, st.wkv, span, at)
    return out, v_first, att_shift, S


def heads_kernel(ups: tuple, cfg: ModelConfig, B: int, T: int) -> bool:
    """Whether B rows of T tokens take the per-head kernel (gpu_time_mix) with these LoRA up
    matrices (one layer's, quant.LayerOf of a layer, or the stacks [L, ...]): one decode token
    on CUDA (Metal keeps the program it compiles)."""
    layers = [w.layer if isinstance(w, quant.LayerOf) else w for w in ups]
    stacked = all(getattr(w, "w", None) is not None and w.w.ndim == 3 for w in layers)
    return (
        gpu_time_mix.supports(B, T, cfg.head_size, layers, stacked=stacked)
        and backends.current_profile().matvec != "fused"
    )


def cpu_heads(cfg: ModelConfig, B: int, T: int, wkv_fn: WkvFn | None = None) -> bool:
    """Whether the per-head work of B rows of T tokens runs as one native call per layer on the
    CPU (cpu_kernels.time_mix_step, which also updates the carried WKV stack in place): one
    decode token, or T tokens whose WKV is the token recurrence (wkv_fn wkv.wkv7_sequential,
    the CPU's prefill default: the kernel runs that recurrence; a chunked WKV asked for keeps
    XLA's path); the CPU backend, its native kernels built, not metal-safe, a head size of whole
    16-lane vectors. 2-core CPU, 0.1b Q4_K_M, tg128 against the XLA path (interleaved rounds,
    BENCHMARKS.md): B = 1 +2-7%, B = 4 +32%, B = 16 +48%."""
    return (
        (T == 1 or wkv_fn is wkv.wkv7_sequential)
        and B >= 1
        and cfg.head_size % 16 == 0
        and jax.default_backend() == "cpu"
        and backends.current_profile().matvec == "platform"
        and cpu_kernels.available()
    )


def _stacked(blk: Block, at: LayerAt | None, name: str) -> Array:
    """A field of this layer with a leading layer axis, for a kernel that indexes the stack
    itself: the whole stack (stacked layers), or the unstacked field as a stack of one."""
    return getattr(blk, name)[None] if at is None else getattr(at.blocks, name)


def _stack_of(w: quant.Weight | quant.LayerOf) -> Array:
    """A dense matrix's stored values with a leading layer axis (see _stacked)."""
    return w.stack.w if isinstance(w, quant.LayerOf) else w.w[None]


def _layer_index(at: LayerAt | None) -> Array:
    """This layer's index into what _stacked returns."""
    return jnp.zeros((), jnp.int32) if at is None else at.index


def _dense_kernel(ws: tuple, B: int, T: int, dtype) -> bool:
    """Whether one decode token of B rows multiplies by these dense matrices (one layer's LoRA
    downs or ups) in one gpu_dense launch (on CUDA; Metal keeps the program it compiles)."""
    layers = [w.layer if isinstance(w, quant.LayerOf) else w for w in ws]
    return (
        T == 1
        and gpu_dense.supports(layers, B, dtype)
        and backends.current_profile().matvec != "fused"
    )


def _dense_group(ws: tuple, at: LayerAt | None, xs: tuple, dtype) -> list[Array]:
    """matmul() of each (w, x) of ws and xs, through one gpu_dense launch reading the matrices
    in place from their stacks (`at`; unstacked: stacks of one)."""
    stacks = [_stack_of(w) for w in ws]
    ys = gpu_dense.matmul_group(stacks, [x.astype(dtype) for x in xs], _layer_index(at))
    return [y.astype(jnp.float32) for y in ys]


def _mix_kernel(x: Array, downs: tuple = ()) -> bool:
    """Whether one decode token's prologue of x [B, T, C] with these LoRA downs may take the
    gpu_mix kernel (on CUDA; Metal keeps the program it compiles)."""
    B, T, C = x.shape
    layers = [w.layer if isinstance(w, quant.LayerOf) else w for w in downs]
    return gpu_mix.supports(B, T, C, layers) and backends.current_profile().matvec != "fused"


# a sub-block's prologue fields: layer norm weight and bias, mixing vectors (how many), shift
_PROLOGUE = {
    "att": ("ln1_w", "ln1_b", "x_rwkvag", 6, "att_shift"),
    "ffn": ("ln2_w", "ln2_b", "ffn_x_k", 1, "ffn_shift"),
}


def _prologue(
    blk: Block,
    cfg: ModelConfig,
    span: Span,
    at: LayerAt | None,
    x: Array,
    addends: Array | None,
    prev: Array,
    which: str,
    outs: tuple[int, ...],
    downs: tuple = (),
) -> tuple[Array | None, list[Array], Array, list[Array]]:
    """gpu_mix.mix_prologue of one decode token for this layer's `which` sub-block ("att" /
    "ffn", _PROLOGUE), reading its vectors, LoRA downs and shift state in place from the stacks
    (`at`) or as stacks of one (unstacked layers)."""
    ln_w, ln_b, mix, n_mix, shift = _PROLOGUE[which]
    return gpu_mix.mix_prologue(
        _layer_index(at),
        span.valid[:, 0],
        x[:, 0],
        addends,
        prev[None] if at is None else getattr(at, shift),
        (_stacked(blk, at, ln_w), _stacked(blk, at, ln_b)),
        _stacked(blk, at, mix).reshape(-1, n_mix, x.shape[-1]).astype(jnp.float32),
        outs,
        downs,
        eps=cfg.layer_norm_eps,
        dtype=span.dtype,
    )


def att_inputs(
    blk: Block, cfg: ModelConfig, x: Array, prev: Array, span: Span, at: LayerAt | None
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array, Array], Array]:
    """ln1, token shift and mixes of x [B, T, C]: ((xr, xk, xv) in the compute dtype, the LoRA
    hiddens, the new shift state). One decode token on NVIDIA GPUs takes one kernel (gpu_mix)
    for all of it, the LoRA down-projections included."""
    dtype = span.dtype

    downs = (blk.w1, blk.a1, blk.v1, blk.g1)  # from xw, xa, xv, xg (mixes 1, 4, 3, 5)

    def xla(x, prev, grouped=False):
        u = layer_norm(x, blk.ln1_w, blk.ln1_b, cfg.layer_norm_eps)  # [B, T, C]
        d, shift = token_shift(u, prev, span.lengths)
        xr, xw, xk, xv, xa, xg = (u + d * lead(blk.x_rwkvag[i], 3) for i in range(6))
        # LoRA hiddens (BlinkDL's row-vector notation: x·down, then ·up inside heads()); the
        # four downs in one launch where gpu_dense takes them (`grouped`, the CUDA branch)
        ins = (xw, xa, xv, xg)
        if grouped:
            zw, za, zv, zg = _dense_group(downs, at, ins, dtype)
        else:
            zw, za, zv, zg = (matmul(w, xi, dtype) for w, xi in zip(downs, ins, strict=True))
        hidden = (
            jnp.tanh(zw),  # decay
            za,  # in-context learning rate
            zv,  # value residual
            jax.nn.sigmoid(zg),  # output gate
        )
        # the hiddens only ever enter the up matmuls, which take them in the compute dtype
        hidden = tuple(h.astype(dtype) for h in hidden)
        return (xr.astype(dtype), xk.astype(dtype), xv.astype(dtype)), hidden, shift

    if not _mix_kernel(x, downs):
        if _dense_kernel(downs, x.shape[0], x.shape[1], dtype):

            def grouped(x, prev):
                return xla(x, prev, grouped=True)

            return lax.platform_dependent(x, prev, cuda=grouped, default=xla)
        return xla(x, prev)
    acts = ("tanh", None, None, "sigmoid")  # as in xla() above

    def kernel(x, prev):
        spec = tuple(zip((1, 4, 3, 5), map(_stack_of, downs), acts, strict=True))
        _, mixed, shift, hidden = _prologue(
            blk,
            cfg,
            span,
            at,
            x,
            None,
            prev,
            "att",
            (0, 2, 3),
            spec,  # mixes r, k, v out
        )
        return tuple(a[:, None] for a in mixed), tuple(h[:, None] for h in hidden), shift

    return lax.platform_dependent(x, prev, cuda=kernel, default=xla)


def heads(
    blk: Block,
    cfg: ModelConfig,
    r: Array,
    k: Array,
    v: Array,
    v_first: Array,
    is_first: Array | bool,
    hidden: tuple[Array, Array, Array, Array],
    S: Array,
    span: Span,
) -> tuple[Array, Array, Array]:
    """From r, k, v [B, T, C] and the LoRA hiddens to the gated output (out * g [B, T, C]),
    v_first and the new WKV state: LoRA ups, WKV-7, group norm, bonus and gate."""
    valid, _, wkv_fn, dtype = span
    B, T, C = r.shape
    H, N = cfg.n_head, cfg.head_size
    hw, ha, hv, hg = hidden
    z = lead(blk.w0, 3) + matmul(blk.w2, hw, dtype)  # decay pre-activation
    log_decay = -DECAY_SCALE * jax.nn.sigmoid(z)  # ld in (-0.6065, 0)
    a = jax.nn.sigmoid(lead(blk.a0, 3) + matmul(blk.a2, ha, dtype))  # in-context learning rate
    g = matmul(blk.g2, hg, dtype)  # output gate (no squash after g2)

    # value residual: layer 0 sets v_first = v, which makes the mix below an exact no-op there
    v_first = jnp.where(is_first, v, v_first)
    v = v + (v_first - v) * jax.nn.sigmoid(lead(blk.v0, 3) + matmul(blk.v2, hv, dtype))

    per_head = lambda t: t.reshape(B, T, H, N)  # noqa: E731  [B, T, C] -> [B, T, H, N]
    kk = per_head(k * lead(blk.k_k, 3))  # removal key from k *before* the k_a rescale
    kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), L2_EPS)
    k = k * (1 + (a - 1) * lead(blk.k_a, 3))

    # padded positions (beyond each row's length) must not touch the state: v = beta = 0, ld = 0
    m = valid[:, :, None, None]
    y, S = wkv_fn(
        S,
        per_head(r),
        per_head(k),
        jnp.where(m, per_head(v), 0.0),
        -kk,
        jnp.where(m, kk * per_head(a), 0.0),
        jnp.where(m, per_head(log_decay), 0.0),
    )

    out = group_norm(y, blk.ln_x_w, blk.ln_x_b, cfg.group_norm_eps)  # [B, T, C]
    bonus = jnp.sum(
        per_head(r) * per_head(k) * lead(blk.r_k, 4), axis=-1, keepdims=True
    )  # [B, T, H, 1]
    out = out + (bonus * per_head(v)).reshape(B, T, C)
    return out * g, v_first, S


def heads_step(
    blk: Block,
    cfg: ModelConfig,
    rkv: list[tuple[quant.Weight, Array]],
    v_first: Array,
    is_first: Array | bool,
    hidden: tuple[Array, Array, Array, Array],
    S: Array,
    span: Span,
    at: LayerAt | None,
) -> tuple[Array, Array, Array]:
    """The receptance, key and value matmuls of `rkv` ((W, x) pairs), then heads(). One decode
    token on NVIDIA GPUs takes one kernel (gpu_time_mix) for the heads, which also adds up the
    grouped matvecs' split-K partial sums, and reads the stacked layer `at` in place (or the
    unstacked `blk` and state S); on the CPU (one decode token, or a prefill step's tokens with
    the token recurrence: cpu_heads) one native call (cpu_kernels.time_mix_step) after the
    matmuls, writing the state into the carried stack in place."""
    dtype = span.dtype
    ws = [w for w, _ in rkv]
    B, T, C = rkv[0][1].shape
    ups = (blk.w2, blk.a2, blk.v2, blk.g2)
    carried = at is not None and at.wkv_carried

    def xla(xr, xk, xv, v_first, S, *hidden):
        r, k, v = matmuls(list(zip(ws, (xr, xk, xv), strict=True)), dtype)
        if carried:  # S is the carried stack: this layer's slice in, the stack updated out
            layer = lax.dynamic_index_in_dim(S, at.index, keepdims=False)  # type: ignore[union-attr]
            out, v_first, new = heads(blk, cfg, r, k, v, v_first, is_first, hidden, layer, span)
            S = lax.dynamic_update_index_in_dim(S, new, at.index, 0)  # type: ignore[union-attr]
        else:
            out, v_first, S = heads(blk, cfg, r, k, v, v_first, is_first, hidden, S, span)
        return out.astype(dtype), v_first, S

    xs = tuple(x for _, x in rkv)
    if carried:
        S = at.wkv  # type: ignore[union-attr]
    native = cpu_heads(cfg, B, T, span.wkv_fn)
    if not native and not heads_kernel(ups, cfg, B, T):
        return xla(*xs, v_first, S, *hidden)
    names = ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_x_w", "ln_x_b")
    vectors = tuple(_stacked(blk, at, n).reshape(-1, C).astype(jnp.float32) for n in names)
    index = _layer_index(at)
    first = bool(is_first) if at is None else None  # stacked: the kernel asks layer == 0

    if native:

        def cpu(xr, xk, xv, v_first, S, *hidden):
            # the matmuls as the XLA path runs them (native too), then the per-head work in one
            # call that updates this layer's state in place (carried: in the scan's stack)
            r, k, v = matmuls(list(zip(ws, (xr, xk, xv), strict=True)), dtype)
            products = tuple(matmul(w, h, dtype) for w, h in zip(ups, hidden, strict=True))
            stack = S if carried else S[None]
            out, v_first, stack = cpu_kernels.time_mix_step(
                index, first, span.valid, r, k, v, v_first, products, vectors, stack,
                eps=cfg.group_norm_eps, decay_scale=DECAY_SCALE, l2_eps=L2_EPS,
            )  # fmt: skip
            return out.astype(dtype), v_first, stack if carried else stack[0]

        return lax.platform_dependent(*xs, v_first, S, *hidden, cpu=cpu, default=xla)
    up_values = tuple(_stack_of(w) for w in ups)  # [L, C, D]

    projected = B > gpu_time_mix.MAX_UP_ROWS
    grouped_ups = projected and _dense_kernel(ups, B, T, dtype)

    def kernel(xr, xk, xv, v_first, S, *hidden):
        # the LoRA ups as the XLA path computes them (in one gpu_dense launch where it applies):
        # the kernel takes their products
        if grouped_ups:
            hidden = tuple(_dense_group(ups, at, hidden, dtype))
        elif projected:
            hidden = tuple(matmul(w, h, dtype) for w, h in zip(ups, hidden, strict=True))
        pairs = list(zip(ws, (xr.astype(dtype), xk.astype(dtype), xv.astype(dtype)), strict=True))
        # one row: the grouped kernel's partial sums [3, P, C, 1] as they are ([3, P, 1, C]:
        # the same bytes); more rows (M > 1: each row's values lie M apart there) or no group:
        # the summed products [3, 1, B, C]
        parts = quant.group_partials(pairs, split=gpu_time_mix.RKV_SPLIT) if B == 1 else None
        if parts is None:
            parts = jnp.stack([y[:, 0] for y in matmuls(pairs, dtype)])[:, None]
        else:
            parts = parts.reshape(3, -1, 1, C)
        out, v_first, S = gpu_time_mix.time_mix_heads(
            index,
            first,
            span.valid[:, 0],
            parts,
            v_first[:, 0],
            tuple(h[:, 0] for h in hidden),
            None if projected else up_values,
            vectors,
            S[None] if at is None else at.wkv,
            eps=cfg.group_norm_eps,
            decay_scale=DECAY_SCALE,
            l2_eps=L2_EPS,
            dtype=dtype,
            round_weights=B > quant.MATVEC_MAX_ROWS,
            in_place=carried,
        )
        return out[:, None], v_first[:, None], S

    return lax.platform_dependent(*xs, v_first, S, *hidden, cuda=kernel, default=xla)


def channel_mix(
    blk: Block,
    cfg: ModelConfig,
    x: Array,
    att: Array,
    prev: Array,
    span: Span,
    at: LayerAt | None = None,
) -> tuple[Array, Array]:
    """The time mix's output matmul (of `att`) added to x, then the FFN of one layer:
    returns (x + output(att) + value(relu(key(lerp))^2), ffn_shift)."""
    x, xk, ffn_shift = ffn_inputs(blk, cfg, x, att, prev, span, at)
    h = jnp.square(jax.nn.relu(matmul(blk.ffn_key, xk, span.dtype)))  # [B, T, F]
    return x + matmul(blk.ffn_value, h, span.dtype), ffn_shift


def ffn_inputs(
    blk: Block,
    cfg: ModelConfig,
    x: Array,
    att: Array,
    prev: Array,
    span: Span,
    at: LayerAt | None,
) -> tuple[Array, Array, Array]:
    """x + output(att), then ln2, token shift and the key's mix: (x, the key matmul's input in
    the compute dtype, the new shift state). One decode token on NVIDIA GPUs takes one kernel
    (gpu_mix), which adds the output matvec's split-K partial sums itself at one row."""
    dtype = span.dtype

    def xla(x, att, prev):
        x = x + matmul(blk.output, att, dtype)
        u = layer_norm(x, blk.ln2_w, blk.ln2_b, cfg.layer_norm_eps)
        d, shift = token_shift(u, prev, span.lengths)
        return x, (u + d * lead(blk.ffn_x_k, 3)).astype(dtype), shift

    if not _mix_kernel(x):
        return xla(x, att, prev)
    B, _, C = x.shape

    def kernel(x, att, prev):
        parts = (
            quant.group_partials([(blk.output, att)], split=gpu_mix.ADDEND_SPLIT)
            if B == 1
            else None
        )
        if parts is None:  # the summed product as the one addend
            addends = matmul(blk.output, att, dtype)[None, :, 0]  # [1, B, C]
        else:  # [1, P, C, 1]: one row's partial sums, the same bytes as [P, 1, C]
            addends = parts.reshape(-1, 1, C)
        x, (xk,), shift, _ = _prologue(blk, cfg, span, at, x, addends, prev, "ffn", (0,))
        return x[:, None], xk[:, None], shift

    return lax.platform_dependent(x, att, prev, cuda=kernel, default=xla)


def block(
    blk: Block,
    cfg: ModelConfig,
    x: Array,
    st: LayerState,
    v_first: Array,
    is_first: Array | bool,
    span: Span,
    at: LayerAt | None = None,
) -> tuple[Array, Array, LayerState]:
    """One residual block: x += time_mix(x); x += channel_mix(x)."""
    att, v_first, att_shift, S = time_mix(blk, cfg, x, st, v_first, is_first, span, at)
    x, ffn_shift = channel_mix(blk, cfg, x, att, st.ffn_shift, span, at)
    return x, v_first, LayerState(att_shift, ffn_shift, S)


def embed(params: Params, cfg: ModelConfig, tokens: Array) -> Array:
    """x0 = LN(emb[token]; ln0), float32 [B, T, C]."""
    e = params.emb.rows(tokens).astype(jnp.float32)
    return layer_norm(e, params.ln0_w, params.ln0_b, cfg.layer_norm_eps)


def layer_of(blk: Block, blocks: Block, i: Array) -> Block:
    """Layer i's block `blk` (the scan's slice of the stacked `blocks`) with every matrix as a
    quant.LayerOf: the GPU kernels read it in place from the stack, other paths use the slice."""
    is_weight = lambda a: isinstance(a, quant.Weight)  # noqa: E731
    wrap = lambda a, stack: quant.LayerOf(a, stack, i) if is_weight(a) else a  # noqa: E731
    return jax.tree.map(wrap, blk, blocks, is_leaf=is_weight)


def _on_gpu() -> bool:
    """Whether programs are built for a GPU (CUDA or ROCm) backend."""
    return jax.default_backend() == "gpu"


def layers(
    params: Params,
    cfg: ModelConfig,
    x: Array,
    state: State,
    span: Span,
) -> tuple[Array, State]:
    """All blocks: a lax.scan over stacked layers, or an unrolled loop over a tuple."""
    v_first0 = jnp.zeros_like(x)
    if params.stacked:
        blocks: Block = params.blocks  # type: ignore[assignment]
        B, T, _ = x.shape
        # the per-head kernel writes each layer's WKV state into the carried stack in place: as
        # the scan's per-layer outputs, XLA fills a new stack with zeros, copies each layer's
        # state into it, and copies the result into the decode loop's carry (at B = 64 three
        # passes over 1.3 GB per token: 2.1 of 9.7 ms per step on an H200)
        ups = (blocks.w2, blocks.a2, blocks.v2, blocks.g2)
        # (on the CPU: the native per-head step updates it in place at every row count)
        carried = (0 < WKV_IN_PLACE_MIN_ROWS <= B and heads_kernel(ups, cfg, B, T)) or cpu_heads(
            cfg, B, T, span.wkv_fn
        )

        def body(carry, xs):
            h, v_first, wkv = carry
            blk, idx, a_sh, f_sh, S = xs
            with jax.named_scope("block"):
                blk = layer_of(blk, blocks, idx)
                if carried:
                    S, wkv_at = None, wkv
                else:
                    wkv_at = state.wkv
                at = LayerAt(blocks, wkv_at, state.att_shift, state.ffn_shift, idx, carried)
                st = LayerState(a_sh, f_sh, S)  # type: ignore[arg-type]
                h, v_first, st = block(blk, cfg, h, st, v_first, idx == 0, span, at)
            if carried:
                return (h, v_first, st.wkv), (st.att_shift, st.ffn_shift, None)
            return (h, v_first, wkv), tuple(st)

        per_layer_wkv = None if carried else state.wkv
        wkv0 = state.wkv if carried else None
        xs = (blocks, jnp.arange(cfg.n_layer), state.att_shift, state.ffn_shift, per_layer_wkv)
        unroll = DECODE_LAYER_UNROLL if T == 1 and _on_gpu() else LAYER_SCAN_UNROLL
        (x, _, wkv), (att, ffn, S) = lax.scan(body, (x, v_first0, wkv0), xs, unroll=unroll)
        return x, State(att, ffn, wkv if carried else S)
    v_first, out = v_first0, []
    for i, blk in enumerate(params.blocks):  # type: ignore[arg-type]
        with jax.named_scope(f"block_{i}"):
            st = LayerState(state.att_shift[i], state.ffn_shift[i], state.wkv[i])
            x, v_first, st = block(blk, cfg, x, st, v_first, i == 0, span)
        out.append(st)
    return x, State(*(jnp.stack(parts) for parts in zip(*out, strict=True)))


def head(params: Params, cfg: ModelConfig, x: Array, dtype) -> Array:
    """logits = head · LN(x; ln_out), float32 [..., V]."""
    return matmul(
        params.head, layer_norm(x, params.ln_out_w, params.ln_out_b, cfg.layer_norm_eps), dtype
    )


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: Array,
    state: State,
    *,
    lengths: Array | None = None,
    wkv_fn: WkvFn = wkv.wkv7_sequential,
    all_logits: bool = False,
    dtype=jnp.float32,
) -> tuple[Array, State]:
    """Run tokens [B, T] from `state`; logits of each row's last valid token [B, V] (or all
    positions [B, T, V]) and the new state. Row b uses tokens[b, :lengths[b]] (default all)."""
    B, T = tokens.shape
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    x = embed(params, cfg, tokens)
    x, state = layers(params, cfg, x, state, Span(valid, lengths, wkv_fn, dtype))
    if not all_logits:
        x = _last_valid(x, lengths)
    return head(params, cfg, x, dtype), state
