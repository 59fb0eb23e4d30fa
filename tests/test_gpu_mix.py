"""The decode prologue kernel (rwkv_jax/gpu_mix.py) against the XLA path's arithmetic, in Pallas'
interpreter on the CPU; its Triton lowering for CUDA; and the model's decode with the kernel
wired in (stacked and unrolled layers) against the model without it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import rwkv_jax
from rwkv_jax import gpu_kernels, gpu_mix, model, quant
from rwkv_jax.generate import decode_step
from tests.jaxprs import equations

C, L = 96, 3  # 96: chunks of 32 (three per row)
RANKS = (24, 16, 8, 40)  # w, a, v, g: 24 and 40 take tiles of 8, not DOWN_ROWS
ACTS = ("tanh", None, None, "sigmoid")
TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _reference(layer, active, x, addends, prev, ln, mix, outs, downs, dtype, eps=1e-5):
    """What model.att_inputs / ffn_inputs compute for one token, from model.py's own functions:
    x + dtype(Σ addends), layer_norm, token_shift, the mixes, and each down as a quant weight's
    matmul (its CPU path) rounded to dtype and activated."""
    f32 = jnp.float32
    if addends is not None:
        x = x + jnp.sum(addends, axis=0).astype(dtype).astype(f32)
    u = model.layer_norm(x[:, None], ln[0][layer], ln[1][layer], eps)  # [B, 1, C]
    lengths = jnp.asarray(active, jnp.int32)
    d, shift = model.token_shift(u, prev[layer], lengths)
    mixed = [(u + d * model.lead(mix[layer, i], 3))[:, 0] for i in range(mix.shape[1])]
    acts = {None: lambda y: y, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}
    hidden = [
        acts[fn](model.matmul(quant.dense_weight(w[layer]), mixed[i], dtype)).astype(dtype)
        for i, w, fn in downs
    ]
    return x, [mixed[i].astype(dtype) for i in outs], shift, hidden


def _inputs(rng, B: int, dtype, with_add: bool, dense=np.float32):
    f32 = jnp.float32
    x = jnp.asarray(3.0 * rng.standard_normal((B, C)) + 1.0, f32)
    addends = jnp.asarray(rng.standard_normal((5, B, C)), f32) if with_add else None
    prev = jnp.asarray(rng.standard_normal((L, B, C)), dtype)  # every layer's shift state
    ln = (
        jnp.asarray(rng.standard_normal((L, C)), f32),
        jnp.asarray(0.1 * rng.standard_normal((L, C)), f32),
    )
    mix = jnp.asarray(rng.random((L, 6, C)), f32)
    downs = tuple(
        (i, jnp.asarray(rng.standard_normal((L, d, C)) / np.sqrt(C), dense), fn)
        for i, d, fn in zip((1, 4, 3, 5), RANKS, ACTS, strict=True)
    )
    return x, addends, prev, ln, mix, downs


@pytest.mark.parametrize(("B", "layer"), [(1, 1), (3, 0), (4, 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("with_add", [False, True], ids=["att", "ffn"])
def test_kernel_matches_reference(B, layer, dtype, with_add):
    """Kernel (interpreted) == the model's arithmetic: x + addends within float32 reordering of
    five terms (1e-6), the rest within float32 reordering over a row of C = 96 values (1e-5
    relative) and, in the compute dtype, one rounding of each value: where the two float32 values
    straddle a rounding boundary they differ by one ulp of it (2^-8 in bf16); a padding row's
    shift state untouched bit for bit."""
    rng = np.random.default_rng(10 * B + layer + with_add)
    x, addends, prev, ln, mix, downs = _inputs(rng, B, dtype, with_add)
    active = np.ones(B, bool)
    active[-1] = B == 1  # the last row pads (when there are several)
    outs = (0, 2, 3)
    got = gpu_mix.mix_prologue(
        jnp.int32(layer), jnp.asarray(active), x, addends, prev, ln, mix, outs,
        downs if not with_add else (), eps=1e-5, dtype=dtype, interpret=True,
    )  # fmt: skip
    want = _reference(
        layer, active, x, addends, prev, ln, mix, outs, downs if not with_add else (), dtype
    )
    ulp = 2.0**-8 if dtype == jnp.bfloat16 else 0.0
    if with_add:
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    else:
        assert got[0] is None
    for g, w in zip(got[1], want[1], strict=True):
        assert g.dtype == dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=1e-5 + ulp, atol=1e-5 * np.abs(w).max())
    assert got[2].dtype == prev.dtype
    shift, want_shift = np.asarray(got[2], np.float32), np.asarray(want[2], np.float32)
    np.testing.assert_allclose(shift, want_shift, rtol=1e-5 + ulp, atol=1e-5)
    if B > 1:
        np.testing.assert_array_equal(shift[-1], np.asarray(prev[layer, -1], np.float32))
    assert len(got[3]) == len(want[3])
    for g, w in zip(got[3], want[3], strict=True):
        # a sum over C products of dtype-rounded inputs: reordering (1e-5), the input's own
        # rounding flipping where u + d * mix straddles a boundary (one term off by an ulp:
        # ~ulp / sqrt(C) of the sum's scale) and the result's rounding (one ulp)
        w = np.asarray(w)
        np.testing.assert_allclose(g, w, rtol=1e-5 + 2 * ulp, atol=1e-5 + ulp)


def test_chunk():
    assert [gpu_mix.chunk(c) for c in (2560, 768, 4096, 96, 100)] == [512, 256, 512, 32, None]


@pytest.mark.parametrize("with_add", [False, True], ids=["att", "ffn"])
def test_lowers_to_triton_for_cuda(with_add):
    """The kernel passes Pallas' Triton lowering for CUDA at the 2.9b model's sizes (C = 2560,
    LoRA ranks 96/96/64/320, 20 partial sums), reading the stacks whole."""
    C_, L_, f32 = 2560, 4, jnp.float32
    downs = () if with_add else tuple(
        (i, jnp.ones((L_, d, C_), f32), fn)
        for i, d, fn in zip((1, 4, 3, 5), (96, 96, 64, 320), ACTS, strict=True)
    )  # fmt: skip

    def f(layer, x, addends, prev, lnw, lnb, mix, mats):
        spec = tuple((i, w, fn) for (i, _, fn), w in zip(downs, mats, strict=True))
        return gpu_mix.mix_prologue(
            layer, jnp.ones((1,), bool), x, addends, prev, (lnw, lnb), mix,
            (0,) if with_add else (0, 2, 3), spec, eps=1e-5, dtype=jnp.bfloat16,
        )  # fmt: skip

    args = (
        jnp.int32(0),
        jnp.ones((1, C_), f32),
        jnp.ones((20, 1, C_), f32) if with_add else None,
        jnp.ones((L_, 1, C_), jnp.bfloat16),  # the shift states of every layer
        jnp.ones((L_, C_), f32),
        jnp.ones((L_, C_), f32),
        jnp.ones((L_, 1 if with_add else 6, C_), f32),
        tuple(w for _, w, _ in downs),
    )
    text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=TRITON)(
        *args
    ).mlir_module()
    call = [ln for ln in text.splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert len(call) == 1
    # the prologue without LoRA downs (the FFN's) launches ADD_WARPS warps per program
    warps = gpu_mix.ADD_WARPS if with_add else gpu_mix.NUM_WARPS
    assert gpu_mix.ADD_WARPS != gpu_mix.NUM_WARPS  # else this tells nothing
    assert f"num_warps = {warps} : i32" in call[0]
    assert f"tensor<{L_}x{C_}xf32>" in call[0]  # the whole stacks
    assert f"tensor<{L_}x1x{C_}xbf16>" in call[0]
    assert "dynamic_slice" not in text


@pytest.mark.parametrize("stack_layers", [True, False], ids=["stacked", "unrolled"])
@pytest.mark.parametrize(("B", "qtype"), [(1, "Q8_0"), (2, "Q8_0"), (1, "Q4_K_M")])
def test_decode_with_kernel_matches_xla(
    cuda_branch, decode_steps, synth_model, stack_layers, B, qtype
):
    """Three float32 decode steps of the tiny model through the kernel equal the XLA path's:
    layer index, stacked vectors and LoRA matrices, shift states wired right; Q4_K_M at one row
    takes the output matvec's partial sums (Q8_0 and more rows: the summed product)."""
    m = rwkv_jax.load(synth_model("tiny", qtype), stack_layers=stack_layers, dtype="float32")
    rng = np.random.default_rng(B)
    toks = jnp.asarray(rng.integers(0, m.config.vocab_size, (3, B)), jnp.int32)
    want_logits, want_st = decode_steps(m, toks)
    # the prologues' CUDA branches (the per-head kernel still declines the CPU backend, so
    # heads_step stays on XLA): logged are which prologue and its addends or LoRA downs
    log = lambda a, kw: ("ffn", a[3].shape[0]) if a[3] is not None else ("att", len(a[8]))  # noqa: E731
    calls = cuda_branch([(gpu_mix, "mix_prologue", log)], grouped=qtype == "Q4_K_M")
    jax.clear_caches()
    got_logits, got_st = decode_steps(m, toks)
    jax.clear_caches()
    grouped = qtype == "Q4_K_M" and B == 1
    parts = gpu_kernels._parts(m.config.n_embd // 256, gpu_kernels.SPLIT) if grouped else 1
    # the output matvec's partial sums, in the parts the FFN prologue asks for
    per_layer = [("att", 4)] + [("partials", gpu_mix.ADDEND_SPLIT)] * grouped + [("ffn", parts)]
    if B > gpu_mix.MAX_ROWS:  # more rows keep the XLA path
        per_layer = []
    # traced once per jit (stacked: the scan body; unrolled: once per layer)
    assert calls == per_layer * (1 if stack_layers else m.config.n_layer)
    # float32 throughout: only summation orders differ (C = 256 terms per sum, a few ulp of
    # float32 through two layers and the head)
    scale = np.abs(want_logits).max()
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4 * scale)
    for name in ("att_shift", "ffn_shift", "wkv"):
        np.testing.assert_allclose(
            np.asarray(getattr(got_st, name)), np.asarray(getattr(want_st, name)),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


def test_gpu_decode_takes_several_layers_per_scan_iteration(monkeypatch, synth_model, decode_steps):
    """On a GPU one decode token's scan over stacked layers unrolls DECODE_LAYER_UNROLL layers
    per iteration (prefill keeps LAYER_SCAN_UNROLL), with the same results: the compiled scan's
    `unroll` read off the jaxpr, and three decode steps against the rolled scan."""
    m = rwkv_jax.load(synth_model("tiny", "Q8_0"), stack_layers=True, dtype="float32")
    toks = jnp.asarray(np.random.default_rng(2).integers(0, m.config.vocab_size, (3, 1)), jnp.int32)

    def unrolls(T):
        fn = functools.partial(decode_step, cfg=m.config, dtype=m.dtype)
        if T > 1:
            fn = lambda p, t, s: model.forward(p, m.config, t, s, dtype=m.dtype)  # noqa: E731
        jaxpr = jax.make_jaxpr(fn)(m.params, jnp.zeros((1, T) if T > 1 else (1,), jnp.int32),
                                   m.new_state(1))  # fmt: skip
        return [
            eqn.params["unroll"]
            for eqn in equations(jaxpr)
            if eqn.primitive.name == "scan" and eqn.params["length"] == m.config.n_layer
        ]

    def run():
        logits, st = decode_steps(m, toks)
        return logits, np.asarray(st.wkv)

    assert unrolls(1) == [model.LAYER_SCAN_UNROLL]  # the CPU
    want = run()
    monkeypatch.setattr(model, "_on_gpu", lambda: True)
    jax.clear_caches()
    assert unrolls(1) == [model.DECODE_LAYER_UNROLL]
    assert unrolls(4) == [model.LAYER_SCAN_UNROLL]  # prefill
    got = run()
    jax.clear_caches()
    # the same operations; XLA may fuse them differently across layers (float32 reordering)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
