"""BlinkDL's official `rwkv` pip package (class RWKV_x070, strategy "cpu fp32") on GGUF weights.

The GGUF is turned back into the original `.pth` state dict by inverting llama.cpp's converter
(spec §2.2), saved to a temporary file (the package only loads `<name>.pth` from disk) and run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .gguf_arrays import read_gguf

LERP_ORDER = ("r", "w", "k", "v", "a", "g")  # rows of time_mix_lerp_fused
STRATEGY = "cpu fp32"
# One intra-op thread: these models are tiny per op, and on a shared 2-core machine two spinning
# OpenMP threads made the token-by-token mode ~10x slower.
TORCH_THREADS = 1

# per-layer GGUF suffix -> (.pth suffix, how to reshape back)
_LAYER_MAP: dict[str, tuple[str, str]] = {
    "attn_norm.weight": ("ln1.weight", "keep"),
    "attn_norm.bias": ("ln1.bias", "keep"),
    "attn_norm_2.weight": ("ln2.weight", "keep"),
    "attn_norm_2.bias": ("ln2.bias", "keep"),
    "time_mix_w0.weight": ("att.w0", "vec"),
    "time_mix_a0.weight": ("att.a0", "vec"),
    "time_mix_v0.weight": ("att.v0", "vec"),
    "time_mix_k_k.weight": ("att.k_k", "vec"),
    "time_mix_k_a.weight": ("att.k_a", "vec"),
    "time_mix_r_k.weight": ("att.r_k", "heads"),
    **{f"time_mix_{x}.weight": (f"att.{x}", "transpose") for x in ("w1", "a1", "v1", "g1")},
    **{f"time_mix_{x}.weight": (f"att.{x}", "transpose") for x in ("w2", "a2", "v2", "g2")},
    "time_mix_receptance.weight": ("att.receptance.weight", "keep"),
    "time_mix_key.weight": ("att.key.weight", "keep"),
    "time_mix_value.weight": ("att.value.weight", "keep"),
    "time_mix_output.weight": ("att.output.weight", "keep"),
    "time_mix_ln.weight": ("att.ln_x.weight", "keep"),
    "time_mix_ln.bias": ("att.ln_x.bias", "keep"),
    "channel_mix_lerp_k.weight": ("ffn.x_k", "vec"),
    "channel_mix_key.weight": ("ffn.key.weight", "keep"),
    "channel_mix_value.weight": ("ffn.value.weight", "keep"),
}
_GLOBAL_MAP = {
    "token_embd.weight": "emb.weight",
    "token_embd_norm.weight": "blocks.0.ln0.weight",
    "token_embd_norm.bias": "blocks.0.ln0.bias",
    "output_norm.weight": "ln_out.weight",
    "output_norm.bias": "ln_out.bias",
    "output.weight": "head.weight",
}


def gguf_to_pth_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Invert llama.cpp's converter: BlinkDL `.pth` keys and shapes (spec §1.1), float32.

    Layer-0 `time_mix_v0/v1/v2` (copies of a0/a1/a2 written for llama.cpp) are dropped: the
    package never reads them (it overwrites `blocks.0.att.v0/v1/v2` with empty tensors at load).
    """
    gg, md = read_gguf(path)
    head_size = int(md["rwkv7.wkv.head_size"])
    sd: dict[str, np.ndarray] = {}
    for name, t in gg.items():
        if name in _GLOBAL_MAP:
            sd[_GLOBAL_MAP[name]] = t
            continue
        blk, layer, suffix = name.split(".", 2)
        if blk != "blk" or not layer.isdigit():
            raise KeyError(f"{path}: tensor {name!r} is not an RWKV-7 tensor")
        prefix = f"blocks.{layer}."
        if suffix == "time_mix_lerp_fused.weight":
            # ne [C, 1, 1, 6] (numpy (6, 1, 1, C)); accept any layout with 6 * C values
            for c, row in zip(LERP_ORDER, t.reshape(6, -1), strict=True):
                sd[prefix + "att.x_" + c] = row.reshape(1, 1, -1)
            continue
        if suffix not in _LAYER_MAP:
            raise KeyError(f"{path}: tensor {name!r} has no .pth counterpart")
        if layer == "0" and suffix.startswith(("time_mix_v0", "time_mix_v1", "time_mix_v2")):
            continue
        key, how = _LAYER_MAP[suffix]
        if how == "vec":
            t = t.reshape(1, 1, -1)  # squeezed (C,) -> (1, 1, C)
        elif how == "heads":
            t = t.reshape(-1, head_size)  # flattened h*N + n -> (H, N)
        elif how == "transpose":
            t = t.T  # GGUF (out, in) -> BlinkDL LoRA (in, out)
        sd[prefix + key] = t
    return {k: torch.tensor(v) for k, v in sd.items()}  # copies, contiguous, float32


