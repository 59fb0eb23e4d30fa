"""Fuzzing the GGUF reader: mutated small rwkv7 files end in a clean GGUFError or a correct load.

A seeded mutator (no hypothesis: every case is reproducible from its index) truncates, flips
bits, overwrites the header's counts, lengths, value types, dims, ggml types and offsets with
extreme values, splices and duplicates names. The cases run in a worker subprocess with an
address-space limit (a memory blow-up becomes a MemoryError, i.e. a failure) and a per-case
alarm (a hang becomes a failure); a crash of the worker fails the test with the last case
number. A load that succeeds must agree with gguf-py's own reader on the same bytes.

    python tests/test_fuzz_gguf.py --cases 20000 --seed 7    # run the worker by hand
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

import gguf
import numpy as np
import pytest

from rwkv_jax.errors import GGUFError

T = gguf.GGMLQuantizationType

# The small model: C = 64 (one head), one layer, 300 tokens — 150 kB, each case opens in ms.
C, F, V, RANK = 64, 256, 300, 32
N_CASES = 3000  # default suite (~30 s on 2 cores); `slow` runs SLOW_CASES
SLOW_CASES = 40000
CASE_SECONDS = 5.0  # per-case alarm; a clean open takes a few ms, the bound only catches hangs
ADDRESS_SPACE_HEADROOM = 1 << 30  # the worker may grow by 1 GiB at most (files are 150 kB)


def _types() -> dict[str, int]:
    """A mix of every float type and two block formats, so size checks see several block sizes."""
    from rwkv_jax.gguf import GLOBAL_TENSORS, LAYER_TENSORS

    out: dict[str, int] = {}
    mats = [s for s in (*GLOBAL_TENSORS, *LAYER_TENSORS) if s.kind == "mat"]
    cycle = (T.Q8_0, T.F16, T.BF16, T.Q4_0, T.F32)
    for i, spec in enumerate(mats):
        out[spec.gguf_name] = cycle[i % len(cycle)]
    for spec in (*GLOBAL_TENSORS, *LAYER_TENSORS):
        out.setdefault(spec.gguf_name, T.F32 if spec.gguf_name != "time_mix_ln.weight" else T.BF16)
    return out


def vocab() -> tuple[list[str], list[int]]:
    """300 World-style token strings: <s>, every single byte (escaped), and some words."""
    from rwkv_jax.tokenizer import escape_token

    words = [w.encode() for w in ("the", " the", "ing", "\n\n", "café", "🦀", "ab", " a")]
    tokens = ["<s>"] + [escape_token(bytes([b])) for b in range(256)]
    tokens += [escape_token(w) for w in words]
    tokens += [f"[T{i}]" for i in range(len(tokens), V)]
    types = [int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.NORMAL)] * (V - 1)
    return tokens, types


def write_small_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layer: int = 1,
    extra_metadata: bool = True,
    types: dict[str, int] | None = None,
    n_tokens: int = V,
) -> str:
    """A valid rwkv7 GGUF with C=64, `n_layer` layers and a 300-token vocabulary.

    types: ggml type per GGUF name suffix (e.g. {"time_mix_key.weight": T.IQ4_NL}); types
    gguf-py cannot quantize get random bytes. n_tokens: length of the token arrays.
    """
    from rwkv_jax.gguf import GLOBAL_TENSORS, KEY, LAYER_TENSORS

    rng = np.random.default_rng(seed)
    dims = {"C": C, "V": V, "F": F, "Dw": RANK, "Da": RANK, "Dv": RANK, "Dg": RANK, "1": 1, "6": 6}
    qtypes = {**_types(), **(types or {})}
    w = gguf.GGUFWriter(os.fspath(path), "rwkv7")
    w.add_name("fuzz-base")
    w.add_uint32(KEY["context_length"], 1048576)
    w.add_uint32(KEY["n_embd"], C)
    w.add_uint32(KEY["n_layer"], n_layer)
    w.add_float32(KEY["eps"], 1e-5)
    w.add_uint32(KEY["head_size"], 64)
    for k in ("rank_w", "rank_a", "rank_v", "rank_g"):
        w.add_uint32(KEY[k], RANK)
    w.add_uint32(KEY["ffn"], F)
    w.add_uint32(KEY["head_count"], 0)
    w.add_file_type(7)
    tokens, token_types = vocab()
    tokens = (tokens + [f"[X{i}]" for i in range(V, n_tokens)])[:n_tokens]
    token_types = (token_types + [1] * n_tokens)[:n_tokens]
    w.add_tokenizer_model("rwkv")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_eot_token_id(261)
    if extra_metadata:  # every value type, so mutations reach every parser branch
        w.add_bool("fuzz.bool", True)
        w.add_float64("fuzz.f64", 0.25)
        w.add_int64("fuzz.i64", -3)
        w.add_int8("fuzz.i8", -1)
        w.add_uint16("fuzz.u16", 7)
        w.add_array("fuzz.nested", [[1, 2], [3]])
        w.add_array("fuzz.floats", [0.5, -1.5, 2.0])
        w.add_chat_template("{{ messages }}")
    specs = [(s.gguf_name, s) for s in GLOBAL_TENSORS]
    specs += [(f"blk.{i}.{s.gguf_name}", s) for i in range(n_layer) for s in LAYER_TENSORS]
    for name, spec in specs:
        ne = tuple(dims[d] for d in spec.ne)
        x = rng.standard_normal(ne[::-1]).astype(np.float32) * 0.1
        qtype = T(qtypes[spec.gguf_name])
        if qtype == T.F32:
            w.add_tensor(name, x)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            try:
                raw = gguf.quants.quantize(x, qtype)
            except NotImplementedError:  # e.g. IQ4_NL: the bytes only need the right size
                blk, size = gguf.GGML_QUANT_SIZES[qtype]
                raw = rng.integers(0, 256, (*ne[:0:-1], ne[0] // blk * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


# ---- the mutator ------------------------------------------------------------------------------


def slots(path: str) -> tuple[list[tuple[int, int, str]], int]:
    """Numeric header fields (offset, size, label) of a valid file, and where its data starts."""
    r = gguf.GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    out: list[tuple[int, int, str]] = []

    def add(part: np.ndarray, label: str) -> None:
        off = part.__array_interface__["data"][0] - base
        if part.dtype == np.uint8 and part.size != 1:
            out.append((off, part.nbytes, label + ":bytes"))
        else:
            for i in range(part.size):
                out.append((off + i * part.itemsize, part.itemsize, f"{label}[{i}]"))

    for name, field in r.fields.items():
        for j, part in enumerate(field.parts[:40]):  # a long array: its first elements suffice
            add(part, f"kv:{name}:{j}")
    for t in r.tensors:
        for j, part in enumerate(t.field.parts):
            add(part, f"ti:{t.name}:{j}")
    return out, int(r.data_offset)


EXTREME_U64 = (0, 1, 2, 255, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 60, 1 << 63, (1 << 64) - 1)
EXTREME_U32 = (0, 1, 2, 3, 4, 8, 9, 10, 12, 13, 39, 99, 0x7FFFFFFF, 0xFFFFFFFF)


def mutate(data: bytes, slot_list, data_start: int, rng: np.random.Generator) -> tuple[bytes, str]:
    """One to three random mutations of `data`; returns the bytes and a description."""
    buf = bytearray(data)
    desc = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["truncate", "bitflip", "slot", "bytes", "dup", "shift"])
        in_header = rng.random() < 0.85
        hi = data_start if in_header else len(buf)
        if kind == "truncate":
            cut = int(rng.integers(0, min(len(buf), hi + 64)))
            del buf[cut:]
            desc.append(f"truncate@{cut}")
        elif kind == "bitflip" and buf:
            for _ in range(int(rng.integers(1, 9))):
                pos = int(rng.integers(0, min(hi, len(buf))))
                buf[pos] ^= 1 << int(rng.integers(0, 8))
            desc.append("bitflip")
        elif kind == "slot":
            off, size, label = slot_list[int(rng.integers(0, len(slot_list)))]
            if off + size > len(buf):
                continue
            old = int.from_bytes(buf[off : off + min(size, 8)], "little")
            if size == 8:
                v = int(rng.choice([*EXTREME_U64, old + 1, old - 1, old * 2, len(data), -1]))
            elif size == 4:
                v = int(rng.choice([*EXTREME_U32, old + 1, old - 1, old ^ 0x80000000]))
            elif size in (1, 2):
                v = int(rng.integers(0, 1 << (8 * size)))
            else:  # string bytes: invalid UTF-8, or another name's bytes
                pos = off + int(rng.integers(0, size))
                buf[pos] = int(rng.choice([0xFF, 0xC3, 0x00, 0x2E, buf[pos] ^ 1]))
                desc.append(f"str:{label}")
                continue
            buf[off : off + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
            desc.append(f"{label}={v}")
        elif kind == "bytes":
            pos = int(rng.integers(0, max(1, min(hi, len(buf)))))
            n = int(rng.integers(1, 17))
            fill = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            buf[pos : pos + n] = fill if rng.random() < 0.5 else b"\xff" * n
            desc.append(f"bytes@{pos}+{n}")
        elif kind == "dup":
            # copy one header field's bytes over another of the same size (duplicate names,
            # equal offsets = overlapping tensors, repeated keys)
            a, b = (slot_list[int(i)] for i in rng.integers(0, len(slot_list), 2))
            if a[1] == b[1] and max(a[0], b[0]) + a[1] <= len(buf):
                buf[b[0] : b[0] + b[1]] = buf[a[0] : a[0] + a[1]]
                desc.append(f"dup:{a[2]}->{b[2]}")
        elif kind == "shift":
            pos = int(rng.integers(0, max(1, min(hi, len(buf)))))
            n = int(rng.integers(1, 9))
            if rng.random() < 0.5:
                del buf[pos : pos + n]
                desc.append(f"delete@{pos}+{n}")
            else:
                buf[pos:pos] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                desc.append(f"insert@{pos}+{n}")
    return bytes(buf), ",".join(desc)


# ---- one case ---------------------------------------------------------------------------------


def open_model(path: str):
    """What `rwkv_jax.load` does before uploading weights: validate, configure, tokenizer."""
    from rwkv_jax.gguf import GGUFFile
    from rwkv_jax.tokenizer import Tokenizer

    f = GGUFFile(path)
    tokens = f.metadata.get("tokenizer.ggml.tokens") or []
    try:
        Tokenizer.from_gguf(tokens, f.metadata.get("tokenizer.ggml.token_type"))
    except Exception as exc:  # the tokenizer's messages do not carry the path: add it
        exc.args = (f"{path}: {exc}",)
        raise
    return f


def agrees_with_gguf_py(f, path: str) -> str | None:
    """None when gguf-py's plain reader sees the same metadata and tensors; else what differs."""
    r = gguf.GGUFReader(path)
    meta = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    if repr(meta) != repr(f.metadata):  # repr: a NaN value equals itself
        return "metadata differs from gguf-py's"
    if len(r.tensors) != len(f.tensors):
        return "tensor count differs"
    for t in r.tensors:
        mine = f.tensors.get(t.name)
        if mine is None or mine.ggml_type != int(t.tensor_type):
            return f"tensor {t.name} is missing or has another type"
        if mine.ne != tuple(int(x) for x in t.shape) or mine.n_bytes != int(t.n_bytes):
            return f"tensor {t.name} has other dims or size"
        offset = mine.data.ctypes.data - f._reader.data.ctypes.data
        theirs = np.asarray(t.data).reshape(-1).view(np.uint8)
        if offset != int(t.data_offset) or not np.array_equal(mine.data, theirs):
            return f"tensor {t.name} has other data"
    return None


