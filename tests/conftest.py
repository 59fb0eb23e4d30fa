"""Shared fixtures: synthetic models written once per test session, strict JAX settings."""

from __future__ import annotations

import os

import jax
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
