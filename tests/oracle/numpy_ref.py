"""Float64 numpy RWKV-7 forward pass, token by token, straight from a GGUF (spec §1.3-§1.4).

Weights keep the GGUF orientation: numpy shape = reversed ne, i.e. every matrix is (out, in) and
acts as `W @ x` (the LoRA matrices included: the converter already transposed them).
The state uses the official package's layout: per layer [att_shift (C), wkv (H, N, N), ffn_shift
(C)], wkv rows = value index, columns = key index.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf_arrays import read_gguf

DECAY_SCALE = np.exp(-0.5)  # wd = exp(-e^{-1/2} * sigmoid(z))
GROUP_NORM_EPS = 64e-5  # ln_x eps = N * 1e-5, hard-coded in BlinkDL's code and llama.cpp
L2_EPS = 1e-12  # F.normalize clamps the norm (not added)


@dataclass(frozen=True)
class RefModel:
    """Float64 weights by GGUF name plus the few sizes the forward pass needs."""

    w: dict[str, np.ndarray]
    n_layer: int
    n_embd: int
    head_size: int
    ln_eps: float


@functools.lru_cache(maxsize=1)
def _load_cached(path: str, mtime_ns: int, size: int) -> RefModel:
    """Dequantize every tensor to float64 (keyed by file identity so rewrites are seen)."""
    tensors, md = read_gguf(path)
    return RefModel(
        w={name: np.array(t, dtype=np.float64) for name, t in tensors.items()},
        n_layer=int(md["rwkv7.block_count"]),
        n_embd=int(md["rwkv7.embedding_length"]),
        head_size=int(md["rwkv7.wkv.head_size"]),
        ln_eps=float(md.get("rwkv7.attention.layer_norm_epsilon", 1e-5)),
    )


def load_f64(path: str | Path) -> RefModel:
    """The float64 model of a GGUF file (cached for the last file read)."""
    st = os.stat(path)
    return _load_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid, written with tanh so it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, biased variance."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def zero_state(m: RefModel) -> list[np.ndarray]:
    """All-zero recurrent state in the official [att_shift, wkv, ffn_shift] * n_layer layout."""
    C, N = m.n_embd, m.head_size
    state = []
    for _ in range(m.n_layer):
        state += [np.zeros(C), np.zeros((C // N, N, N)), np.zeros(C)]
    return state


def time_mix(
    m: RefModel, i: int, x: np.ndarray, shift: np.ndarray, S: np.ndarray, v_first: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Spec §1.4 steps 1-11 for one token: returns (att_out, new shift, new S, v_first)."""
    p = f"blk.{i}."
    W = m.w
    H, N = S.shape[0], S.shape[1]
    u = layer_norm(x, W[p + "attn_norm.weight"], W[p + "attn_norm.bias"], m.ln_eps)
    d = shift - u
    lerp = W[p + "time_mix_lerp_fused.weight"].reshape(6, -1)  # rows r, w, k, v, a, g
    xr, xw, xk, xv, xa, xg = (u + d * lerp[j] for j in range(6))

    r = W[p + "time_mix_receptance.weight"] @ xr
    k = W[p + "time_mix_key.weight"] @ xk
    v = W[p + "time_mix_value.weight"] @ xv
    z = W[p + "time_mix_w0.weight"] + W[p + "time_mix_w2.weight"] @ np.tanh(
        W[p + "time_mix_w1.weight"] @ xw
    )
    a = sigmoid(
        W[p + "time_mix_a0.weight"]
        + W[p + "time_mix_a2.weight"] @ (W[p + "time_mix_a1.weight"] @ xa)
    )
    g = W[p + "time_mix_g2.weight"] @ sigmoid(W[p + "time_mix_g1.weight"] @ xg)

    if i == 0:
        v_first = v  # layer 0 only sets v_first; its v0/v1/v2 are never used
    else:
        mix = sigmoid(
            W[p + "time_mix_v0.weight"]
            + W[p + "time_mix_v2.weight"] @ (W[p + "time_mix_v1.weight"] @ xv)
        )
        v = v + (v_first - v) * mix

    kk = (k * W[p + "time_mix_k_k.weight"]).reshape(H, N)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), L2_EPS)  # (H, N)
    k = k * (1 + (a - 1) * W[p + "time_mix_k_a.weight"])  # after kk: kk uses the raw k
    wd = np.exp(-DECAY_SCALE * sigmoid(z))

    # WKV-7 per head; rows i = value index, columns j = key index
    rh, kh, vh, wh, ah = (t.reshape(H, N) for t in (r, k, v, wd, a))
    alpha, beta = -kk, kk * ah
    sa = np.einsum("hij,hj->hi", S, alpha)  # from the old state
    S = S * wh[:, None, :] + vh[:, :, None] * kh[:, None, :] + sa[:, :, None] * beta[:, None, :]
    y = np.einsum("hij,hj->hi", S, rh)  # readout from the new state, (H, N)

    # GroupNorm with one group per head, then the r_k bonus
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    y = ((y - mu) / np.sqrt(var + GROUP_NORM_EPS)).reshape(-1)
    y = y * W[p + "time_mix_ln.weight"] + W[p + "time_mix_ln.bias"]
    bonus = (rh * kh * W[p + "time_mix_r_k.weight"].reshape(H, N)).sum(-1, keepdims=True)
    y = y + (bonus * vh).reshape(-1)

    return W[p + "time_mix_output.weight"] @ (y * g), u, S, v_first


def channel_mix(m: RefModel, i: int, x: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, ...]:
    """Spec §1.4 steps 12-13 for one token: returns (ffn_out, new shift)."""
    p = f"blk.{i}."
    W = m.w
    u = layer_norm(x, W[p + "attn_norm_2.weight"], W[p + "attn_norm_2.bias"], m.ln_eps)
    xk = u + (shift - u) * W[p + "channel_mix_lerp_k.weight"]
    h = np.maximum(W[p + "channel_mix_key.weight"] @ xk, 0.0) ** 2  # (F,)
    return W[p + "channel_mix_value.weight"] @ h, u


def run_f64(
    path: str | Path, tokens: list[int], state: list[np.ndarray] | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [T, V] (float64) for every position and the final state, from `state` or zeros."""
    if not tokens:
        raise ValueError("tokens must not be empty")
    m = load_f64(path)
    W = m.w
    state = zero_state(m) if state is None else [np.array(s, dtype=np.float64) for s in state]
    logits = []
    for tok in tokens:
        x = layer_norm(
            W["token_embd.weight"][tok],
            W["token_embd_norm.weight"],
            W["token_embd_norm.bias"],
            m.ln_eps,
        )
        v_first = np.zeros(m.n_embd)  # set by layer 0 before any use
        for i in range(m.n_layer):
            att, state[3 * i], state[3 * i + 1], v_first = time_mix(
                m, i, x, state[3 * i], state[3 * i + 1], v_first
            )
            x = x + att
            ffn, state[3 * i + 2] = channel_mix(m, i, x, state[3 * i + 2])
            x = x + ffn
        x = layer_norm(x, W["output_norm.weight"], W["output_norm.bias"], m.ln_eps)
        logits.append(W["output.weight"] @ x)
    return np.stack(logits), state


def forward_f64(path: str | Path, tokens: list[int]) -> np.ndarray:
    """Float64 logits [T, V] of `tokens` from the zero state."""
    return run_f64(path, tokens)[0]
