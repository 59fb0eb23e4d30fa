"""`rwkv-jax doctor`: versions, PJRT plugins, devices, a one-token smoke test per platform, advice.

Each smoke test runs in its own Python process (JAX_PLATFORMS set for it), so a plugin that
crashes — jax-metal segfaults rather than raising on some programs — is reported instead of
taking the doctor down. A test loads a model (the synthetic tiny Q4_K_M one, written once to the
cache, or `--model`), prefills one token and decodes one, twice each: the first call includes
compilation, the second is the steady time. Logits of every platform are compared with the CPU's.
On a Metal plugin both profiles run: metal-safe (what `--profile auto` picks there) and default
(scanned prefill, donation), so the advice can say whether the faster one works on this Mac.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from rwkv_jax import backends
from rwkv_jax.backends import Plugin

# Logits of another platform agree with the CPU's when max|Δ| / std(cpu) stays below this:
# float32 everywhere, so only summation order differs (~1e-6 measured on the CPU between the
# two profiles); 1e-3 leaves room for a GPU's own reductions and flags real breakage.
AGREE = 1e-3
PACKAGES = ("rwkv-jax", "jax", "jaxlib", "equinox", "numpy", "ml_dtypes", "gguf")


@dataclass
class Smoke:
    """One smoke test: where it ran, what came back."""

    label: str  # e.g. "cpu", "cpu metal-safe", "METAL (jax-metal 0.1.1)"
    jax_platforms: str
    profile: str
    ok: bool = False
    error: str = ""
    backend: str = ""
    devices: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # load, prefill_first, prefill, ...
    vs_cpu: float | None = None  # max|Δ logits| / std(cpu logits)


@dataclass
class Report:
    """Everything doctor found; `advise` turns it into advice."""

    python: str
    system: str  # e.g. "Darwin 24.1.0 arm64 (macOS 15.1)"
    machine: str  # platform.machine(): arm64, x86_64, ...
    apple_silicon: bool
    macos: str  # "" off macOS
    rosetta: bool  # an x86_64 Python on an arm64 Mac
    packages: dict[str, str | None]
    env: dict[str, str]
    plugins: list[dict]
    entry_points: list[str]
    nvidia_gpu: bool
    model: str = ""
    smoke: list[Smoke] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Facts (no JAX backend is initialized in this process)


def _rosetta() -> bool:
    """Whether this process is an x86_64 binary translated by Rosetta on Apple silicon."""
    if sys.platform != "darwin" or platform.machine() != "x86_64":
        return False
    try:
        out = subprocess.run(
            ["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


def facts() -> Report:
    """Python, OS, package versions, environment and installed PJRT plugins."""
    macos = platform.mac_ver()[0] if sys.platform == "darwin" else ""
    system = f"{platform.system()} {platform.release()} {platform.machine()}"
    plugins = backends.installed_plugins()
    return Report(
        python=f"{platform.python_version()} ({platform.python_implementation()}, "
        f"{sys.executable})",
        system=system + (f" (macOS {macos})" if macos else ""),
        machine=platform.machine(),
        apple_silicon=backends.is_apple_silicon(),
        macos=macos,
        rosetta=_rosetta(),
        packages={name: backends.dist_version(name) for name in PACKAGES},
        env={k: os.environ.get(k, "") for k in ("JAX_PLATFORMS", backends.PROFILE_ENV)},
        plugins=[_plugin_dict(p) for p in plugins],
        entry_points=backends.jax_plugin_entry_points(),
        nvidia_gpu=bool(shutil.which("nvidia-smi")) or os.path.exists("/proc/driver/nvidia"),
    )


def _plugin_dict(p: Plugin) -> dict:
    """An installed plugin as plain data."""
    return {
        "dist": p.spec.dist,
        "version": p.version,
        "platform": p.spec.platform,
        "kind": p.spec.kind,
        "problem": p.problem or "",
        "note": p.spec.note,
    }


def smoke_plan(report: Report, which: str = "all") -> list[Smoke]:
    """The smoke tests to run: the CPU (both profiles) and every working accelerator plugin."""
    plan = []
    if which in ("all", "cpu"):
        plan += [Smoke("cpu", "cpu", "auto"), Smoke("cpu metal-safe", "cpu", "metal-safe")]
    for p in report.plugins:
        if p["problem"] or which not in ("all", p["kind"]):
            continue
        name = f"{p['platform']} ({p['dist']} {p['version']})"
        if p["kind"] == "metal":  # the profile auto picks there, then the faster one
            plan += [
                Smoke(name, p["platform"], "metal-safe"),
                Smoke(f"{name} default", p["platform"], "default"),
            ]
        elif p["kind"] == "cuda" and not any(s.jax_platforms == "cuda" for s in plan):
            plan.append(Smoke(name, "cuda", "auto"))
    return plan


# ---------------------------------------------------------------------------------------------
# The smoke test (child process side)


def smoke_child(model_path: str, profile: str, out_path: str) -> dict:
    """Load, prefill one token, decode one (each twice); logits to out_path; a summary dict."""
    import jax
    import numpy as np

    import rwkv_jax

    backends.set_profile(profile)
    seconds = {}
    t = time.perf_counter()
    devices = [str(d) for d in jax.devices()]
    backend = jax.default_backend()
    seconds["init"] = time.perf_counter() - t
    t = time.perf_counter()
    m = rwkv_jax.load(model_path)
    seconds["load"] = time.perf_counter() - t
    ids = m.tokenizer.encode("The")[:1]

    def timed(name, fn):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        seconds[name] = time.perf_counter() - t
        return out

    timed("prefill_first", lambda: m.forward(ids))
    logits, state = timed("prefill", lambda: m.forward(ids))
    step, state = timed("decode_first", lambda: m.step(ids, state))
    step, state = timed("decode", lambda: m.step(ids, state))
    np.savez(out_path, prefill=np.asarray(logits[0]), decode=np.asarray(step[0]))
    return {
        "backend": backend,
        "devices": devices,
        "seconds": seconds,
        "profile": backends.current_profile().name,
    }


def _signal_name(rc: int) -> str:
    """'SIGSEGV' for a process killed by signal 11, etc."""
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _logits_path(s: Smoke, out_dir: str) -> str:
    """Where the child of smoke test `s` writes its logits."""
    return os.path.join(out_dir, "smoke-" + re.sub(r"\W+", "_", s.label) + ".npz")


def run_smoke(s: Smoke, model_path: str, out_dir: str, timeout: float) -> Smoke:
    """Run one smoke test in a child process and fill in `s`."""
    out = _logits_path(s, out_dir)
    cmd = [sys.executable, "-m", "rwkv_jax.doctor", model_path, s.profile, out]
    env = {**os.environ, "JAX_PLATFORMS": s.jax_platforms}
    env.pop(backends.PROFILE_ENV, None)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        s.error = f"timed out after {timeout:.0f} s"
        return s
    if proc.returncode < 0:
        s.error = f"crashed ({_signal_name(proc.returncode)})"
        return s
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        s.error = tail[-1] if tail else f"exit status {proc.returncode}"
        return s
    got = json.loads(lines[-1])
    s.ok, s.backend, s.devices, s.seconds = True, got["backend"], got["devices"], got["seconds"]
    s.profile = got["profile"]
    return s


def compare(smokes: list[Smoke], out_dir: str) -> None:
    """Set vs_cpu of every successful test from its logits and the CPU default test's."""
    import numpy as np

    def load(s: Smoke):
        return np.load(_logits_path(s, out_dir))

    ref = next((s for s in smokes if s.ok and s.label == "cpu"), None)
    if ref is None:
        return
    r = load(ref)
    for s in smokes:
        if s.ok and s is not ref:
            got = load(s)
            s.vs_cpu = max(
                float(np.abs(got[k] - r[k]).max() / max(float(r[k].std()), 1e-30))
                for k in ("prefill", "decode")
            )


