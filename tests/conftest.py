"""Shared fixtures: synthetic models written once per test session, strict JAX settings."""

from __future__ import annotations

import functools
import os
import types

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# no persistent compilation cache in tests: every run compiles what it checks and writes nothing
# to the user's cache (tests/test_load.py turns it on with directories of its own)
os.environ.setdefault("RWKV_JAX_COMPILE_CACHE", "0")

MODEL_DIR_ENV = "RWKV_JAX_TEST_MODELS"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """Where synthetic test models live (reused across runs if RWKV_JAX_TEST_MODELS is set)."""
    d = os.environ.get(MODEL_DIR_ENV)
    if d:
        os.makedirs(d, exist_ok=True)
        return d
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def synth_model(model_dir):
    """Factory: path of a synthetic model (preset, type, seed), written on first use."""
    from rwkv_jax import synth

    def get(preset: str = "tiny", qtype: str = "F32", seed: int = 0) -> str:
        return synth.ensure(preset, qtype, seed, cache_dir=model_dir, progress=False)

    return get


@pytest.fixture
def cuda_branch(monkeypatch):
    """Factory: run model.py's CUDA branches on the CPU, their Pallas kernels interpreted.

    force(kernels, grouped=False) replaces model.lax by jax.lax whose platform_dependent picks
    `cuda` (the matmuls dispatch in quant.py, untouched) and model.cpu_heads says False; for
    each (module, function name, log) of `kernels`, module._cpu_backend says False (as on a GPU
    host) and module.<name> runs in Pallas' interpreter, appending log(args) to the list force
    returns. grouped: quant's matmuls leave the native CPU kernels (as off the CPU) and the
    grouped Pallas matvec runs interpreted too, appending ("partials", split) for each call that
    hands its split-K partial sums over (split: the parts its consumer asked for, None = the
    matvec's own; other matmuls trace their CUDA branches there too, without partial sums)."""
    from rwkv_jax import gpu_kernels, model, quant

    def force(kernels, grouped: bool = False) -> list:
        calls = []
        if grouped:
            monkeypatch.setattr(quant, "_cpu_native", lambda w: False)
            group = functools.partial(gpu_kernels.matmul_group, interpret=True)

            def group_spy(*args, **kw):
                if kw.get("partials"):
                    calls.append(("partials", kw.get("split")))
                return group(*args, **kw)

            monkeypatch.setattr(gpu_kernels, "matmul_group", group_spy)
        fake = types.SimpleNamespace(
            **{n: getattr(jax.lax, n) for n in dir(jax.lax) if n[0] != "_"}
        )
        fake.platform_dependent = lambda *args, cuda, default: cuda(*args)
        monkeypatch.setattr(model, "lax", fake)
        # as on a GPU host: no native CPU per-head step (its branch is the CPU's, not CUDA's)
        monkeypatch.setattr(model, "cpu_heads", lambda *a: False)
        for module, name, log in kernels:
            monkeypatch.setattr(module, "_cpu_backend", lambda: False)
            interpreted = functools.partial(getattr(module, name), interpret=True)

            def spy(*args, _f=interpreted, _log=log, **kw):
                calls.append(_log(args, kw))
                return _f(*args, **kw)

            monkeypatch.setattr(module, name, spy)
        return calls

    return force


@pytest.fixture(scope="session")
def decode_steps():
    """Factory: run(m, toks [steps, B]) -> (logits [steps, B, V] numpy, final state): one
    generate.decode_step per row of toks from a fresh state of the loaded model m."""
    from rwkv_jax.generate import decode_step

    def run(m, toks):
        st, logits = m.new_state(toks.shape[1]), []
        for t in toks:
            lg, st = decode_step(m.params, t, st, cfg=m.config, dtype=m.dtype)
            logits.append(np.asarray(lg))
        return np.stack(logits), st

    return run
