"""Platform selection, capability profiles, the metal-safe code path on the CPU, and doctor."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import backends, doctor, quant
from rwkv_jax.backends import Plugin
from rwkv_jax.errors import ConfigError
from rwkv_jax.generate import decode_step_kept, prefill_call
from tests.jaxprs import equations

# metal-safe prefill runs the token recurrence, the default the chunked form: they differ only
# in float32 summation order, the bound test_prefill.py uses for chunked vs sequential (logits
# of std ~3)
TOL = 1e-4
SPECS = {s.dist: s for s in backends.KNOWN_PLUGINS}


@pytest.fixture
def profile():
    """Set a profile for one test; the one requested before is restored afterwards."""
    before = backends.requested_profile()
    yield backends.set_profile
    backends.set_profile(before)


def _plugin(dist: str, problem: str | None = None) -> Plugin:
    """An installed-plugin record for a known distribution."""
    return Plugin(SPECS[dist], "9.9", problem)


# ---- profiles -------------------------------------------------------------------------------


def test_profile_table_is_consistent():
    """Each row uses known values; every Metal platform name maps to metal-safe."""
    for name, p in backends.PROFILES.items():
        assert p.name == name
        assert p.prefill_loop in ("scan", "host")
        assert p.quant_bytes in ("uint8", "int8", "uint32")
        assert p.matvec in ("platform", "fused") and p.stack_layers in (None, False, True)
    safe = backends.PROFILES["metal-safe"]
    assert not safe.donate and safe.prefill_loop == "host" and safe.quant_bytes == "int8"
    assert safe.prng_impl == "threefry2x32"  # rng_bit_generator's ui32 fails on jax-metal
    for name in ("METAL", "metal", "mps", "mtl"):
        assert backends.profile_for_platform(name) is safe
    for name in ("cpu", "tpu", "something-new"):
        assert backends.profile_for_platform(name).name == "default"
    for name in ("gpu", "cuda", "rocm"):  # quants as words for the GPU kernels, else default
        gpu = backends.profile_for_platform(name)
        assert gpu.name == "gpu" and gpu.quant_bytes == "uint32"
        assert gpu == dataclasses.replace(
            backends.PROFILES["default"], name="gpu", quant_bytes="uint32", why=gpu.why
        )


def test_set_profile_and_env(profile, monkeypatch):
    """set_profile wins over RWKV_JAX_PROFILE; bad names are ConfigErrors naming the source."""
    profile("metal-safe")
    assert backends.current_profile().name == "metal-safe"
    assert jax.config.jax_default_prng_impl == "threefry2x32"
    profile("auto")
    assert backends.current_profile().name == "default"  # this machine runs JAX on the CPU
    with pytest.raises(ConfigError, match="set_profile: unknown profile 'fast'"):
        profile("fast")
    monkeypatch.setattr(backends, "_override", None)
    monkeypatch.setenv(backends.PROFILE_ENV, "metal")
    with pytest.raises(ConfigError, match="RWKV_JAX_PROFILE: unknown profile 'metal'"):
        backends.requested_profile()
    monkeypatch.setenv(backends.PROFILE_ENV, "metal-safe")
    assert backends.requested_profile() == "metal-safe"


# ---- versions and plugins -------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, spec, ok",
    [
        ("0.4.38", ">=0.4.34", True),
        ("0.4.33", ">=0.4.34", False),
        ("0.10.2", ">=0.9.0,<0.10", False),
        ("0.9.2", ">=0.9.0,<0.10", True),
        ("0.7.1", "!=0.7.0,!=0.7.1,>=0.4.38", False),
        ("0.4.38", "==0.4.*", True),
        ("0.5.0", "==0.4.*", False),
        ("0.4.36", "~=0.4.30", True),
        ("0.5.0", "~=0.4.30", False),
        ("0.10.0rc1", "<0.10", False),  # the release part decides: 0.10.0
        ("1.0", "", True),
    ],
)
def test_satisfies(version, spec, ok):
    assert backends.satisfies(version, spec) is ok


def test_jax_metal_compatibility(monkeypatch):
    """jax-metal: only jax == jaxlib within 0.4.34-0.5.0; a community plugin by its metadata."""
    reqs = {("jax-metal", "jax"): ">=0.4.34", ("jax-mps", "jax"): ">=0.9.0,<0.10"}
    monkeypatch.setattr(backends, "dist_requirement", lambda d, on: reqs.get((d, on), ""))
    metal = SPECS["jax-metal"]
    assert backends.plugin_problem(metal, "0.1.1", "0.4.38", "0.4.38") == ""
    assert backends.plugin_problem(metal, "0.1.1", "0.5.0", "0.5.0") == ""
    msg = backends.plugin_problem(metal, "0.1.1", "0.10.2", "0.10.2")
    assert msg == "jax-metal 0.1.1 needs jax/jaxlib <= 0.5.0; you have jax 0.10.2, jaxlib 0.10.2"
    assert "jax == jaxlib" in backends.plugin_problem(metal, "0.1.1", "0.4.38", "0.4.36")
    assert "jax >=0.4.34" in backends.plugin_problem(metal, "0.1.1", "0.4.31", "0.4.31")
    mps = SPECS["jax-mps"]
    assert "jax >=0.9.0,<0.10" in backends.plugin_problem(mps, "0.9.9", "0.10.2", "0.10.2")
    assert backends.plugin_problem(mps, "0.9.9", "0.9.2", "0.9.2") == ""


def test_metal_plugin_choice_and_errors():
    """The first working Metal plugin wins; none or only broken ones raise with advice."""
    with pytest.raises(ConfigError, match=r"no Metal PJRT plugin.*rwkv-jax\[metal\].*metaljax"):
        backends.metal_plugin([_plugin("jax-cuda13-plugin")])
    broken = _plugin("jax-metal", "jax-metal 0.1.1 needs jax/jaxlib <= 0.5.0; you have jax 0.10.2")
    with pytest.raises(ConfigError, match=r"needs jax/jaxlib <= 0\.5\.0.*fresh environment"):
        backends.metal_plugin([broken])
    assert backends.metal_plugin([broken, _plugin("metaljax")]).spec.platform == "metal"
    assert backends.metal_plugin([_plugin("jax-metal")]).spec.platform == "METAL"


def test_auto_excludes_plugins_that_cannot_work():
    """auto: JAX's own order unless a broken plugin must be kept out (then an explicit list)."""
    broken = _plugin("jax-metal", "too new a jax")
    assert backends._auto_platforms([]) == ""
    assert backends._auto_platforms([_plugin("jax-metal")]) == ""
    assert backends._auto_platforms([broken]) == "cpu"
    assert backends._auto_platforms([broken, _plugin("jax-mps")]) == "mps,cpu"
    assert backends._auto_platforms([broken, _plugin("jax-cuda12-plugin")]) == "cuda,cpu"


