"""Where does a decode step's time go? Times pieces of the decode step on one device.

    python -m experiments.decode_profile --preset 2.9b --type Q4_K_M

Times (median of many calls, after warm-up): the whole decode step at B=1 and B=8; the LM head
matvec alone; one layer's block alone; the six large packed matvecs of every layer alone (a scan
over layers doing nothing else); an empty scan over the layers. Comparing them separates memory
traffic from per-kernel overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import rwkv_jax
from rwkv_jax import model as M
from rwkv_jax import quant, synth
from rwkv_jax.generate import _step_wkv, decode_step


def bench(fn, *args, n: int = 50) -> float:
    """Median milliseconds of fn(*args) (blocking), after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2.9b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--unroll", type=int, default=1, help="layers per scan iteration")
    p.add_argument("--matvec-rows", type=int, default=0, help="override MATVEC_MAX_ROWS")
    a = p.parse_args()
    M.LAYER_SCAN_UNROLL = a.unroll
    if a.matvec_rows:
        quant.MATVEC_MAX_ROWS = a.matvec_rows
    path = synth.ensure(a.preset, a.type, 0)
    m = rwkv_jax.load(path, dtype=a.dtype, stack_layers=True)  # the scans below need a stack
    cfg, params, dt = m.config, m.params, m.dtype
    print(
        jax.devices()[0].device_kind,
        cfg.n_layer,
        "layers",
        dt,
        "unroll",
        a.unroll,
        "matvec rows",
        quant.MATVEC_MAX_ROWS,
    )
    rows = {}

    for B in (1, 8):
        st = m.new_state(B)
        tok = jnp.ones((B,), jnp.int32)

        def step(tok, st):
            lg, st2 = decode_step(params, tok, jax.tree.map(jnp.copy, st), cfg=cfg, dtype=dt)
            return lg

        rows[f"decode step B={B}"] = bench(step, tok, st)

    x = jnp.ones((1, cfg.n_embd), dt)
    rows["head matvec"] = bench(jax.jit(lambda p, x: p.head.matmul(x)), params, x)

    blk0 = jax.tree.map(lambda a: a[0], params.blocks)
    st = m.new_state(1)
    ls = M.LayerState(st.att_shift[0], st.ffn_shift[0], st.wkv[0])
    x3 = jnp.ones((1, 1, cfg.n_embd), jnp.float32)

    def one_block(blk, x, ls):
        lens = jnp.ones((1,), jnp.int32)
        valid = jnp.ones((1, 1), bool)
        return M.block(blk, cfg, x, ls, x, False, M.Span(valid, lens, _step_wkv, dt))

    rows["one block"] = bench(jax.jit(one_block), blk0, x3, ls)

    def big_matvecs(blocks, x):
        def body(h, blk):
            y = blk.receptance.matmul(h) + blk.key.matmul(h) + blk.value.matmul(h)
            y = y + blk.output.matmul(h) + blk.ffn_value.matmul(blk.ffn_key.matmul(h))
            return (h + y * 1e-3).astype(h.dtype), None

        return lax.scan(body, x, blocks)[0]

    rows["6 packed matvecs x layers"] = bench(jax.jit(big_matvecs), params.blocks, x)

    def empty_scan(blocks, x):
        return lax.scan(lambda h, blk: (h + blk.w0[None].astype(h.dtype), None), x, blocks)[0]

    rows["scan over layers, no work"] = bench(jax.jit(empty_scan), params.blocks, x)
    for k, v in rows.items():
        print(f"{k:32s} {v:8.3f} ms")


if __name__ == "__main__":
    main()
