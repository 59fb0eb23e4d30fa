"""GGUF reading for `rwkv7` files: validation, the one name table, and the model config.

The `gguf` package's reader parses the container over mmap; this module checks that what it found
is a usable RWKV-7 model and fixes ggml's dimension order (``ne[0]`` fastest) once: every 2-D
tensor leaves here as ``(rows, row_bytes)`` bytes plus a PyTorch-convention ``(out, in)`` shape.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from rwkv_jax.errors import GGUFError

ARCH = "rwkv7"

# --------------------------------------------------------------------------------------------
# The name table: GGUF tensor name -> field of the params pytree (rwkv_jax/params.py).
# Global tensors map to top-level fields, per-layer tensors (``blk.N.``) to fields of a block.
# ``kind`` says how the loader treats the tensor: "vec" = 1-D float vector, "lerp" = the fused
# 6-way token-shift coefficients, "mat" = 2-D matrix kept in its file format (packed if quantized).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Where one GGUF tensor goes and what shape (ggml ``ne`` order) it must have."""

    gguf_name: str  # suffix after "blk.N." for layer tensors
    field: str  # params field name (paper / BlinkDL names)
    kind: str  # "vec" | "lerp" | "mat"
    ne: tuple[str, ...]  # symbolic dims in ggml order, resolved against ModelConfig


GLOBAL_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("token_embd.weight", "emb", "mat", ("C", "V")),
    TensorSpec("token_embd_norm.weight", "ln0_w", "vec", ("C",)),
    TensorSpec("token_embd_norm.bias", "ln0_b", "vec", ("C",)),
    TensorSpec("output_norm.weight", "ln_out_w", "vec", ("C",)),
    TensorSpec("output_norm.bias", "ln_out_b", "vec", ("C",)),
    TensorSpec("output.weight", "head", "mat", ("C", "V")),
)

LAYER_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("attn_norm.weight", "ln1_w", "vec", ("C",)),
    TensorSpec("attn_norm.bias", "ln1_b", "vec", ("C",)),
    TensorSpec("attn_norm_2.weight", "ln2_w", "vec", ("C",)),
    TensorSpec("attn_norm_2.bias", "ln2_b", "vec", ("C",)),
    TensorSpec("time_mix_lerp_fused.weight", "x_rwkvag", "lerp", ("C", "1", "1", "6")),
    TensorSpec("time_mix_w0.weight", "w0", "vec", ("C",)),
    TensorSpec("time_mix_w1.weight", "w1", "mat", ("C", "Dw")),
    TensorSpec("time_mix_w2.weight", "w2", "mat", ("Dw", "C")),
    TensorSpec("time_mix_a0.weight", "a0", "vec", ("C",)),
    TensorSpec("time_mix_a1.weight", "a1", "mat", ("C", "Da")),
    TensorSpec("time_mix_a2.weight", "a2", "mat", ("Da", "C")),
    TensorSpec("time_mix_v0.weight", "v0", "vec", ("C",)),
    TensorSpec("time_mix_v1.weight", "v1", "mat", ("C", "Dv")),
    TensorSpec("time_mix_v2.weight", "v2", "mat", ("Dv", "C")),
    TensorSpec("time_mix_g1.weight", "g1", "mat", ("C", "Dg")),
    TensorSpec("time_mix_g2.weight", "g2", "mat", ("Dg", "C")),
    TensorSpec("time_mix_k_k.weight", "k_k", "vec", ("C",)),
    TensorSpec("time_mix_k_a.weight", "k_a", "vec", ("C",)),
    TensorSpec("time_mix_r_k.weight", "r_k", "vec", ("C",)),
    TensorSpec("time_mix_receptance.weight", "receptance", "mat", ("C", "C")),
    TensorSpec("time_mix_key.weight", "key", "mat", ("C", "C")),
    TensorSpec("time_mix_value.weight", "value", "mat", ("C", "C")),
    TensorSpec("time_mix_output.weight", "output", "mat", ("C", "C")),
    TensorSpec("time_mix_ln.weight", "ln_x_w", "vec", ("C",)),
    TensorSpec("time_mix_ln.bias", "ln_x_b", "vec", ("C",)),
    TensorSpec("channel_mix_lerp_k.weight", "ffn_x_k", "vec", ("C",)),
    TensorSpec("channel_mix_key.weight", "ffn_key", "mat", ("C", "F")),
    TensorSpec("channel_mix_value.weight", "ffn_value", "mat", ("F", "C")),
)

# Layer 0's value-residual LoRA is a dummy: the converter writes copies of a0/a1/a2 under the v
# names (so v1/v2 have the iclr rank there) and no implementation ever uses them.
LAYER0_DUMMY_RANK = {"v1": "Da", "v2": "Da"}

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