# ---------------------------------------------------------------------------------------------
# Advice


def advise(r: Report) -> list[str]:
    """Concrete next steps for what the report shows (empty advice never: at least a summary)."""
    jax_v = r.packages.get("jax") or "(not installed)"
    out = []
    if r.rosetta:
        out.append(
            "this Python is x86_64 (Rosetta); Metal plugins are arm64-only: use an arm64 Python "
            "(python.org installer or Homebrew under /opt/homebrew) in a fresh environment"
        )
    elif r.macos and r.machine == "x86_64":
        out.append("an Intel Mac: no JAX Metal plugin supports it, so JAX runs on the CPU")
    for p in r.plugins:
        if not p["problem"]:
            continue
        if p["dist"] == "jax-metal":
            out.append(
                f"jax-metal needs jax <= {backends.JAX_METAL_MAX} (jaxlib == jax); you have "
                f"{jax_v} — {backends.METAL_EXTRA_HINT}, {backends.COMMUNITY_HINT}"
            )
        else:
            out.append(
                f"{p['problem']} — install the {p['dist']} release built for jax {jax_v}, or "
                "its jax in a fresh environment"
            )
    metal = [p for p in r.plugins if p["kind"] == "metal"]
    if r.apple_silicon and not metal:
        py = "{}.{}".format(*sys.version_info[:2])
        extra = "" if sys.version_info >= (3, 12) else f" (metaljax needs Python >= 3.12, not {py})"
        out.append(
            "no Metal plugin is installed, so JAX runs on the CPU only — "
            f"{backends.METAL_EXTRA_HINT}, {backends.COMMUNITY_HINT}{extra}"
        )
    if r.macos and any(p["dist"] == "jax-metal" for p in metal):
        if backends.release(r.macos) < (14, 4):
            out.append(f"jax-metal needs macOS >= 14.4; this is macOS {r.macos}")
    if r.nvidia_gpu and not any(p["kind"] == "cuda" for p in r.plugins):
        out.append("an NVIDIA GPU is visible but no CUDA plugin: `pip install 'rwkv-jax[cuda]'`")
    out += _smoke_advice(r.smoke)
    if not out:
        out.append("nothing to fix: every check passed")
    return out


