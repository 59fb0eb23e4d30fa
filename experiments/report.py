"""Benchmark output: console table, JSON lines, the seed's markdown block, history plot.

The markdown entry is byte-for-byte the seed's `write_single_result` (web-rwkv-gguf
examples/benchmark.rs), followed by one extra table with the figures the seed does not have.
Appending follows the seed's `write_result_to_markdown`, blank lines included: into the existing
`## <title>` section (after its last entry, preceded by one extra newline) or, when there is none,
as a new section at the end of the file. Unlike the seed, the section is found by an exact
heading line (the seed's substring search also matches a longer title) and the file is replaced
atomically (a crash mid-write leaves the old file).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Any

from rwkv_jax.errors import InputError, RwkvJaxError

NEW_FILE_HEADER = """# Benchmark Results

This file tracks performance benchmarks across changes to the codebase.

**How to use:**
1. Run benchmark BEFORE making changes with a descriptive title
2. Make your changes
3. Run benchmark AFTER with the SAME title to group results

```bash
python -m experiments.bench configs/default.yaml --title "<title>" --change "<description>"
```

---

"""

# ---- formatting ------------------------------------------------------------------------------


def _f2(x: float) -> str:
    """Rust's `{:.2}`."""
    return f"{x:.2f}"


def seed_block(r: dict) -> str:
    """The seed's markdown entry (`### <time> - <change>`, metric table, quality tokens)."""
    s = r["seed"]
    lines = [
        f"### {r['timestamp']} - {r['change']}",
        "",
        "| Metric | Value |",
        "|--------|-------|",
        f"| Model | {r['model']['name']} |",
        f"| Version | {r['model']['version']} |",
        f"| Layers | {r['model']['n_layer']} |",
        f"| Embedding | {r['model']['n_embd']} |",
        f"| GPU | {r['device']['name']} |",
        f"| **Load Time** | **{_f2(s['load_ms'])} ms** |",
        f"| **Prefill** | **{_f2(s['prefill_tps'])} tok/s** |",
        f"| **Generation** | **{_f2(s['generation_tps'])} tok/s** |",
        f"| Quality Hash | `{s['quality_hash']}` |",
        "",
        "<details><summary>Quality tokens (first 16)</summary>",
        "",
        "```",
        "[" + ", ".join(str(t) for t in s["quality_tokens"][:16]) + "]",  # Rust `{:?}`
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines) + "\n"


def _gb(x: float) -> str:
    """Bytes as GB with 3 significant digits."""
    return f"{x / 1e9:.3g} GB"


def _tps(t: dict) -> str:
    """mean ± sd tok/s."""
    return f"{t['tps_mean']:.2f} ± {t['tps_sd']:.2f} tok/s"


