"""Native CPU matmul over packed ggml weights, as an XLA FFI custom call (rwkv_jax/native).

XLA:CPU unpacks packed blocks at well under 1 GB/s (docs/backends.md), so the decode matvecs run
through `native/qmatvec.cc` instead: one C++ kernel per format that dequantizes each block to
exactly ggml's float32 values in registers and accumulates `x · Wᵀ` in float32, on a small
thread pool (Q4_K and Q6_K at one row, AVX-512 or AVX2: each sub-block's scale and min factored
out of its sum, the same weight values with another rounding; on AVX2 the sums over x are exact
integer sums over x held as 26-bit fixed point per 32 values, within 2^-26 of each group's
largest |x|, finer than float32's rounding of that value: `info()` q4k_int16_x / q6k_int16_x,
qmatvec.cc `x_int16_digits`). From 8
activation rows (prefill) the blocks are unpacked once into float32 tiles and multiplied by a
register-blocked microkernel (`info()` names the thresholds). bfloat16 activations take the
bfloat16 targets: the weights rounded to bfloat16 as XLA's bfloat16 path rounds them, multiplied
with vdpbf16ps where the CPU has avx512_bf16 (`info()`: bf16=avx512_bf16) and by the float32
kernels on the rounded values elsewhere (bf16=portable; the same products, another summation
order). The model's decode does not take them for packed weights: up to quant.MATVEC_MAX_ROWS
rows packed weights multiply in float32 on every backend, so quant calls the float32 targets on
the widened x there. The source is compiled with the system C++ compiler on first use into a
cache keyed by source, compiler, flags, JAX version and CPU, then registered with `jax.ffi`.
Without a compiler or a usable `jax.ffi`, `available()` is False, `reason()` says why, and
callers keep the XLA path (same numbers, slower). `RWKV_JAX_NATIVE=0` disables it;
`RWKV_JAX_NATIVE_THREADS=N` sets the pool size (default: the CPUs this process may use).

The same library holds the per-head work of a decode token or a prefill step's tokens
(`time_mix_step`, model.heads with the token recurrence, in float32: decay, gates, value
residual, WKV-7 state update and readout, group norm, bonus), which XLA:CPU runs as ~40 small
fusions and copies of the state per layer (and per token, in the recurrence's loop); it updates
the layer's state in place in the stack it is given (model.heads_step). 2-core CPU, 0.1b
Q4_K_M, pp512 with the prefill's heads here against XLA's (interleaved rounds, BENCHMARKS.md):
float32 767.8 -> 834.5 tok/s, bfloat16 1062.1 -> 1181.2.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.errors import RwkvJaxError

Array = jax.Array

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "qmatvec.cc"
TARGET_PREFIX = "rwkv_jax_qmatvec_"  # FFI target name = prefix + format name (float32 x)
TARGET_PREFIX_BF16 = "rwkv_jax_qmatvec_bf16_"  # the same for bfloat16 x
TIME_MIX_TARGET = "rwkv_jax_time_mix_step"  # the per-head work of T tokens (model.heads)

# Per format: the weight's array fields in the order the C++ handler takes them, each with its
# dtype and per-block trailing shape (fields are [out, nb, *trail]; dense `w` is [out, in]).
_U8, _I8, _F16 = np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float16)
FIELDS: dict[str, tuple[tuple[str, np.dtype, tuple[int, ...]], ...]] = {
    "F32": (("w", np.dtype(np.float32), ()),),
    "F16": (("w", _F16, ()),),
    "BF16": (("w", np.dtype(jnp.bfloat16), ()),),
    "Q4_0": (("d", _F16, ()), ("qs", _U8, (16,))),
    "Q4_1": (("d", _F16, ()), ("m", _F16, ()), ("qs", _U8, (16,))),
    "Q5_0": (("d", _F16, ()), ("qh", _U8, (4,)), ("qs", _U8, (16,))),
    "Q5_1": (("d", _F16, ()), ("m", _F16, ()), ("qh", _U8, (4,)), ("qs", _U8, (16,))),
    "Q8_0": (("d", _F16, ()), ("qs", _I8, (32,))),
    "Q2_K": (("scales", _U8, (16,)), ("qs", _U8, (64,)), ("d", _F16, ()), ("dmin", _F16, ())),
    "Q3_K": (("hmask", _U8, (32,)), ("qs", _U8, (64,)), ("scales", _U8, (12,)), ("d", _F16, ())),
    "Q4_K": (("d", _F16, ()), ("dmin", _F16, ()), ("scales", _U8, (12,)), ("qs", _U8, (128,))),
    "Q5_K": (
        ("d", _F16, ()),
        ("dmin", _F16, ()),
        ("scales", _U8, (12,)),
        ("qh", _U8, (32,)),
        ("qs", _U8, (128,)),
    ),
    "Q6_K": (("ql", _U8, (128,)), ("qh", _U8, (64,)), ("scales", _I8, (16,)), ("d", _F16, ())),
}
# values per block (dense: 1, any row length)
BLOCK_ELEMS = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32}
BLOCK_ELEMS |= {"Q8_0": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}

# -O3 and the host's vector ISA; contraction into FMAs keeps ggml's values (see qmatvec.cc).
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=fast", "-pthread")
# tried in order until one compiles (clang on arm64 macOS may reject -march=native);
# RWKV_JAX_NATIVE_ARCH="-mavx2 -mfma -mf16c" (or "" for plain C++) replaces them
ARCH_FLAGS = (("-march=native",), ("-mcpu=native",), ())


def _arch_candidates() -> tuple[tuple[str, ...], ...]:
    """Architecture flags to try: $RWKV_JAX_NATIVE_ARCH if set, else ARCH_FLAGS."""
    env = os.environ.get("RWKV_JAX_NATIVE_ARCH")
    return ARCH_FLAGS if env is None else (tuple(env.split()),)


@dataclass(frozen=True)
class _Native:
    """Outcome of the one-time build: the loaded library or why there is none."""

    lib: ctypes.CDLL | None
    reason: str
    info: str = ""
    build_s: float = 0.0  # seconds spent compiling in this process (0 if cached)


_lock = threading.Lock()
_native: _Native | None = None


def _ffi():
    """The jax FFI module (jax.ffi from 0.5, jax.extend.ffi before), or None."""
    mod = getattr(jax, "ffi", None)
    if mod is None:
        try:
            from jax.extend import ffi as mod  # type: ignore[no-redef]
        except ImportError:
            return None
    needed = ("ffi_call", "register_ffi_target", "pycapsule", "include_dir")
    return mod if all(hasattr(mod, n) for n in needed) else None


def _compiler() -> str | None:
    """The C++ compiler: $CXX, else the first of g++, c++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and feature flags where readable."""
    sig = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    sig.append(line.strip())
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:  # not Linux: macOS names its chip through sysctl
        try:
            brand = ["sysctl", "-n", "machdep.cpu.brand_string"]
            sig.append(subprocess.run(brand, capture_output=True, text=True, timeout=10).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    return "\n".join(sig)


def cache_dir() -> Path:
    """Where built libraries live: $RWKV_JAX_CACHE/native or ~/.cache/rwkv_jax/native."""
    root = os.environ.get("RWKV_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rwkv_jax"
    )
    return Path(root) / "native"


def _run_compiler(cxx: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run the compiler with a generous timeout, capturing its messages."""
    return subprocess.run([cxx, *args], capture_output=True, text=True, timeout=600)


