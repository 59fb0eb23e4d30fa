"""rwkv_jax driven by the benchmark protocols (import only after the JAX platform is chosen)."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import rwkv_jax
from rwkv_jax import backends
from rwkv_jax.generate import Model, decode_fn
from rwkv_jax.gguf import GGUFFile
from rwkv_jax.params import nbytes
from rwkv_jax.sampling import Penalty, Sampler, SamplerParams, stream_keys
from rwkv_jax.session import sample_steps


@jax.jit
def _greedy(logits: jax.Array) -> jax.Array:
    """argmax per row on the device (first maximum), int32 [B]: the greedy feedback token."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def greedy_loop_args(batch: int, vocab: int, remaining: int) -> tuple:
    """session.sample_steps' arguments after (params, logits, state): greedy streams from
    position 0, all active with `remaining` tokens each, no stop tokens, no penalties."""
    return (
        Penalty.zeros(batch, vocab),
        stream_keys(0, batch),
        jnp.zeros((batch,), jnp.int32),  # positions
        jnp.ones((batch,), bool),  # active
        jnp.full((batch,), remaining, jnp.int32),  # remaining
        jnp.asarray([-1], jnp.int32),  # no stop tokens
        SamplerParams.from_samplers([Sampler.greedy()] * batch, vocab),
        jnp.zeros((vocab,), jnp.float32),  # token weights (no penalties)
    )


class JaxEngine:
    """One rwkv_jax model and one recurrent state, with the seed's and llama-bench's calls."""

    name = "rwkv_jax"

    def __init__(self, path: str, options: dict):
        self.path = path
        self.options = dict(options)  # rwkv_jax.from_gguf keyword options
        self.header: GGUFFile | None = None  # the last parsed header
        self.model: Model | None = None
        self.state = None

    @property
    def config(self):
        """The model's ModelConfig (parses the header on first use)."""
        if self.header is None:
            self.header = GGUFFile(self.path)
        return self.header.config

    @property
    def vocab_size(self) -> int:
        """V."""
        return self.config.vocab_size

    # ---- loading -----------------------------------------------------------------------------

    def load_once(self, header: GGUFFile | None = None) -> float:
        """Parse the header (untimed; or take one already parsed), then time building the
        model until its weights are on the device: the seed's load timer. Compilation is lazy
        in JAX and timed apart."""
        self.model, self.state = None, None
        gc.collect()  # drop the previous copy first, so peak memory holds one model
        header = self.header = header or GGUFFile(self.path)
        t0 = time.perf_counter()
        model = rwkv_jax.from_gguf(header, **self.options)
        jax.block_until_ready(model.params)
        dt = time.perf_counter() - t0
        self.model = model
        return dt

    def active(self) -> Model:
        """The loaded model (load_once must have run)."""
        if self.model is None:
            self.load_once()
        assert self.model is not None
        return self.model

    def weight_bytes(self) -> tuple[int, int]:
        """(device bytes of all weights, bytes read per decoded token).

        Per token a decode step reads every matrix and vector once, but only one row of the
        embedding table: bytes/token = nbytes(params) - nbytes(emb) + nbytes(emb) / V.
        """
        params = self.active().params
        total = nbytes(params)
        emb = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params.emb))
        return total, total - emb + emb // self.vocab_size

    # ---- compile time ------------------------------------------------------------------------

    def compile_times(self, prompt_len: int) -> dict:
        """First call minus a repeated identical call, for the prefill program and the decode
        step (batch 1), on a scratch state so the protocol's own state is untouched."""
        m = self.active()
        toks = np.arange(1, prompt_len + 1, dtype=np.int32) % self.vocab_size

        def prefill() -> float:
            t0 = time.perf_counter()
            logits, _ = m.forward(toks, m.new_state(1))
            np.asarray(logits)
            return time.perf_counter() - t0

        def decode() -> float:
            st = m.new_state(1)
            jax.block_until_ready(st)
            t0 = time.perf_counter()
            logits, _ = m.step([1], st)
            np.asarray(logits)
            return time.perf_counter() - t0

        first_p, again_p = prefill(), prefill()
        first_d, again_d = decode(), decode()
        return {
            "prefill_s": max(first_p - again_p, 0.0),
            "decode_s": max(first_d - again_d, 0.0),
            "prefill_first_call_s": first_p,
            "decode_first_call_s": first_d,
        }

    # ---- the seed protocol -------------------------------------------------------------------

    def reset(self) -> None:
        """A zero state for one sequence."""
        self.state = self.active().new_state(1)

    def feed(self, tokens: Sequence[int], read: bool) -> np.ndarray | None:
        """One prefill call continuing the state; logits to the host only when asked."""
        logits, self.state = self.active().forward(np.asarray(tokens, np.int32), self.state)
        return np.asarray(logits)[0] if read else None

    def step(self, token: int) -> np.ndarray:
        """One decode step (the state is donated); its logits to the host."""
        logits, self.state = self.active().step([token], self.state)
        return np.asarray(logits)[0]

    # ---- llama-bench style -------------------------------------------------------------------

    def pp(self, tokens: Sequence[int]) -> float:
        """Seconds for one prefill of `tokens` from a zero state, up to logits on the host."""
        m = self.active()
        toks = np.asarray(tokens, np.int32)
        st = m.new_state(1)
        jax.block_until_ready(st)
        t0 = time.perf_counter()
        logits, _ = m.forward(toks, st)
        np.asarray(logits)
        return time.perf_counter() - t0

    def tg(self, first: Sequence[int], n: int) -> float:
        """Seconds for n greedy decode steps of len(first) streams from a zero state, the way
        generation runs them: the first tokens fed, then n - 1 tokens sampled (greedy) and fed
        back on the device in one loop (session.sample_steps); a host loop of decode steps under
        a profile without loops (metal-safe)."""
        m = self.active()
        B, V = len(first), self.vocab_size
        st = m.new_state(B)
        tok = jnp.asarray(np.asarray(first, np.int32))
        looped = backends.current_profile().decode_block > 1 and n > 1
        if looped:
            args = greedy_loop_args(B, V, n)
        jax.block_until_ready((st, tok))
        t0 = time.perf_counter()
        logits, st = decode_fn()(m.params, tok, st, cfg=m.config, dtype=m.dtype)
        if looped:
            toks = sample_steps(m.params, logits, st, *args, n=n - 1, cfg=m.config, dtype=m.dtype)[
                0
            ]
        else:
            for _ in range(n - 1):
                logits, st = decode_fn()(m.params, _greedy(logits), st, cfg=m.config, dtype=m.dtype)
            toks = _greedy(logits)
        np.asarray(toks)
        return time.perf_counter() - t0

    # ---- fidelity ----------------------------------------------------------------------------

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position [T, V] from a zero state, float32 on the host."""
        logits, _ = self.active().forward(np.asarray(tokens, np.int32), all_logits=True)
        return np.asarray(logits, dtype=np.float32)[0]

    def close(self) -> None:
        """Release the model."""
        self.model, self.state = None, None
        gc.collect()