def test_select_platform_here():
    """On this CPU machine: cpu is accepted (JAX already runs it); the others explain."""
    assert backends.select_platform("cpu") == "cpu"
    with pytest.raises(ConfigError, match="unknown platform 'tpu'"):
        backends.select_platform("tpu")
    kinds = {p.spec.kind for p in backends.installed_plugins()}
    if "metal" not in kinds:
        with pytest.raises(ConfigError, match="--platform metal:.*rwkv-jax\\[metal\\]"):
            backends.select_platform("metal")
    if "cuda" not in kinds:
        with pytest.raises(ConfigError, match="--platform cuda: no CUDA plugin"):
            backends.select_platform("cuda")


def test_select_platform_after_init_is_an_error(monkeypatch):
    """A platform other than the running one cannot be selected once JAX is up."""
    jax.devices()  # make sure the backends exist
    monkeypatch.setattr(backends, "installed_plugins", lambda: [_plugin("metaljax")])
    with pytest.raises(ConfigError, match="already running on 'cpu'.*JAX_PLATFORMS=metal"):
        backends.select_platform("metal")


def test_select_platform_before_init_in_a_fresh_process():
    """In a new interpreter (jax imported, no backend yet) selection reaches jax.config."""
    code = (
        "import rwkv_jax, jax, os\n"
        "from rwkv_jax import backends\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized()\n"
        "print(backends.select_platform('cpu'), jax.config.jax_platforms,\n"
        "      os.environ['JAX_PLATFORMS'], jax.default_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu", "cpu", "cpu"]


# ---- the metal-safe code path ---------------------------------------------------------------


# one class per unpacking helper: nibbles, q5 bits, Q2_K scales, crumbs + bit planes + xor,
# 6-bit scale pairs, Q6_K's high crumbs (Q4_K runs in the model test below)
INT8_FORMATS = [quant.Q4_0, quant.Q5_1, quant.Q2_K, quant.Q3_K, quant.Q5_K, quant.Q6_K]