def _build(ffi) -> tuple[Path, float]:
    """Compile qmatvec.cc into the cache (once per key, under a file lock); (path, seconds)."""
    cxx = _compiler()
    if cxx is None:
        raise RwkvJaxError("no C++ compiler found (set CXX or install g++/clang++)")
    version = _run_compiler(cxx, ["--version"]).stdout.splitlines()[:1]
    src = SOURCE.read_bytes()
    key = hashlib.sha256()
    arch = _arch_candidates()
    parts = (src, *version, jax.__version__, _jaxlib_version(), _cpu_signature(), *BASE_FLAGS)
    for part in (*parts, repr(arch)):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"qmatvec-{key.hexdigest()[:16]}.so"
    with _file_lock(out_dir / (lib.name + ".lock")):
        if lib.exists():
            return lib, 0.0
        t0 = time.perf_counter()
        errors = []
        for flags in arch:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            args = [*BASE_FLAGS, *flags, "-isystem", ffi.include_dir(), str(SOURCE), "-o", tmp]
            res = _run_compiler(cxx, args)
            if res.returncode == 0:
                os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache needs it readable
                os.replace(tmp, lib)  # atomic: readers never see a partial file
                return lib, time.perf_counter() - t0
            os.unlink(tmp)
            errors.append(f"{' '.join(flags) or '(no arch flag)'}: {res.stderr.strip()[-2000:]}")
        raise RwkvJaxError(f"compiling {SOURCE.name} with {cxx} failed:\n" + "\n".join(errors))