class _CaseTimeout(Exception):
    """Raised by the per-case alarm."""


def _alarm(signum, frame):
    raise _CaseTimeout()


def run_cases(base_path: str, n_cases: int, seed: int, workdir: str) -> dict:
    """Run n_cases mutations of base_path; a summary dict (failures listed, counts by outcome)."""
    from rwkv_jax.errors import GGUFError

    data = open(base_path, "rb").read()
    slot_list, data_start = slots(base_path)
    path = os.path.join(workdir, "case.gguf")
    signal.signal(signal.SIGALRM, _alarm)
    outcomes: dict[str, int] = {}
    failures: list[dict] = []
    max_s, t_all = 0.0, time.perf_counter()
    for i in range(n_cases):
        mutated, desc = mutate(data, slot_list, data_start, np.random.default_rng([seed, i]))
        if os.path.exists(path):  # a new inode: a mapping still alive never sees a shorter file
            os.unlink(path)
        with open(path, "wb") as fh:
            fh.write(mutated)
        print(f"case {i}: {desc}", file=sys.stderr, flush=True)  # last line names a crash
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            f = open_model(path)
            problem = agrees_with_gguf_py(f, path)
            outcome = "load" if problem is None else "wrong-load"
            f.close()
        except GGUFError as exc:
            msg = str(exc)
            outcome = "error" if msg and "\n" not in msg and path in msg else "bad-message"
            problem = None if outcome == "error" else f"message not one line with path: {msg!r}"
        except _CaseTimeout:
            outcome, problem = "timeout", f"no answer within {CASE_SECONDS} s"
        except BaseException as exc:  # MemoryError under the address-space limit included
            outcome = "crash"
            problem = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:500]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t0
        max_s = max(max_s, dt)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if problem is not None and len(failures) < 20:
            failures.append({"case": i, "mutation": desc, "outcome": outcome, "problem": problem})
    return {
        "cases": n_cases,
        "outcomes": outcomes,
        "failures": failures,
        "max_case_s": round(max_s, 4),
        "total_s": round(time.perf_counter() - t_all, 2),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def _limit_address_space() -> None:
    """Cap the worker's address space at what it uses now plus ADDRESS_SPACE_HEADROOM."""
    with open("/proc/self/status") as fh:
        vm_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
    cap = vm_kb * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _worker(argv: list[str]) -> None:
    """Entry point of the worker process: write the base file, run the cases, print JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=N_CASES)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import rwkv_jax.gguf  # noqa: F401  (import everything before the memory cap)
    import rwkv_jax.quant  # noqa: F401
    import rwkv_jax.tokenizer  # noqa: F401

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as d:
        base = write_small_model(os.path.join(d, "base.gguf"))
        open_model(base)  # the unmutated file must load
        if sys.platform == "linux":
            _limit_address_space()
        summary = run_cases(base, args.cases, args.seed, d)
    print(json.dumps(summary))


def _run_worker(n_cases: int, seed: int, timeout: float) -> dict:
    """Run the worker in a subprocess; fail with its last case on a crash."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--cases", str(n_cases), "--seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"},
    )
    last = proc.stderr.strip().splitlines()[-3:]
    assert proc.returncode == 0, f"worker died (rc {proc.returncode}); last lines: {last}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(summary: dict, n_cases: int) -> None:
    """Every case ended in a clean error or a correct load; both outcomes actually occurred."""
    print(json.dumps(summary, indent=1))
    out = summary["outcomes"]
    assert summary["cases"] == n_cases
    assert not summary["failures"], summary["failures"]
    assert set(out) <= {"error", "load"}, out
    # the mutator must exercise both sides: some files still load, most are rejected
    assert out.get("load", 0) >= n_cases // 50 and out.get("error", 0) >= n_cases // 2, out
    assert summary["max_case_s"] < CASE_SECONDS