def _smoke_advice(smokes: list[Smoke]) -> list[str]:
    """Advice from the smoke tests: failures, disagreements, a faster profile that works."""
    out = []
    by = {s.label: s for s in smokes}
    for s in smokes:
        if not s.ok:
            out.append(f"smoke test '{s.label}' (profile {s.profile}) failed: {s.error}")
        elif s.vs_cpu is not None and s.vs_cpu > AGREE:
            out.append(
                f"'{s.label}' logits differ from the CPU's by {s.vs_cpu:.1e} of their std "
                f"(expected < {AGREE:g}): treat its results as wrong and report it"
            )
    for s in smokes:
        if s.profile != "metal-safe" or s.jax_platforms == "cpu":
            continue
        fast = by.get(f"{s.label} default")
        if not s.ok:
            out.append(
                f"{s.label} cannot run the metal-safe path: use --platform cpu on this machine "
                "and report the error above"
            )
        elif fast is not None and fast.ok and (fast.vs_cpu or 0.0) <= AGREE:
            out.append(
                f"{s.label}: the default profile also works here (prefill "
                f"{fast.seconds['prefill'] * 1e3:.1f} ms vs {s.seconds['prefill'] * 1e3:.1f} ms, "
                f"decode {fast.seconds['decode'] * 1e3:.1f} ms vs "
                f"{s.seconds['decode'] * 1e3:.1f} ms per token): pass --profile default if "
                "it is faster on your prompts"
            )
        elif fast is not None:
            out.append(f"{s.label}: keep the metal-safe profile (--profile auto picks it there)")
    return out


# ---------------------------------------------------------------------------------------------
# Output and the command


def collect(
    model: str | None = None, which: str = "all", timeout: float = 300, smoke: bool = True
) -> Report:
    """Run every check (smoke tests in child processes) and return the report with advice."""
    r = facts()
    if smoke:
        if model is None:
            from rwkv_jax import synth

            model = synth.ensure("tiny", "Q4_K_M", 0, progress=False)
        r.model = model
        with tempfile.TemporaryDirectory(prefix="rwkv-doctor-") as tmp:
            r.smoke = [run_smoke(s, model, tmp, timeout) for s in smoke_plan(r, which)]
            compare(r.smoke, tmp)
    r.advice = advise(r)
    return r


def _ms(x: float) -> str:
    """Seconds as milliseconds (or seconds when long), for the table."""
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def format_report(r: Report) -> str:
    """The report as text."""
    lines = [f"python        {r.python}", f"system        {r.system}"]
    lines += [f"{k:<13} {v or '(not installed)'}" for k, v in r.packages.items()]
    lines += [f"{k:<13} {v or '(unset)'}" for k, v in r.env.items()]
    lines.append("")
    lines.append("PJRT plugins")
    for p in r.plugins:
        state = f"INCOMPATIBLE: {p['problem']}" if p["problem"] else "ok"
        lines.append(f"  {p['dist']} {p['version']:<10} platform {p['platform']:<6} {state}")
    if not r.plugins:
        lines.append("  (none: the CPU only)")
    if r.entry_points:
        lines.append(f"  jax_plugins entry points: {', '.join(r.entry_points)}")
    if r.smoke:
        lines += ["", f"smoke test: 1-token prefill + 1-token decode of {r.model}"]
        for s in r.smoke:
            if not s.ok:
                lines.append(f"  {s.label:<34} {s.profile:<10} FAILED  {s.error}")
                continue
            t = s.seconds
            agree = "" if s.vs_cpu is None else f", logits vs cpu {s.vs_cpu:.1e} of std"
            lines.append(
                f"  {s.label:<34} {s.profile:<10} ok  prefill {_ms(t['prefill'])}, decode "
                f"{_ms(t['decode'])} (first calls {_ms(t['prefill_first'])} / "
                f"{_ms(t['decode_first'])}, load {_ms(t['load'])}){agree}"
            )
            lines.append(f"  {'':<34} devices {', '.join(s.devices)}")
    lines += ["", "advice"] + [f"  - {a}" for a in r.advice]
    return "\n".join(lines)


def _cmd_doctor(args: argparse.Namespace) -> None:
    """The `doctor` sub-command."""
    r = collect(args.model, args.platform, args.timeout, smoke=not args.no_smoke)
    if args.json:
        print(json.dumps(asdict(r), indent=1))
    else:
        print(format_report(r))


def add_doctor_parser(subparsers) -> None:
    """Register `rwkv-jax doctor` on the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "doctor", help="check Python, JAX, PJRT plugins and devices; smoke-test each platform"
    )
    p.add_argument("--model", help="smoke-test this .gguf (default: synthetic tiny Q4_K_M)")
    p.add_argument(
        "--platform",
        choices=["all", "cpu", "cuda", "metal"],
        default="all",
        help="smoke-test only this platform (default: every available one)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per smoke test (600)")
    p.add_argument("--no-smoke", action="store_true", help="versions and plugins only")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=_cmd_doctor)


if __name__ == "__main__":  # the smoke-test child: MODEL PROFILE OUT.npz
    print(json.dumps(smoke_child(*sys.argv[1:4])))
