"""Figures beyond the seed: fidelity, measured copy bandwidth, peak memory, device name.

Import after the JAX platform is chosen (bandwidth and memory touch the device).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time

import numpy as np

# A fixed English text for the fidelity check (tokenized, then cut to `prompt_tokens`).
FIDELITY_TEXT = (
    "The history of the lighthouse is a history of people who kept a flame alive through long "
    "winter nights. Before electric lamps, keepers trimmed wicks, polished brass and carried oil "
    "up narrow stairs, often several times between dusk and dawn. A ship's captain approaching an "
    "unfamiliar coast counted the seconds between flashes to know which light he was seeing, "
    "because every tower had its own rhythm. In 1822 Augustin Fresnel described a lens made of "
    "concentric rings of glass that bent scattered light into a single beam, and within a few "
    "decades his design could be seen from more than twenty miles away. Today most lights are "
    "automatic, yet sailors still learn to read them, and the old towers remain on the maps as "
    "points from which to measure distance, bearing and time."
)


def log_softmax64(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64."""
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def fidelity(ref: np.ndarray, run: np.ndarray) -> dict:
    """KL(ref || run) per position (nats) and top-1 agreement, for logits [T, V]."""
    lp, lq = log_softmax64(ref), log_softmax64(run)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)  # [T]
    agree = np.argmax(ref, axis=-1) == np.argmax(run, axis=-1)
    return {
        "positions": int(kl.shape[0]),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1": float(agree.mean()),
    }


def copy_bandwidth(mb: int, runs: int = 5) -> dict:
    """Measured copy: `y = x + 1` over an `mb` MB float32 array; bytes read + written / time
    (median of `runs` after a warm-up)."""
    import jax
    import jax.numpy as jnp

    n = mb * 1_000_000 // 4
    x = jnp.zeros((n,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))
    secs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        secs.append(time.perf_counter() - t0)
    s = float(np.median(secs))
    return {"mb": mb, "seconds": s, "gbps": 2 * n * 4 / s / 1e9}


def peak_memory() -> dict:
    """Peak memory so far: the device allocator's peak where JAX reports one (GPU), else the
    process's resident-set high-water mark (CPU: includes the mmap'd file pages touched)."""
    import jax

    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {
            "bytes": int(stats["peak_bytes_in_use"]),
            "source": "device peak_bytes_in_use",
            "device_limit_bytes": int(stats.get("bytes_limit", 0)),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"bytes": int(rss * scale), "source": "process RSS high-water mark"}


def cpu_snapshot() -> dict | None:
    """Host CPU seconds (busy, total, from /proc/stat) and this process's own CPU seconds;
    None where /proc/stat does not exist (not Linux)."""
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    t = os.times()
    return {"busy": busy / hz, "total": (busy + idle + iowait) / hz, "self": t.user + t.system}


def others_cpu_share(start: dict | None, end: dict | None) -> float | None:
    """Fraction of the host's CPU time that other processes used between two snapshots."""
    if not start or not end or end["total"] <= start["total"]:
        return None
    others = (end["busy"] - start["busy"]) - (end["self"] - start["self"])
    return max(0.0, others) / (end["total"] - start["total"])


def cpu_name() -> str:
    """The host processor's model name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """Name of the device that runs the model (the seed's "GPU" row) and its platform."""
    import jax

    dev = jax.devices()[0]
    kind = str(getattr(dev, "device_kind", dev.platform))
    if dev.platform == "cpu":
        name = f"CPU {cpu_name()} ({os.cpu_count()} cores)"
    else:
        name = kind
    return {"name": name, "platform": dev.platform, "kind": kind, "count": jax.device_count()}