def test_fuzz_default():
    """3000 mutated files in a memory-capped worker: clean GGUFError or a correct load."""
    _check(_run_worker(N_CASES, seed=0, timeout=600), N_CASES)


@pytest.mark.slow
def test_fuzz_many():
    """More cases, another seed."""
    n = int(os.environ.get("RWKV_JAX_FUZZ_CASES", SLOW_CASES))
    _check(_run_worker(n, seed=1, timeout=3600), n)


def test_mutator_is_deterministic(tmp_path):
    """A case index always yields the same bytes, so any failure is reproducible."""
    base = write_small_model(tmp_path / "b.gguf")
    data = open(base, "rb").read()
    sl, start = slots(base)
    a = mutate(data, sl, start, np.random.default_rng([0, 17]))
    b = mutate(data, sl, start, np.random.default_rng([0, 17]))
    assert a == b and a[0] != data


# ---- GGUFFile's fast path agrees with the checked reader ---------------------------------------

FAST_CASES = 1000  # mutated files opened both ways (~4 s on 2 cores)


def _opened(path: str, fast: bool, monkeypatch) -> tuple[str, object]:
    """('load', what GGUFFile read) or ('error', exception type and message), one path forced."""
    import rwkv_jax.gguf as g

    monkeypatch.setattr(g, "_FAST", fast)
    try:
        f = g.GGUFFile(path)
    except g.GGUFError as exc:
        return "error", (type(exc), str(exc))
    base = f._reader.data.ctypes.data
    tensors = [
        (t.name, t.ggml_type, t.ne, t.data.ctypes.data - base, t.data.shape, t.data.dtype)
        for t in f.tensors.values()
    ]
    used_fast = isinstance(f._reader, g._Mapped)
    # repr: a NaN equals itself, and 1 vs 1.0 vs True differ
    return "load", (repr(f.metadata), tensors, f.config, used_fast)


