"""State checkpoints: a `State` saved as safetensors with metadata, forks, state-tuning imports.

An RWKV state is the model's whole memory of a context, so a checkpoint is a conversation (or a
document, or a system prompt) that can be reloaded without re-reading it. File layout
(safetensors, written atomically through a temporary file and `os.replace`):

| tensor | shape | dtype |
|---|---|---|
| att_shift, ffn_shift | [L, B, C] | float32 (the compute dtype is recorded and restored on load) |
| wkv | [L, B, H, N, N] | float32, S[i = value row, j = key column] |
| logits (optional) | [B, V] | float32: next-token logits, so generation resumes without a step |

Metadata (strings): `format` = "rwkv_jax.state", `format_version`, `fingerprint`, `model` (the
config as JSON), `positions` (tokens each row has consumed, JSON), `dtypes`, `shapes`, `extra`
(caller JSON, e.g. the chat format).

The model fingerprint is sha256 over the shape fields of the config and the float32 bytes of the
layer-norm vectors (ln0, ln_out, every ln1): these stay float32 in every llama.cpp quantization,
so the fingerprint identifies the trained weights, not the file type — a state saved with the F16
file loads into its Q4_K_M file — while any other model, or a random one, differs. Loading into a
model with other dimensions, or other weights, raises `StateError` naming the field.

State-tuning files (RWKV-PEFT `.pth`, `blocks.N.att.time_state` of shape [H, 64, 64]) hold the
initial WKV matrix per layer. For RWKV-7 it is already in our layout S[value row, key column], so
it is used as is: RWKV-PEFT's x070 state kernels read `time_state` as [V, K] (its FLA wrapper
transposes it only because FLA's `initial_state` is [K, V]), and the official v7 inference state
is `state * w.view(H,1,N) + state @ ab + v.view(H,N,1) @ k.view(H,1,N)`, i.e. [H, V, K]. The
`.transpose(1, 2)` seen in ChatRWKV / `rwkv` package loaders belongs to RWKV-5/6, whose inference
state is [H, K, V]. Token-shift states start at zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from rwkv_jax.errors import StateError
from rwkv_jax.gguf import ModelConfig
from rwkv_jax.state import State

FORMAT = "rwkv_jax.state"
FORMAT_VERSION = 1
# config fields that fix the state's shape or the meaning of its numbers (not name / file type)
SHAPE_FIELDS = (
    "n_layer",
    "n_embd",
    "ffn",
    "head_size",
    "vocab_size",
    "rank_w",
    "rank_a",
    "rank_v",
    "rank_g",
)
STATE_FIELDS = ("att_shift", "ffn_shift", "wkv")


@dataclass
class Checkpoint:
    """A loaded state file: the state, where each row is, and what wrote it."""

    state: State
    positions: list[int]  # tokens each row's state has consumed
    logits: Array | None  # [B, V] next-token logits, when saved
    fingerprint: str
    model_name: str
    extra: dict[str, Any] = field(default_factory=dict)


# ---- state surgery --------------------------------------------------------------------------


def fork(state: State) -> State:
    """An independent copy (the decode step donates its input; fork before reusing a state)."""
    return jax.tree.map(jnp.copy, state)


def take_rows(state: State, rows: Sequence[int]) -> State:
    """The sub-batch of the given rows (a new state; batch is axis 1 of every field)."""
    idx = jnp.asarray(np.asarray(rows, np.int32))
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=1), state)


def concat_rows(states: Sequence[State]) -> State:
    """Stack states of B1, B2, ... rows into one of B1 + B2 + ... rows."""
    if not states:
        raise StateError("concat_rows needs at least one state")
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *states)


def repeat_rows(state: State, n: int) -> State:
    """A one-row state broadcast to n identical rows (fork one context into n streams)."""
    if state.batch != 1:
        raise StateError(f"repeat_rows needs a one-row state, this one has {state.batch} rows")
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=1), state)


def expected_shapes(config: ModelConfig, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the State fields for a model config and batch size."""
    L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
    return {
        "att_shift": (L, batch, C),
        "ffn_shift": (L, batch, C),
        "wkv": (L, batch, H, N, N),
    }


