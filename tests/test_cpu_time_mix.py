"""The native per-head step on the CPU (cpu_kernels.time_mix_step) against the XLA path
(model.heads): one call of one or several tokens, whole decode steps and prefills of a model
through model.heads_step."""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import cpu_kernels, model, wkv
from rwkv_jax.generate import decode_step

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no native CPU kernels")

VECTORS = ("w0", "a0", "v0", "k_k", "k_a", "r_k", "ln_x_w", "ln_x_b")
EPS = 64e-5


def _inputs(rng, B, H, N, L, T=None):
    """Random inputs of B rows ([B, C]; T given: [B, T, C]) and an L-layer state stack."""
    C = H * N
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    rows = (B, C) if T is None else (B, T, C)
    r, k, v, vf, zw, za, zv, g = (f(*rows) for _ in range(8))
    vectors = [0.5 * f(L, C) for _ in VECTORS]
    S = 0.1 * f(L, B, H, N, N)
    return (r, k, v, vf, (zw, za, zv, g), vectors, S)


def _heads_xla(layer, first, active, r, k, v, vf, ups, vectors, S, H, N):
    """model.heads itself (the XLA path) on one layer, the up products given as they are."""
    blk = types.SimpleNamespace(w2=None, a2=None, v2=None, g2=None)
    for name, a in zip(VECTORS, vectors, strict=True):
        row = a[min(layer, a.shape[0] - 1)]
        setattr(blk, name, row.reshape(H, N) if name == "r_k" else row)
    cfg = types.SimpleNamespace(n_head=H, head_size=N, group_norm_eps=EPS)
    tokens = r.ndim == 3  # [B, T, C] (and active [B, T]), else one token [B, C]
    valid = active if tokens else active[:, None]
    span = model.Span(valid, valid.sum(1).astype(jnp.int32), wkv.wkv7_sequential, jnp.float32)
    one = (lambda a: a) if tokens else (lambda a: a[:, None])  # [B, C] -> [B, T = 1, C]
    with pytest.MonkeyPatch.context() as mp:  # the ups are products already
        mp.setattr(model, "matmul", lambda w, x, dtype: x)
        out, vf, S = model.heads(
            blk, cfg, one(r), one(k), one(v), one(vf), first, tuple(map(one, ups)), S[layer], span
        )
    return (out, vf, S) if tokens else (out[:, 0], vf[:, 0], S)


_CALL = functools.partial(
    cpu_kernels.time_mix_step, eps=EPS, decay_scale=model.DECAY_SCALE, l2_eps=model.L2_EPS
)


def _against_heads(layer, active, inputs, H, N):
    """One jitted call on layer `layer` of the inputs' stack (first=None: layer 0 is the first)
    against model.heads: the output and this layer's state within float32 reordering, v_first
    equal, the other layer's state untouched. -> the call's state stack."""
    r, k, v, vf, ups, vectors, S = inputs
    got_out, got_vf, got_S = jax.jit(
        lambda S: _CALL(jnp.int32(layer), None, active, r, k, v, vf, ups, vectors, S)
    )(S)
    want_out, want_vf, want_S = _heads_xla(
        layer, layer == 0, active, r, k, v, vf, ups, vectors, S, H, N
    )
    # float32 both ways, the same operations: only the summation order of the 64-term dot
    # products and norms (and libm's vs the kernel's exp, both within 2 ulp) differ, each a few
    # ulp of its largest term; 1e-5 of the largest value is ~100x what they give (a wrong
    # operand, layout or token order is O(1)); through a few tokens of the recurrence the
    # state's rounding differences do not grow past it
    for got, want in ((got_out, want_out), (got_S[layer], want_S)):
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * scale
    np.testing.assert_array_equal(got_vf, want_vf)  # v itself (layer 0) or v_first as given
    np.testing.assert_array_equal(got_S[1 - layer], S[1 - layer])
    return got_S


@pytest.mark.parametrize("layer", [0, 1])
def test_step_matches_heads(layer):
    """Rows of a 2-layer stack, one a padding row: the output, v_first and this layer's state as
    model.heads computes them; the other layer's state and the padding row's state untouched
    (bit for bit). first=None: the kernel takes layer 0 as the first layer (v_first = v)."""
    rng = np.random.default_rng(30 + layer)
    B, H, N, L = 3, 4, 64, 2
    inputs = _inputs(rng, B, H, N, L)
    got_S = _against_heads(layer, jnp.asarray([True, False, True]), inputs, H, N)
    np.testing.assert_array_equal(got_S[layer, 1], inputs[-1][layer, 1])  # the padding row


@pytest.mark.parametrize("layer", [0, 1])
def test_tokens_match_heads_with_the_token_recurrence(layer):
    """T = 6 tokens of 2 rows, the second with 4 valid tokens then padding (a prefill step):
    outputs, v_first and the state after the tokens as model.heads with wkv7_sequential gives
    them; the padding leaves the state as it is (the second row's state equals that of its 4
    valid tokens alone); the other layer's state untouched."""
    rng = np.random.default_rng(60 + layer)
    B, H, N, L, T = 2, 2, 32, 2, 6
    r, k, v, vf, ups, vectors, S = inputs = _inputs(rng, B, H, N, L, T)
    active = jnp.arange(T)[None, :] < jnp.asarray([[T], [4]])  # [B, T]
    got_S = _against_heads(layer, active, inputs, H, N)
    short = tuple(a[1:, :4] for a in (r, k, v, vf))
    _, _, S4 = _CALL(
        jnp.int32(layer), None, active[1:, :4], *short, tuple(u[1:, :4] for u in ups), vectors,
        S[:, 1:],
    )  # fmt: skip
    np.testing.assert_array_equal(got_S[layer, 1], S4[layer, 0])