def test_fast_path_equals_checked_reader_on_mutated_files(tmp_path, monkeypatch):
    """Mutated small models: the fast path loads exactly what the checked reader loads, and
    every file the checked reader rejects is rejected with the very same message."""
    base = write_small_model(tmp_path / "base.gguf")
    data = open(base, "rb").read()
    slot_list, data_start = slots(base)
    path = str(tmp_path / "case.gguf")
    counts = {"load": 0, "error": 0}
    for i in range(FAST_CASES):
        mutated, desc = mutate(data, slot_list, data_start, np.random.default_rng([5, i]))
        if os.path.exists(path):  # a new inode: an old mapping never sees a shorter file
            os.unlink(path)
        with open(path, "wb") as fh:
            fh.write(mutated)
        fast = _opened(path, True, monkeypatch)
        checked = _opened(path, False, monkeypatch)
        if fast[0] == "load":
            assert fast[1][3], f"case {i} ({desc}): a valid file left the fast path"
            assert not checked[1][3]
            fast, checked = (fast[0], fast[1][:3]), (checked[0], checked[1][:3])
        assert fast == checked, f"case {i} ({desc})"
        counts[fast[0]] += 1
    assert counts["load"] >= FAST_CASES // 50 and counts["error"] >= FAST_CASES // 2, counts