def _jaxlib_version() -> str:
    """Installed jaxlib version (the FFI headers and ABI come from it)."""
    try:
        import jaxlib

        return str(jaxlib.__version__)
    except (ImportError, AttributeError):
        return "unknown"


class _file_lock:
    """An exclusive advisory lock on `path` (fcntl; a no-op where fcntl is missing)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
        return False


def _load() -> _Native:
    """Build, load and register the kernels, or say why not (never raises)."""
    if os.environ.get("RWKV_JAX_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return _Native(None, "disabled by RWKV_JAX_NATIVE=0")
    ffi = _ffi()
    if ffi is None:
        return _Native(None, f"jax {jax.__version__} has no usable jax.ffi (needs ffi_call)")
    try:
        path, build_s = _build(ffi)
        lib = ctypes.CDLL(str(path))
        for fmt in FIELDS:
            for prefix, sym in (
                (TARGET_PREFIX, "rwkv_qmatvec_"),
                (TARGET_PREFIX_BF16, "rwkv_qmatvec_bf16_"),
            ):
                fn = getattr(lib, sym + fmt)
                ffi.register_ffi_target(prefix + fmt, ffi.pycapsule(fn), platform="cpu")
        step = ffi.pycapsule(lib.rwkv_time_mix_step)
        ffi.register_ffi_target(TIME_MIX_TARGET, step, platform="cpu")
        lib.rwkv_qmatvec_info.restype = ctypes.c_char_p
        # (format, x, field pointers, M, in, out, y) -> 0: the kernels without XLA (profiling)
        direct = lib.rwkv_qmatvec_direct
        direct.restype = ctypes.c_int
        direct.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p]
        direct.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
        # (format, x kind 0 f32 / 1 bf16 / 2 bf16 portable, x, fields, M, in, out, y) -> 0
        direct_x = lib.rwkv_qmatvec_direct_x
        direct_x.restype = ctypes.c_int
        direct_x.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        direct_x.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
        info = lib.rwkv_qmatvec_info().decode()
    except (RwkvJaxError, OSError, subprocess.SubprocessError, AttributeError) as e:
        return _Native(None, f"native CPU kernels unavailable: {e}")
    except Exception as e:  # an older jax may reject the registration in its own way
        return _Native(None, f"native CPU kernels unavailable ({type(e).__name__}): {e}")
    return _Native(lib, "ok", info, build_s)


def _state() -> _Native:
    """The one-time build outcome (thread-safe; logs it once at INFO)."""
    global _native
    if _native is None:
        with _lock:
            if _native is None:
                _native = _load()
                if _native.lib is None:
                    log.info("rwkv_jax: using XLA for CPU matmuls: %s", _native.reason)
                else:
                    log.info(
                        "rwkv_jax: native CPU matmul kernels loaded (%s%s)",
                        _native.info,
                        f", built in {_native.build_s:.1f} s" if _native.build_s else "",
                    )
    return _native


def available() -> bool:
    """True if the native kernels are built, loaded and registered with XLA."""
    return _state().lib is not None


def reason() -> str:
    """'ok', or why the native kernels are unavailable."""
    return _state().reason


def info() -> str:
    """Build details ('isa=avx512 threads=2 ...'), empty if unavailable."""
    return _state().info


def build_seconds() -> float:
    """Seconds this process spent compiling the library (0.0 when it came from the cache)."""
    return _state().build_s


def _format(weight) -> str:
    """The weight's ggml type name ('Q4_K'), '' for non-weights."""
    name = getattr(weight, "format_name", None)
    return name if isinstance(name, str) else ""


