"""Loading: the device-side block split (rwkv_jax/upload.py), load_params, the compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax import backends, compile_cache, cpu_kernels, quant, upload
from rwkv_jax.gguf import GGUFFile
from rwkv_jax.params import Block, load_params

ALL = list(quant.FORMATS.values())
DENSE = {quant.F32, quant.F16, quant.BF16}


@pytest.fixture(params=["default", "metal-safe", "gpu"])
def profile(request):
    """Run under each storage of byte fields (uint8; int8 under metal-safe; the K-quants' quants
    as uint32 words under gpu), then restore."""
    before = backends.requested_profile()
    backends.set_profile(request.param)
    yield request.param
    backends.set_profile(before)


def _shape(cls: type[quant.Weight]) -> tuple[int, int]:
    """(out, in) with several blocks per row and several rows."""
    return (3, 512) if cls.BLOCK_ELEMS == quant.QK_K else (5, 96)


def _raw(cls: type[quant.Weight], shape, rng, lead=()) -> np.ndarray:
    """Random bytes [*lead, out, row_bytes]: every bit pattern (NaN/inf scales too)."""
    return rng.integers(0, 256, (*lead, shape[0], cls.row_bytes(shape[1])), dtype=np.uint8)


def _host_split(cls: type[quant.Weight], raw: np.ndarray) -> dict[str, np.ndarray]:
    """The reference: numpy's structured view of the block struct, each field copied out and
    stored as the profile stores it (uint8, its int8 view under metal-safe, little-endian
    uint32 words of the WORD_FIELDS under gpu)."""
    rec = np.ascontiguousarray(raw).view(cls.BLOCK)  # [..., out, nb] records
    words = backends.current_profile().quant_bytes == "uint32"

    def dtype(f):
        return (
            np.dtype("<u4")
            if words and f in cls.WORD_FIELDS
            else quant.field_dtype(cls.BLOCK[f].base)
        )

    return {f: np.array(rec[f]).view(dtype(f)) for f in cls.BLOCK.names}


def _assert_fields(w: quant.Weight, want: dict[str, np.ndarray]) -> None:
    """Every field of `w` has the reference's dtype and shape and the same bits."""
    for name, ref in want.items():
        got = np.asarray(getattr(w, name))
        assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, got.shape)
        # bytes, not values: random fp16/bf16/f32 bits include NaNs of every payload
        assert np.array_equal(got.view(np.uint8), ref.view(np.uint8)), name


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_device_split_matches_host_split(cls, profile):
    """from_raw's device split equals the host split bit for bit: one weight, a [L, ...] raw,
    and stacks filled layer by layer (as load_params does), under uint8 and int8 storage."""
    rng = np.random.default_rng(int(cls.GGML_TYPE))
    shape = _shape(cls)
    raw = _raw(cls, shape, rng)
    _assert_fields(cls.from_raw(raw.reshape(-1), shape), _host_split(cls, raw))

    layers = _raw(cls, shape, rng, lead=(3,))  # [L, out, row_bytes]
    want = _host_split(cls, layers)  # fields [L, out, nb, ...]
    _assert_fields(cls.from_raw(layers, shape), want)

    lay = quant.raw_layout(cls)
    assert lay.dense == (cls in DENSE)
    stacks = upload.empty_stacks({"w": lay}, {"w": (3, shape[0], shape[1] // cls.BLOCK_ELEMS)})
    for i in (2, 0, 1):  # any order: each layer lands in its own slot
        stacks = upload.put_layers(stacks, {"w": upload.to_device(layers[i], lay)}, i, {"w": lay})
    _assert_fields(cls(shape=shape, **stacks["w"]), want)
    if profile == "metal-safe":  # no unsigned type reaches the device, not even the raw bytes
        assert all(np.dtype(a.dtype) != np.uint8 for a in jax.tree.leaves(stacks))
        assert np.dtype(upload.to_device(layers[0], lay).dtype) != np.uint8


def test_layout_matches_numpy_struct():
    """Field offsets and sizes come from the C struct (e.g. Q4_K: d@0, dmin@2, scales@4, qs@16)."""
    lay = quant.raw_layout(quant.Q4_K)
    assert [(f.name, f.offset, f.nbytes, f.shape) for f in lay.fields] == [
        ("d", 0, 2, ()),
        ("dmin", 2, 2, ()),
        ("scales", 4, 12, (12,)),
        ("qs", 16, 128, (128,)),
    ]
    assert lay.block_bytes == 144 and not lay.dense
    for cls in ALL:
        offsets = [cls.BLOCK.fields[n][1] for n in cls.BLOCK.names]
        assert [f.offset for f in quant.raw_layout(cls).fields] == offsets


@pytest.mark.parametrize("cls", [quant.Q4_K, quant.Q8_0, quant.F16], ids=lambda c: c.__name__)
def test_device_arrays_never_alias_host_bytes(cls):
    """Writing to the host bytes after from_raw changes no field: the device holds a copy (on
    the CPU backend too, where an alias of an mmap would see the file change)."""
    shape = _shape(cls)
    # 64-byte aligned host bytes: what XLA:CPU wraps without copying (an mmap'd tensor often is)
    n = shape[0] * cls.row_bytes(shape[1])
    buf = np.empty(n + 64, np.uint8)
    start = -buf.ctypes.data % 64
    raw = buf[start : start + n].reshape(shape[0], -1)
    raw[:] = _raw(cls, shape, np.random.default_rng(0))
    want = _host_split(cls, raw)
    w = cls.from_raw(raw, shape)
    jax.block_until_ready(w)
    raw ^= 0xFF  # every byte changes
    _assert_fields(w, want)


def _weights(tree) -> list[tuple[str, quant.Weight]]:
    """(path, weight) for every packed weight of a params pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, quant.Weight)
    )[0]
    return [(jax.tree_util.keystr(p), w) for p, w in leaves if isinstance(w, quant.Weight)]


def test_load_params_fields_equal_file_bytes(synth_model):
    """load_params (stacked and unrolled) holds exactly the file's block fields: each layer's
    weight equals the host split of its tensor's bytes; vectors are the file's float32 values."""
    f = GGUFFile(synth_model("tiny", "Q4_K_M"))
    stacked = load_params(f, stack_layers=True)
    unrolled = load_params(f, stack_layers=False)
    assert stacked.stacked and not unrolled.stacked
    seen = set()
    for i, block in enumerate(unrolled.blocks):
        layer = stacked.blocks
        for name in Block.__dataclass_fields__:
            got, st = getattr(block, name), getattr(layer, name)
            if isinstance(got, quant.Weight):
                seen.add(got.format_name)
                if not (i == 0 and name in ("v1", "v2")):  # layer 0's are zero dummies
                    info = f.tensor(f"blk.{i}.{_gguf_name(name)}")
                    _assert_fields(got, _host_split(type(got), info.rows()))
                for k in type(got).BLOCK.names:  # stacked slot i == unrolled layer i
                    a, b = np.asarray(getattr(st, k)[i]), np.asarray(getattr(got, k))
                    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), (i, name, k)
            else:
                assert got.dtype == np.float32 and np.array_equal(np.asarray(st[i]), got)
    assert {"Q4_K", "F32"} <= seen  # the file mixes block and dense formats
    for ends in (stacked, unrolled):
        _assert_fields(ends.emb, _host_split(type(ends.emb), f.tensor("token_embd.weight").rows()))
        _assert_fields(ends.head, _host_split(type(ends.head), f.tensor("output.weight").rows()))


def test_gpu_profile_stores_words_for_packed_bf16_models(synth_model):
    """Under the gpu profile a packed bf16/f16 model stores the K-quants' quants as uint32
    words (the fields then equal the file's bytes read as little-endian words); float32 and
    dense models, and every model under the default profile, keep bytes."""
    f = GGUFFile(synth_model("tiny", "Q4_K_M"))
    before = backends.requested_profile()
    try:
        for prof, dtype, mode, words in [
            ("gpu", jnp.bfloat16, "packed", True),
            ("gpu", jnp.float16, "packed", True),
            ("gpu", jnp.float32, "packed", False),
            ("gpu", jnp.bfloat16, "dense", False),
            ("default", jnp.bfloat16, "packed", False),
        ]:
            backends.set_profile(prof)
            assert quant.words_for(dtype) == (prof == "gpu" and dtype != jnp.float32)
            params = load_params(f, mode=mode, dtype=dtype, stack_layers=False)
            kquants = [
                w
                for w in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, quant.Weight))
                if isinstance(w, (quant.Q4_K, quant.Q6_K))
            ]
            assert bool(kquants) == (mode == "packed")  # dense: every matrix dequantized
            for w in kquants:
                for name in type(w).WORD_FIELDS:
                    want = np.uint32 if words else np.uint8
                    assert np.dtype(getattr(w, name).dtype) == want, (prof, dtype, name)
            if words:  # the head's fields are the file's bytes, as words
                head = f.tensor("output.weight")
                _assert_fields(params.head, _host_split(type(params.head), head.rows()))
    finally:
        backends.set_profile(before)


def _gguf_name(field: str) -> str:
    """GGUF tensor name (after 'blk.N.') of a Block matrix field."""
    from rwkv_jax.gguf import LAYER_TENSORS

    return next(s.gguf_name for s in LAYER_TENSORS if s.field == field)


# ---- persistent compilation cache -------------------------------------------------------------


@pytest.fixture
def fresh_jax_cache(monkeypatch):
    """No cache directory configured; the test's config and cache state are undone after."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()
    yield monkeypatch
    for k, v in saved.items():
        jax.config.update(k, v)
    cc.reset_cache()


def test_enable_compile_cache(fresh_jax_cache, tmp_path):
    """enable(): our directory and thresholds by default; off with RWKV_JAX_COMPILE_CACHE=0; a
    directory the user configured stays."""
    env = fresh_jax_cache
    env.setenv("RWKV_JAX_COMPILE_CACHE", "0")
    assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
    env.setenv("RWKV_JAX_COMPILE_CACHE", "1")
    env.setenv("RWKV_JAX_CACHE", str(tmp_path / "root"))
    assert compile_cache.enable() == str(tmp_path / "root" / "xla")
    assert os.path.isdir(tmp_path / "root" / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "user"))
    env.setenv("RWKV_JAX_COMPILE_CACHE", str(tmp_path / "ours"))
    assert compile_cache.enable() == str(tmp_path / "user")  # the user's choice wins
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable() == str(tmp_path / "ours")  # a path in the variable


_CACHED_MATMUL = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax._src import monitoring
    from rwkv_jax import compile_cache, cpu_kernels, quant
    hits = []
    monitoring.register_event_listener(
        lambda e, **k: hits.append(e) if e.endswith("cache_hits") else None
    )
    compile_cache.enable()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, 8 * quant.Q4_K.row_bytes(256), dtype=np.uint8)
    raw.view(quant.Q4_K.BLOCK)["d"] = np.float16(0.01)
    raw.view(quant.Q4_K.BLOCK)["dmin"] = np.float16(0.01)
    w = quant.Q4_K.from_raw(raw, (8, 256))
    x = jax.numpy.asarray(rng.standard_normal((1, 256)).astype(np.float32))
    f = jax.jit(lambda w, x: w.matmul(x))
    hlo = f.lower(w, x).as_text()
    y = np.asarray(f(w, x))
    print(json.dumps({"native": cpu_kernels.TARGET_PREFIX + "Q4_K" in hlo,
                      "hits": len(hits), "y": y.tolist()}))
    """
)


def test_cached_native_matmul_runs_in_a_new_process(tmp_path):
    """A program calling a native FFI kernel, compiled in one process and read from the
    persistent cache in a fresh one (where the target is registered while tracing, before the
    cached executable loads), gives the same result."""
    if backends.current_profile().matvec != "platform" or not cpu_kernels.available():
        pytest.skip(f"no native CPU kernels here ({cpu_kernels.reason()}, or metal-safe)")
    env = dict(os.environ, RWKV_JAX_COMPILE_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _CACHED_MATMUL], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["native"] and runs[1]["native"]  # the custom call is in the program
    assert runs[0]["hits"] == 0 and runs[1]["hits"] >= 1  # compiled, then read from the cache
    assert runs[0]["y"] == runs[1]["y"]