def check_state(state: State, config: ModelConfig, what: str = "state") -> None:
    """Raise StateError when a State does not fit a model config."""
    want = expected_shapes(config, state.batch)
    for name in STATE_FIELDS:
        got = tuple(getattr(state, name).shape)
        if got != want[name]:
            raise StateError(
                f"{what}: field '{name}' has shape {got} but model '{config.name}' needs "
                f"{want[name]} (n_layer={config.n_layer}, n_embd={config.n_embd}, "
                f"n_head={config.n_head}, head_size={config.head_size}); use a state made by "
                "this model"
            )


# ---- fingerprint ----------------------------------------------------------------------------


def _shape_config(config: ModelConfig) -> dict[str, int]:
    """The config fields that a state depends on."""
    return {k: int(getattr(config, k)) for k in SHAPE_FIELDS}


def model_fingerprint(model) -> str:
    """sha256 (hex) of the shape config and the float32 layer-norm vectors of a loaded model."""
    p = model.params
    h = hashlib.sha256(json.dumps(_shape_config(model.config), sort_keys=True).encode())
    if p.stacked:
        ln1 = [p.blocks.ln1_w, p.blocks.ln1_b]  # [L, C] each
    else:
        ln1 = [jnp.stack([b.ln1_w for b in p.blocks]), jnp.stack([b.ln1_b for b in p.blocks])]
    for vec in (p.ln0_w, p.ln0_b, p.ln_out_w, p.ln_out_b, *ln1):
        h.update(np.ascontiguousarray(np.asarray(vec, np.float32)).tobytes())
    return h.hexdigest()


# ---- save / load ----------------------------------------------------------------------------


def save_state(
    path: str | os.PathLike[str],
    state: State,
    model,
    *,
    positions: Sequence[int] | None = None,
    logits: Array | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `state` (fitting `model`) to a safetensors file atomically; returns the path.

    positions: tokens each row has consumed (default 0); logits: optional [B, V] next-token
    logits; extra: JSON-serialisable caller metadata.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    check_state(state, model.config)
    B = state.batch
    pos = [0] * B if positions is None else [int(p) for p in positions]
    if len(pos) != B:
        raise StateError(f"positions has {len(pos)} entries but the state has {B} rows")
    tensors = {name: np.asarray(getattr(state, name), np.float32) for name in STATE_FIELDS}
    if logits is not None:
        lg = np.asarray(logits, np.float32)
        if lg.shape != (B, model.config.vocab_size):
            raise StateError(
                f"logits have shape {lg.shape}, expected ({B}, {model.config.vocab_size})"
            )
        tensors["logits"] = lg
    try:
        extra_json = json.dumps(extra or {})
    except TypeError as exc:
        raise StateError(f"extra metadata is not JSON-serialisable: {exc}") from None
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "fingerprint": model_fingerprint(model),
        "model": json.dumps(model.config.to_dict()),
        "positions": json.dumps(pos),
        "dtypes": json.dumps({n: str(getattr(state, n).dtype) for n in STATE_FIELDS}),
        "shapes": json.dumps({n: list(t.shape) for n, t in tensors.items()}),
        "extra": extra_json,
    }
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StateError(f"{path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of a state file (no tensors read); StateError if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StateError(f"{path}: no such state file")
    try:
        with safe_open(path, "np") as f:
            raw = f.metadata() or {}
            keys = set(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateError(f"{path}: not a safetensors state file ({exc})") from None
    if raw.get("format") != FORMAT:
        raise StateError(
            f"{path}: not an rwkv_jax state file (metadata 'format' is {raw.get('format')!r}, "
            f"expected {FORMAT!r}); RWKV-PEFT state-tuning .pth files load with "
            "import_state_tuning"
        )
    unknown = sorted(set(raw) - set(METADATA_TYPES) - {"format", "format_version"})
    if unknown:
        raise StateError(f"{path}: unknown state metadata key(s) {unknown}; the file is damaged")
    try:
        version = int(raw.get("format_version", "0"))
    except ValueError:
        raise StateError(
            f"{path}: state metadata 'format_version' is {raw['format_version']!r}, not an integer"
        ) from None
    if version > FORMAT_VERSION:
        raise StateError(
            f"{path}: state format version {version} is newer than this rwkv_jax understands "
            f"({FORMAT_VERSION}); upgrade rwkv_jax"
        )
    meta: dict[str, Any] = {"format_version": version, "tensors": sorted(keys)}
    for key, kind in METADATA_TYPES.items():
        if key not in raw and key == "extra":
            meta[key] = {}
            continue
        if key not in raw:
            raise StateError(f"{path}: state metadata '{key}' is missing; the file is damaged")
        try:
            value = raw[key] if kind is str else json.loads(raw[key])
        except ValueError as exc:
            raise StateError(f"{path}: state metadata '{key}' is not valid JSON ({exc})") from None
        if not isinstance(value, kind):
            raise StateError(
                f"{path}: state metadata '{key}' must be a JSON {kind.__name__}, got "
                f"{type(value).__name__}"
            )
        meta[key] = value
    _check_positions(path, meta["positions"])
    for k in SHAPE_FIELDS:
        v = meta["model"].get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise StateError(f"{path}: state metadata 'model.{k}' must be an integer, got {v!r}")
    unknown = sorted(keys - set(STATE_FIELDS) - {"logits"})
    if unknown:
        raise StateError(f"{path}: unknown state tensor(s) {unknown}; expected {STATE_FIELDS}")
    return meta


# metadata key -> JSON type of its value (str: stored as a plain string)
METADATA_TYPES: dict[str, type] = {
    "fingerprint": str,
    "model": dict,
    "positions": list,
    "dtypes": dict,
    "shapes": dict,
    "extra": dict,
}


def _check_positions(path: str, positions: list) -> None:
    """positions: a list of non-negative integers (tokens consumed per row)."""
    bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int) or p < 0]
    if bad:
        raise StateError(
            f"{path}: state metadata 'positions' must hold non-negative integers, got {bad[0]!r}"
        )


