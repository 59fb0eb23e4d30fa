"""Launch shapes of the Pallas decode kernels, per matrix, timed from profiler traces.

    python -m experiments.gpu_sweep [--shapes rkv cxc key value value6 head] [--configs 32:4:10 ...]
        [--rows 64]

Each shape is a stack of --layers random packed weights (as the model stacks its layers) read in
place by gpu_kernels.matmul(..., layer=i) inside a lax.fori_loop over the layers, --rows
activation rows (default one; more than gpu_kernels.MAX_ROWS take the tensor-core kernel) whose
next value depends on the last product (so the calls run in order, as in a decode
step). One more call runs under jax.profiler.trace; per matrix it reports the Pallas kernel's
own time (events named rwkv_jax_*, median over the layers) and all kernels per matrix (the
split-K partial sums and the fold included) — the figure to compare launch shapes by, since a
microbenchmark's wall time is dominated by its own launches for matrices this small.
Configs: TILE:WARPS:SPLIT[:STAGES[:ROW_LOOP]]; GB/s counts packed weight bytes.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
from jax import lax

from experiments.cpu_matvec import random_weight
from experiments.gpu_trace import kernel_events
from rwkv_jax import gpu_kernels, quant

C, F, VOCAB = 2560, 10240, 65536
# name -> (format, (out, in), weights per launch): the 2.9b Q4_K_M decode's matrices
SHAPES = {
    "rkv": (quant.Q4_K, (C, C), 3),
    "cxc": (quant.Q4_K, (C, C), 1),
    "key": (quant.Q4_K, (F, C), 1),
    "value": (quant.Q4_K, (C, F), 1),
    "value6": (quant.Q6_K, (C, F), 1),
    "head": (quant.Q6_K, (VOCAB, C), 1),
}
DEFAULT_CONFIGS = [
    "32:4:10",
    "16:4:10",
    "64:4:10",
    "32:8:10",
    "32:4:5",
    "32:4:2",
    "32:4:1",
    "64:8:5",
    "16:2:10",
    "32:4:20",
    "32:4:40",
    "32:4:10:3",
    "32:4:5:3",
    "64:4:5",
    "128:8:10",
]


def chained(group: int, layers: int, out: int, n_in: int, launch: dict):
    """jit(stacks, x): x through every layer's product in turn (a fori_loop over the layers)."""

    @jax.jit
    def f(stacks, x):
        def body(i, x):
            ys = gpu_kernels.matmul_group(stacks, [x] * group, layer=i, **launch)
            y = sum(ys)
            y = y[..., :n_in] if out >= n_in else jnp.tile(y, (1, n_in // out))
            return (x + 1e-3 * y).astype(x.dtype)

        return lax.fori_loop(0, layers, body, x)

    return f


def run_shape(
    name: str, configs: list[str], layers: int, interpret: bool = False, rows: int = 1
) -> None:
    cls, shape, group = SHAPES[name]
    out, n_in = shape
    stacks = [
        quant.stack([random_weight(cls, shape, seed=100 * g + i) for i in range(layers)])
        for g in range(group)
    ]
    nbytes = group * cls.row_bytes(n_in) * out
    for spec in configs:
        t, nw, sp, *more = map(int, spec.split(":"))
        launch = dict(block_rows=t, num_warps=nw, split=sp, num_stages=more[0] if more else 2)
        if len(more) > 1:  # the integer path's row tiles per program
            launch["row_loop"] = more[1]
        launch["interpret"] = interpret
        if gpu_kernels._row_tile(out, t) != t:
            continue

        f = chained(group, layers, out, n_in, launch)
        x = jnp.ones((rows, n_in), jnp.bfloat16)
        try:
            jax.block_until_ready(f(stacks, x))
        except Exception as e:  # a launch shape Triton rejects
            print(f"{name:7s} {spec:10s} failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
            continue
        jax.block_until_ready(f(stacks, x))
        d = tempfile.mkdtemp(prefix="rwkv_sweep_")
        with jax.profiler.trace(d):
            jax.block_until_ready(f(stacks, x))
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        ev = kernel_events(files[0]) if files else []
        mine = [e[2] for e in ev if e[0].startswith("rwkv_jax")]
        if not mine:
            print(f"{name:7s} {spec:10s} no kernel events")
            continue
        k_us = statistics.median(mine) / 1e3
        all_us = sum(e[2] for e in ev if not e[0].startswith("Memcpy")) / 1e3 / layers
        print(
            f"{name:7s} {spec:10s} kernel {k_us:7.2f} us ({nbytes / k_us / 1e3:6.0f} GB/s)  "
            f"all kernels {all_us:7.2f} us/matrix ({nbytes / all_us / 1e3:6.0f} GB/s), "
            f"{len(ev) / layers:.1f} kernels/matrix"
        )


PROBE_MODES = ("load", "i2f", "bits", "qx", "dp4a", "dp4a8")


def load_probe(shape: tuple[int, int], view: str, spec: str, layers: int, mode: str = "load"):
    """Part of a Q4_K one-row kernel on a matrix's nibble bytes (qs, 128 of each 144-byte
    super-block), with the kernels' grid and stacked indexing: `load` sums the bytes (what any
    kernel of this launch shape and load width can reach); `i2f` unpacks both nibbles and
    converts them to float32 with the conversion instruction, `bits` with the 2^23 trick, both
    summed; `qx` multiplies the converted nibbles by x and sums each 32-value sub-block (the
    factored kernel without its scales); `dp4a` reads the bytes as 32-bit words, unpacks both
    nibble planes four values at a time and takes their products with x as two int8 planes
    (high and low byte) by 4-way integer dot products (PTX dp4a), summed per sub-block; `dp4a8`
    does the same from the bytes as they are stored, each word put together in registers."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    out, n_in = shape
    nb = n_in // 256
    t, nw, sp, *st = map(int, spec.split(":"))
    parts = gpu_kernels._parts(nb, sp)
    per = nb // parts
    width, dt = (128, jnp.uint8) if view == "u8" else (32, jnp.uint32)
    qs = jax.random.bits(jax.random.key(0), (layers, out, nb, width), dt)
    if mode == "dp4a8":
        qs = qs.reshape(layers, out, nb, 2, 2, 8, 4)
    elif mode == "dp4a":
        qs = jax.random.bits(jax.random.key(0), (layers, out, nb, 2, 2, 8), jnp.uint32)
    elif mode != "load":
        qs = qs.reshape(layers, out, nb, 2, 2, 32)
    if mode.startswith("dp4a"):  # x as two planes of int8 words (high, low byte)
        x = jax.random.bits(jax.random.key(1), (2, nb, 2, 2, 2, 8), jnp.uint32)
    else:
        x = jax.random.normal(jax.random.key(1), (nb, 2, 2, 2, 32), jnp.float32)
    tiles = out // t

    def to_f32(q):
        if mode == "bits":  # 2^23 + q as float32 bits, minus 2^23
            return lax.bitcast_convert_type(q | 0x4B000000, jnp.float32) - 8388608.0
        return q.astype(jnp.float32)

    def kernel(idx_ref, q_ref, x_ref, o_ref):
        layer = idx_ref[0]
        rows = pl.ds(pl.multiple_of(pl.program_id(0) * t, t), t)
        k0 = pl.program_id(1) * per

        def body(s, acc):
            q = q_ref[layer, rows, k0 + s].astype(jnp.int32)
            if mode == "load":
                return acc + jnp.sum(q, axis=-1).astype(jnp.float32)
            if mode.startswith("dp4a"):
                q = q_ref[layer, rows, k0 + s]
                if mode == "dp4a8":  # [t, 2, 2, 8, 4] bytes -> [t, 2, 2, 8] words
                    shift = 8 * lax.broadcasted_iota(jnp.int32, (1, 1, 1, 1, 4), 4)
                    q = jnp.sum(q.astype(jnp.int32) << shift, axis=-1)
                q = lax.bitcast_convert_type(q, jnp.int32)
                for nib in range(2):
                    qn = (q >> (4 * nib)) & 0x0F0F0F0F  # [t, 2, 2, 8] words of 4 nibbles
                    sums = []
                    for half, kind in ((0, "s32"), (1, "u32")):
                        xw = lax.bitcast_convert_type(x_ref[half, k0 + s, :, :, nib], jnp.int32)
                        (d,) = plgpu.elementwise_inline_asm(
                            f"dp4a.u32.{kind} $0, $1, $2, $3;",
                            args=[qn, jnp.broadcast_to(xw[None], qn.shape), jnp.zeros_like(qn)],
                            constraints="=r,r,r,r",
                            pack=1,
                            result_shape_dtypes=[jax.ShapeDtypeStruct(qn.shape, jnp.int32)],
                        )
                        sums.append(jnp.sum(d, axis=-1).astype(jnp.float32))  # [t, 2, 2]
                    f = sums[0] + sums[1] * (1 / 256)
                    acc = acc + jnp.sum(jnp.sum(f, axis=-1), axis=-1)
                return acc
            for nib in range(2):
                f = to_f32((q >> (4 * nib)) & 0xF)  # [t, 2, 2, 32]
                if mode == "qx":
                    f = jnp.sum(f * x_ref[k0 + s, nib][None], axis=-1)  # [t, 2, 2]
                while f.ndim > 1:
                    f = jnp.sum(f, axis=-1)
                acc = acc + f
            return acc

        acc = lax.fori_loop(0, per, body, jnp.zeros((t,), jnp.float32))
        o_ref[...] = acc

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((parts, out), jnp.float32),
        grid=(tiles, parts),
        in_specs=[
            pl.BlockSpec((1,), lambda i, k: (0,)),
            pl.BlockSpec(qs.shape, lambda i, k: (0,) * qs.ndim),
            pl.BlockSpec(x.shape, lambda i, k: (0,) * x.ndim),
        ],
        out_specs=pl.BlockSpec((None, t), lambda i, k: (k, i)),
        compiler_params=plgpu.CompilerParams(num_warps=nw, num_stages=st[0] if st else 2),
        name="rwkv_jax_probe",
    )

    @jax.jit
    def f(qs):
        def body(i, acc):
            return acc + call(i.reshape(1), qs, x)[0, :1]

        return lax.fori_loop(0, layers, body, jnp.zeros((1,), jnp.float32))

    jax.block_until_ready(f(qs))
    d = tempfile.mkdtemp(prefix="rwkv_probe_")
    with jax.profiler.trace(d):
        jax.block_until_ready(f(qs))
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    mine = [e[2] for e in kernel_events(files[0]) if e[0].startswith("rwkv_jax")]
    us = statistics.median(mine) / 1e3
    nbytes = out * nb * 128
    print(
        f"probe {mode:4s} {out}x{n_in} {view:3s} {spec:10s} {us:7.2f} us "
        f"({nbytes / us / 1e3:6.0f} GB/s of qs bytes)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rows", type=int, default=1, help="activation rows (> 4: tensor cores)")
    p.add_argument("--interpret", action="store_true", help="smoke test off CUDA (no timings)")
    p.add_argument(
        "--probe", nargs="*", default=None, help="load-only probe: configs (TILE:WARPS:SPLIT)"
    )
    p.add_argument(
        "--mma", action="store_true", help="one row through the tensor-core kernel (MAX_ROWS 0)"
    )
    p.add_argument("--probe-modes", nargs="+", default=["load"], choices=PROBE_MODES)
    a = p.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__, "mma" if a.mma else "")
    if a.mma:
        gpu_kernels.MAX_ROWS = 0
    if a.probe is not None:
        views = ("u8", "u32") if a.probe_modes == ["load"] else ("u8",)
        for shape, mode, view in itertools.product(((F, C), (C, F)), a.probe_modes, views):
            for spec in a.probe or ["32:4:10", "32:4:5:3", "32:4:2:3", "64:4:10", "32:8:5:3"]:
                try:
                    load_probe(shape, view, spec, a.layers, mode)
                except Exception as e:  # a launch shape Triton rejects
                    print(f"probe {shape} {view} {spec} failed: {str(e).splitlines()[0][:90]}")
        return
    for name in a.shapes:
        run_shape(name, a.configs, a.layers, a.interpret, a.rows)


if __name__ == "__main__":
    main()
