"""experiments.bench: the seed's RNG and hash, the strict config, the markdown log, a smoke run.

tests/data/BENCHMARKS-seed.md is the seed project's log verbatim (shared/seed/); the markdown
tests re-render every entry in it and replay its history, so the output format is pinned to the
seed byte for byte.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest

from experiments import bench, llamacpp, report
from experiments import config as cfgmod
from experiments.seed_protocol import (
    WyRand,
    draw_tokens,
    quality_hash,
    seed_argmax,
    token_bound,
)
from rwkv_jax.errors import ConfigError, InputError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SEED_LOG = os.path.join(HERE, "data", "BENCHMARKS-seed.md")
DEFAULT = os.path.join(REPO, "configs", "default.yaml")


# ---- the seed's RNG and hash -----------------------------------------------------------------


def test_wyrand_token_vectors():
    """The vectors of bench-protocol.md §1 (fastrand 2.3 `u16(0..65535)`, vocab 65536)."""
    assert draw_tokens(WyRand(12345), 16, 65536) == [
        40654, 35531, 59942, 24899, 45423, 44925, 31306, 12725,
        18380, 52006, 42149, 3034, 52011, 56320, 36046, 46463,
    ]  # fmt: skip
    assert draw_tokens(WyRand(42), 4, 65536) == [30359, 21000, 47799, 29478]


def test_wyrand_is_wyrand():
    """gen_u64 is the WyRand step (checked against the formula with explicit 128-bit math)."""
    rng, s = WyRand(7), 7
    for _ in range(5):
        s = (s + 0x2D358DCCAA6C78A5) % 2**64
        t = s * (s ^ 0x8BB84B93962EACC9)
        assert rng.gen_u64() == (t % 2**64) ^ (t // 2**64)
    assert WyRand(7).gen_u32() == WyRand(7).gen_u64() % 2**32


def test_gen_mod_u32_rejects_low_products():
    """Lemire's rejection: a draw whose low product word is below 2^32 mod n is redrawn."""
    n = 3_000_000_000  # t = 2^32 mod n = 1294967296: about 30% of draws are rejected
    t = 2**32 % n
    for seed in range(200):
        probe = WyRand(seed)
        r1, r2 = probe.gen_u32(), probe.gen_u32()
        if (r1 * n) % 2**32 < t and (r2 * n) % 2**32 >= t:
            assert WyRand(seed).gen_mod_u32(n) == (r2 * n) >> 32  # first rejected, second kept
            break
    else:
        pytest.fail("no seed below 200 rejects its first draw")
    # accepted draws return the high word of r * n
    rng = WyRand(1)
    r = WyRand(1).gen_u32()
    if (r * n) % 2**32 >= t:
        assert rng.gen_mod_u32(n) == (r * n) >> 32


def test_u16_ranges():
    """The full u16 range is `gen_u32() as u16`; an empty range is refused; the seed's bound."""
    assert WyRand(9).u16(0, 65536) == WyRand(9).gen_u32() & 0xFFFF
    assert WyRand(9).u16(10, 11) == 10
    with pytest.raises(ValueError):
        WyRand(9).u16(5, 5)
    assert token_bound(65536) == 65535
    assert token_bound(65600) == 63  # `(65600 - 1) as u16` wraps, as in Rust
    toks = draw_tokens(WyRand(3), 2000, 300)
    assert min(toks) >= 0 and max(toks) < 299


def test_quality_hash_fold():
    """The seed's documented tokens fold to its documented hash; {:x} has no zero padding."""
    assert quality_hash([33, 3319, 153, 129] * 8) == "3895ad4add71cff0"
    assert quality_hash([]) == "0"
    assert quality_hash([1, 2]) == "21"  # 1 * 31 + 2 = 33 = 0x21
    assert quality_hash([65535] * 40) == format(
        sum(65535 * 31**i for i in range(40)) % 2**64, "x"
    )  # wrapping u64


