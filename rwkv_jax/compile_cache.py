"""JAX's persistent compilation cache, on by default for rwkv_jax (model load turns it on).

Compiled programs (prefill, decode, the load-time block split) are written to a directory and
read back by later processes, so a second run skips XLA's compile. The directory is
$RWKV_JAX_CACHE/xla or ~/.cache/rwkv_jax/xla (next to the native kernels and synthetic models).
RWKV_JAX_COMPILE_CACHE=0 turns it off, RWKV_JAX_COMPILE_CACHE=/some/dir picks the directory; a
directory the user gave JAX already (JAX_COMPILATION_CACHE_DIR, `jax.config.update`) is kept,
with the user's thresholds. Ours cache every program, however small or quick to compile.

Native CPU kernels (cpu_kernels.py) are XLA FFI custom calls: a cached executable names its
target, which must be registered before XLA loads it. JAX looks an executable up only after
tracing and lowering the function, and the tracing that emits the custom call is what registers
the target (`cpu_kernels.supports` -> `available`), so a cached entry that names a target is
never loaded in a process where that target is missing (tests/test_load.py runs a cached native
matmul in a fresh process).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV = "RWKV_JAX_COMPILE_CACHE"
_OFF = ("0", "false", "off", "no")


def default_dir() -> str:
    """$RWKV_JAX_COMPILE_CACHE if it names a directory, else $RWKV_JAX_CACHE/xla or
    ~/.cache/rwkv_jax/xla."""
    env = os.environ.get(ENV, "").strip()
    if env and env.lower() not in (*_OFF, "1", "true", "on", "yes"):
        return os.path.expanduser(env)
    root = os.environ.get("RWKV_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rwkv_jax"
    )
    return os.path.join(root, "xla")


def enabled_by_env() -> bool:
    """False when RWKV_JAX_COMPILE_CACHE turns the cache off."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


def enable() -> str | None:
    """Turn the persistent compilation cache on (idempotent); the directory in use, or None.

    Keeps a directory configured before (by the user or an earlier call). Returns None, changing
    nothing, when RWKV_JAX_COMPILE_CACHE=0 or JAX's own switch (jax_enable_compilation_cache)
    is off.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not enabled_by_env() or not jax.config.jax_enable_compilation_cache:
        return None
    path = default_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a read-only home, say: run without the cache rather than fail
        log.warning("rwkv_jax: no persistent compilation cache (%s: %s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # every program: the load-time split compiles in well under JAX's 1 s default threshold
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # a compile before this point may have marked the cache as initialized without a directory
    # (jax 0.4.x does); start it afresh so the directory takes effect in this process
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    log.info("rwkv_jax: persistent compilation cache at %s", path)
    return path