KEY = {
    "context_length": f"{ARCH}.context_length",
    "n_embd": f"{ARCH}.embedding_length",
    "n_layer": f"{ARCH}.block_count",
    "ffn": f"{ARCH}.feed_forward_length",
    "head_size": f"{ARCH}.wkv.head_size",
    "eps": f"{ARCH}.attention.layer_norm_epsilon",
    "rank_w": f"{ARCH}.attention.decay_lora_rank",
    "rank_a": f"{ARCH}.attention.iclr_lora_rank",
    "rank_v": f"{ARCH}.attention.value_residual_mix_lora_rank",
    "rank_g": f"{ARCH}.attention.gate_lora_rank",
    "head_count": f"{ARCH}.attention.head_count",
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one RWKV-7 model, read only from GGUF metadata and tensor shapes."""

    n_layer: int
    n_embd: int  # C
    ffn: int  # F (4*C in released models)
    head_size: int  # N (64)
    vocab_size: int  # V (rows of token_embd)
    rank_w: int  # decay LoRA rank Dw
    rank_a: int  # iclr LoRA rank Da
    rank_v: int  # value-residual LoRA rank Dv
    rank_g: int  # gate LoRA rank Dg
    layer_norm_eps: float = 1e-5
    file_type: int = -1  # general.file_type (llama_ftype), -1 when absent
    name: str = ""

    @property
    def n_head(self) -> int:
        """H = C / N."""
        return self.n_embd // self.head_size

    @property
    def group_norm_eps(self) -> float:
        """ln_x epsilon: N * 1e-5 = 64e-5 in every implementation (spec §1.4-9)."""
        return self.head_size * 1e-5

    def dims(self) -> dict[str, int]:
        """Symbolic dimension names of the name table -> sizes."""
        return {
            "C": self.n_embd,
            "V": self.vocab_size,
            "F": self.ffn,
            "Dw": self.rank_w,
            "Da": self.rank_a,
            "Dv": self.rank_v,
            "Dg": self.rank_g,
            "1": 1,
            "6": 6,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON results and state metadata)."""
        return dataclasses.asdict(self)


def lora_rank(n_embd: int, exponent: float, multiplier: float) -> int:
    """The converter's default LoRA rank: max(1, round(C^e * m / 32)) * 32."""
    return max(1, round(n_embd**exponent * multiplier / 32)) * 32


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: type, ggml dims, and a zero-copy view of its bytes."""

    name: str
    ggml_type: int
    ne: tuple[int, ...]  # ggml order, ne[0] contiguous
    data: np.ndarray  # uint8 view into the mmap, exactly n_bytes long

    @property
    def type_name(self) -> str:
        """ggml type name, e.g. 'Q4_K' (or the number for unknown ids)."""
        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return str(self.ggml_type)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """PyTorch-convention shape (reverse of ne): (out, in) for matrices."""
        return tuple(reversed(self.ne))

    @property
    def n_bytes(self) -> int:
        """Bytes of data in the file."""
        return int(self.data.size)

    def rows(self) -> np.ndarray:
        """Bytes as (rows, row_bytes): one row per ``ne[0]`` run, in file order."""
        n_rows = int(np.prod(self.ne[1:], dtype=np.int64)) if len(self.ne) > 1 else 1
        return self.data.reshape(n_rows, -1)


def _field_value(field: Any) -> Any:
    """Python value of a reader field (scalar, string or list)."""
    return field.contents()


class GGUFFile:
    """An opened, validated `rwkv7` GGUF: metadata, config, and tensors over one mmap."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise GGUFError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise GGUFError(f"{self.path}: is a directory, expected a .gguf file")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except GGUFError:
            raise
        except Exception as exc:  # the reader raises ValueError/KeyError/IndexError/... on junk
            raise GGUFError(
                f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc})"
            ) from None
        self._reader = reader
        self.metadata: dict[str, Any] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                self.metadata[name] = _field_value(field)
            except Exception as exc:
                raise GGUFError(
                    f"{self.path}: metadata key '{name}' is unreadable: {exc}"
                ) from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            ne = tuple(int(x) for x in t.shape)
            data = np.asarray(t.data).reshape(-1).view(np.uint8)
            self.tensors[t.name] = TensorInfo(t.name, int(t.tensor_type), ne, data)
        self.config = self._read_config()
        self._check_tensors()

    # ---- metadata ---------------------------------------------------------------------------

    def _get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        if key not in self.metadata:
            if required:
                raise GGUFError(
                    f"{self.path}: metadata key '{key}' is missing; an rwkv7 file written by "
                    "llama.cpp's converter always has it"
                )
            return default
        return self.metadata[key]

    def _int(self, key: str, *, required: bool = True, default: int = 0) -> int:
        value = self._get(key, default, required=required)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise GGUFError(
                f"{self.path}: metadata key '{key}' must be a non-negative integer, got {value!r}"
            )
        return int(value)

    def _read_config(self) -> ModelConfig:
        arch = self._get("general.architecture", required=True)
        if arch != ARCH:
            raise GGUFError(
                f"{self.path}: general.architecture is '{arch}', rwkv_jax runs only '{ARCH}' "
                "(RWKV-7) models"
            )
        n_embd = self._int(KEY["n_embd"])
        n_layer = self._int(KEY["n_layer"])
        head_size = self._int(KEY["head_size"])
        if n_layer < 1 or n_embd < 1 or head_size < 1 or n_embd % head_size:
            raise GGUFError(
                f"{self.path}: {KEY['n_embd']}={n_embd} must be a positive multiple of "
                f"{KEY['head_size']}={head_size}, and {KEY['n_layer']}={n_layer} positive"
            )
        # Ranks: metadata first; tensor shapes are checked against them below.
        ranks = {}
        for key, exp_mult in (
            ("rank_w", (0.5, 1.8)),
            ("rank_a", (0.5, 1.8)),
            ("rank_v", (0.5, 1.3)),
            ("rank_g", (0.8, 0.6)),
        ):
            default = lora_rank(n_embd, *exp_mult)
            ranks[key] = self._int(KEY[key], required=False, default=default)
        if ranks["rank_g"] == 0:
            raise GGUFError(
                f"{self.path}: {KEY['rank_g']}=0 (no output gate, an ARWKV7 hybrid); "
                "rwkv_jax supports RWKV-7 models with the gate LoRA"
            )
        emb = self.tensors.get("token_embd.weight")
        if emb is None or len(emb.ne) != 2:
            raise GGUFError(f"{self.path}: tensor 'token_embd.weight' is missing or not 2-D")
        eps = self._get(KEY["eps"], 1e-5)
        if not isinstance(eps, float | int) or not (0 < float(eps) < 1):
            raise GGUFError(f"{self.path}: {KEY['eps']}={eps!r} must be a number in (0, 1)")
        ffn = self._int(KEY["ffn"], required=False, default=4 * n_embd)
        return ModelConfig(
            n_layer=n_layer,
            n_embd=n_embd,
            ffn=ffn,
            head_size=head_size,
            vocab_size=emb.ne[1],
            layer_norm_eps=float(eps),
            file_type=int(self._get("general.file_type", -1)),
            name=str(self._get("general.name", os.path.basename(self.path))),
            **ranks,
        )

    # ---- tensors ----------------------------------------------------------------------------

    def expected_tensors(self) -> dict[str, tuple[TensorSpec, tuple[int, ...]]]:
        """Every tensor name the model needs -> (spec, expected ne)."""
        dims = self.config.dims()
        out: dict[str, tuple[TensorSpec, tuple[int, ...]]] = {}
        for spec in GLOBAL_TENSORS:
            out[spec.gguf_name] = (spec, tuple(dims[d] for d in spec.ne))
        for layer in range(self.config.n_layer):
            for spec in LAYER_TENSORS:
                names = spec.ne
                if layer == 0 and spec.field in LAYER0_DUMMY_RANK:
                    names = tuple(LAYER0_DUMMY_RANK[spec.field] if d == "Dv" else d for d in names)
                out[f"blk.{layer}.{spec.gguf_name}"] = (spec, tuple(dims[d] for d in names))
        return out

    def _check_tensors(self) -> None:
        expected = self.expected_tensors()
        for name, (spec, ne) in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise GGUFError(f"{self.path}: tensor '{name}' is missing")
            got = _squeeze_trailing_ones(info.ne)
            if got != _squeeze_trailing_ones(ne):
                # llama.cpp also accepts the lerp vector of channel mix declared as [C, 1, 1].
                raise GGUFError(
                    f"{self.path}: tensor '{name}' has dims {list(info.ne)}, expected {list(ne)} "
                    f"from the metadata ({spec.field})"
                )
        extra = sorted(set(self.tensors) - set(expected))
        # Tensors we do not know are an error: silently ignoring weights gives wrong logits.
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise GGUFError(
                f"{self.path}: unexpected tensors {extra[:5]}{more}: not part of a llama.cpp "
                "rwkv7 model (another variant, e.g. DeepEmbed or ARWKV7?)"
            )

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called ``name`` (GGUFError if absent)."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor '{name}' is missing") from None

    def bytes_by_type(self) -> dict[str, tuple[int, int]]:
        """ggml type name -> (tensor count, bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors.values():
            count, size = out.get(t.type_name, (0, 0))
            out[t.type_name] = (count + 1, size + t.n_bytes)
        return out

    def close(self) -> None:
        """Drop the mmap (tensors obtained earlier become invalid)."""
        self.tensors = {}
        mm = getattr(self._reader, "data", None)
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            del mm
        self._reader = None

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {self.config})"


def _squeeze_trailing_ones(ne: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing size-1 dims (ggml treats [C] and [C,1,1] alike)."""
    out = list(ne)
    while len(out) > 1 and out[-1] == 1:
        out.pop()
    return tuple(out)


def layer_of(name: str) -> tuple[int, str] | None:
    """('blk.3.time_mix_key.weight') -> (3, 'time_mix_key.weight'); None for global tensors."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