@contextlib.contextmanager
def _reference_execution() -> Iterator[None]:
    """Run TorchScript unoptimized (no fuser recompiles, no fused-kernel rounding) on 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        with torch.no_grad(), torch.jit.optimized_execution(False):
            yield
    finally:
        torch.set_num_threads(threads)


def _rwkv_x070_class() -> Any:
    """Import the package's RWKV-7 class with the env flags it reads at import time."""
    if "rwkv.model" in sys.modules and not hasattr(sys.modules["rwkv.model"], "RWKV_x070"):
        raise RuntimeError("rwkv.model was imported without RWKV_V7_ON=1; import this module first")
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "0"  # ignored by v7 (it always uses TorchScript), set for clarity
    os.environ["RWKV_CUDA_ON"] = "0"
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a banner on import
        from rwkv.model import RWKV_x070
    return RWKV_x070


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, size: int) -> Any:
    """The package's model for one GGUF file (keyed by file identity so rewrites are seen)."""
    cls = _rwkv_x070_class()
    sd = gguf_to_pth_state_dict(path)
    with tempfile.TemporaryDirectory() as tmp:
        stem = os.path.join(tmp, "model")
        torch.save(sd, stem + ".pth")
        with contextlib.redirect_stdout(io.StringIO()):
            model = cls(stem, STRATEGY)  # it appends ".pth" itself
        # the package mmaps the .pth and keeps views into it; removing the directory is safe
        # on POSIX (the mapping outlives the unlink)
    return model


def load_official(path: str | Path) -> Any:
    """The package's RWKV_x070 model on a GGUF file's weights, cached per file."""
    st = os.stat(path)
    return _load_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def official_run(
    path: str | Path,
    tokens: list[int],
    *,
    mode: Literal["seq", "rnn"],
    state: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [T, V] and final state from the package, starting at `state` (None = zeros).

    "seq": one `forward_seq(..., full_output=True)` over all tokens (layer-major, as prefill);
    "rnn": `forward_one` per token, carrying the state. The state is the package's flat list
    [att_shift (C), wkv (H, N, N), ffn_shift (C)] * n_layer, as float32 numpy.
    """
    if mode not in ("seq", "rnn"):
        raise ValueError(f"mode must be 'seq' or 'rnn', got {mode!r}")
    if not tokens:
        raise ValueError("tokens must not be empty")
    model = load_official(path)
    st = (
        model.generate_zero_state()
        if state is None
        else [torch.tensor(np.asarray(s), dtype=torch.float32) for s in state]
    )
    with _reference_execution():
        if mode == "seq" and len(tokens) > 1:
            out, st = model.forward_seq(list(tokens), st, full_output=True)  # [T, V]
        else:  # "rnn", or a single token (the package routes T=1 to forward_one anyway)
            rows = []
            for tok in tokens:
                logit, st = model.forward_one(int(tok), st)  # [V]
                rows.append(logit)
            out = torch.stack(rows)
    return out.float().numpy().copy(), [s.float().numpy().copy() for s in st]


def official_logits(
    path: str | Path, tokens: list[int], *, mode: Literal["seq", "rnn"]
) -> np.ndarray:
    """Official float32 logits [T, V] of `tokens` from the zero state."""
    return official_run(path, tokens, mode=mode)[0]


def official_state(
    path: str | Path, tokens: list[int], *, mode: Literal["seq", "rnn"] = "seq"
) -> list[np.ndarray]:
    """Official final state after `tokens` from the zero state (flat per-layer list, float32)."""
    return official_run(path, tokens, mode=mode)[1]