def _stack_depth(weight) -> int | None:
    """0 for a weight the kernels take as is, 1 for a stack [L, ...] of them, else None."""
    fmt = _format(weight)
    spec = FIELDS.get(fmt)
    shape = getattr(weight, "shape", None)
    if spec is None or shape is None:
        return None
    out, n_in = shape
    if n_in % BLOCK_ELEMS[fmt]:
        return None
    nb = n_in // BLOCK_ELEMS[fmt]
    leads = set()
    for name, dtype, trail in spec:
        a = getattr(weight, name, None)
        # byte fields: uint8 or int8 alike (quant.py's metal-safe profile stores int8 views)
        bytes_ok = dtype.itemsize == 1 and a is not None and np.dtype(a.dtype) in (_U8, _I8)
        if a is None or (np.dtype(a.dtype) != dtype and not bytes_ok):
            return None
        want = (out, nb, *trail)
        lead = tuple(a.shape[: a.ndim - len(want)])
        if tuple(a.shape[len(lead) :]) != want:
            return None
        leads.add(lead)
    # every field must carry the same leading (stack) axes, at most one of them
    if len(leads) != 1 or len(lead := leads.pop()) > 1:
        return None
    return len(lead)


def supports(weight, *, stacked: bool = False) -> bool:
    """True if `matmul` can run this weight natively: known format, fields as expected.

    stacked=False: one weight ([out, nb, ...] fields); stacked=True: a stack [L, out, nb, ...]
    to be indexed by `matmul(..., index=)`.
    """
    return available() and _stack_depth(weight) == (1 if stacked else 0)


def matmul(weight, x: Array, index: Array | int | None = None) -> Array:
    """x @ Wᵀ for x [..., in] -> float32 [..., out], jit-traceable.

    A bfloat16 x gives XLA's bfloat16 product: the weight values rounded to bfloat16
    (round-to-nearest-even, as `dequantize(bfloat16)`) times x, accumulated in float32
    (vdpbf16ps where the CPU has avx512_bf16; elsewhere the float32 kernels on the rounded
    values, the same products summed in another order). Any other x is cast to float32 and
    multiplied by the exact weight values.

    With `index`, `weight` is a stack of L weights and W = weight[index] (clamped to
    [0, L-1] like a dynamic slice); the kernel reads the stack in place, where slicing it first
    makes XLA copy the slice before a custom call.
    """
    stacked = index is not None
    if not supports(weight, stacked=stacked):
        fmt = _format(weight) or type(weight).__name__
        raise RwkvJaxError(
            f"native CPU matmul cannot run this {fmt} weight of shape "
            f"{getattr(weight, 'shape', '?')} ({reason()}, stacked={stacked}); check "
            "cpu_kernels.supports(weight) first and use Weight.matmul otherwise"
        )
    fmt = _format(weight)
    out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the {fmt} weight takes {n_in}")
    lead = x.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return jnp.zeros((*lead, out), jnp.float32)
    bf16 = x.dtype == jnp.bfloat16
    x2 = x.reshape(m, n_in)  # [M, in]
    x2 = x2 if bf16 else x2.astype(jnp.float32)
    layer = jnp.asarray(0 if index is None else index, jnp.int32).reshape(())
    fields = [getattr(weight, name) for name, _, _ in FIELDS[fmt]]
    y = _call(fmt, m, out, bf16)(x2, layer, *fields)  # [M, out]
    return y.reshape(*lead, out)