def _s(text: str | bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(8, "little") + raw


def _array(itype: int, items: list[bytes], n: int | None = None) -> bytes:
    """A GGUF array value (without its own type id): element type, count (n, else the number of
    items), packed elements."""
    n = len(items) if n is None else n
    return itype.to_bytes(4, "little") + n.to_bytes(8, "little") + b"".join(items)


def _raw_gguf(path, kvs: list[tuple[str, int, bytes]]) -> str:
    """A GGUF v3 file without tensors holding kvs (key, value type, value bytes) as given."""
    out = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
    out += len(kvs).to_bytes(8, "little")
    for key, vtype, value in kvs:
        out += _s(key) + vtype.to_bytes(4, "little") + value
    with open(path, "wb") as fh:
        fh.write(out)
    return os.fspath(path)


def _gguf_py_metadata(path: str) -> dict:
    """Metadata as gguf-py's own reader gives it (ReaderField.contents())."""
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_fast_path_values_equal_gguf_py_on_crafted_arrays(tmp_path):
    """Every value type, empty arrays and strings, multi-byte UTF-8, and nested arrays whose
    elements differ in type (gguf-py flattens them and reads all by the first one's type)."""
    from rwkv_jax.gguf import _read_fast

    V = gguf.GGUFValueType
    u32 = [i.to_bytes(4, "little") for i in (7, 8)]
    strs_ab, strs_a, strs_bc, strs_none = (
        _array(V.STRING, [_s(x) for x in t]) for t in (["ab"], ["a"], ["bc"], [])
    )
    kvs = [
        ("x.u8", V.UINT8, b"\xff"),
        ("GGUF.extra", V.UINT8, b"\x01"),  # a key in gguf-py's own namespace: not metadata
        ("x.i8", V.INT8, b"\xff"),
        ("x.u16", V.UINT16, b"\x01\x02"),
        ("x.i16", V.INT16, b"\xfe\xff"),
        ("x.i32", V.INT32, b"\xff\xff\xff\xff"),
        ("x.f32", V.FLOAT32, np.float32(0.1).tobytes()),
        ("x.nan", V.FLOAT32, b"\x01\x00\xc0\xff"),  # a NaN with a payload and the sign set
        ("x.bool2", V.BOOL, b"\x02"),  # not 0/1: numpy's view still says True
        ("x.u64", V.UINT64, (2**64 - 1).to_bytes(8, "little")),
        ("x.i64", V.INT64, (2**64 - 3).to_bytes(8, "little")),
        ("x.f64", V.FLOAT64, np.float64(-0.0).tobytes()),
        ("x.empty_str", V.STRING, _s("")),
        ("x.utf8", V.STRING, _s("café 🦀")),
        ("x.no_items", V.ARRAY, _array(V.STRING, [])),
        ("x.no_ints", V.ARRAY, _array(V.INT32, [])),
        ("x.strings", V.ARRAY, _array(V.STRING, [_s(""), _s("a"), _s("\\xff"), _s("é")])),
        ("x.bools", V.ARRAY, _array(V.BOOL, [b"\x00", b"\x01", b"\x05"])),
        ("x.f32s", V.ARRAY, _array(V.FLOAT32, [np.float32(x).tobytes() for x in (0.5, -2)])),
        ("x.nested", V.ARRAY, _array(V.ARRAY, [_array(V.UINT32, u32), _array(V.UINT32, [])])),
        ("x.first_empty", V.ARRAY, _array(V.ARRAY, [strs_none, strs_ab])),
        ("x.str_then_int", V.ARRAY, _array(V.ARRAY, [strs_a, _array(V.UINT32, u32)])),
        ("x.int_then_str", V.ARRAY, _array(V.ARRAY, [_array(V.UINT32, u32), strs_bc])),
        ("x.no_arrays", V.ARRAY, _array(V.ARRAY, [])),
        ("x.deep", V.ARRAY, _array(V.ARRAY, [_array(V.ARRAY, [_array(V.INT8, [b"\x01"])])])),
    ]  # fmt: skip
    path = _raw_gguf(tmp_path / "values.gguf", kvs)
    fast = _read_fast(path)
    assert fast is not None
    assert repr(fast[1]) == repr(_gguf_py_metadata(path))
    assert fast[2] == {}


@pytest.mark.parametrize(
    "kvs",
    [
        # an array of strings cut in the middle of its last string
        [("x.tokens", 9, _array(8, [_s("ab"), _s("cd")])[:-1])],
        # ... and in the middle of a length
        [("x.tokens", 9, _array(8, [_s("ab"), _s("cd")])[:-5])],
        # a string length far past the end, and one over the 16 MiB limit (with bytes to spare)
        [("x.tokens", 9, _array(8, [_s("ab"), (1 << 62).to_bytes(8, "little")]))],
        [("x.s", 8, ((1 << 24) + 1).to_bytes(8, "little") + bytes(40))],
        # more elements declared than bytes follow, and more than the per-array limit
        [("x.tokens", 9, (8).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little"))],
        [("x.ints", 9, (0).to_bytes(4, "little") + ((1 << 20) + 1).to_bytes(8, "little"))],
        # invalid UTF-8 in an element, a repeated key, an unknown element type, too deep
        [("x.tokens", 9, _array(8, [_s(b"\xc3")]))],
        [("x.a", 4, bytes(4)), ("x.a", 4, bytes(4))],
        [("GGUF.kv_count", 4, bytes(4))],  # gguf-py's own field: a repeat too
        [("x.a", 9, (13).to_bytes(4, "little") + bytes(8))],
        [("x.d", 9, _array(9, [_array(9, [_array(9, [_array(0, [b"\x01"])])])]))],
        # general.alignment of the wrong type, or not a power of two
        [("general.alignment", 10, (64).to_bytes(8, "little"))],
        [("general.alignment", 4, (48).to_bytes(4, "little"))],
        # (built when run: 16 MiB) a vocabulary entry over the limit that the file holds
        lambda: [("x.tokens", 9, _array(8, [_s(bytes((1 << 24) + 1))]))],
    ],
    ids=[
        "cut-string", "cut-length", "length-past-end", "string-too-long", "count-past-end",
        "count-over-limit", "bad-utf8", "repeated-key", "gguf-py-key", "unknown-type", "too-deep",
        "alignment-type", "alignment-value", "vocab-string-too-long",
    ],
)  # fmt: skip
def test_fast_path_leaves_bad_headers_to_the_checked_reader(tmp_path, monkeypatch, kvs):
    """The fast path declines every malformed header; GGUFFile then raises the checked reader's
    own message (the same as with the fast path switched off)."""
    from rwkv_jax.gguf import GGUFFile, _read_fast

    path = _raw_gguf(tmp_path / "bad.gguf", kvs() if callable(kvs) else kvs)
    assert _read_fast(path) is None
    messages = []
    for fast in (True, False):
        monkeypatch.setattr("rwkv_jax.gguf._FAST", fast)
        with pytest.raises(GGUFError) as info:
            GGUFFile(path)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and path in messages[0]
    # a header fault, not the later "not an rwkv7 model" check
    assert "general.architecture" not in messages[0], messages[0]


def test_fast_path_counts_elements_of_all_arrays(tmp_path, monkeypatch):
    """The limit on array elements of the whole file, counted as the checked reader counts them
    (nested ones included); lowered here so the files stay small."""
    import rwkv_jax.gguf as g

    monkeypatch.setattr(g, "MAX_ARRAY_TOTAL", 10)
    nested = _array(9, [_array(0, [b"\x01"] * 3), _array(0, [b"\x02"] * 2)])  # 2 + 3 + 2 = 7
    ok = _raw_gguf(tmp_path / "ok.gguf", [("x.n", 9, nested), ("x.b", 9, _array(0, [b"\x03"] * 3))])
    assert g._read_fast(ok)[1] == {"x.n": [1, 1, 1, 2, 2], "x.b": [3, 3, 3]}
    over = _raw_gguf(
        tmp_path / "over.gguf", [("x.n", 9, nested), ("x.b", 9, _array(0, [b"\x03"] * 4))]
    )
    assert g._read_fast(over) is None
    with pytest.raises(GGUFError, match="at most 1048576 per array and 10 in all"):
        g.GGUFFile(over)


def test_fast_string_loop_refuses_what_it_cannot_prove():
    """The vocabulary loop on its own: a cut last string or length, an entry over the limit."""
    from rwkv_jax.gguf import MAX_STRING_BYTES, _FastHeader, _Unsure

    two = _s("é") + _s("cd")
    assert _FastHeader(two)._strings(0, 2) == (["é", "cd"], len(two))
    for buf in (two[:-1], two[:-4], _s(bytes(MAX_STRING_BYTES + 1))):
        with pytest.raises((_Unsure, struct.error)):
            _FastHeader(buf)._strings(0, 2 if len(buf) < 100 else 1)


def test_fast_path_takes_a_valid_model_and_refuses_a_cut_vocabulary(tmp_path):
    """The small model loads through the fast path; cut inside its vocabulary it is refused
    with the checked reader's message naming the string or array."""
    from rwkv_jax.gguf import GGUFFile, _Mapped

    path = write_small_model(tmp_path / "m.gguf")
    assert isinstance(GGUFFile(path)._reader, _Mapped)
    table = {label: (off, size) for off, size, label in slots(path)[0]}
    cut_at = table["kv:tokenizer.ggml.tokens:29[0]"][0] + 3  # inside the 13th string's length
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:cut_at])
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.tokens'.*(truncated|past the end)"):
        GGUFFile(cut)


if __name__ == "__main__":
    _worker(sys.argv[1:])
