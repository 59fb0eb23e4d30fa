"""Decode matmuls over packed K-quant blocks on NVIDIA GPUs, as Pallas (Triton) kernels.

XLA's paths for a few activation rows either repeat the unpacking per row (the fused
unpack-multiply-reduce matvec, quant._Blocked.matvec_fused) or write a dequantized copy of the
weight and read it back for a dot (more rows). These kernels unpack each packed byte once, in
registers, and apply it to every row:

- 1..MAX_ROWS rows: float32 sums per row and sub-block with the scales factored out,
  acc[r, j] += d*sc[j] * sum(q * x[r]) - dmin*mn[j] * sum(x[r]) (FACTORED);
- the same rows of bf16/f16 x where the quants are stored as 32-bit words (the "gpu" profile,
  Weight.WORD_FIELDS): sum(q * x) as integer dot products — each program holds x per sub-block
  as 16-bit integers (_split_plane: exact for every bfloat16 value from half the sub-block's
  power-of-two scale up, within scale / 2 below) and sums q * w four quants per PTX dp4a,
  exactly, in int32 (the float path executes ~9 thread instructions per weight: Nsight
  Compute, BENCHMARKS.md);
- up to MMA_MAX_ROWS rows of bf16/f16: each super-block's values rounded to x's dtype (as the
  XLA path's dequantize-then-dot rounds them) and multiplied on tensor cores, float32 sums.

Triton wants every tensor a power of two long: a Q4_K super-block is decoded as two nibble
planes of [2, 2, 32] values, Q6_K as two planes of [2, 2, 2, 16]. With float32 accumulators
the kernel picks x's matching plane itself (a strided load of x as it lies, widened in
registers: no XLA kernel rearranges x before each call); the tensor-core kernel takes x
rearranged plane-major with the rows last. Only the summation order differs from
dequantize-then-dot. Quants stored as words are decoded as 8 planes of 32 values per
super-block, one per nibble plane and byte position (x's matching plane picked, or arranged so
for the tensor cores).

Grid: (row tiles of weight rows, SPLIT parts of the super-blocks); each program loops over its
super-blocks and writes a partial [rows, M] sum that XLA adds up (or the consumer:
`partials=True`, the per-head decode kernel of gpu_time_mix at one row).

Stacked layers: given the layer index, a kernel reads layer i of the [L, ...] fields in place
(quant.LayerOf). A custom call takes whole buffers, so the alternative — slicing the layer out
first — makes XLA copy every packed field before every call: at B = 4 a third of the decode
step went to those copies (H200, experiments/gpu_trace).

Measured on an H200, whole decode steps of the 2.9b Q4_K_M model, XLA paths -> these kernels
(`python -m experiments.gpu_matvec --variants none --model 2.9b --decode-variants xla
pallas:32:4:10`): B=4 20.32 -> 9.62 ms, B=8 13.88 -> 9.36 ms, B=64 17.91 -> 14.63 ms per step.
One row (B=1 decode) takes them too since the kernels read stacked layers in place: the
generation loop (`python -m experiments.gpu_trace --cases tg:1:128 --pallas 1:0:0:0` against
the XLA fused matvec) ran 263.0 -> 277.7 and 260.8 -> 274.6 tok/s on two H200s; before, the
per-layer copies out of the stack made it slower (5.22 ms XLA vs 6.21 ms per step). Per matrix
they still reach only ~1 TB/s at one row (H200 trace, per call: C x C 4.8-5.0 us for 3.7 MB,
the two 14.7 MB FFN matrices 15.0 us accumulating elementwise, 13.9 us factored). Converting
the unpacked integers to float32 without the int-to-float instruction (2^23 bit trick) changed
nothing, so conversions do not bound them. Small launches are what cost: the receptance, key
and value matvecs of a layer as one launch (`matmul_group`, 11 MB) take ~4.9 us against 3 x 5.0
us apart; generation loop, H200, one call each: B=1 282.9 -> 299.5, B=4 681.9 -> 717.1, B=64
5171.6 -> 5328.5 tok/s. Tests run the kernels in Pallas' interpreter on the CPU
(`interpret=True`) and check their Triton lowering for CUDA.

Integer dot products (quants as words, H200, 2.9b Q4_K_M; BENCHMARKS.md "Decode kernels under
Nsight Compute"): per matrix at one row, all kernels of a product (`python -m
experiments.gpu_sweep --configs 32:4:20`, RWKV_JAX_PROFILE=default -> gpu) r/k/v 12.58 -> 9.88,
C x C 5.90 -> 5.22, FFN key 14.55 -> 11.70, FFN value 14.92 -> 12.99 (Q6_K 19.30 -> 16.46),
head 104.8 -> 68.0 us; generation loop (gpu_trace tg:1:128) 451.2 -> 519.7 tok/s. x prepared
by XLA kernels before each call instead made the kernels faster still (FFN key 8.78 us) but
cost three launches per product (B = 1 456.0 -> 415.0 tok/s).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array

QK_K = 256
# activation rows (padded to a power of two) these kernels take with float32 accumulators
MIN_ROWS, MAX_ROWS = 1, 4
# more rows (batched decode) take the tensor-core kernel, in row tiles of MMA_ROWS
MMA_MAX_ROWS, MMA_ROWS = 64, 64
# launch shape: weight rows per program (fewer when the row count is not a multiple), warps per
# program, programs per row tile along the super-blocks (at most; a divisor of their count: 1 =
# one program loops over a whole row, more = split-K, partial sums added by XLA). Per matrix at
# one row (H200, `python -m experiments.gpu_sweep`, kernel time from a trace): 32 rows x 4 warps
# is best or level for every decode matrix but the head; split 20 (two super-blocks per program
# where a row has 40) takes the F -> C matrices from 14.5 to 13.1 us (Q4_K) and 20.6 to 18.4 us
# (Q6_K), the same as split 10 elsewhere; 8 warps, 16 or 128 rows, or split <= 2 are slower.
BLOCK_ROWS = 32
NUM_WARPS = 4
SPLIT = 20
# ... for the integer dot products (quants as words, bf16/f16 x): split 10 (it only changes the
# F -> C matrices, 40 super-blocks per row: 4 per program instead of 2). Same sweep with
# RWKV_JAX_PROFILE=gpu, all kernels per matrix, split 20 -> 10: FFN value Q4_K 12.82 -> 12.48
# us, Q6_K 16.40 -> 15.26 us; C -> C and C -> F matrices (10 super-blocks) level; 16-128 rows,
# 2-8 warps or 1-3 stages within ~0.3 us of 32 x 4 or slower for every matrix (the head keeps
# its WIDE_ROWS).
INT_SPLIT = 10
# ... and row tiles per program on that path: a program splits x into integer digits once per
# super-block and multiplies that many tiles of rows by them, one after another. Each program
# takes at most INT_ROW_LOOP (row tile, super-block) pairs, and the launch keeps at least
# INT_LOOP_PROGRAMS programs. H200, `python -m experiments.gpu_sweep --configs
# 32:4:SPLIT:2:LOOP`, kernel time per matrix at one row, loop 1 / 2 / 4 / 8: one super-block
# per program (split 10): r/k/v group 8.19 / 7.97 / 7.79 / 12.18 us, FFN key 9.73 / 9.25 / 8.77
# / 11.68, C x C (800 programs at loop 1) 3.38 / 3.23 / 4.16 / 6.11; two (split 5): r/k/v 9.50
# / 8.62 / 12.94, FFN key 11.02 / 9.46 / 12.98; four (the FFN value at split 10) 11.63 / 13.68
# / 28.29 / 31.58 (another call). Generation loop (`python -m experiments.gpu_trace --cases
# tg:1:128 tg:4:64 [--int-row-loop 1]`, one call, before / after twice): B = 1 532.1 / 540.2,
# 533.3 / 543.1 tok/s (the r/k/v group -0.9 us and the FFN key -0.8 us per layer); B = 4 lost
# (1089.7 / 1047.9, 1090.1 / 1054.3: its r/k/v group took 20.3 instead of 16.1 us per layer at
# loop 4), so from two rows a program takes one tile unless asked. Q6_K (FFN value at split 20)
# 14.08 / 16.19 us, the head (one super-block per program) 63.18 / 64.32 / 63.34 us at loop 1 /
# 2 / 4: Q6_K keeps one tile too.
INT_ROW_LOOP, INT_LOOP_PROGRAMS = 4, 600
# ... and at one row Q4_K splits the super-blocks into (at most) INT_SPLIT_ONE_ROW parts where
# each program then takes more than one row tile: the FFN value (40 super-blocks per row) takes
# 2 per program and 2 row tiles (INT_ROW_LOOP), 9.87 us against 11.68 at split 10 (4 per
# program, one tile); in 20 parts with one tile it took 12.24 us, and Q6_K 14.08 vs 14.14 us, so
# neither changes. Generation loop (`gpu_trace --cases tg:1:128 [--int-split 20]`, one call,
# split 10 / 20 twice): 543.9 / 565.1, 544.7 / 559.3 tok/s
INT_SPLIT_ONE_ROW = 20
# the tensor-core kernel (more rows) splits its super-blocks into at most MMA_SPLIT parts; from
# MMA_WIDE_M rows (padded) into the fewest parts giving at least MMA_PROGRAMS programs per launch
# instead: each part's [out, M] float32 sums are written, read back and added by XLA, which
# costs more the more rows. H200, 2.9b Q4_K_M, `python -m experiments.gpu_trace --cases tg:64:32
# tg:32:32 tg:8:64 [--mma ::PROGRAMS::]`, one machine, tok/s: split 10 8892 / 5487 / -, at least
# 528 programs 9084 / 5424, 792 9174 / 5562, 1056 9022 / 5682; on another, with gpu_dense: split
# 10 9405 / 5907 / 1852, 792 9688 / 6042 / 1725 (B = 8, 16 rows: split 10 kept).
# MMA_WARPS / MMA_STAGES: its warps per program and pipelining depth (8 warps or 3 stages: B =
# 64 9027 -> 7840 / 8020 tok/s). One stage: since the quants are words (8 planes of 32 values, a
# [32, M] x tile in shared memory each) two stages took 78 KB of shared memory per program, two
# programs per SM (Nsight Compute: 12.5% occupancy, 800 programs in 3.03 waves for the FFN key
# matrix). H200, `python -m experiments.gpu_trace --cases tg:64:32 tg:32:32 tg:8:64 --mma ""
# ::::1 "" ::::1`, one process: 2 -> 1 stage B = 64 10096.7 / 9975.8 -> 10682.4 / 10879.1
# tok/s, B = 32 6952.3 / 6899.4 -> 7063.8 / 7011.2, B = 8 1886.2 / 1885.2 -> 1993.6 / 2001.7;
# per matrix at 64 rows (`gpu_sweep --rows 64`, all kernels) FFN key 43.1 -> 33.5 us, FFN
# value 46.0 -> 37.0 us, the C x C matrices level.
MMA_SPLIT = 10
MMA_WIDE_M, MMA_PROGRAMS = 32, 792
MMA_WARPS, MMA_STAGES = 4, 1
# matrices of at least WIDE_OUT rows (the head) take WIDE_ROWS rows per program: 92.5 us against
# 106.2 us with 32 (Q6_K 65536 x 2560, same sweep)
WIDE_OUT, WIDE_ROWS = 32768, 64
NUM_STAGES = 2  # Triton software pipelining of the super-block loop
# float32-accumulator kernels (<= MAX_ROWS rows): True = scales factored out of each sub-block's
# sum (scale * sum(q x) - offset * sum(x), as llama.cpp's matvecs do: less work per value, one
# reduction per sub-block); False = value * x accumulated elementwise over the super-block view.
# H200, generation loop (gpu_trace, one call each): B=1 275.7 -> 282.8, B=4 610.7 -> 689.2 tok/s
FACTORED = True
# RWKV_JAX_PALLAS=0 keeps the XLA fused matvec on GPUs (for comparisons and bisecting)
ENABLED = os.environ.get("RWKV_JAX_PALLAS", "1") != "0"
# the dense formats (quant class names) the LoRA kernels (gpu_mix, gpu_time_mix, gpu_dense) read
DENSE = ("F32", "F16", "BF16")


def _pow2_at_least(m: int) -> int:
    """Smallest power of two >= m."""
    return 1 << max(0, m - 1).bit_length()


def _row_tile(out: int, block_rows: int | None = None) -> int | None:
    """Rows per program: the largest power of two <= block_rows dividing `out` (>= 16), or None."""
    t = block_rows or BLOCK_ROWS
    while t >= 16:
        if out % t == 0:
            return t
        t //= 2
    return None


def supports(weight, rows: int, dtype=jnp.bfloat16) -> bool:
    """Whether `weight` (an unstacked quant.Weight) times `rows` activation rows of `dtype` runs
    here: MIN_ROWS..MAX_ROWS rows (float32 FMAs), or up to MMA_MAX_ROWS of bf16/f16 (tensor
    cores)."""
    if not ENABLED or _format(weight) is None or rows < MIN_ROWS:
        return False
    mma = rows > MAX_ROWS
    if mma and (rows > MMA_MAX_ROWS or not _tensor_cores(jnp.dtype(dtype))):
        return False
    out, n_in = weight.shape
    lead = jax.tree.leaves(weight)[0].ndim - type(weight).leaf_ndim()
    return lead == 0 and n_in % QK_K == 0 and _row_tile(out, MMA_ROWS if mma else None) is not None


def _tensor_cores(dtype) -> bool:
    """Whether the default device's tensor cores take `dtype` (bf16: sm_80+, f16: sm_70+);
    True off CUDA (the CUDA branch is not lowered there) or when the device does not say."""
    if dtype not in (jnp.bfloat16, jnp.float16):
        return False
    try:
        cc = float(jax.devices()[0].compute_capability)
    except (AttributeError, TypeError, ValueError):
        return True
    return cc >= (8.0 if dtype == jnp.bfloat16 else 7.0)


def matmul(weight, x: Array, *, layer: Array | None = None, **launch) -> Array:
    """x @ W^T for x [..., in] (rows as `supports` says) -> float32 [..., out].

    layer: `weight` is a stack [L, ...] of equal weights and this int32 scalar picks the one to
    multiply by (read in place, no copy of the layer's fields). launch: see `matmul_group`.
    """
    return matmul_group([weight], [x], layer=layer, **launch)[0]


def matmul_group(
    weights: Sequence,
    xs: Sequence[Array],
    *,
    layer: Array | None = None,
    interpret: bool = False,
    block_rows: int | None = None,
    num_warps: int | None = None,
    split: int | None = None,
    num_stages: int | None = None,
    factored: bool | None = None,
    row_loop: int | None = None,
    partials: bool = False,
) -> list[Array] | Array:
    """[x_g @ W_g^T] for G weights of one format and shape and G inputs of one shape, in one
    launch (the receptance, key and value matrices of a layer: three small launches cost more
    than one three times the size). Each -> float32 [..., out].

    Up to MAX_ROWS rows: float32 accumulators per row. More: each super-block's values rounded
    to x's dtype (as the XLA path's dequantize-then-dot does) and multiplied on tensor cores with
    float32 accumulation. block_rows / num_warps / split / num_stages / factored override the
    launch shape and the accumulation, row_loop the integer path's row tiles per program
    (INT_ROW_LOOP; tuning: experiments/gpu_sweep.py, gpu_trace.py).
    partials: return the kernel's split-K partial sums as they are, float32 [G, parts, out, M]
    (M = the rows padded to a power of two), for a consumer that adds them itself.
    """
    w0, x0 = weights[0], xs[0]
    if any(type(w) is not type(w0) or w.shape != w0.shape for w in weights) or any(
        x.shape != x0.shape or x.dtype != x0.dtype for x in xs
    ):
        raise ValueError("matmul_group needs weights of one format and shape, inputs of one shape")
    out, n_in = w0.shape
    lead = x0.shape[:-1]
    rows = math.prod(lead)
    mma = rows > MAX_ROWS
    m = max(16, _pow2_at_least(rows)) if mma else _pow2_at_least(rows)
    nb = n_in // QK_K
    fmt = _format(w0)
    ints = fmt.ints is not None and not mma and x0.dtype in INT_DOT_DTYPES
    stacked = layer is not None
    arrays = []
    for w, x in zip(weights, xs, strict=True):
        xr = x.reshape(rows, n_in)
        if m != rows:
            xr = jnp.pad(xr, ((0, m - rows), (0, 0)))
        # free reshapes to the kernel's power-of-two views: fields [out, nb, ...]
        lead_w = (-1,) if stacked else ()
        arrays += [getattr(w, f).reshape(*lead_w, out, nb, *v) for f, v in fmt.fields]
        # x [M, nb, *x view] as it is, dtype too (rows: the kernel picks each plane and widens
        # it, so no XLA kernel rearranges x first) or [nb, 2 planes, 128, M] (tensor cores)
        xv = xr.reshape(m, nb, *fmt.x_view)
        if mma:
            xv = jnp.moveaxis(xv, 2 + fmt.plane_axis, 2)  # [M, nb, 2 planes, *plane view]
            if fmt.words:  # per plane and byte position b ([.., k, b] -> b first)
                xv = jnp.moveaxis(xv, -1, 3)
            n_planes = 8 if fmt.words else 2
            xv = jnp.moveaxis(xv.reshape(m, nb, n_planes, QK_K // n_planes), 0, -1)
        arrays.append(xv)
    wide = WIDE_ROWS if out >= WIDE_OUT else None
    tile = _row_tile(out, block_rows or (MMA_ROWS if mma else wide))
    groups = len(weights)
    if split or not mma:
        parts = _parts(nb, split or (INT_SPLIT if ints else SPLIT))
    else:
        parts = _mma_parts(nb, groups * out // tile, m)
    looped = ints and m == 1 and fmt.name == "q4_k"  # the default row loop's reach: INT_ROW_LOOP
    if looped and not split:  # more parts where they get row tiles (see INT_SPLIT_ONE_ROW)
        more = _parts(nb, INT_SPLIT_ONE_ROW)
        if _int_row_loop(groups * out // tile, more, nb // more) > 1:
            parts = more
    per_group = len(fmt.fields) + 1
    one = arrays[:per_group]  # one group's operands: the others match them
    shapes, dtypes = tuple(a.shape for a in one), tuple(a.dtype for a in one)
    warps, stages = (MMA_WARPS, MMA_STAGES) if mma else (NUM_WARPS, NUM_STAGES)
    loop = 1
    if ints and (row_loop or looped):
        loop = row_loop or _int_row_loop(groups * out // tile, parts, nb // parts)
    while (out // tile) % loop:
        loop //= 2
    launch = (tile, loop, parts, num_warps or warps, num_stages or stages)
    fact = "ints" if ints else (FACTORED if factored is None else factored)
    call = _call(fmt, shapes, dtypes, m, out, nb, *launch, mma, fact, stacked, groups, interpret)
    if stacked:
        arrays.insert(0, jnp.asarray(layer, jnp.int32).reshape(1))
    partial = call(*arrays)  # [G, parts, out, M]
    if partials:
        return partial
    y = partial[:, 0] if parts == 1 else jnp.sum(partial, axis=1)  # [G, out, M]
    return [y[g].T[:rows].reshape(*lead, out) for g in range(groups)]


def _int_row_loop(tiles: int, parts: int, per: int) -> int:
    """Row tiles per program on the integer path for `tiles` row tiles in `parts` parts of `per`
    super-blocks: INT_ROW_LOOP // per, halved until the launch keeps INT_LOOP_PROGRAMS programs
    (or 1)."""
    loop = max(1, INT_ROW_LOOP // per)
    while loop > 1 and tiles // loop * parts < INT_LOOP_PROGRAMS:
        loop //= 2
    return loop


def _parts(nb: int, split: int) -> int:
    """Programs per row tile along the super-blocks: the largest divisor of nb <= split."""
    return max(p for p in range(1, min(nb, split) + 1) if nb % p == 0)


def _mma_parts(nb: int, tiles: int, m: int) -> int:
    """The tensor-core kernel's parts for `tiles` row tiles of nb super-blocks and M rows: from
    MMA_WIDE_M rows the fewest (a divisor of nb) giving MMA_PROGRAMS programs, else MMA_SPLIT."""
    if not MMA_PROGRAMS or m < MMA_WIDE_M:
        return _parts(nb, MMA_SPLIT)
    return min(
        p for p in range(1, nb + 1) if nb % p == 0 and (tiles * p >= MMA_PROGRAMS or p == nb)
    )


@functools.cache
def _call(
    fmt,
    shapes,
    dtypes,
    m,
    out,
    nb,
    tile,
    loop,
    parts,
    num_warps,
    stages,
    mma,
    factored,
    stacked,
    groups,
    interpret,
):
    """The pallas_call for `groups` (format, weight shape, M) products: grid (groups x row tiles,
    super-block parts); shapes are one group's operands (fields, then x).

    stacked: the fields are [L, out, nb, *view], passed whole after an int32 [1] layer index;
    the kernel offsets its loads by (layer, row tile, part) itself. loop: row tiles per program
    (the integer path; 1 elsewhere)."""
    per = nb // parts  # super-blocks per program
    n_fields = len(fmt.fields)
    span = tile * loop  # rows per program
    tiles = out // span  # programs per group along the rows: program i works on group i // tiles

    def field_spec(shape):
        if stacked:  # the whole stack; loads index it (see `get` in the kernel)
            return pl.BlockSpec(shape, lambda i, k: (0,) * len(shape))
        # [out, nb, *view] -> block [span, per, *view]
        zeros = (0,) * (len(shape) - 2)
        return pl.BlockSpec((span, per, *shape[2:]), lambda i, k: (i % tiles, k, *zeros))

    group_specs = [field_spec(s) for s in shapes[:n_fields]]
    if mma:  # x [nb, planes, 256 / planes, M]
        _, n_planes, plane_len, _ = shapes[-1]
        group_specs.append(pl.BlockSpec((per, n_planes, plane_len, m), lambda i, k: (k, 0, 0, 0)))
    else:  # x [M, nb, *x view]
        zeros = (0,) * (len(shapes[-1]) - 2)
        group_specs.append(pl.BlockSpec((m, per, *shapes[-1][2:]), lambda i, k: (0, k, *zeros)))

    def x_plane(x_ref, r, s, k):
        # row r's plane k of super-block s, float32 [*plane view]: a strided load of x's view
        # (over words plane k is (plane k // 4, byte position k % 4 on x view's last axis))
        at = [slice(None)] * len(fmt.x_view)
        if fmt.words:
            at[fmt.plane_axis], at[-1] = k // 4, k % 4
        else:
            at[fmt.plane_axis] = k
        return x_ref[(r, s, *at)].astype(jnp.float32)

    in_specs = group_specs * groups
    if stacked:
        in_specs.insert(0, pl.BlockSpec((1,), lambda i, k: (0,)))

    def vec_step(get, s, ins, accs):
        # one float32 accumulator per activation row, elementwise over the plane view: the
        # cross-lane reduction happens once, at the end
        *fields, x_ref = ins
        for k, w in enumerate(fmt.planes(get, *fields, s)):
            accs = tuple(acc + w * x_plane(x_ref, r, s, k)[None] for r, acc in enumerate(accs))
        return accs

    def factored_step(get, s, ins, accs):
        # per row and sub-block: scale * sum(q x) - offset * sum(x), accumulators [tile, group, 1]
        *fields, x_ref = ins
        for k, (q, scale, offset) in enumerate(fmt.parts(get, *fields, s)):
            new = []
            for r, acc in enumerate(accs):
                xk = x_plane(x_ref, r, s, k)  # [*plane view]
                qx = jnp.sum(q * xk[None], axis=-1, keepdims=True)
                xs = jnp.sum(xk, axis=-1, keepdims=True)[None]
                new.append(acc + scale * qx - offset * xs)
            accs = tuple(new)
        return accs

    # the integer step's rows: from two rows all at once, on a leading axis of their own (one
    # split of x and one dp4a call per plane for every row; row by row, each row cost about
    # what the weights' unpacking does); one row without that axis (as [1, ...] it was 4-25%
    # slower per matrix). H200, `python -m experiments.gpu_sweep --rows R --configs 32:4:10`,
    # all kernels per matrix, row by row -> at once: 4 rows r/k/v 23.0 -> 18.1 us, FFN key
    # 27.3 -> 20.1, FFN value Q4_K 40.4 -> 23.2, Q6_K 44.6 -> 23.7; 2 rows 15.0 -> 14.1, 16.8
    # -> 15.7, 19.1 -> 17.1, 21.2 -> 17.2; generation loop (gpu_trace tg:B) B = 4 903.3 ->
    # 1165.4, B = 3 698.5 -> 905.9, B = 2 706.8 -> 752.8 tok/s (B = 1: unchanged code). The
    # float factored step (float32 x) stays row by row: written the same way it lost (a float32
    # model, `gpu_trace --dtype float32`: B = 4 973.8 -> 723.9, B = 2 663.9 -> 545.9 tok/s)
    lead = (m,) if m > 1 else ()

    def x_digits(x_ref, s):
        # x's 16-bit integer values (256 hi + lo, made here from x as it lies: _split_plane)
        # per plane of super-block s: [(hi, lo, scale, sum)]
        out = []
        for k in range(fmt.x_view[fmt.plane_axis]):
            at = tuple(k if a == fmt.plane_axis else slice(None) for a in range(len(fmt.x_view)))
            # plane k, float32 [*lead, *int view, 4]: a word's four values on the last axis
            x = x_ref[(slice(None) if lead else 0, s, *at)].astype(jnp.float32)
            out.append(_split_plane(x))
        return out

    def int_step(get, s, ins, acc, digits):
        # per row and sub-block: scale * sx * sum(q w) - offset * sum(x), with w x's digits
        # (x_digits of super-block s, made once for the program's row tiles) and sum(q w) exact
        # in int32 (dp4a); acc [*lead, tile, *group, 1]
        *fields, _ = ins
        # weights' and x's axes to broadcast on: [*lead, tile, ...]
        w_ax, x_ax = ((None,), (slice(None), None)) if lead else ((), (None,))
        for (q, scale, offset), (hi, lo, sx, xs) in zip(
            fmt.ints(get, *fields, s), digits, strict=True
        ):
            shape = (*lead, *q.shape)
            q, hi, lo = (jnp.broadcast_to(a, shape) for a in (q[w_ax], hi[x_ax], lo[x_ax]))
            qx = sx[x_ax] * jnp.sum(_dot4(q, hi, lo, interpret), axis=-1, keepdims=True)
            acc = acc + scale[w_ax] * qx.astype(jnp.float32) - offset[w_ax] * xs[x_ax]
        return acc

    def mma_step(get, s, ins, acc):
        *fields, x_ref = ins
        planes = fmt.planes(get, *fields, s)
        for k, w in enumerate(planes):
            w = w.reshape(tile, QK_K // len(planes)).astype(dtypes[-1])  # rounded as XLA does
            acc = acc + jnp.dot(w, x_ref[s, k], preferred_element_type=jnp.float32)
        return acc

    def kernel(*refs):
        *ins, o_ref = refs
        if stacked:  # field refs are whole stacks: this program's tile of layer `idx`
            idx_ref, *ins = ins
            layer = idx_ref[0]
            row_tile = pl.program_id(0) % tiles if groups > 1 else pl.program_id(0)
            k0 = pl.program_id(1) * per

            def getter(r):  # loads of the program's r-th tile of rows
                rows = pl.ds(pl.multiple_of((row_tile * loop + r) * tile, tile), tile)
                return lambda ref, s, *rest: ref[(layer, rows, k0 + s, *rest)]
        else:

            def getter(r):
                return lambda ref, s, *rest: ref[(pl.ds(r * tile, tile), s, *rest)]

        gets = [getter(r) for r in range(loop)]
        if groups == 1:
            return product(gets, ins, o_ref)
        n = len(shapes)  # one group's operands: fields, then x
        for g in range(groups):  # one branch runs: this program's group
            pl.when(pl.program_id(0) // tiles == g)(
                functools.partial(product, gets, ins[g * n : (g + 1) * n], o_ref)
            )

    def product(gets, ins, o_ref):
        # this program's [span, M] partial product of one group
        get = gets[0]
        if mma:
            init, step = jnp.zeros((tile, m), jnp.float32), mma_step
        elif factored == "ints":  # one accumulator [*lead, tile, group, 1] per tile of rows
            init = tuple(
                jnp.zeros((*lead, tile, *fmt.plane_view[:-1], 1), jnp.float32) for _ in gets
            )

            def step(_, s, ins, accs):  # x's digits made once for every tile of rows
                digits = x_digits(ins[-1], s)
                return tuple(
                    int_step(g, s, ins, a, digits) for g, a in zip(gets, accs, strict=True)
                )
        elif factored:  # the factored float path: accumulators [tile, group, 1] per row
            group = (tile, *fmt.plane_view[:-1], 1)
            init, step = tuple(jnp.zeros(group, jnp.float32) for _ in range(m)), factored_step
        else:
            init = tuple(jnp.zeros((tile, *fmt.plane_view), jnp.float32) for _ in range(m))
            step = vec_step
        acc = (
            step(get, 0, ins, init)
            if per == 1
            else lax.fori_loop(0, per, lambda s, acc: step(get, s, ins, acc), init)
        )
        if mma:
            o_ref[...] = acc
            return
        if factored == "ints":
            for r, a in enumerate(acc):
                while a.ndim > len(lead) + 1:
                    a = jnp.sum(a, axis=-1)
                rows = pl.ds(r * tile, tile)
                if lead:
                    o_ref[rows, :] = a.T
                else:
                    o_ref[rows, 0] = a
            return
        for r, a in enumerate(acc):
            while a.ndim > 1:
                a = jnp.sum(a, axis=-1)
            o_ref[:, r] = a

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, parts, out, m), jnp.float32),
        grid=(groups * tiles, parts),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, span, m), lambda i, k: (i // tiles, k, i % tiles, 0)),
        compiler_params=compiler_params(num_warps, stages, interpret),
        interpret=interpret,
        name=f"rwkv_jax_{fmt.name}_{'mma' if mma else 'matvec'}",
    )


def compiler_params(num_warps: int, num_stages: int, interpret: bool):
    """Triton launch parameters for a pallas_call (None in Pallas' interpreter)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    # jax < 0.5 names it TritonCompilerParams
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def _iota(shape: tuple[int, ...], axis: int) -> Array:
    """int32 index along `axis`, broadcastable against [tile, *shape]."""
    return lax.broadcasted_iota(jnp.int32, (1, *shape), axis + 1)


def _q4_k_scales(get, d_ref, dmin_ref, sc_ref, s) -> list[tuple[Array, Array]]:
    """Q4_K super-block s: per nibble plane (scale, offset) float32 [tile, 2, 2] of the
    sub-blocks j = 4h + 2p + nib (scale byte 4k + 2p' + par is sc[k, p', par])."""
    d = get(d_ref, s).astype(jnp.float32)[:, None, None]  # [tile, 1, 1]
    dmin = get(dmin_ref, s).astype(jnp.float32)[:, None, None]
    hi = _iota((2, 1), 0) == 1  # sub-blocks 4..7 take their high scale bits from bytes 0-7
    out = []
    for nib in range(2):
        # ggml get_scale_min_k4 for j = 4h + 2p + nib: bytes a = j mod 4, b = a + 4, c = a + 8
        a = get(sc_ref, s, 0, slice(None), nib).astype(jnp.int32)[:, None, :]  # [tile, 1, 2]
        b = get(sc_ref, s, 1, slice(None), nib).astype(jnp.int32)[:, None, :]
        c = get(sc_ref, s, 2, slice(None), nib).astype(jnp.int32)[:, None, :]
        sc = jnp.where(hi, (c & 0xF) | ((a >> 6) << 4), a & 63)  # [tile, 2, 2]
        mn = jnp.where(hi, (c >> 4) | ((b >> 6) << 4), b & 63)
        out.append((d * sc.astype(jnp.float32), dmin * mn.astype(jnp.float32)))
    return out


def _q4_k(get, *fields) -> list[Array]:
    """Q4_K super-block s as 2 nibble planes of float32 values [tile, 2, 2, 32] (_q4_k_parts)."""
    return [scale * q - offset for q, scale, offset in _q4_k_parts(get, *fields)]


def _q4_k_parts(get, d_ref, dmin_ref, sc_ref, qs_ref, s) -> list[tuple[Array, Array, Array]]:
    """Q4_K super-block s as 2 nibble planes (q [tile, 2, 2, 32], scale, offset [tile, 2, 2, 1]):
    values scale * q - offset.

    Value 32*j + l with sub-block j = 2*(2h + p) + nib sits in plane nib at [h, p, l]: the
    nibble of qs byte 64h + 32p + l.
    `get(ref, s, *rest)` loads this program's rows of super-block s (then `rest`) from a field.
    """
    qs = get(qs_ref, s).astype(jnp.int32)  # [tile, 2, 2, 32]
    return [
        (((qs >> (4 * nib)) & 0xF).astype(jnp.float32), scale[..., None], offset[..., None])
        for nib, (scale, offset) in enumerate(_q4_k_scales(get, d_ref, dmin_ref, sc_ref, s))
    ]


def _word_bytes(w: Array, shift: int | Array, mask: int) -> Array:
    """`(byte >> shift) & mask` of each byte of int32 words [..., n] -> [..., n, 4] (byte b of a
    word is value 4k + b of its run)."""
    return (w[..., None] >> (_byte_shifts(w.ndim + 1) + shift)) & mask


def _byte_shifts(ndim: int) -> Array:
    """8 b for the byte positions b of a word, int32 [1, ..., 1, 4] of `ndim` axes."""
    return 8 * lax.broadcasted_iota(jnp.int32, (1,) * (ndim - 1) + (4,), ndim - 1)


def _q4_k_words(get, *fields) -> list[Array]:
    """Q4_K (qs as words) super-block s as 8 planes of float32 values [tile, 2, 2, 8]
    (_q4_k_words_parts)."""
    return [scale * q - offset for q, scale, offset in _q4_k_words_parts(get, *fields)]


def _q4_k_words_parts(get, d_ref, dmin_ref, sc_ref, qs_ref, s):
    """Q4_K (qs as words [tile, 2, 2, 8]) super-block s as 8 planes (q [tile, 2, 2, 8], scale,
    offset [tile, 2, 2, 1]), one per nibble plane nib and byte position b: value 32*(2*(2h + p)
    + nib) + 4k + b at [h, p, k]."""
    qs = lax.bitcast_convert_type(get(qs_ref, s), jnp.int32)
    return [
        (((qs >> (8 * b + 4 * nib)) & 0xF).astype(jnp.float32), sc[..., None], mn[..., None])
        for nib, (sc, mn) in enumerate(_q4_k_scales(get, d_ref, dmin_ref, sc_ref, s))
        for b in range(4)
    ]


def _q4_k_ints(get, d_ref, dmin_ref, sc_ref, qs_ref, s) -> list[tuple[Array, Array, Array]]:
    """Q4_K (qs as words) super-block s per nibble plane: q as int32 words of 4 nibbles (one
    per byte) [tile, 2, 2, 8], scale and offset [tile, 2, 2, 1]."""
    qs = lax.bitcast_convert_type(get(qs_ref, s), jnp.int32)
    return [
        ((qs >> (4 * nib)) & 0x0F0F0F0F, sc[..., None], mn[..., None])
        for nib, (sc, mn) in enumerate(_q4_k_scales(get, d_ref, dmin_ref, sc_ref, s))
    ]


def _q6_k(get, *fields) -> list[Array]:
    """Q6_K super-block s as 2 planes of float32 values [tile, 2, 2, 2, 16] (_q6_k_values)."""
    return [scale * (q - 32).astype(jnp.float32) for q, scale in _q6_k_values(get, *fields)]


def _q6_k_parts(get, *fields) -> list[tuple[Array, Array, Array]]:
    """Q6_K super-block s as 2 planes (q, scale, offset): values scale * q - offset."""
    return [(q.astype(jnp.float32), sc, 32.0 * sc) for q, sc in _q6_k_values(get, *fields)]


def _q6_k_scales(get, sc_ref, d_ref, s) -> list[Array]:
    """Q6_K super-block s: per plane n the float32 scales [tile, 2h, 2c, 2u] (8h + 2(2n + c) +
    u)."""
    d = get(d_ref, s).astype(jnp.float32)[:, None, None, None]  # [tile, 1, 1, 1]
    return [d * get(sc_ref, s, slice(None), n).astype(jnp.float32) for n in range(2)]


def _q6_k_values(get, ql_ref, qh_ref, sc_ref, d_ref, s) -> list[tuple[Array, Array]]:
    """Q6_K super-block s as 2 planes (unsigned q int32 [tile, 2, 2, 2, 16], float32 scale
    [tile, 2, 2, 2, 1]): values scale * (q - 32).

    Value 128h + 32(2n + c) + 16u + t sits in plane n at [h, c, u, t]: ql byte 64h + 32c + 16u
    + t (nibble n), qh byte 32h + 16u + t (bits 2(2n + c)), scale 8h + 2(2n + c) + u.
    """
    ql = get(ql_ref, s).astype(jnp.int32)  # [tile, 2h, 2c, 2u, 16]
    qh = get(qh_ref, s).astype(jnp.int32)[:, :, None]  # [tile, 2h, 1, 2u, 16]
    c2 = 2 * _iota((2, 2, 1, 1), 1)  # 2c
    return [
        (((ql >> (4 * n)) & 0xF) | (((qh >> (4 * n + c2)) & 3) << 4), sc[..., None])
        for n, sc in enumerate(_q6_k_scales(get, sc_ref, d_ref, s))
    ]


def _q6_k_words(get, *fields) -> list[Array]:
    """Q6_K (ql, qh as words) super-block s as 8 planes of float32 values [tile, 2, 2, 2, 4]
    (_q6_k_words_parts): scale * (q - 32), as _q6_k and XLA's dequantization round them."""
    return [scale * (q - 32.0) for q, scale, _ in _q6_k_words_parts(get, *fields)]


def _q6_k_words_parts(get, ql_ref, qh_ref, sc_ref, d_ref, s):
    """Q6_K (ql [tile, 2h, 2c, 2u, 4], qh [tile, 2h, 2u, 4] as words) super-block s as 8 planes
    (q [tile, 2, 2, 2, 4], scale, offset = 32 scale [tile, 2, 2, 2, 1]), one per plane n and
    byte position b: value 128h + 32(2n + c) + 16u + 4k + b at [h, c, u, k]."""
    ql = lax.bitcast_convert_type(get(ql_ref, s), jnp.int32)
    qh = lax.bitcast_convert_type(get(qh_ref, s), jnp.int32)[:, :, None]
    c2 = 2 * _iota((2, 2, 1, 1), 1)
    out = []
    for n, sc in enumerate(_q6_k_scales(get, sc_ref, d_ref, s)):
        for b in range(4):
            sh = 8 * b + 4 * n
            q = ((ql >> sh) & 0xF) | (((qh >> (sh + c2)) & 3) << 4)
            out.append((q.astype(jnp.float32), sc[..., None], 32.0 * sc[..., None]))
    return out


def _q6_k_ints(get, ql_ref, qh_ref, sc_ref, d_ref, s) -> list[tuple[Array, Array, Array]]:
    """Q6_K (ql, qh as words) super-block s per plane: q as int32 words of four 6-bit values
    [tile, 2h, 2c, 2u, 4], scale and offset (32 scale) [tile, 2, 2, 2, 1]."""
    ql = lax.bitcast_convert_type(get(ql_ref, s), jnp.int32)
    qh = lax.bitcast_convert_type(get(qh_ref, s), jnp.int32)[:, :, None]
    c2 = 2 * _iota((2, 2, 1, 1), 1)
    out = []
    for n, sc in enumerate(_q6_k_scales(get, sc_ref, d_ref, s)):
        q = ((ql >> (4 * n)) & 0x0F0F0F0F) | (((qh >> (4 * n + c2)) & 0x03030303) << 4)
        out.append((q, sc[..., None], 32.0 * sc[..., None]))
    return out


def _dot4(q: Array, hi: Array, lo: Array, interpret: bool) -> Array:
    """Per int32 word: sum over its 4 bytes of q_b * (256 hi_b + lo_b), q and lo unsigned
    bytes, hi signed (PTX dp4a twice; exact in int32 for the kernels' ranges). Pallas'
    interpreter runs the same arithmetic unpacked."""
    if interpret:
        q, lo = (_word_bytes(a, 0, 0xFF) for a in (q, lo))
        hi = (hi[..., None] << (24 - _byte_shifts(hi.ndim + 1))) >> 24  # sign-extended bytes
        return jnp.sum(q * (256 * hi + lo), axis=-1)
    from jax.experimental.pallas import triton as plgpu

    (d,) = plgpu.elementwise_inline_asm(
        "{ .reg .s32 t; dp4a.u32.s32 t, $1, $2, 0; shl.b32 t, t, 8; dp4a.u32.u32 $0, $1, $3, t; }",
        args=[q, hi, lo],
        constraints="=r,r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, jnp.int32)],
    )
    return d


# x dtypes whose products at <= MAX_ROWS rows take the integer dot products where the quants
# are words (_split_plane holds their values exactly from half a sub-block's scale up; float32
# x keeps the float kernels: its 24-bit values would lose bits). RWKV_JAX_INT_DOT=0: never.
INT_DOT_DTYPES = (
    (jnp.bfloat16, jnp.float16) if os.environ.get("RWKV_JAX_INT_DOT", "1") != "0" else ()
)


def _split_plane(x: Array) -> tuple[Array, Array, Array, Array]:
    """One plane of x (float32 [..., k, 4]: a sub-block of 4k values on the last two axes) as
    16-bit integers for the dot products -> (hi, lo int32 words [..., k], scale, sum float32
    [..., 1]).

    Per sub-block a power of two s > max|x| / 127 (s = 2^(e + 1) from the exponent field e of
    max|x| / 127, at least 2^-99) and w = round(256 x / s), |w| <= 256 * 127, split as 256 hi +
    lo: hi the signed and lo the unsigned low byte, four of each per little-endian word (value
    4k + b in byte b). scale = s / 256, so x ~ scale * w within scale / 2, and exactly for every
    x whose last significant bit is >= scale (every bfloat16 x >= s / 2). sum: the float32 sum
    of the sub-block's x, for the offsets' term. A sub-block holding an inf or NaN gets a NaN
    scale, so the product is NaN as with the float kernels. Bit operations only: each program
    runs this on the planes it multiplies (no XLA kernel prepares x)."""
    amax = jnp.max(jnp.max(jnp.abs(x), axis=-1, keepdims=True), axis=-2, keepdims=True)
    field = (lax.bitcast_convert_type(amax * (1 / 127), jnp.int32) >> 23) & 0xFF
    field = jnp.clip(field, 27, 248) + 1  # s = 2^(field - 127)
    s = lax.bitcast_convert_type(field << 23, jnp.float32)
    inv = lax.bitcast_convert_type((262 - field) << 23, jnp.float32)  # 256 / s
    w = jnp.floor(x * inv + 0.5).astype(jnp.int32)
    shift = _byte_shifts(w.ndim)
    hi = jnp.sum(((w >> 8) & 0xFF) << shift, axis=-1)  # disjoint bytes: the sum is an or
    lo = jnp.sum((w & 0xFF) << shift, axis=-1)
    scale = jnp.where(amax < jnp.inf, s * (1 / 256), jnp.nan)[..., 0]  # NaN for inf / NaN
    total = jnp.sum(jnp.sum(x, axis=-1), axis=-1, keepdims=True)
    return hi, lo, scale, total


class _Format(NamedTuple):
    """A kernel's format: name, plane decoder (values, or factored: q, scale, offset per plane),
    weight fields with their per-super-block views,
    x's natural view of a super-block, which axis of it picks the plane, and the plane view;
    words: the quants are uint32 words, decoded as 8 planes (nibble plane, byte position b on
    x view's last axis) of the plane view; ints (words): per nibble plane (q words of the plane
    view, scale, offset) for the integer dot products."""

    name: str
    planes: Callable[..., list[Array]]
    parts: Callable[..., list[tuple[Array, Array, Array]]]
    fields: tuple[tuple[str, tuple[int, ...]], ...]
    x_view: tuple[int, ...]
    plane_axis: int
    plane_view: tuple[int, ...]
    words: bool = False  # quants as words: 8 planes (nibble plane, byte position) per block
    ints: Callable[..., list[tuple[Array, Array, Array]]] | None = None


_Q4_K_SCALES = ("d", ()), ("dmin", ()), ("scales", (3, 2, 2))
_FORMATS = {
    ("Q4_K", "bytes"): _Format(
        "q4_k",
        _q4_k,
        _q4_k_parts,
        (*_Q4_K_SCALES, ("qs", (2, 2, 32))),
        (2, 2, 2, 32),  # x [h, p, nib, l]: value 32*(2*(2h + p) + nib) + l
        2,
        (2, 2, 32),
    ),
    ("Q4_K", "words"): _Format(
        "q4_k",
        _q4_k_words,
        _q4_k_words_parts,
        (*_Q4_K_SCALES, ("qs", (2, 2, 8))),
        (2, 2, 2, 8, 4),  # x [h, p, nib, k, b]: value 32*(2*(2h + p) + nib) + 4k + b
        2,
        (2, 2, 8),
        words=True,
        ints=_q4_k_ints,
    ),
    ("Q6_K", "bytes"): _Format(
        "q6_k",
        _q6_k,
        _q6_k_parts,
        (("ql", (2, 2, 2, 16)), ("qh", (2, 2, 16)), ("scales", (2, 2, 2, 2)), ("d", ())),
        (2, 2, 2, 2, 16),  # x [h, n, c, u, t]: value 128h + 32(2n + c) + 16u + t
        1,
        (2, 2, 2, 16),
    ),
    ("Q6_K", "words"): _Format(
        "q6_k",
        _q6_k_words,
        _q6_k_words_parts,
        (("ql", (2, 2, 2, 4)), ("qh", (2, 2, 4)), ("scales", (2, 2, 2, 2)), ("d", ())),
        (2, 2, 2, 2, 4, 4),  # x [h, n, c, u, k, b]: value 128h + 32(2n + c) + 16u + 4k + b
        1,
        (2, 2, 2, 4),
        words=True,
        ints=_q6_k_ints,
    ),
}


def _format(weight) -> _Format | None:
    """The kernel format of a packed weight (its quants as bytes or as uint32 words), or None."""
    name = type(weight).__name__
    if (name, "bytes") not in _FORMATS:
        return None
    words = all(
        jnp.dtype(getattr(weight, f).dtype) == jnp.uint32
        for f in getattr(weight, "WORD_FIELDS", ())
    )
    return _FORMATS[(name, "words" if words else "bytes")]