def _call(fmt: str, m: int, out: int, bf16: bool = False):
    """The ffi_call for one format, activation dtype (bfloat16 or float32) and result shape."""
    ffi = _ffi()
    result = jax.ShapeDtypeStruct((m, out), jnp.float32)
    kwargs = {}
    if "vmap_method" in inspect.signature(ffi.ffi_call).parameters:
        kwargs["vmap_method"] = "sequential"  # a vmapped weight or x: one call per slice
    prefix = TARGET_PREFIX_BF16 if bf16 else TARGET_PREFIX
    return ffi.ffi_call(prefix + fmt, result, **kwargs)


def time_mix_step(
    layer: Array,
    first: bool | None,
    active: Array,
    r: Array,
    k: Array,
    v: Array,
    v_first: Array,
    ups: tuple[Array, Array, Array, Array],
    vectors: tuple[Array, ...],
    S: Array,
    *,
    eps: float,
    decay_scale: float,
    l2_eps: float,
) -> tuple[Array, Array, Array]:
    """model.heads with the token recurrence (wkv.wkv7_sequential) for B rows of T tokens, in
    one native call (float32 throughout): a decode step (T = 1) or a prefill step.

    layer: int32 [] index into S and the vector stacks; first: whether this is the first layer
    (its v becomes v_first), None = layer == 0; active: [B] or [B, T] bool (False: a padding
    row or token, which leaves the state as it is); r, k, v, v_first: [B, C] or [B, T, C]; ups:
    the LoRA up products (w2, a2, v2, g2), shaped as r, as the matmuls return them; vectors:
    (w0, a0, v0, k_k, k_a, r_k, ln_x_w, ln_x_b), each [L', C] (L' = 1: this layer's); S: the
    WKV state stack [L, B, H, N, N] float32, returned with layer `layer` updated after the T
    tokens (the call aliases it: inside a scan that carries S, XLA updates the stack in place).
    -> (out * g and v_first shaped as r, S).
    """
    if not available():
        raise RwkvJaxError(f"native CPU kernels unavailable ({reason()})")
    shape = r.shape  # [B, C] or [B, T, C]
    C = shape[-1]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    flag = -1 if first is None else int(bool(first))
    args = (
        jnp.asarray(layer, jnp.int32).reshape(()),
        jnp.asarray(flag, jnp.int32).reshape(()),
        jnp.asarray(active, jnp.int32).reshape(shape[:-1]),
        *(f32(a).reshape(shape) for a in (r, k, v, v_first, *ups)),
        *(f32(a).reshape(-1, C) for a in vectors),
        f32(S),
    )
    result = (
        jax.ShapeDtypeStruct(shape, jnp.float32),
        jax.ShapeDtypeStruct(shape, jnp.float32),
        jax.ShapeDtypeStruct(S.shape, jnp.float32),
    )
    ffi = _ffi()
    kwargs = {}
    if "vmap_method" in inspect.signature(ffi.ffi_call).parameters:
        kwargs["vmap_method"] = "sequential"  # vmapped inputs: one call per slice
    call = ffi.ffi_call(TIME_MIX_TARGET, result, input_output_aliases={len(args) - 1: 2}, **kwargs)
    out, vf, S = call(
        *args,
        eps=np.float32(eps),
        decay_scale=np.float32(decay_scale),
        l2_eps=np.float32(l2_eps),
    )
    return out, vf, S
