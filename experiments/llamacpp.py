"""llama.cpp (through llama-cpp-python's low-level API) driven by the same protocols.

Used by `compare: llama.cpp`. The calls mirror llama-bench: one context with n_batch 2048 /
n_ubatch 512, every layer offloaded when the build has a GPU backend, threads = os.cpu_count();
a prompt is fed as llama_decode calls of at most n_batch tokens; a fresh state is
`llama_memory_clear`. The load timer covers `llama_model_load_from_file` +
`llama_init_from_model` (llama.cpp parses the header inside the first; it maps the file with
mmap, so pages fault in on first use, as llama.cpp always runs).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import time
from collections.abc import Sequence

import numpy as np

from rwkv_jax.errors import RwkvJaxError

N_BATCH = 2048  # llama-bench defaults
N_UBATCH = 512
N_CTX = 16384  # positions of one sequence over a whole protocol (recurrent state: no KV cost)


def available() -> bool:
    """True when llama-cpp-python is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    """llama-cpp-python's version."""
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "unknown"))


def gpu_offload() -> bool:
    """True when this llama.cpp build can run layers on a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


_QUIET = None  # keeps the no-op log callback alive for the process


def _silence(lc) -> None:
    """Send llama.cpp's log lines nowhere (they would interleave with the bench's output)."""
    global _QUIET
    if _QUIET is None:
        _QUIET = lc.llama_log_callback(lambda level, text, user: None)
        lc.llama_log_set(_QUIET, ctypes.c_void_p(0))


class LlamaCppEngine:
    """One llama.cpp model + context and its single sequence's recurrent state."""

    name = "llama.cpp"

    def __init__(self, path: str, n_threads: int | None = None):
        import llama_cpp as lc

        self.lc = lc
        _silence(lc)
        lc.llama_backend_init()
        self.path = path
        self.n_threads = n_threads or os.cpu_count() or 1
        self.model = None
        self.ctx = None
        self.load_once()
        vocab = lc.llama_model_get_vocab(self.model)
        self.vocab_size = int(lc.llama_vocab_n_tokens(vocab))

    def info(self) -> dict:
        """How llama.cpp was run."""
        sysinfo = self.lc.llama_print_system_info()
        return {
            "threads": self.n_threads,
            "n_batch": N_BATCH,
            "n_ubatch": N_UBATCH,
            "gpu_offload": bool(self.lc.llama_supports_gpu_offload()),
            "system_info": sysinfo.decode(errors="replace") if isinstance(sysinfo, bytes) else "",
        }

    # ---- loading -----------------------------------------------------------------------------

    def _free(self) -> None:
        """Free the context and model, if any."""
        if self.ctx is not None:
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self.lc.llama_model_free(self.model)
            self.model = None

    def load_once(self) -> float:
        """Load the model and create a context; seconds."""
        lc = self.lc
        self._free()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 999  # all layers on the GPU when there is one (ignored on CPU builds)
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = N_CTX, N_BATCH, N_UBATCH
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.n_seq_max = 1
        cp.no_perf = True
        t0 = time.perf_counter()
        self.model = lc.llama_model_load_from_file(os.fsencode(self.path), mp)
        if not self.model:
            raise RwkvJaxError(f"llama.cpp could not load {self.path}")
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RwkvJaxError(f"llama.cpp could not create a context for {self.path}")
        return time.perf_counter() - t0

    # ---- calls -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Clear the recurrent state (llama_memory_clear)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def _decode(self, tokens: Sequence[int]) -> None:
        """llama_decode over tokens in batches of at most N_BATCH (last-token logits kept)."""
        for s in range(0, len(tokens), N_BATCH):
            piece = tokens[s : s + N_BATCH]
            arr = (self.lc.llama_token * len(piece))(*piece)
            rc = self.lc.llama_decode(self.ctx, self.lc.llama_batch_get_one(arr, len(piece)))
            if rc != 0:
                raise RwkvJaxError(f"llama_decode failed with code {rc}")

    def _logits(self) -> np.ndarray:
        """The last token's logits (a view; copy before the next decode)."""
        ptr = self.lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))

    def feed(self, tokens: Sequence[int], read: bool) -> np.ndarray | None:
        """One call continuing the state; the last logits copied to numpy when asked."""
        self._decode(tokens)
        return self._logits().copy() if read else None

    def step(self, token: int) -> np.ndarray:
        """One token; its logits."""
        self._decode([token])
        return self._logits().copy()

    def pp(self, tokens: Sequence[int]) -> float:
        """Seconds for one prompt from a cleared state, up to the last logits."""
        self.reset()
        t0 = time.perf_counter()
        self._decode(tokens)
        self._logits().copy()
        return time.perf_counter() - t0

    def tg(self, first: Sequence[int], n: int) -> float:
        """Seconds for n greedy steps (first maximum) from a cleared state; one stream only."""
        if len(first) != 1:
            raise RwkvJaxError("the llama.cpp comparison runs one stream only")
        self.reset()
        tok = int(first[0])
        t0 = time.perf_counter()
        for _ in range(n):
            self._decode([tok])
            tok = int(np.argmax(self._logits()))
        return time.perf_counter() - t0

    def close(self) -> None:
        """Free llama.cpp's model and context."""
        self._free()
