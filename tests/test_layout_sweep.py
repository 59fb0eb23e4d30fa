"""experiments.layout_sweep: layouts parse, take effect on the model copies, and fill the table."""

from __future__ import annotations

import numpy as np
import pytest

import rwkv_jax
from experiments import layout_sweep
from rwkv_jax.errors import InputError


def test_parse_layout_and_its_errors():
    assert layout_sweep.parse_layout("128/256/16", 16) == (8, 16, 1)
    assert layout_sweep.parse_layout("512/512/0", 16) == (32, 32, 0)
    for bad in ["128/256", "128/x/16", "8/16/0", "256/128/16", "128/256/24", "128/320/16",
                "128/256/48", "64/128/128"]:  # fmt: skip
        with pytest.raises(InputError):
            layout_sweep.parse_layout(bad, 16)


def test_variants_share_weights_and_run_their_own_layout(synth_model, monkeypatch):
    model = rwkv_jax.load(synth_model("tiny", "Q4_K_M"))
    models = layout_sweep.variants(model, ["16/32/0", "32/32/16"])
    a, b = models["16/32/0"], models["32/32/16"]
    assert (a.chunks_per_step, a.chunks_per_call, a.tail_chunks) == (1, 2, 0)
    assert (b.chunks_per_step, b.chunks_per_call, b.tail_chunks) == (2, 2, 1)
    assert a.params is model.params and b.params is model.params
    # the layout reaches the compiled prefill: step lengths as each layout cuts a 40-token prompt
    from rwkv_jax import generate

    steps = []
    real = generate.prefill_call

    def spy(*args, step_len, **kw):
        steps.append(step_len)
        return real(*args, step_len=step_len, **kw)

    monkeypatch.setattr(generate, "prefill_call", spy)
    toks = np.arange(1, 41, dtype=np.int32)
    la, _ = a.forward(toks)
    assert steps == [16, 16]  # a 32-token call in 16-token steps, then the last 8 tokens
    steps.clear()
    lb, _ = b.forward(toks)
    assert steps == [32, 16]  # one whole 32-token step, then the tail in 16-token steps
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=2e-4, atol=2e-4)


def test_sweep_interleaves_and_tables_medians(synth_model):
    model = rwkv_jax.load(synth_model("tiny", "F32"))
    models = layout_sweep.variants(model, ["16/16/0", "32/32/0"])
    seen = []
    cost = {"16/16/0": 1.0, "32/32/0": 2.0}

    def timer(m, toks):
        name = f"{16 * m.chunks_per_step}/{16 * m.chunks_per_call}/{16 * m.tail_chunks}"
        seen.append((name, len(toks)))
        return cost[name]

    tps = layout_sweep.sweep(models, [8, 20], rounds=2, timer=timer)
    assert len(seen) == 2 * 2 + 2 * 2 * 2 * 2  # warm-ups, then rounds x lengths x layouts x 2
    assert seen[4:6] == [("16/16/0", 8)] * 2 and seen[8:10] == [("16/16/0", 20)] * 2
    assert seen[12:14] == [("32/32/0", 8)] * 2  # round 2 starts with the other layout
    assert tps[("16/16/0", 20)] == [20.0, 20.0] and tps[("32/32/0", 8)] == [4.0, 4.0]
    out = layout_sweep.table(tps, ["16/16/0", "32/32/0"], [8, 20]).splitlines()
    assert out[0] == "| prompt tokens | 16/16/0 | 32/32/0 |"
    assert out[2:] == ["| 8 | 8.0 | 4.0 |", "| 20 | 20.0 | 10.0 |"]