def test_int8_fields_unpack_bit_identically(profile):
    """metal-safe stores u8 fields as int8 views; values equal, and no unsigned type is traced."""
    shape, rng = (3, 512), np.random.default_rng(7)
    raws = [rng.integers(0, 256, 3 * c.row_bytes(512), dtype=np.uint8) for c in INT8_FORMATS]
    for cls, raw in zip(INT8_FORMATS, raws, strict=True):
        for f in cls.BLOCK.names:  # finite fp16 scales
            if cls.BLOCK[f] == np.float16:
                raw.view(cls.BLOCK)[f] = np.float16(0.01)
    dequantize = eqx.filter_jit(lambda w: w.dequantize())
    profile("default")
    refs = [dequantize(c.from_raw(r, shape)) for c, r in zip(INT8_FORMATS, raws, strict=True)]
    profile("metal-safe")
    for cls, raw, ref in zip(INT8_FORMATS, raws, refs, strict=True):
        w = cls.from_raw(raw, shape)
        for f in cls.BLOCK.names:
            want = np.int8 if cls.BLOCK[f].base == np.uint8 else cls.BLOCK[f].base
            assert getattr(w, f).dtype == want, (cls.__name__, f)
        assert np.array_equal(np.asarray(dequantize(w)), np.asarray(ref)), cls.__name__
        jaxpr = str(jax.make_jaxpr(lambda w: w.dequantize())(w))
        assert not any(t in jaxpr for t in ("u8[", "u16[", "u32[", "u64[")), jaxpr


def _primitives(jaxpr) -> set[str]:
    """Names of every primitive in a (closed) jaxpr, nested jaxprs (jit, cond, scan) included."""
    return {eqn.primitive.name for eqn in equations(jaxpr)}


def test_metal_safe_model_matches_default(synth_model, profile):
    """Same logits and state as the default path; no loop primitive, no donation."""
    path = synth_model("tiny", "Q4_K_M")
    toks = np.random.default_rng(3).integers(1, 65530, 20).astype(np.int32)
    out = {}
    for name in ("default", "metal-safe"):
        profile(name)
        m = rwkv_jax.load(path)
        logits, state = m.forward(toks, all_logits=True)
        steps, s = [], m.new_state(1)
        for t in toks[:3]:
            old = s
            lg, s = m.step([int(t)], s)
            steps.append(lg[0])
        out[name] = (logits, state, jnp.stack(steps), old.wkv.is_deleted(), m)
    (a, sa, da, donated, _), (b, sb, db, kept_deleted, safe) = out["default"], out["metal-safe"]
    assert donated and not kept_deleted
    assert float(jnp.abs(a - b).max()) <= TOL
    assert float(jnp.abs(da - db).max()) <= TOL
    assert float(jnp.abs(db - b[0, :3]).max()) <= TOL  # decode agrees with its own prefill
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        assert float(jnp.abs(x - y).max()) <= TOL
    assert not safe.params.stacked
    # the programs a Metal plugin compiles hold no loop or conditional primitive
    st, kw = safe.new_state(1), dict(cfg=safe.config, dtype=safe.dtype)
    opts = dict(chunk_size=16, step_len=16, all_logits=False, impl="unrolled", **kw)
    pre = jax.make_jaxpr(lambda p, t, n, s: prefill_call(p, t, n, s, **opts))
    dec = jax.make_jaxpr(lambda p, t, s: decode_step_kept(p, t, s, **kw))
    tok = jnp.zeros((1, 16), jnp.int32)
    for j in (pre(safe.params, tok, jnp.array([16]), st), dec(safe.params, tok[:, 0], st)):
        prims = _primitives(j)
        assert "dot_general" in prims  # the walk reached inside the jit site
        assert not prims & {"scan", "while", "cond", "platform_index"}, prims


def test_cli_options(synth_model, profile, tmp_path, capsys):
    """--profile reaches the model; --platform metal without a plugin is a one-line error."""
    from rwkv_jax.cli import main

    path, out = synth_model("tiny", "F32"), tmp_path / "l.npz"
    profile("default")
    args = ["logits", path, "--prompt", "Hi", "-o", str(out), "--platform", "cpu"]
    assert main([*args, "--profile", "metal-safe"]) == 0
    assert backends.current_profile().name == "metal-safe" and out.exists()
    if not any(p.spec.kind == "metal" for p in backends.installed_plugins()):
        assert main(["generate", path, "--prompt", "Hi", "--platform", "metal"]) == 1
        assert "rwkv-jax: error: --platform metal:" in capsys.readouterr().err


