"""The fused per-head decode kernel (rwkv_jax/gpu_time_mix.py) against the XLA path
(model.heads), in Pallas' interpreter on the CPU; its Triton lowering for CUDA; and the model's
decode with the kernel wired in (stacked and unrolled layers) against the model without it."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import rwkv_jax
from rwkv_jax import gpu_kernels, gpu_time_mix, model, quant, wkv

H, N, C, L = 2, 16, 32, 3
RANKS = (24, 16, 8, 40)  # w, a, v, g: 24 and 40 take two power-of-two pieces
TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _params(rng, dense=np.float16):
    """Stacked random layer parameters the heads use (a stand-in for params.Block), as exact
    small multiples of 1/16 so the LoRA-up sums are exact whatever their order."""

    def vec(scale=1.0):
        return jnp.asarray(scale * rng.standard_normal((L, C)), jnp.float32)

    def up(d):  # [L, C, d]
        q = rng.integers(-4, 5, (L, C, d)) / 16.0
        return quant.dense_weight(jnp.asarray(q, dense))

    w2, a2, v2, g2 = (up(d) for d in RANKS)
    return types.SimpleNamespace(
        w0=vec(), a0=vec(), v0=vec(), k_k=vec(), k_a=vec(),
        r_k=jnp.asarray(rng.standard_normal((L, H, N)), jnp.float32),
        ln_x_w=vec(), ln_x_b=vec(0.1), w2=w2, a2=a2, v2=v2, g2=g2,
    )  # fmt: skip


def _layer(p, i: int):
    """Layer i of the stacked stand-in, as the scan would slice it."""
    return types.SimpleNamespace(**{n: jax.tree.map(lambda a: a[i], v) for n, v in vars(p).items()})


def _inputs(rng, B: int, dtype):
    # r, k, v as the grouped matvec hands them over: multiples of 1/64 in [-2, 2] (exact in
    # bf16, so the kernel's rounding of their sums changes nothing), and as two split-K partial
    # sums [3, 2, B, C] whose float32 sum is exact
    rkv = tuple(
        jnp.asarray(rng.integers(-128, 129, (B, 1, C)) / 64.0, jnp.float32) for _ in range(3)
    )
    v_first = jnp.asarray(rng.standard_normal((B, 1, C)), jnp.float32)
    # hiddens as the model passes them (float32 activations of dtype-rounded products); multiples
    # of 1/8 in [-1, 1] are exact in every compute dtype
    hidden = tuple(jnp.asarray(rng.integers(-8, 9, (B, 1, d)) / 8.0, jnp.float32) for d in RANKS)
    S = jnp.asarray(rng.standard_normal((L, B, H, N, N)), jnp.float32)
    return rkv, v_first, hidden, S


CFG = types.SimpleNamespace(n_head=H, head_size=N, group_norm_eps=64e-5)


@pytest.mark.parametrize(("B", "layer"), [(1, 1), (3, 0), (6, 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("projected", [False, True], ids=["ups_inside", "ups_given"])
def test_kernel_matches_xla_heads(B, layer, dtype, projected):
    """Kernel (interpreted) == model.heads on the same inputs: outputs within float32 reordering
    of sums over a head (N = 16 terms, each step of the chain a few ulp: 1e-5 relative), v_first
    exact, and a padding row's state untouched bit for bit. projected: the kernel takes the LoRA
    up products (model.matmul's) instead of the hiddens and matrices."""
    rng = np.random.default_rng(100 * B + layer)
    p = _params(rng)
    (r, k, v), v_first, hidden, S = _inputs(rng, B, dtype)
    active = np.ones(B, bool)
    active[-1] = B == 1  # the last row pads (when there are several)
    valid = jnp.asarray(active)[:, None]
    span = model.Span(valid, valid[:, 0].astype(jnp.int32), wkv.wkv7_sequential, dtype)
    want = model.heads(_layer(p, layer), CFG, r, k, v, v_first, layer == 0, hidden, S[layer], span)
    second = jnp.asarray(rng.integers(-64, 65, (3, B, C)) / 64.0, jnp.float32)
    first_part = jnp.stack([r[:, 0], k[:, 0], v[:, 0]]) - second
    parts = jnp.stack([first_part, second], axis=1)  # [3, 2, B, C]
    lay = _layer(p, layer)
    ups = (lay.w2, lay.a2, lay.v2, lay.g2)
    products = tuple(model.matmul(w, h, dtype) for w, h in zip(ups, hidden, strict=True))

    got = gpu_time_mix.time_mix_heads(
        jnp.int32(layer),
        None if layer != 1 else False,  # layer 1 passes `first` as the unrolled model does
        jnp.asarray(active),
        parts,
        v_first[:, 0],
        tuple(h[:, 0] for h in (products if projected else hidden)),
        None if projected else (p.w2.w, p.a2.w, p.v2.w, p.g2.w),
        tuple(a.reshape(L, C) for a in (p.w0, p.a0, p.v0, p.k_k, p.k_a, p.r_k, p.ln_x_w, p.ln_x_b)),
        S,
        eps=CFG.group_norm_eps,
        decay_scale=model.DECAY_SCALE,
        l2_eps=model.L2_EPS,
        dtype=dtype,
        round_weights=B > quant.MATVEC_MAX_ROWS,
        interpret=True,
    )
    out, vf, S_new = (np.asarray(a, np.float32) for a in got)
    w_out, w_vf, w_S = (np.asarray(a) for a in want)
    assert got[0].dtype == dtype  # the output matmul's input, rounded by the kernel
    np.testing.assert_array_equal(vf, w_vf[:, 0])
    # out: float32 reordering (1e-5) and, in bf16, one rounding of each: where the two float32
    # values straddle a rounding boundary they round one bf16 ulp (<= 2^-8 relative) apart
    rtol = 1e-5 + (2.0**-8 if dtype == jnp.bfloat16 else 0.0)
    np.testing.assert_allclose(out, w_out[:, 0], rtol=rtol, atol=1e-5 * np.abs(w_out).max())
    np.testing.assert_allclose(S_new, w_S, rtol=1e-5, atol=1e-5 * np.abs(w_S).max())
    if B > 1:
        np.testing.assert_array_equal(S_new[-1], np.asarray(S[layer, -1]))


def test_pieces_cover_the_rank():
    for d in (8, 24, 40, 96, 320, 64, 7):
        got = gpu_time_mix.pieces(d)
        assert sum(w for _, w in got) == d
        assert all(w & (w - 1) == 0 and w <= gpu_time_mix.MAX_PIECE for _, w in got)
        assert [s for s, _ in got] == list(np.cumsum([0] + [w for _, w in got])[:-1])


@pytest.mark.parametrize(("B", "in_place"), [(1, False), (8, False), (8, True), (64, True)])
def test_lowers_to_triton_for_cuda(B, in_place):
    """The kernel passes Pallas' Triton lowering for CUDA at the 2.9b model's sizes (C = 2560,
    ranks 96/96/64/320, head size 64), reading the stacks whole; in place, its state output is
    the state input's buffer (an aliased operand) and the whole stack; from WIDE_ROWS rows it
    launches WIDE_WARPS warps per program, NUM_WARPS below."""
    C_, L_, H_, ranks = 2560, 4, 40, (96, 96, 64, 320)
    f32 = jnp.float32
    args = (
        jnp.int32(0),
        None,
        jnp.ones((B,), bool),
        jnp.ones((3, 10 if B == 1 else 1, B, C_), f32),
        jnp.ones((B, C_), f32),
        tuple(jnp.ones((B, d), f32) for d in ranks),
        tuple(jnp.ones((L_, C_, d), jnp.float16) for d in ranks),
        tuple(jnp.ones((L_, C_), f32) for _ in range(8)),
        jnp.ones((L_, B, H_, 64, 64), f32),
    )
    f = jax.jit(
        functools.partial(
            gpu_time_mix.time_mix_heads,
            eps=1e-5,
            decay_scale=model.DECAY_SCALE,
            l2_eps=model.L2_EPS,
            dtype=jnp.bfloat16,
            round_weights=B > 4,
            in_place=in_place,
        )
    )
    text = export.export(f, platforms=["cuda"], disabled_checks=TRITON)(*args).mlir_module()
    call = [ln for ln in text.splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert len(call) == 1
    stack = f"tensor<{L_}x{B}x{H_}x64x64xf32>"
    assert stack in call[0]  # the whole state stack
    assert "dynamic_slice" not in text
    assert ("output_operand_aliases" in call[0]) == in_place
    assert call[0].split("->")[-1].count(stack) == in_place  # results: the stack when in place
    wide = B >= gpu_time_mix.WIDE_ROWS
    warps = gpu_time_mix.WIDE_WARPS if wide else gpu_time_mix.NUM_WARPS
    assert f"num_warps = {warps} : i32" in call[0]


@pytest.mark.parametrize("stack_layers", [True, False], ids=["stacked", "unrolled"])
@pytest.mark.parametrize(
    ("B", "qtype"), [(1, "Q8_0"), (3, "Q8_0"), (1, "Q4_K_M"), (3, "Q4_K_M"), (17, "Q8_0")]
)
def test_decode_with_kernel_matches_xla(
    monkeypatch, cuda_branch, decode_steps, synth_model, stack_layers, B, qtype
):
    """Three decode steps of the tiny model through the kernel equal the XLA path's: the layer
    index, first-layer value residual, stacked vectors and state all wired right; Q4_K_M takes
    the grouped matvec's partial sums (Q8_0: the fallback, three matmuls); stacked layers at
    WKV_IN_PLACE_MIN_ROWS rows write the carried state stack in place."""
    m = rwkv_jax.load(synth_model("tiny", qtype), stack_layers=stack_layers, dtype="float32")
    rng = np.random.default_rng(B)
    toks = jnp.asarray(rng.integers(0, m.config.vocab_size, (3, B)), jnp.int32)
    want_logits, want_st = decode_steps(m, toks)
    # the heads' CUDA branch (heads_step is model.py's only platform_dependent that the CPU
    # backend reaches; gpu_mix declines it): logged are the partial sums, the state it reads,
    # whether it writes it in place (stacked: the scan's carried stack), whether it takes products
    log = lambda a, kw: (a[3].shape[1], a[-1].shape, kw["in_place"], a[6] is None)  # noqa: E731
    monkeypatch.setattr(model, "WKV_IN_PLACE_MIN_ROWS", 3)  # B = 3 carries it, B = 1 does not
    in_place = stack_layers and B >= 3
    calls = cuda_branch([(gpu_time_mix, "time_mix_heads", log)], grouped=qtype == "Q4_K_M")
    jax.clear_caches()
    got_logits, got_st = decode_steps(m, toks)
    L_, H_, N_ = m.config.n_layer, m.config.n_head, m.config.head_size
    # traced once per jit (stacked: the scan body; unrolled: once per layer)
    grouped = qtype == "Q4_K_M" and B == 1  # the partial sums are handed over at one row
    parts = gpu_kernels._parts(m.config.n_embd // 256, gpu_kernels.SPLIT) if grouped else 1
    state = (L_ if stack_layers else 1, B, H_, N_, N_)
    projected = B > gpu_time_mix.MAX_UP_ROWS  # the kernel takes the LoRA up products
    # the grouped matvec's partial sums, in the parts the kernel asks for (RKV_SPLIT)
    handed = [("partials", gpu_time_mix.RKV_SPLIT)] * grouped
    assert calls == (handed + [(parts, state, in_place, projected)]) * (1 if stack_layers else L_)
    jax.clear_caches()
    scale = np.abs(want_logits).max()
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(
        np.asarray(got_st.wkv), np.asarray(want_st.wkv), rtol=1e-4, atol=1e-5
    )
    # the first layer's input does not depend on the kernel; later layers' do, by rounding
    np.testing.assert_array_equal(np.asarray(got_st.att_shift[0]), np.asarray(want_st.att_shift[0]))
    np.testing.assert_allclose(
        np.asarray(got_st.ffn_shift), np.asarray(want_st.ffn_shift), rtol=1e-4, atol=1e-5
    )


def test_carried_state_through_xla_equals_per_layer_outputs(monkeypatch, decode_steps, synth_model):
    """Where the per-head kernel applies but the backend takes platform_dependent's default
    branch (a GPU without CUDA), the carried WKV stack is updated by XLA's dynamic-update-slice:
    the same numbers as the scan's per-layer outputs (bit for bit: the same operations)."""
    m = rwkv_jax.load(synth_model("tiny", "Q8_0"), stack_layers=True, dtype="float32")
    toks = jnp.asarray(np.random.default_rng(5).integers(0, m.config.vocab_size, (3, 2)), jnp.int32)
    want_logits, want_st = decode_steps(m, toks)
    monkeypatch.setattr(gpu_time_mix, "_cpu_backend", lambda: False)  # the kernel "applies"
    monkeypatch.setattr(model, "WKV_IN_PLACE_MIN_ROWS", 2)
    assert model.heads_kernel((m.params.blocks.w2,) * 4, m.config, 2, 1)
    jax.clear_caches()
    got_logits, got_st = decode_steps(m, toks)
    jax.clear_caches()
    np.testing.assert_array_equal(got_logits, want_logits)
    for got, want in zip(jax.tree.leaves(got_st), jax.tree.leaves(want_st), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
