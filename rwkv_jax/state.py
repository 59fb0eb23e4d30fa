"""The recurrent state of RWKV-7: everything the model remembers, as one typed pytree."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jax import Array

from rwkv_jax.gguf import ModelConfig


class State(eqx.Module):
    """Per-layer recurrent state for a batch of B sequences.

    `att_shift` / `ffn_shift` hold the previous token's ln1 / ln2 output (token shift), in the
    compute dtype. `wkv` is the WKV-7 matrix state S[h, i, j] (i = value row, j = key column, the
    BlinkDL / ggml layout), always float32. A zero state is the start of a sequence.
    """

    att_shift: Array  # [L, B, C] compute dtype
    ffn_shift: Array  # [L, B, C] compute dtype
    wkv: Array  # [L, B, H, N, N] float32

    @staticmethod
    def zeros(config: ModelConfig, batch: int = 1, dtype=jnp.float32) -> State:
        """The empty-context state."""
        n, c, h, hs = config.n_layer, config.n_embd, config.n_head, config.head_size
        return State(
            att_shift=jnp.zeros((n, batch, c), dtype),
            ffn_shift=jnp.zeros((n, batch, c), dtype),
            wkv=jnp.zeros((n, batch, h, hs, hs), jnp.float32),
        )

    @property
    def batch(self) -> int:
        """Number of sequences B."""
        return int(self.wkv.shape[1])
