"""Dense float32 copies of a GGUF file's tensors and scalar metadata, via gguf-py only."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np


@functools.lru_cache(maxsize=1)
def _read_cached(path: str, mtime_ns: int, size: int) -> tuple[dict[str, np.ndarray], dict]:
    """Parse and dequantize one file (keyed by file identity so rewrites are seen)."""
    # GGUFReader parses the whole header, including the 65536-string vocabulary (~2 s), so
    # both oracles share this one read of the last file
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        dense = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 for every type
        # ne[0] is the contiguous axis, so the numpy (row-major) shape is ne reversed
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # np.array copies: the result must outlive the reader's mmap
        arr = np.array(dense, dtype=np.float32).reshape(shape)
        arr.flags.writeable = False  # shared by the cache: callers copy before changing
        tensors[t.name] = arr
    # array-valued keys (the vocabulary) are skipped: the oracles only need numbers
    metadata = {
        name: field.contents()
        for name, field in reader.fields.items()
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    return tensors, metadata


def read_gguf(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read-only float32 tensors (numpy shape = reversed GGUF ne) and scalar metadata."""
    st = os.stat(path)
    return _read_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