@pytest.mark.parametrize("first", [True, False])
def test_step_unstacked_vectors_and_explicit_first(first):
    """One layer's vectors ([1, C]) and a stack of one state, first given explicitly."""
    rng = np.random.default_rng(40 + first)
    B, H, N = 2, 2, 32
    r, k, v, vf, ups, vectors, S = _inputs(rng, B, H, N, 1)
    active = jnp.asarray([True, True])
    got_out, got_vf, got_S = cpu_kernels.time_mix_step(
        jnp.int32(0), first, active, r, k, v, vf, ups, vectors, S,
        eps=EPS, decay_scale=model.DECAY_SCALE, l2_eps=model.L2_EPS,
    )  # fmt: skip
    want_out, want_vf, want_S = _heads_xla(0, first, active, r, k, v, vf, ups, vectors, S, H, N)
    for got, want in ((got_out, want_out), (got_S[0], want_S)):
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))
    np.testing.assert_array_equal(got_vf, v if first else vf)


def _native_against_xla(monkeypatch, run):
    """run() -> (program text, logits, state), once with the native step and once with
    model.cpu_heads off: the custom call in the first program only, and equal logits and states
    within float32 reordering (two layers and the head: a few ulp of each sum)."""
    text, got_logits, got_st = run()
    assert cpu_kernels.TIME_MIX_TARGET in text
    monkeypatch.setattr(model, "cpu_heads", lambda *a: False)
    jax.clear_caches()
    text, want_logits, want_st = run()
    jax.clear_caches()
    assert cpu_kernels.TIME_MIX_TARGET not in text
    scale = np.abs(want_logits).max()
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5 * scale)
    for name in ("att_shift", "ffn_shift", "wkv"):
        np.testing.assert_allclose(
            np.asarray(getattr(got_st, name)), np.asarray(getattr(want_st, name)),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip


@pytest.mark.parametrize(("qtype", "stack_layers"), [("Q4_K_M", True), ("Q8_0", False)])
@pytest.mark.parametrize("B", [1, 3])
def test_decode_steps_match_the_xla_path(synth_model, monkeypatch, qtype, stack_layers, B):
    """Three float32 decode steps of the tiny model take the native step (the custom call is in
    the program) and equal the XLA path's logits and states within float32 reordering."""
    m = rwkv_jax.load(synth_model("tiny", qtype), stack_layers=stack_layers, dtype="float32")
    toks = np.random.default_rng(B).integers(0, m.config.vocab_size, (3, B))
    step = jax.jit(functools.partial(decode_step, cfg=m.config, dtype=m.dtype))

    def run():
        st = m.new_state(B)
        st = dataclasses.replace(st, wkv=st.wkv + 0.01)  # a state that is not all zeros
        text = step.lower(m.params, jnp.asarray(toks[0], jnp.int32), st).as_text()
        logits = []
        for t in toks:
            lg, st = step(m.params, jnp.asarray(t, jnp.int32), st)
            logits.append(np.asarray(lg))
        return text, np.stack(logits), st

    _native_against_xla(monkeypatch, run)


def test_step_under_vmap_equals_one_call_per_slice():
    """jax.vmap over a leading axis of the rows' inputs and the state: one call per slice."""
    rng = np.random.default_rng(50)
    B, H, N, L = 2, 2, 16, 2
    slices = [_inputs(rng, B, H, N, L) for _ in range(3)]
    active = jnp.asarray([True, True])

    def one(r, k, v, vf, ups, S):
        return cpu_kernels.time_mix_step(
            jnp.int32(1), None, active, r, k, v, vf, ups, slices[0][5], S,
            eps=EPS, decay_scale=model.DECAY_SCALE, l2_eps=model.L2_EPS,
        )  # fmt: skip

    stacked = [jnp.stack(parts) for parts in zip(*[(*s[:4], s[6]) for s in slices], strict=True)]
    ups = tuple(jnp.stack(u) for u in zip(*[s[4] for s in slices], strict=True))
    r, k, v, vf, S = stacked
    got = jax.vmap(one)(r, k, v, vf, ups, S)
    for i, s in enumerate(slices):
        want = one(*s[:5], s[6])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g[i], w)


@pytest.mark.parametrize(("qtype", "stack_layers"), [("Q4_K_M", True), ("Q8_0", False)])
def test_prefill_matches_the_xla_path(synth_model, monkeypatch, qtype, stack_layers):
    """A float32 prefill of two rows (11 and 7 tokens: a padded tail) through model.forward with
    the token recurrence takes the native call for every layer and equals the XLA path's
    logits and state; a chunked WKV keeps the XLA path."""
    m = rwkv_jax.load(synth_model("tiny", qtype), stack_layers=stack_layers, dtype="float32")
    toks = np.random.default_rng(7).integers(0, m.config.vocab_size, (2, 11))
    lengths = jnp.asarray([11, 7], jnp.int32)

    def run(wkv_fn=wkv.wkv7_sequential):
        st = m.new_state(2)
        st = dataclasses.replace(st, wkv=st.wkv + 0.01)
        f = jax.jit(
            lambda p, t, s: model.forward(
                p, m.config, t, s, lengths=lengths, wkv_fn=wkv_fn, all_logits=True
            )
        )
        text = f.lower(m.params, jnp.asarray(toks, jnp.int32), st).as_text()
        logits, st = f(m.params, jnp.asarray(toks, jnp.int32), st)
        return text, np.asarray(logits), st

    chunked = functools.partial(wkv.wkv7_chunked, chunk_size=16)
    assert cpu_kernels.TIME_MIX_TARGET not in run(chunked)[0]
    # the padded positions' logits are compared too (both paths leave the state and read it)
    _native_against_xla(monkeypatch, run)