def extra_rows(r: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the figures beyond the seed's table."""
    rows: list[tuple[str, str]] = []
    e = r["engine"]
    rows.append(
        (
            "Engine",
            f"rwkv_jax {e['mode']} {e['dtype']}, prefill chunk {e['chunk_size']} × "
            f"{e['chunks_per_call']}, wkv {e['wkv_impl']}",
        )
    )
    if "seed" in r:
        dev = r["seed"].get("deviations") or {}
        rows.append(
            (
                "Protocol",
                "seed (bench-protocol.md §1)"
                if not dev
                else "seed §1 with " + ", ".join(f"{k}={v}" for k, v in dev.items()),
            )
        )
    if "load_ms" in r:  # no seed protocol: one load, timed as the seed times it
        rows.append(("Load (1 run)", f"{r['load_ms']:.2f} ms"))
    if "compile" in r:
        c = r["compile"]
        rows.append(
            (
                "Compile",
                f"prefill {c['prefill_s']:.2f} s, decode {c['decode_s']:.2f} s "
                "(first call minus a repeat; not in Load Time)",
            )
        )
    if "bandwidth" in r:
        b = r["bandwidth"]
        txt = f"{b['decode_gbps']:.2f} GB/s ({b['bytes_per_token'] / 1e6:.1f} MB of weights/token)"
        if b.get("copy_gbps"):
            txt += f"; measured copy {b['copy_gbps']:.1f} GB/s"
        rows.append(("Decode bandwidth", txt))
    if "memory" in r:
        m = r["memory"]
        rows.append(("Peak memory", f"{_gb(m['bytes'])} ({m['source']})"))
    if "model" in r and "weight_bytes" in r["model"]:
        m = r["model"]
        rows.append(("Weights", f"{_gb(m['weight_bytes'])} on device, file {_gb(m['file_bytes'])}"))
    if "fidelity" in r:
        f = r["fidelity"]
        rows.append(
            (
                "Fidelity vs f32",
                f"mean KL {f['mean_kl']:.3g} nats (max {f['max_kl']:.3g}), top-1 "
                f"{100 * f['top1']:.1f}% over {f['positions']} tokens",
            )
        )
    lb = r.get("llama_bench")
    if lb:
        for t in lb["tests"] + lb["batched"]:
            suffix = " aggregate" if "streams" in t else ""
            rows.append((t["name"], _tps(t) + suffix + f" ({lb['repeats']} runs)"))
    cmp_ = r.get("compare")
    if cmp_ and cmp_.get("seed"):
        s = cmp_["seed"]
        rows.append(
            (
                "llama.cpp seed",
                f"load {s['load_ms']:.2f} ms, prefill {s['prefill_tps']:.2f}, generation "
                f"{s['generation_tps']:.2f} tok/s, hash `{s['quality_hash']}`",
            )
        )
    if cmp_ and cmp_.get("llama_bench"):
        for t in cmp_["llama_bench"]["tests"]:
            rows.append((f"llama.cpp {t['name']}", _tps(t)))
    if cmp_ and cmp_.get("ratios"):
        rows.append(
            (
                "rwkv_jax / llama.cpp",
                ", ".join(f"{k} {v:.2f}×" for k, v in cmp_["ratios"].items()),
            )
        )
    h = r.get("host")
    if h and r.get("device", {}).get("platform") == "cpu":
        txt = (
            f"1-min load average {h['loadavg_before']:.2f} before the run ({h['cpu_count']} cores)"
        )
        if h.get("others_cpu_share") is not None:
            txt += f"; other processes used {100 * h['others_cpu_share']:.0f}% of the CPU during it"
        rows.append(("Host load", txt))
    v = r["versions"]
    git = r["git"]
    rows.append(
        (
            "Versions",
            f"jax {v['jax']}, jaxlib {v['jaxlib']}, git {git['sha'][:10]}"
            + (" (dirty)" if git.get("dirty") else ""),
        )
    )
    return rows


def extra_table(r: dict) -> str:
    """The extra markdown table, after the seed's entry."""
    lines = ["| Extra | Value |", "|-------|-------|"]
    lines += [f"| {k} | {v} |" for k, v in extra_rows(r)]
    return "\n".join(lines) + "\n\n"


def markdown_entry(r: dict) -> str:
    """The seed's block plus the extra table."""
    return seed_block(r) + extra_table(r)


def console_table(r: dict) -> str:
    """A plain-text summary for the terminal."""
    rows: list[tuple[str, str]] = [
        ("Model", f"{r['model']['name']} ({r['model']['n_layer']} layers, {r['model']['n_embd']})"),
        ("Device", r["device"]["name"]),
    ]
    if "seed" in r:
        s = r["seed"]
        rows += [
            ("Load Time", f"{s['load_ms']:.2f} ms"),
            ("Prefill", f"{s['prefill_tps']:.2f} tok/s"),
            ("Generation", f"{s['generation_tps']:.2f} tok/s"),
            ("Quality Hash", f"{s['quality_hash']}  {s['quality_tokens'][:8]}"),
        ]
    rows += extra_rows(r)
    width = max(len(k) for k, _ in rows)
    bar = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([bar, *(f"{k:<{width}} | {v}" for k, v in rows), bar])


# ---- files -----------------------------------------------------------------------------------


def atomic_write(path: str, text: str) -> None:
    """Replace `path` with `text` atomically: write a temporary file beside it, fsync, rename.
    On any failure the old file is left as it was and the temporary file is removed."""
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _headings(text: str) -> list[tuple[int, str]]:
    """(offset, heading text) of each `## ` line outside fenced code blocks."""
    out, fenced, pos = [], False, 0
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            out.append((pos, line[3:].rstrip("\r\n")))
        pos += len(line)
    return out


def insert_entry(existing: str, title: str, entry: str) -> str:
    """The file text with `entry` appended to section `## title` (the seed's layout)."""
    if not existing:
        existing = NEW_FILE_HEADER
    heads = _headings(existing)
    at = [i for i, (_, h) in enumerate(heads) if h == title.strip()]
    if not at:
        if not existing.endswith("\n"):
            existing += "\n"
        if not existing.endswith("\n\n"):
            existing += "\n"
        return existing + f"## {title.strip()}\n\n" + entry
    i = at[0]
    # the section ends at the newline before the next `## ` heading, as the seed's find("\n## ")
    end = heads[i + 1][0] - 1 if i + 1 < len(heads) else len(existing)
    return existing[:end] + "\n" + entry + existing[end:]


def append_markdown(path: str, title: str, entry: str) -> None:
    """Append an entry under `## title` in the markdown log at `path`, atomically."""
    if not title.strip() or "\n" in title:
        raise InputError(f"--title must be one non-empty line, got {title!r}")
    existing = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as fh:
            existing = fh.read()
    atomic_write(path, insert_entry(existing, title, entry))


def _jsonable(x: Any) -> Any:
    """NaN/inf to None so every line is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def append_jsonl(results_dir: str, r: dict) -> str:
    """Append one JSON line for this run to results_dir/bench.jsonl; returns the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, "bench.jsonl")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(r), allow_nan=False) + "\n")
    return path


