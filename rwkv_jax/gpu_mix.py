"""One decode token's layer norm, token shift and mixes — with the LoRA down-projections that
read them — as a single Pallas (Triton) kernel on NVIDIA GPUs.

Before each sub-block's matvecs, one decode token of model.py is a chain of small steps over
one row of C values: the residual add of the previous matvec's output (the FFN's prologue),
the layer norm's two reductions, the token shift against the previous token's normalised row,
the mixes u + (prev - u) · mix_i, their rounding to the compute dtype and, in the time mix, the
four LoRA down-projections (C -> 64..320, dense) with their activations. XLA runs these as 8
kernels before the time mix's matvecs and 4 before the FFN's (H200 trace of the 2.9b model at
B = 1, 1-2.4 us each with ~0.5 us between launches), for a few tens of KB of activations and
3.4 MB of LoRA weights per layer (the 2.9b synthetic model: w1 F32, a1, v1, g1 F16).

Here one launch does it all. Programs are of two kinds:

- writers, one per chunk of the row: x (+ the rounded sum of the addends), the mixes the
  matvecs take (in the compute dtype) and the new shift state;
- LoRA programs, a few rows of one down matrix each: y = act(bf16(Σ_c W[r, c] · bf16(x_i[c])))
  (bf16 = the compute dtype's rounding, as model.matmul does; act = tanh / none / sigmoid).

Every program computes the layer norm's statistics of the whole row itself (a few KB from L2):
no second launch, no barrier between programs. The kernel reads the stacked layers' vectors
and LoRA matrices in place (the layer index, as gpu_kernels does). Only the summation order
differs from the XLA path (model.att_inputs / model.ffn_inputs), which stays the reference and
every other backend's program (tests/test_gpu_mix.py checks the kernel against it).

The FFN's prologue takes the output matvec's split-K partial sums as the kernel wrote them and
adds them itself (as gpu_time_mix does for r, k, v); given the summed product, one addend.

Each program issues all of its loads (its rows of a down matrix; x, the addends, the layer
norm's vectors, the shift state and the mixes it needs) before its first reduction: a
reduction across warps is a barrier, and loads issued after one wait for it. H200, 2.9b, B = 1
(`python -m experiments.gpu_trace --cases tg:1:128`, old code from a copy in the same call): the
time mix's prologue 5.9 -> 5.6 us per call; with ADD_WARPS = 16 and gpu_time_mix.RKV_SPLIT = 5
too, 528.5 / 525.9 -> 552.1 / 549.5 tok/s (old, new, old, new), and DOWN_ROWS 4 -> 2 on top of
that 546.8 -> 557.4 (another call).

Measured on an H200 (2.9b Q4_K_M, bf16, `python -m experiments.gpu_trace --cases tg:1:128
tg:4:64`, base and new in one call): B = 1 341.6 -> 407.7 tok/s, 837 -> 517 kernels per token,
80.4 us per layer (was 91.4); B = 4 takes the XLA path (MAX_ROWS). Float32 decode with and
without it (`python -m experiments.time_mix_check --kernels prologue`): logits within 3.4e-6 of
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
from rwkv_jax.gpu_time_mix import _cpu_backend, one_decode_token  # _cpu_backend: a test seam

Array = jax.Array

# rows this kernel takes. Each program goes over its rows one after another, and at B = 4 one
# call took 24.3 us against 6.9 us at one row (H200, 2.9b: the generation loop ran 820.1 ->
# 747.5 tok/s with it, 344.5 -> 378.7 at one row), so more rows keep the XLA path. Every row at
# once ([B, chunk] tensors, as gpu_kernels' integer step does) lost too: each LoRA program
# still loads every row's whole x for the statistics, and the time mix's prologue took 22.4 us
# per call at B = 4 (15.2 at B = 2); `gpu_trace --cases tg:4:64 tg:2:64`, one call: B = 4
# 1150.7 -> 1099.4, B = 2 739.2 -> 730.8 tok/s
MAX_ROWS = 1
# a row is read in power-of-two chunks of at most CHUNK values (Triton's blocks)
CHUNK = 512
# LoRA rows per program (fewer where a rank is not a multiple) and warps per program. H200, 2.9b,
# B = 1 (`python -m experiments.gpu_trace --cases tg:1:128 --mix ROWS:WARPS`, one call, the time
# mix's prologue per call): 2 x 4 5.3 us (557.4 tok/s), 4 x 4 5.6 us (546.8), 4 x 8 5.8, 2 x 2
# 10.6, 4 x 2 13.7; before the loads came first, 8 x 4 10.4 us and 16 x 4 16.1 us
DOWN_ROWS = 2
NUM_WARPS = 4
# warps per program of the prologue without LoRA downs (the FFN's: C / CHUNK = 5 programs, each
# reading the whole row and the output matvec's partial sums for the statistics, ~110 KB at the
# 2.9b): `--mix-add-warps W`, per call 4 warps 5.9 us, 8 5.0, 16 4.1 (527.2 -> 533.4 / 544.1
# tok/s, one call); 32 5.1 us against 3.9 at 16 in another (543.7 vs 552.1 tok/s)
ADD_WARPS = 16
# the split-K parts of the output matvec whose partial sums the FFN's prologue adds at one row
# (None: the matvec's own, INT_SPLIT). Fewer parts make the prologue cheaper and the matvec
# dearer: `--split-consumed 0:P`, P = 5 / 2 / 1: prologue 5.9 -> 4.2 / 3.3 / 3.0 us, matvec
# +1.1 / +4.5 / +12.2 us per layer; 527.2 -> 527.0 / 513.3 / 455.3 tok/s (4 warps, one call)
ADDEND_SPLIT = None
# RWKV_JAX_PALLAS=0 keeps the XLA path on GPUs (as for gpu_kernels)
ENABLED = os.environ.get("RWKV_JAX_PALLAS", "1") != "0"
_ACTS = {None: lambda y: y, "tanh": jnp.tanh, "sigmoid": lambda y: 1.0 / (1.0 + jnp.exp(-y))}


def chunk(c: int) -> int | None:
    """The chunk a row of c values is read in: the largest power of two <= CHUNK dividing c
    (>= 16), or None."""
    return gpu_kernels._row_tile(c, CHUNK)


def _pow2_divisor(d: int, at_most: int) -> int:
    """Largest power of two <= at_most dividing d."""
    t = at_most
    while d % t:
        t //= 2
    return t


def supports(rows: int, tokens: int, n_embd: int, downs: Sequence = ()) -> bool:
    """Whether one decode token of `rows` streams with these LoRA down matrices (unstacked
    quant.Weight, (D, C)) runs here: dense formats, a row length the chunks divide, not the
    CPU."""
    return (
        one_decode_token(ENABLED, _cpu_backend(), tokens, rows, MAX_ROWS)
        and chunk(n_embd) is not None
        and all(type(w).__name__ in gpu_kernels.DENSE and w.w.ndim == 2 for w in downs)
    )


def mix_prologue(
    layer: Array,
    active: Array,
    x: Array,
    addends: Array | None,
    prev: Array,
    ln: tuple[Array, Array],
    mix: Array,
    outs: Sequence[int],
    downs: Sequence[tuple[int, Array, str | None]] = (),
    *,
    eps: float,
    dtype,
    interpret: bool = False,
) -> tuple[Array | None, list[Array], Array, list[Array]]:
    """LN, token shift and mixes of one decode token for B rows, and LoRA downs of the mixes.

    layer: int32 [] index into the stacks; active: [B] bool (False: a padding row, whose shift
    state stays); x: the residual stream, float32 [B, C]; addends: None, or float32 [P, B, C]
    added to x first as dtype(Σ_p addends[p]) — a matvec's split-K partial sums, or (P = 1) its
    product; prev: the shift states of every layer [L, B, C] (read in place; its dtype kept);
    ln: (weight, bias) [L, C]; mix: the mixing vectors [L, n, C] float32; outs: which mixes to
    return, in dtype; downs: (mix index, stored down matrix [L, D, C], activation None / "tanh" /
    "sigmoid") per LoRA.

    Returns (x + addends float32 [B, C], or None without addends; [mix_i in dtype [B, C] for i in
    outs]; this layer's new shift state [B, C]; [act(dtype(mix_i · Wᵀ)) in dtype [B, D] per down:
    what the up matmuls take]).
    """
    B, C = x.shape
    index = jnp.asarray(layer, jnp.int32).reshape(1)
    act = active.astype(jnp.float32).reshape(B, 1)
    extra = () if addends is None else (addends,)
    mats = tuple(w for _, w, _ in downs)
    args = (index, act, x, *extra, prev, ln[0], ln[1], mix, *mats)
    spec = tuple((i, w.shape[1], f) for i, w, f in downs)
    call = _call(
        tuple(a.shape for a in args),
        tuple(jnp.dtype(a.dtype) for a in args),
        addends is not None,
        tuple(outs),
        spec,
        jnp.dtype(dtype),
        eps,
        interpret,
    )
    res = list(call(*args))
    x_new = res.pop(0) if addends is not None else None
    mixed, shift, hidden = res[: len(outs)], res[len(outs)], res[len(outs) + 1 :]
    return x_new, mixed, shift, hidden


@functools.cache
def _call(shapes, dtypes, has_add, outs, downs, dtype, eps, interpret):
    """The pallas_call for inputs of these shapes: a 1-D grid of writer programs (one per chunk
    of the row) then LoRA programs (DOWN_ROWS rows of one matrix each); every input passed whole
    and indexed in the kernel."""
    f32 = jnp.float32
    B, C = shapes[2]
    ch = chunk(C)
    n_ch = C // ch
    n_add = shapes[3][0] if has_add else 0
    prev_dtype = dtypes[4 if has_add else 3]
    # program ranges: writers [0, n_ch), then each down matrix's row tiles
    tiles, start = [], n_ch
    for _, d, _ in downs:
        r = _pow2_divisor(d, DOWN_ROWS)
        tiles.append((start, r))
        start += d // r
    n_programs = start

    def rounded(v):  # a matmul result, or a matmul input, as the compute dtype has it
        return v.astype(dtype).astype(f32)

    def kernel(layer_ref, act_ref, x_ref, *refs):
        refs = list(refs)
        add_ref = refs.pop(0) if has_add else None
        prev_ref, lnw_ref, lnb_ref, mix_ref = refs[:4]
        w_refs = refs[4 : 4 + len(downs)]
        out_refs = refs[4 + len(downs) :]
        xo_ref = out_refs.pop(0) if has_add else None
        mix_outs, sh_ref = out_refs[: len(outs)], out_refs[len(outs)]
        h_refs = out_refs[len(outs) + 1 :]
        layer = layer_ref[0]
        p = pl.program_id(0)

        def x_at(b, cols):  # float32 [ch]: x plus the rounded sum of the addends
            xj = x_ref[b, cols]
            if has_add:
                parts = [add_ref[q, b, cols] for q in range(n_add)]
                xj = xj + rounded(functools.reduce(jnp.add, parts))
            return xj

        def at(b, cols, mixes):  # row b's loads at cols: x, LN weight and bias, prev, mixes
            raw = prev_ref[layer, b, cols]
            vecs = (lnw_ref[layer, cols], lnb_ref[layer, cols], raw.astype(f32))
            return x_at(b, cols), vecs, [mix_ref[layer, i, cols] for i in mixes], raw

        def whole_row(b):  # x over the whole row in chunks, for the statistics
            return [x_at(b, pl.ds(j * ch, ch)) for j in range(n_ch)]

        def stats(xs):  # the layer norm's mean and 1/std of a row, from all of its chunks
            mu = functools.reduce(jnp.add, [jnp.sum(xj) for xj in xs]) / C
            var = functools.reduce(jnp.add, [jnp.sum(jnp.square(xj - mu)) for xj in xs]) / C
            return mu, lax.rsqrt(var + eps)

        def normed(xj, vecs, mu, rstd):  # (u = LN(x), d = prev - u)
            lnw, lnb, prev = vecs
            u = (xj - mu) * rstd * lnw + lnb
            return u, prev - u

        # every program issues all of its loads before its first reduction: a reduction across
        # warps is a barrier, and loads issued after one wait for it (a chain of L2 round trips)
        def writer():
            cols = pl.ds(pl.multiple_of(p * ch, ch), ch)
            rows = [(whole_row(b), at(b, cols, outs)) for b in range(B)]
            for b, (xs, (xj, vecs, mixes, raw)) in enumerate(rows):
                u, d = normed(xj, vecs, *stats(xs))
                if has_add:
                    xo_ref[b, cols] = xj
                for o_ref, mix in zip(mix_outs, mixes, strict=True):
                    o_ref[b, cols] = (u + d * mix).astype(o_ref.dtype)
                live = act_ref[b, :] != 0.0  # [1]
                sh_ref[b, cols] = jnp.where(live, u.astype(prev_dtype), raw)

        def down(k):
            i, _, fn = downs[k]
            first, r = tiles[k]
            rows = pl.ds(pl.multiple_of((p - first) * r, r), r)
            w_ref = w_refs[k]
            chunks = [pl.ds(j * ch, ch) for j in range(n_ch)]
            ws = [w_ref[layer, rows, cols].astype(f32) for cols in chunks]
            loaded = [[at(b, cols, (i,)) for cols in chunks] for b in range(B)]
            for b, parts in enumerate(loaded):
                mu, rstd = stats([xj for xj, *_ in parts])
                acc = jnp.zeros((r, ch), f32)
                for w, (xj, vecs, (mix,), _) in zip(ws, parts, strict=True):
                    u, d = normed(xj, vecs, mu, rstd)
                    acc = acc + w * rounded(u + d * mix)[None, :]
                y = rounded(jnp.sum(acc, axis=1))
                h_refs[k][b, rows] = _ACTS[fn](y).astype(dtype)

        pl.when(p < n_ch)(writer)
        for k in range(len(downs)):
            first, r = tiles[k]
            end = first + downs[k][1] // r
            pl.when((p >= first) & (p < end))(functools.partial(down, k))

    def whole(shape):  # the whole array: the kernel indexes it itself
        return pl.BlockSpec(shape, lambda p: (0,) * len(shape))

    out_shape = [jax.ShapeDtypeStruct((B, C), f32)] if has_add else []
    out_shape += [jax.ShapeDtypeStruct((B, C), dtype) for _ in outs]
    out_shape.append(jax.ShapeDtypeStruct((B, C), prev_dtype))
    out_shape += [jax.ShapeDtypeStruct((B, d), dtype) for _, d, _ in downs]
    return pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(n_programs,),
        in_specs=[whole(s) for s in shapes],
        out_specs=tuple(whole(o.shape) for o in out_shape),
        compiler_params=gpu_kernels.compiler_params(
            NUM_WARPS if downs else ADD_WARPS, 1, interpret
        ),
        interpret=interpret,
        name="rwkv_jax_mix_prologue",
    )