# ---- doctor ---------------------------------------------------------------------------------


def _report(**kw) -> doctor.Report:
    """A doctor report of a machine described by keyword overrides."""
    base = dict(
        python="3.12.4",
        system="Darwin 24.1.0 arm64 (macOS 15.1)",
        machine="arm64",
        apple_silicon=True,
        macos="15.1",
        rosetta=False,
        packages={"jax": "0.10.2", "jaxlib": "0.10.2"},
        env={},
        plugins=[],
        entry_points=[],
        nvidia_gpu=False,
    )
    return doctor.Report(**{**base, **kw})


def _plugin_row(dist: str, problem: str = "") -> dict:
    """A report's plugin row."""
    spec = SPECS[dist]
    return dict(
        dist=dist, version="0.1.1", platform=spec.platform, kind=spec.kind, problem=problem, note=""
    )


def test_doctor_advice_for_a_mac():
    """The advice names the fix: jax-metal under too new a jax, no plugin, Rosetta, old macOS."""
    bad = _plugin_row("jax-metal", "jax-metal 0.1.1 needs jax/jaxlib <= 0.5.0; ...")
    text = " | ".join(doctor.advise(_report(plugins=[bad])))
    assert "jax-metal needs jax <= 0.5.0 (jaxlib == jax); you have 0.10.2" in text
    assert "install rwkv-jax[metal] in a fresh environment" in text
    text = " | ".join(doctor.advise(_report()))
    assert "no Metal plugin is installed" in text and "pip install metaljax" in text
    rosetta = _report(rosetta=True, machine="x86_64", apple_silicon=False)
    assert "Rosetta" in " ".join(doctor.advise(rosetta))
    old = _report(macos="14.2", plugins=[_plugin_row("jax-metal")])
    assert "jax-metal needs macOS >= 14.4; this is macOS 14.2" in doctor.advise(old)


def test_doctor_advice_from_smoke_tests():
    """A working default profile on Metal is suggested; a crash or wrong logits is reported."""
    t = {"prefill": 0.010, "decode": 0.004, "prefill_first": 1.0, "decode_first": 1.0}
    safe = doctor.Smoke(
        "METAL (jax-metal 0.1.1)", "METAL", "metal-safe", ok=True, seconds=t, vs_cpu=2e-6
    )
    fast = doctor.Smoke(
        "METAL (jax-metal 0.1.1) default",
        "METAL",
        "default",
        ok=True,
        seconds={**t, "prefill": 0.005},
        vs_cpu=3e-6,
    )
    text = " | ".join(
        doctor.advise(_report(plugins=[_plugin_row("jax-metal")], smoke=[safe, fast]))
    )
    assert "the default profile also works here (prefill 5.0 ms vs 10.0 ms" in text
    fast.ok, fast.error = False, "crashed (SIGSEGV)"
    text = " | ".join(
        doctor.advise(_report(plugins=[_plugin_row("jax-metal")], smoke=[safe, fast]))
    )
    assert "failed: crashed (SIGSEGV)" in text and "keep the metal-safe profile" in text
    safe.vs_cpu = 0.5
    assert "differ from the CPU's" in " ".join(doctor.advise(_report(smoke=[safe])))


def test_doctor_smoke_plan():
    """CPU in both profiles; a working Metal plugin in both; broken plugins are not run."""
    r = _report(plugins=[_plugin_row("jax-metal"), _plugin_row("jax-mps", "needs jax <0.10")])
    plan = [(s.jax_platforms, s.profile) for s in doctor.smoke_plan(r)]
    assert plan == [
        ("cpu", "auto"),
        ("cpu", "metal-safe"),
        ("METAL", "metal-safe"),
        ("METAL", "default"),
    ]
    assert [s.jax_platforms for s in doctor.smoke_plan(r, "metal")] == ["METAL", "METAL"]


@pytest.mark.slow
def test_doctor_command_runs(synth_model, capsys):
    """The whole command on this machine: both CPU smoke tests pass and agree (~40 s)."""
    from rwkv_jax.cli import main

    assert main(["doctor", "--model", synth_model("tiny", "Q4_K_M"), "--platform", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok  prefill") == 2 and "nothing to fix" in out
