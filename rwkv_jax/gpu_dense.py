"""A layer's LoRA matmuls in batched decode on NVIDIA GPUs: one Pallas (Triton) launch for
several dense matrices, read in place from their stacks, on tensor cores.

From quant.MATVEC_MAX_ROWS + 1 rows XLA runs each of a layer's eight LoRA matrices (the four
downs, x·w1 ... x·g1, and above gpu_time_mix.MAX_UP_ROWS rows the four ups) as a Triton GEMM
fusion of its own, and first copies the matrix out of the stacked layers (a dynamic slice that
a GEMM cannot take in place): at B = 64 on an H200, per layer eight GEMMs of 1.9-4.3 us, their
split-K reductions and ~7.5 us of copies, about 37 us of a ~200 us layer (gpu_trace events).
Here the matrices of one call share a launch: each program computes a [M, tile] block of one
matrix's product over a slice of its inputs, reading the stack at the layer index itself.

    y_g = x_g · W_g[layer]ᵀ    W_g [L, out_g, in_g] (F32 / F16 / BF16 values), x_g [rows, in_g]

Values as XLA's dot for these rows computes them (quant.Weight._matmul_xla): W rounded to x's
dtype, products summed in float32, the result rounded to x's dtype; only the summation order
differs. Inputs of more than KC values are split into KC-wide parts whose float32 partial
products XLA adds (the downs: C inputs); shorter ones (the ups: the LoRA ranks, 32-320) are
taken whole, in power-of-two pieces.

Measured on an H200 (2.9b Q4_K_M, bf16, `python -m experiments.gpu_trace --cases tg:64:32
tg:32:32 tg:8:64 [--no-dense]`, one process each on one machine): B = 64 8968.9 -> 9404.9
tok/s, B = 32 5457.2 -> 5907.4, B = 8 1705.4 -> 1852.1 (downs only there); 31978 -> 27882
kernels per B = 64 call. The launch shape (TILE, KC, warps, stages) was not swept.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_jax import gpu_kernels, gpu_time_mix, quant
from rwkv_jax.gpu_time_mix import _cpu_backend

Array = jax.Array

# activation rows this kernel takes: from where XLA's dot replaces the multiply-reduce
# (quant.MATVEC_MAX_ROWS) up to the batched-decode maximum; padded to a power of two >= 16
MIN_ROWS, MAX_ROWS = quant.MATVEC_MAX_ROWS + 1, 64
# output columns per program (at most; a power of two dividing every matrix's rows)
TILE = 32
# inputs per program where a matrix has more (split-K); at most gpu_time_mix.MAX_PIECE per dot
KC = 256
NUM_WARPS, NUM_STAGES = 4, 1
ENABLED = os.environ.get("RWKV_JAX_PALLAS", "1") != "0"


def _tile(out: int) -> int | None:
    """Output columns per program: the largest power of two <= TILE dividing out (>= 16)."""
    return gpu_kernels._row_tile(out, TILE)


def _parts(n_in: int) -> int:
    """KC-wide parts of a row of n_in inputs (1: the row whole)."""
    return n_in // KC if n_in > KC and n_in % KC == 0 else 1


def supports(weights: Sequence, rows: int, dtype) -> bool:
    """Whether these matrices (unstacked quant.Weight, one layer's) times `rows` activation rows
    of `dtype` run here: dense formats, shapes the tiles and pieces cover, bf16/f16 on tensor
    cores, not the CPU."""
    return (
        ENABLED
        and not _cpu_backend()
        and MIN_ROWS <= rows <= MAX_ROWS
        and gpu_kernels._tensor_cores(jnp.dtype(dtype))
        and all(
            type(w).__name__ in gpu_kernels.DENSE
            and w.w.ndim == 2
            and _tile(w.shape[0]) is not None
            and all(
                width >= 16 for _, width in gpu_time_mix.pieces(w.shape[1] // _parts(w.shape[1]))
            )
            for w in weights
        )
    )


def matmul_group(
    stacks: Sequence[Array], xs: Sequence[Array], layer: Array, *, interpret: bool = False
) -> list[Array]:
    """[x_g · stacks_g[layer]ᵀ] for stacked dense matrices [L, out_g, in_g] and inputs
    [..., in_g] of one dtype, in one launch. Each -> [..., out_g] in x's dtype (module docstring).
    """
    lead = xs[0].shape[:-1]
    rows = math.prod(lead)
    m = max(16, gpu_kernels._pow2_at_least(rows))
    dtype = xs[0].dtype
    flat = []
    for x in xs:
        xr = x.reshape(rows, x.shape[-1]).astype(dtype)
        flat.append(jnp.pad(xr, ((0, m - rows), (0, 0))) if m != rows else xr)
    shapes = tuple(s.shape for s in stacks)
    call = _call(shapes, tuple(s.dtype for s in stacks), m, jnp.dtype(dtype), interpret)
    index = jnp.asarray(layer, jnp.int32).reshape(1)
    # each [parts_g, M, out_g]: float32 partial sums, or (one part) the product in x's dtype
    partial = call(index, *stacks, *flat)
    out = []
    for p in partial:
        y = p[0] if p.shape[0] == 1 else jnp.sum(p, axis=0).astype(dtype)
        out.append(y[:rows].reshape(*lead, p.shape[-1]))
    return out


@functools.cache
def _call(shapes, dtypes, m, dtype, interpret):
    """The pallas_call for stacks of these shapes and dtypes times M rows of `dtype`: a flat grid
    whose programs [start_g, start_g + tiles_g * parts_g) compute matrix g, one output tile and
    one part of its inputs each; every operand passed whole and indexed in the kernel."""
    groups = len(shapes)
    plan = []  # per matrix: (first program, tile, parts, inputs per part, its pieces)
    start = 0
    for _, out, n_in in shapes:
        tile, parts = _tile(out), _parts(n_in)
        plan.append((start, tile, parts, n_in // parts, gpu_time_mix.pieces(n_in // parts)))
        start += out // tile * parts
    programs = start

    def kernel(index_ref, *refs):
        w_refs, x_refs, o_refs = refs[:groups], refs[groups : 2 * groups], refs[2 * groups :]
        layer = index_ref[0]
        pid = pl.program_id(0)

        def product(g):
            first, tile, parts, kc, pieces = plan[g]
            local = pid - first
            cols = pl.ds(pl.multiple_of((local // parts) * tile, tile), tile)
            k0 = (local % parts) * kc
            acc = jnp.zeros((m, tile), jnp.float32)
            for s, width in pieces:
                ks = pl.ds(pl.multiple_of(k0 + s, width), width)
                x = x_refs[g][:, ks]  # [M, width]
                w = w_refs[g][layer, cols, ks].astype(dtype)  # [tile, width], rounded as XLA's
                acc += jax.lax.dot_general(
                    x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
            # a whole row's product rounded here (no XLA convert after the call); parts: float32
            o_refs[g][local % parts, :, cols] = acc.astype(o_refs[g].dtype)

        for g in range(groups):  # one branch runs: this program's matrix
            first, tile, parts, _, _ = plan[g]
            n = shapes[g][1] // tile * parts
            pl.when((pid >= first) & (pid < first + n))(functools.partial(product, g))

    def whole(shape):
        return pl.BlockSpec(shape, lambda i: (0,) * len(shape))

    x_shapes = [(m, n_in) for _, _, n_in in shapes]
    out_shapes = [(p[2], m, s[1]) for p, s in zip(plan, shapes, strict=True)]
    return pl.pallas_call(
        kernel,
        out_shape=tuple(
            jax.ShapeDtypeStruct(s, jnp.float32 if s[0] > 1 else dtype) for s in out_shapes
        ),
        grid=(programs,),
        in_specs=[whole((1,))] + [whole(s) for s in shapes] + [whole(s) for s in x_shapes],
        out_specs=tuple(whole(s) for s in out_shapes),
        compiler_params=gpu_kernels.compiler_params(NUM_WARPS, NUM_STAGES, interpret),
        interpret=interpret,
        name="rwkv_jax_dense_group",
    )