def load_state(path: str | os.PathLike[str], model, *, check_model: bool = True) -> Checkpoint:
    """Read a state file written by `save_state` for `model`.

    The shapes must fit the model; with check_model the fingerprint must match too (a state is
    only meaningful with the weights that produced it). Shift states come back in model.dtype.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    meta = read_metadata(path)
    cfg: ModelConfig = model.config
    saved = meta["model"]
    for k in SHAPE_FIELDS:
        if k in saved and saved[k] != int(getattr(cfg, k)):
            raise StateError(
                f"{path}: saved from model '{saved.get('name', '?')}' with {k}={saved[k]}, but "
                f"model '{cfg.name}' has {k}={getattr(cfg, k)}; load it into the model it "
                "was saved from"
            )
    fp = model_fingerprint(model)
    if check_model and meta["fingerprint"] != fp:
        raise StateError(
            f"{path}: saved from model '{saved.get('name', '?')}' (fingerprint "
            f"{meta['fingerprint'][:12]}), which has the same shape as '{cfg.name}' but other "
            f"weights (fingerprint {fp[:12]}); a state only means something to the weights "
            "that produced it. Pass check_model=False (chat: --force) to load it anyway"
        )
    from safetensors import SafetensorError

    try:
        with safe_open(path, "np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateError(f"{path}: state tensors are unreadable ({exc})") from None
    missing = [n for n in STATE_FIELDS if n not in tensors]
    if missing:
        raise StateError(f"{path}: state tensors {missing} are missing")
    for name, t in tensors.items():
        if t.dtype != np.float32:  # save_state writes float32 only
            raise StateError(f"{path}: tensor '{name}' is {t.dtype}, a state file holds float32")
        if not np.all(np.isfinite(t)):
            raise StateError(f"{path}: tensor '{name}' contains NaN or infinite values")
    batch = int(tensors["wkv"].shape[1]) if tensors["wkv"].ndim == 5 else -1
    want = expected_shapes(cfg, batch)
    for name in STATE_FIELDS:
        if tuple(tensors[name].shape) != want[name]:
            raise StateError(
                f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, model "
                f"'{cfg.name}' needs {want[name]}"
            )
    positions = [int(p) for p in meta["positions"]]
    if len(positions) != batch:
        raise StateError(f"{path}: {len(positions)} positions for {batch} state rows")
    state = State(
        att_shift=jnp.asarray(tensors["att_shift"], model.dtype),
        ffn_shift=jnp.asarray(tensors["ffn_shift"], model.dtype),
        wkv=jnp.asarray(tensors["wkv"], jnp.float32),
    )
    logits = None
    if "logits" in tensors:
        if tensors["logits"].shape != (batch, cfg.vocab_size):
            raise StateError(
                f"{path}: tensor 'logits' has shape {tensors['logits'].shape}, expected "
                f"({batch}, {cfg.vocab_size})"
            )
        logits = jnp.asarray(tensors["logits"], jnp.float32)
    return Checkpoint(
        state, positions, logits, meta["fingerprint"], saved.get("name", ""), meta["extra"]
    )


# ---- state tuning ---------------------------------------------------------------------------


def import_state_tuning(path: str | os.PathLike[str], model, batch: int = 1) -> State:
    """An initial State from an RWKV-PEFT state-tuning `.pth` (`blocks.N.att.time_state`).

    time_state [H, N, N] per layer becomes wkv[layer, row] unchanged (see the module docstring
    for the layout); token shifts are zero. Needs torch (only to unpickle the file).
    """
    path = os.fspath(path)
    try:
        import torch
    except ImportError:
        raise StateError(
            f"{path}: reading a .pth state-tuning file needs PyTorch (pip install torch); or "
            "convert it once elsewhere with rwkv_jax.checkpoint.import_state_tuning + save_state"
        ) from None
    if not os.path.isfile(path):
        raise StateError(f"{path}: no such state-tuning file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for non-pickles / unsafe pickles
        raise StateError(
            f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(raw, dict):
        raise StateError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    cfg: ModelConfig = model.config
    L, H, N = cfg.n_layer, cfg.n_head, cfg.head_size
    names = [f"blocks.{i}.att.time_state" for i in range(L)]
    found = sorted(k for k in raw if isinstance(k, str) and k.endswith(".att.time_state"))
    missing = [n for n in names if n not in raw]
    if missing or len(found) != L:
        raise StateError(
            f"{path}: has {len(found)} 'blocks.N.att.time_state' tensors but model "
            f"'{cfg.name}' has {L} layers"
            + (f" (missing {missing[:3]}{'...' if len(missing) > 3 else ''})" if missing else "")
            + "; a state-tuning file only fits the model it was tuned on"
        )
    mats = []
    for n in names:
        t = raw[n]
        if not hasattr(t, "shape") or tuple(t.shape) != (H, N, N):
            raise StateError(
                f"{path}: '{n}' has shape {tuple(getattr(t, 'shape', ()))}, model "
                f"'{cfg.name}' needs ({H}, {N}, {N}) (n_head, head_size, head_size)"
            )
        mats.append(t.detach().to(torch.float32).numpy())
    wkv = np.stack(mats)[:, None]  # [L, 1, H, N, N]
    if not np.all(np.isfinite(wkv)):
        raise StateError(f"{path}: time_state contains NaN or infinite values")
    zeros = State.zeros(cfg, batch, model.dtype)
    return State(
        att_shift=zeros.att_shift,
        ffn_shift=zeros.ffn_shift,
        wkv=jnp.asarray(np.repeat(wkv, batch, axis=1), jnp.float32),
    )


def load_any(path: str | os.PathLike[str], model, *, check_model: bool = True) -> Checkpoint:
    """A `.pth`/`.pt` state-tuning file or a safetensors state file, as a Checkpoint."""
    p = os.fspath(path)
    if p.endswith((".pth", ".pt")):
        return Checkpoint(import_state_tuning(p, model), [0], None, "", "state-tuning")
    return load_state(p, model, check_model=check_model)