def test_seed_argmax_takes_the_last_maximum():
    """Rust's max_by keeps the last of equal maxima, over float32 softmax probabilities."""
    assert seed_argmax(np.array([1.0, 3.0, 2.0, 3.0, 0.0])) == 3
    assert seed_argmax(np.array([5.0, 1.0])) == 0
    # one float32 ulp apart near 0.01 (~1e-9): distinct logits, yet exp(x - max) rounds both
    # to exactly 1.0 in float32, so the probabilities tie and the later index wins
    x = np.zeros(8, np.float32)
    x[2] = np.float32(0.01)
    x[5] = np.nextafter(np.float32(0.01), np.float32(0))
    assert x[2] > x[5] and int(np.argmax(x)) == 2 and seed_argmax(x) == 5


# ---- config ----------------------------------------------------------------------------------


def _raw() -> dict:
    import yaml

    with open(DEFAULT, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_all_configs_load():
    """Every shipped config validates; the synthetic ones name a preset, the seed's file not."""
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    names = {os.path.basename(p) for p in paths}
    assert {"default.yaml", "cpu.yaml", "h100.yaml", "h200.yaml", "m2max.yaml"} <= names
    for p in paths:
        cfg = cfgmod.load(p)
        assert isinstance(cfg, cfgmod.BenchConfig)
    d = cfgmod.load(DEFAULT)
    assert d.platform == "cpu" and d.model.preset == "0.1b" and d.model.type == "Q4_K_M"
    assert d.protocols.seed == cfgmod.SEED_DEFAULTS
    m2 = cfgmod.load(os.path.join(REPO, "configs", "m2max.yaml"))
    assert m2.platform == "metal" and m2.model.file is not None
    assert os.path.basename(m2.model.file) == "rwkv7-g1b-2.9b-20251205-ctx8192-Q4_K_M.gguf"
    for gpu in ("h100.yaml", "h200.yaml"):
        g = cfgmod.load(os.path.join(REPO, "configs", gpu))
        assert (g.platform, g.model.preset, g.model.type) == ("cuda", "2.9b", "Q4_K_M")


def test_config_names_match_synth():
    """The config's preset/type lists are rwkv_jax.synth's."""
    from rwkv_jax import synth

    assert cfgmod.PRESETS == tuple(synth.PRESETS)
    assert cfgmod.QTYPES == tuple(synth.TYPES)


def test_config_unknown_key_names_its_path():
    raw = _raw()
    raw["protocols"]["seed"]["prefil_len"] = 128
    with pytest.raises(ConfigError, match=r"^x\.yaml: protocols\.seed\.prefil_len: unknown key"):
        cfgmod.from_dict(raw, "x.yaml")


def test_config_missing_key_names_its_path():
    raw = _raw()
    del raw["engine"]["wkv_impl"]
    with pytest.raises(ConfigError, match=r"^x\.yaml: engine\.wkv_impl: missing key"):
        cfgmod.from_dict(raw, "x.yaml")
    raw = _raw()
    del raw["output"]
    with pytest.raises(ConfigError, match=r"^x\.yaml: output: missing key"):
        cfgmod.from_dict(raw, "x.yaml")


def test_config_wrong_types_name_their_paths():
    raw = _raw()
    raw["protocols"]["seed"]["prefill_len"] = "abc"
    with pytest.raises(ConfigError) as e:
        cfgmod.from_dict(raw, "configs/x.yaml")
    assert str(e.value) == "configs/x.yaml: protocols.seed.prefill_len: expected int, got 'abc'"
    cases = [
        (("repeats",), True, "repeats: expected int, got True"),  # bool is not an int
        (("protocols", "llama_bench", "pp"), [512, "x"], r"protocols\.llama_bench\.pp\[1\]"),
        (("protocols", "llama_bench", "tg"), 128, "expected list of int"),
        (("engine", "chunk_size"), 24, "engine.chunk_size: 24 is not one of: 16, 32, 64"),
        (("platform",), "tpu", "platform: 'tpu' is not one of"),
        (("repeats",), 0, "repeats: must be at least 1"),
        (("engine",), [1], "engine: expected a mapping"),
    ]
    for keys, value, msg in cases:
        raw = _raw()
        node = raw
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        with pytest.raises(ConfigError, match=re.escape(msg) if "\\" not in msg else msg):
            cfgmod.from_dict(raw, "x.yaml")


def test_config_model_is_file_or_synthetic():
    raw = _raw()
    raw["model"]["file"] = "m.gguf"
    with pytest.raises(ConfigError, match="model.preset: must be null when model.file is given"):
        cfgmod.from_dict(raw, "x.yaml")
    raw = _raw()
    raw["model"]["seed"] = None
    with pytest.raises(ConfigError, match="model.seed: required for a synthetic model"):
        cfgmod.from_dict(raw, "x.yaml")


def test_config_overrides():
    cfg = cfgmod.load(
        DEFAULT,
        ["model.preset=tiny", "repeats=1", "protocols.llama_bench.pp=[16, 32]", "compare=null"],
    )
    assert cfg.model.preset == "tiny" and cfg.repeats == 1 and cfg.compare is None
    assert cfg.protocols.llama_bench is not None and cfg.protocols.llama_bench.pp == (16, 32)
    off = cfgmod.load(DEFAULT, ["protocols.fidelity=null"])
    assert off.protocols.fidelity is None
    with pytest.raises(ConfigError, match=r"^command-line override: repeats: expected int"):
        cfgmod.load(DEFAULT, ["repeats=abc"])
    with pytest.raises(ConfigError, match=r"protocols\.seed\.nope: unknown key"):
        cfgmod.load(DEFAULT, ["protocols.seed.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        cfgmod.load(DEFAULT, ["repeats"])
    with pytest.raises(ConfigError, match="is null in the config"):
        cfgmod.load(DEFAULT, ["protocols.fidelity=null", "protocols.fidelity.prompt_tokens=8"])
    with pytest.raises(ConfigError, match="no such config file"):
        cfgmod.load(os.path.join(REPO, "configs", "nope.yaml"))


def test_schema_lists_every_key():
    lines = cfgmod.schema_lines()
    assert any(line.startswith("protocols.seed.prefill_len: int [>= 1]") for line in lines)
    assert any(line.startswith("model.file: str or null") for line in lines)


# ---- markdown --------------------------------------------------------------------------------

_SEED_ENTRY = re.compile(
    r"### (?P<ts>[0-9-]+ [0-9:]+) - (?P<change>.*)\n\n\| Metric \| Value \|\n\|-+\|-+\|\n"
    r"\| Model \| (?P<model>.*) \|\n\| Version \| (?P<version>.*) \|\n"
    r"\| Layers \| (?P<layers>\d+) \|\n\| Embedding \| (?P<emb>\d+) \|\n\| GPU \| (?P<gpu>.*) \|\n"
    r"\| \*\*Load Time\*\* \| \*\*(?P<load>[0-9.]+) ms\*\* \|\n"
    r"\| \*\*Prefill\*\* \| \*\*(?P<pre>[0-9.]+) tok/s\*\* \|\n"
    r"\| \*\*Generation\*\* \| \*\*(?P<gen>[0-9.]+) tok/s\*\* \|\n"
    r"\| Quality Hash \| `(?P<hash>[0-9a-f]+)` \|\n\n"
    r"<details><summary>Quality tokens \(first 16\)</summary>\n\n```\n\[(?P<toks>[0-9, ]+)\]\n"
    r"```\n\n</details>\n\n"
)


def _seed_text() -> str:
    with open(SEED_LOG, encoding="utf-8", newline="") as fh:
        return fh.read()


def _result(m: re.Match) -> dict:
    """A result record carrying one seed entry's values."""
    return {
        "timestamp": m["ts"],
        "change": m["change"],
        "model": {
            "name": m["model"],
            "version": m["version"],
            "n_layer": int(m["layers"]),
            "n_embd": int(m["emb"]),
        },
        "device": {"name": m["gpu"]},
        "seed": {
            "load_ms": float(m["load"]),
            "prefill_tps": float(m["pre"]),
            "generation_tps": float(m["gen"]),
            "quality_hash": m["hash"],
            "quality_tokens": [int(t) for t in m["toks"].split(", ")] * 2,  # 32 hashed
        },
    }


def test_seed_block_reproduces_every_seed_entry():
    """Each entry of the seed's log, re-rendered from its values, is byte-identical."""
    entries = list(_SEED_ENTRY.finditer(_seed_text()))
    assert len(entries) == 12
    for m in entries:
        assert report.seed_block(_result(m)) == m.group(0)


def test_insert_entry_replays_the_seed_log():
    """Replaying the seed's entries in time order through insert_entry (titles as the seed
    grouped them) rebuilds the seed's file exactly, blank lines included."""
    text = _seed_text()
    header = text[: text.index("## ")]
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.*)$", text, re.M)]
    items = []
    for m in _SEED_ENTRY.finditer(text):
        title = [h for pos, h in heads if pos < m.start()][-1]
        items.append((m["ts"], title, m.group(0)))
    out = header
    for _, title, entry in sorted(items):
        out = report.insert_entry(out, title, entry)
    assert out == text


def test_insert_entry_exact_title_and_new_file():
    """A new file starts with the how-to header; a title that is a prefix of another is its
    own section (the seed's substring search would have merged them)."""
    e1, e2 = "### a\n\nbody1\n\n", "### b\n\nbody2\n\n"
    out = report.insert_entry("", "Lazy", e1)
    assert out.startswith(report.NEW_FILE_HEADER) and out.endswith("## Lazy\n\n" + e1)
    text = report.NEW_FILE_HEADER + "## Lazy Loading\n\n" + e1
    out = report.insert_entry(text, "Lazy", e2)
    assert out.endswith("## Lazy Loading\n\n" + e1 + "## Lazy\n\n" + e2)
    # a heading inside a code fence is not a section
    fenced = report.NEW_FILE_HEADER + "```\n## Lazy\n```\n\n"
    assert report.insert_entry(fenced, "Lazy", e1).endswith("```\n\n## Lazy\n\n" + e1)


def test_append_markdown_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the old file intact and no temporary file behind."""
    path = tmp_path / "BENCH.md"
    report.append_markdown(str(path), "T", "### x - first\n\n")
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", crash)  # after the new text was (partly) written
    with pytest.raises(OSError, match="disk on fire"):
        report.append_markdown(str(path), "T", "### y - second\n\n" * 1000)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["BENCH.md"]
    monkeypatch.undo()
    report.append_markdown(str(path), "T", "### y - second\n\n")
    assert path.read_text().endswith("### x - first\n\n\n### y - second\n\n")
    with pytest.raises(InputError):
        report.append_markdown(str(path), "two\nlines", "x")


def test_history_reads_a_section():
    h = report.history(_seed_text(), "Lazy Loading")
    assert [e["timestamp"][11:] for e in h] == ["02:21:46", "02:27:15", "02:32:35"]
    assert h[0]["load_ms"] == 6477.41 and h[2]["generation_tps"] == 43.40
    assert report.history(_seed_text(), "Lazy") == []


def test_plot_history(tmp_path):
    pytest.importorskip("matplotlib")
    png = report.plot_history(SEED_LOG, "Lazy Loading", str(tmp_path / "h.png"))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="no entries"):
        report.plot_history(SEED_LOG, "Nope", str(tmp_path / "n.png"))


# ---- command line ----------------------------------------------------------------------------


def test_cli_errors_are_one_line(capsys):
    assert bench.main([DEFAULT, "repeats=abc"]) == 1
    err = capsys.readouterr().err
    assert err == "bench: error: command-line override: repeats: expected int, got 'abc'\n"
    assert bench.main([DEFAULT, "--title", "T"]) == 1
    assert "go together" in capsys.readouterr().err
    assert bench.main(["--plot"]) == 1
    assert "--plot needs --title" in capsys.readouterr().err
    # JAX already runs on the CPU in this process: a CUDA config is refused before any work
    import jax

    jax.devices()
    assert bench.main([DEFAULT, "platform=cuda"]) == 1
    assert "platform: cuda was asked for but JAX runs on 'cpu'" in capsys.readouterr().err
    assert bench.main([DEFAULT, "model.file=/nonexistent/x.gguf", "model.preset=null"]) == 1
    assert "model.type: must be null when model.file is given" in capsys.readouterr().err


def test_cli_cuda_without_a_gpu_fails_cleanly():
    """In a fresh process with no GPU, platform=cuda is one error line, exit status 1."""
    import importlib.util
    import subprocess
    import sys

    if any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
        pytest.skip("a JAX CUDA plugin is installed")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    nothing = ["protocols.seed=null", "protocols.llama_bench=null", "protocols.fidelity=null"]
    p = subprocess.run(
        [sys.executable, "-m", "experiments.bench", DEFAULT, "platform=cuda", *nothing],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if p.returncode == 0:  # pragma: no cover - a machine with a GPU
        pytest.skip("this machine has a GPU")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("bench: error: platform: cuda")


TINY = [
    "model.preset=tiny",
    "model.type=Q4_K_M",
    "repeats=1",
    "bandwidth_probe_mb=1",
    "compare=null",
    "protocols.seed.load_runs=1",
    "protocols.seed.warmup_runs=1",
    "protocols.seed.warmup_len=4",
    "protocols.seed.runs=1",
    "protocols.seed.prefill_len=8",
    "protocols.seed.gen_prefill_len=4",
    "protocols.seed.gen_len=3",
    "protocols.seed.chunk=4",
    "protocols.seed.quality_prompt_len=4",
    "protocols.seed.quality_gen_len=18",
    "protocols.llama_bench.pp=[8]",
    "protocols.llama_bench.tg=[3]",
    "protocols.llama_bench.batch=[2]",
    "protocols.llama_bench.batch_steps=2",
    "protocols.fidelity.prompt_tokens=8",
    "engine.dtype=bfloat16",  # so the fidelity check has something to measure
    "engine.chunks_per_call=2",
]


def test_smoke_run_tiny(tmp_path, synth_model, model_dir, capsys):
    """The whole bench on the tiny preset with tiny protocol sizes: table, JSON, markdown."""
    synth_model("tiny", "Q4_K_M")
    out = tmp_path / "BENCH.md"
    args = [DEFAULT, *TINY, f"model.cache_dir={model_dir}", f"output.results_dir={tmp_path}"]
    assert bench.main([*args, "--title", "Smoke", "--change", "first", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Quality Hash" in table and "pp8" in table and "decode B=2" in table

    lines = (tmp_path / "bench.jsonl").read_text().splitlines()
    r = json.loads(lines[-1])
    assert r["config"]["model"]["preset"] == "tiny" and r["config"]["repeats"] == 1
    assert r["versions"]["jax"] and r["device"]["platform"] == "cpu" and r["git"]["sha"]
    s = r["seed"]
    assert len(s["load_ms_runs"]) == 1 and s["prefill_tps"] > 0 and s["generation_tps"] > 0
    assert len(s["quality_tokens"]) == 18 and s["quality_hash"] == quality_hash(s["quality_tokens"])
    assert s["deviations"]["prefill_len"] == 8
    assert r["compile"]["prefill_s"] >= 0 and r["memory"]["bytes"] > 0
    assert r["bandwidth"]["decode_gbps"] > 0 and r["bandwidth"]["copy_gbps"] > 0
    # bfloat16 products against float32: close but not identical
    f = r["fidelity"]
    assert f["positions"] == 8 and 0 < f["mean_kl"] < 0.5 and f["top1"] >= 0.5
    assert [t["name"] for t in r["llama_bench"]["tests"]] == ["pp8", "tg3"]

    md = out.read_text()
    assert md.startswith(report.NEW_FILE_HEADER) and "\n## Smoke\n\n### " in md
    entry = md[md.index("### ") :]
    m = _SEED_ENTRY.match(entry)
    assert (
        m and m["model"] == "rwkv7-synth-tiny-Q4_K_M-seed0.gguf" and m["hash"] == s["quality_hash"]
    )
    assert m["layers"] == "2" and m["emb"] == "256" and m["version"] == "V7"
    assert "| Extra | Value |" in entry and "| Protocol | seed §1 with " in entry

    # the seed protocol again (programs are compiled now): deterministic, the same greedy tokens;
    # with llama-cpp-python installed, llama.cpp runs the same protocol on the same file
    only_seed = ["protocols.llama_bench=null", "protocols.fidelity=null", "bandwidth_probe_mb=0"]
    if llamacpp.available():
        only_seed.append("compare=llama.cpp")
    argv = [*args, *only_seed, "--title", "Smoke", "--change", "second", "--out", str(out)]
    assert bench.main(argv) == 0
    r2 = json.loads((tmp_path / "bench.jsonl").read_text().splitlines()[-1])
    assert r2["seed"]["quality_tokens"] == s["quality_tokens"]
    assert len(report.history(out.read_text(), "Smoke")) == 2
    if llamacpp.available():
        c = r2["compare"]
        assert len(c["seed"]["quality_tokens"]) == 18 and c["seed"]["generation_tps"] > 0
        assert set(c["ratios"]) == {"load", "prefill", "generation"}
        assert "| rwkv_jax / llama.cpp | load " in out.read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = tmp_path / "smoke.png"
    assert bench.main(["--plot", str(png), "--title", "Smoke", "--out", str(out)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_gpu_trace_busy_time_and_kernel_families():
    """gpu_trace's busy time is the union of kernel intervals (overlaps counted once, gaps not at
    all), and XLA's numbered kernel names group into one family."""
    from experiments.gpu_trace import busy_ns, family

    ev = [("a", 0, 10), ("b", 5, 10), ("c", 30, 5), ("d", 31, 2), ("e", 15, 0)]
    assert busy_ns(ev) == 15 + 5  # [0, 15) and [30, 35)
    assert busy_ns([]) == 0
    assert family("input_reduce_fusion.123") == "input_reduce_fusion"
    assert family("loop_convert_fusion_7") == "loop_convert_fusion"
    assert family("rwkv_jax_q4_k_mma") == "rwkv_jax_q4_k_mma"


def test_gpu_trace_reads_host_events_from_a_trace(tmp_path):
    """A real (CPU) profiler trace: every event comes out in start order with its plane and
    line, and the host summary adds up the events of one name (counts and durations)."""
    import glob

    import jax
    import jax.numpy as jnp

    from experiments.gpu_trace import all_events, host_events

    def called_thrice(x):
        return jnp.sin(x) * 2

    f = jax.jit(called_thrice)
    x = jnp.arange(8.0)
    f(x).block_until_ready()  # compiled outside the trace
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            f(x).block_until_ready()
    (xplane,) = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
    ev = all_events(xplane)
    starts = [e[3] for e in ev]
    assert starts == sorted(starts) and len(ev) > 3
    assert all(e[0].startswith("/") and e[4] >= 0 for e in ev)
    calls = [e for e in ev if e[2] == "PjitFunction(called_thrice)"]
    # one event per call, or more where JAX nests its dispatch events (jax 0.10: two)
    assert calls and len(calls) % 3 == 0 and {e[0] for e in calls} == {"/host:CPU"}
    summary = host_events(xplane)
    n, ns = summary["host:CPU: PjitFunction(called_thrice)"]
    assert n == len(calls) and ns == sum(e[4] for e in calls)


def test_gpu_trace_probe_programs_run():
    """gpu_trace's single-feature programs (the after-prefill probes) compile and run on the CPU,
    each call returning its wall time."""
    from experiments.gpu_trace import _gemm, _probe, _trsm

    for run in (_probe("cond", 8), _probe("big", 1), _trsm(2), _gemm(4, 256, fused=True)):
        assert 0 < run() < 60


def test_decode_loop_compares_the_two_loop_forms(synth_model, capsys):
    """experiments.decode_loop times the scan and the traced-count loop in alternating rounds
    and reports both forms' times and the median ratio; bad arguments are usage errors."""
    from experiments import decode_loop

    path = synth_model("tiny", "Q4_K_M")
    assert decode_loop.main(["--model", path, "--batch", "2", "--steps", "4", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "B=2 steps=4" in out and "median scan/while" in out
    assert out.count("ms [") == 2 and "2 rounds" in out
    with pytest.raises(SystemExit) as e:
        decode_loop.main(["--model", path, "--steps", "2"])
    assert e.value.code == 2