# ---- history and plot ------------------------------------------------------------------------

_ENTRY = re.compile(r"^### (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) - (.*)$", re.M)
_ROW = {
    "load_ms": re.compile(r"^\| \*\*Load Time\*\* \| \*\*([0-9.]+) ms\*\* \|$", re.M),
    "prefill_tps": re.compile(r"^\| \*\*Prefill\*\* \| \*\*([0-9.]+) tok/s\*\* \|$", re.M),
    "generation_tps": re.compile(r"^\| \*\*Generation\*\* \| \*\*([0-9.]+) tok/s\*\* \|$", re.M),
}


def history(text: str, title: str) -> list[dict]:
    """Entries of section `## title`, in file order: timestamp, change and the three figures."""
    heads = _headings(text)
    at = [i for i, (_, h) in enumerate(heads) if h == title.strip()]
    if not at:
        return []
    i = at[0]
    start = heads[i][0]
    end = heads[i + 1][0] if i + 1 < len(heads) else len(text)
    section = text[start:end]
    marks = list(_ENTRY.finditer(section))
    out = []
    for j, m in enumerate(marks):
        body = section[m.end() : marks[j + 1].start() if j + 1 < len(marks) else len(section)]
        vals = {k: rx.search(body) for k, rx in _ROW.items()}
        if all(vals.values()):
            out.append(
                {
                    "timestamp": m.group(1),
                    "change": m.group(2),
                    **{k: float(v.group(1)) for k, v in vals.items() if v},
                }
            )
    return out


def plot_history(markdown: str, title: str, png: str) -> str:
    """Write a PNG of the section's load time, prefill and generation over its entries."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RwkvJaxError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    if not os.path.exists(markdown):
        raise InputError(f"{markdown}: no such file to plot from")
    with open(markdown, encoding="utf-8") as fh:
        entries = history(fh.read(), title)
    if not entries:
        raise InputError(f"{markdown}: no entries under a '## {title}' section")
    x = list(range(len(entries)))
    labels = [f"{e['timestamp'][5:16]}\n{e['change'][:28]}" for e in entries]
    panels = [
        ("load_ms", "Load time (ms)"),
        ("prefill_tps", "Prefill (tok/s)"),
        ("generation_tps", "Generation (tok/s)"),
    ]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(max(6.0, 1.4 * len(entries) + 2), 7.5))
    for ax, (key, name) in zip(axes, panels, strict=True):
        ax.plot(x, [e[key] for e in entries], marker="o")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(x, labels, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
