"""Platforms and capability profiles: which JAX backend runs, and which code paths it gets.

Platform (`select_platform`): `auto | cpu | cuda | metal`, applied before JAX initializes its
backends (it sets JAX_PLATFORMS and, when jax is already imported, `jax_platforms`). `metal`
uses Apple's jax-metal or an installed community PJRT plugin (metaljax, jax-mps,
metal-pjrt-plugin) whose JAX version requirements the installed jax meets, and says what to
install when there is none. `auto` leaves the choice to JAX (a GPU plugin that initializes
before the CPU) except that it excludes an installed plugin that cannot work with this jax —
jax-metal under jax > 0.5.0 would be chosen and then fail on the first array.

Profile (`current_profile`): the code paths the model takes, one row per profile in PROFILES,
picked per platform by PLATFORM_PROFILES (or forced: `set_profile`, `--profile`,
RWKV_JAX_PROFILE). Nothing else in the package branches on the platform for these choices.
The metal-safe row avoids what jax-metal 0.1.1 lacks (issue numbers in jax-ml/jax; see
docs/backends.md): buffer donation (ignored, #20212), `lax.scan` (segfaults with dynamic
indexing, #20750, #23931), unsigned integers (uint32 #24867, unsigned gather/argmax indices
#21547, #21590), int4 (#21883) and RNG bit generators (rng_bit_generator's ui32, #24867).
The same row is what a CPU run with `--profile metal-safe` executes, which is how the Metal
code path is tested without a Mac (`make test-metal-safe`, jax 0.4.38). The gpu row is the
default one with the quants of Q4_K / Q6_K stored as 32-bit words (quant.Weight.WORD_FIELDS)
in packed bf16/f16 models (quant.words_for), which the CUDA decode kernels multiply by integer
dot products (gpu_kernels.py); forced on the CPU it runs XLA's paths for those formats instead
of the native kernels (which read bytes).
"""

from __future__ import annotations

import dataclasses
import os
import platform as _platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata

from rwkv_jax.errors import ConfigError

PLATFORMS = ("auto", "cpu", "cuda", "metal")
PROFILE_ENV = "RWKV_JAX_PROFILE"

# jax-metal 0.1.1 declares only jax>=0.4.34; jax >= 0.5.1 fails with `default_memory_space is not
# supported` (#27062, #26968) and newer jaxlibs emit StableHLO it cannot parse (#32800).
JAX_METAL_MAX = "0.5.0"
# The newest jax that jax-metal runs with and equinox (>= 0.11.12) supports: the [metal] extra.
JAX_FOR_METAL = "0.4.38"
METAL_EXTRA_HINT = (
    "install rwkv-jax[metal] in a fresh environment (jax-metal 0.1.1 with jax/jaxlib "
    f"{JAX_FOR_METAL}): `python3 -m venv ~/.venvs/rwkv-metal && "
    "~/.venvs/rwkv-metal/bin/pip install 'rwkv-jax[metal]'` (from a checkout: "
    "`pip install -e '.[metal]'`)"
)
COMMUNITY_HINT = (
    "or keep current JAX and add a community plugin: `pip install metaljax` (Python >= 3.12, "
    "JAX_PLATFORMS=metal) or `pip install jax-mps` (JAX_PLATFORMS=mps)"
)


# ---------------------------------------------------------------------------------------------
# Capability profiles


@dataclass(frozen=True)
class Profile:
    """The code paths one kind of backend can run; every field is read in exactly one place."""

    name: str
    # decode/sample steps donate the state buffers (generate.decode_fn, session.sample_steps)
    donate: bool
    # prefill: "scan" = one program per call scanning over steps of WKV chunks; "host" = a Python
    # loop over one-chunk calls whose programs hold no loop (token recurrence unrolled)
    prefill_loop: str
    # layer stacking when load() is not told: None = stack (scan over layers) when formats
    # allow; False = unrolled layers (no scan)
    stack_layers: bool | None
    # packed uint8 block fields: "uint8" as stored, "int8" (a zero-copy host view, unpacked
    # with int32 arithmetic, bit-identical) for plugins without unsigned integer support, or
    # "uint32": the quants of Q4_K / Q6_K (Weight.WORD_FIELDS) as little-endian 32-bit words in
    # packed bf16/f16 models (quant.words_for), for the CUDA kernels' dp4a (gpu_kernels.py)
    quant_bytes: str
    # decode matvec of packed weights: "platform" = dot on the CPU, fused multiply+reduce
    # elsewhere (lax.platform_dependent); "fused" = always the multiply+reduce (Metal's branch)
    matvec: str
    # compute dtype for dtype="auto": None = float32 on the CPU, bfloat16 on accelerators
    dtype: str | None
    # jax_default_prng_impl to set, None = leave JAX's setting (threefry2x32 unless changed)
    prng_impl: str | None
    # tokens per generation call (session.Generator): a loop samples and feeds up to this many on
    # the device between host checks; 1 = one token per call, no loop in the program
    decode_block: int
    why: str


_DEFAULT = Profile(
    name="default",
    donate=True,
    prefill_loop="scan",
    stack_layers=None,
    quant_bytes="uint8",
    matvec="platform",
    dtype=None,
    prng_impl=None,
    decode_block=16,
    why="CPU: donated decode state, scanned prefill and layers, uint8 unpacking",
)
PROFILES: dict[str, Profile] = {
    "default": _DEFAULT,
    "gpu": dataclasses.replace(
        _DEFAULT,
        name="gpu",
        quant_bytes="uint32",
        why="GPUs: as default, with the K-quants' quants stored as 32-bit words (bf16/f16 models)",
    ),
    "metal-safe": Profile(
        name="metal-safe",
        donate=False,
        prefill_loop="host",
        stack_layers=False,
        quant_bytes="int8",
        matvec="fused",
        dtype="float32",
        # threefry is plain int32/uint32 arithmetic that every Metal plugin runs (slowly, #31286)
        # and gives the CPU's bits; 'rbg' needs rng_bit_generator, which jax-metal rejects
        prng_impl="threefry2x32",
        decode_block=1,
        why=(
            "Metal plugins: no donation, no lax.scan/while/cond in any program (host loop over "
            "one-chunk prefill calls, unrolled layers), signed-byte fields unpacked with int32 "
            "arithmetic, float32 compute, threefry RNG"
        ),
    ),
}
# jax.default_backend() (lower-cased) -> profile; unknown platforms get "default"
PLATFORM_PROFILES: dict[str, str] = {
    "cpu": "default",
    "gpu": "gpu",
    "cuda": "gpu",
    "rocm": "gpu",
    "tpu": "default",
    "metal": "metal-safe",  # jax-metal ("METAL") and metaljax ("metal")
    "mps": "metal-safe",  # jax-mps
    "mtl": "metal-safe",  # metal-pjrt-plugin
}

_override: str | None = None  # set_profile's choice; None = RWKV_JAX_PROFILE or auto
_resolved: Profile | None = None


def profile_names() -> tuple[str, ...]:
    """Values `set_profile` and `--profile` accept."""
    return ("auto", *PROFILES)


def _check_profile_name(name: str, where: str) -> str:
    """The name if it is a known profile (or auto), else a ConfigError naming `where`."""
    if name not in profile_names():
        raise ConfigError(f"{where}: unknown profile '{name}'; choose one of {profile_names()}")
    return name


def profile_for_platform(platform: str) -> Profile:
    """The profile a JAX platform name ('cpu', 'gpu', 'METAL', 'mps', ...) runs by default."""
    return PROFILES[PLATFORM_PROFILES.get(platform.lower(), "default")]


def set_profile(name: str) -> None:
    """Force a profile ('default', 'metal-safe') on any platform, or 'auto' (by platform).

    Compiled programs embed the profile's choices, so JAX's caches are cleared when this
    changes the profile in use.
    """
    global _override, _resolved
    _check_profile_name(name, "set_profile")
    old = _resolved
    _override, _resolved = name, None
    if old is not None and current_profile() is not old:  # JAX is up: resolving is free
        import jax

        jax.clear_caches()


def requested_profile() -> str:
    """The profile asked for: set_profile's, else RWKV_JAX_PROFILE, else 'auto'."""
    if _override is not None:
        return _override
    return _check_profile_name(os.environ.get(PROFILE_ENV) or "auto", PROFILE_ENV)


def current_profile() -> Profile:
    """The profile in force (resolving 'auto' initializes JAX's backends); applies its RNG."""
    global _resolved
    if _resolved is None:
        import jax

        name = requested_profile()
        prof = profile_for_platform(jax.default_backend()) if name == "auto" else PROFILES[name]
        if prof.prng_impl is not None:
            jax.config.update("jax_default_prng_impl", prof.prng_impl)
        _resolved = prof
    return _resolved


# ---------------------------------------------------------------------------------------------
# Versions and installed PJRT plugins (from package metadata: nothing here initializes JAX)


def release(version: str) -> tuple[int, ...]:
    """Numeric release of a version: '0.4.38' -> (0, 4, 38), '0.9.1.dev5' -> (0, 9, 1)."""
    parts = []
    for piece in version.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):  # '0rc1': the release ends here
            break
    return tuple(parts)


def _cmp(a: str, b: str) -> int:
    """-1, 0 or 1 comparing two versions by their numeric release (zero-padded)."""
    x, y = release(a), release(b)
    n = max(len(x), len(y))
    x, y = x + (0,) * (n - len(x)), y + (0,) * (n - len(y))
    return (x > y) - (x < y)


_OPS = {
    "==": lambda c: c == 0,
    "!=": lambda c: c != 0,
    ">=": lambda c: c >= 0,
    "<=": lambda c: c <= 0,
    ">": lambda c: c > 0,
    "<": lambda c: c < 0,
}


def satisfies(version: str, spec: str) -> bool:
    """Whether a version meets a PEP 440 specifier list like '>=0.9.0,<0.10' (release parts)."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.fullmatch(r"(==|!=|>=|<=|~=|>|<)\s*([\w.*+!-]+)", clause)
        if not m:
            continue  # an exotic clause: not ours to judge
        op, bound = m.groups()
        if bound.endswith(".*"):  # ==0.4.* / !=0.7.*: compare the given prefix
            pre = release(bound[:-2])
            same = release(version)[: len(pre)] == pre
            if same != (op == "=="):
                return False
        elif op == "~=":  # ~=0.4.30: >= 0.4.30 and == 0.4.*
            pre = release(bound)[:-1]
            if _cmp(version, bound) < 0 or release(version)[: len(pre)] != pre:
                return False
        elif not _OPS[op](_cmp(version, bound)):
            return False
    return True


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def dist_requirement(dist: str, on: str) -> str:
    """The specifier `dist` declares for package `on` (e.g. '>=0.4.34'), '' if none."""
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return ""
    for req in reqs:
        body, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?", body)
        if m and m.group(1).lower().replace("_", "-") == on:
            return m.group(2).strip()
    return ""


@dataclass(frozen=True)
class PluginSpec:
    """A PJRT plugin distribution we know: its JAX platform name and what it needs."""

    dist: str
    platform: str  # the name it registers with JAX: a JAX_PLATFORMS value
    kind: str  # "metal" | "cuda" | "rocm" | "tpu"
    jax_max: str | None  # newest jax known to work where the metadata does not say
    note: str


KNOWN_PLUGINS: tuple[PluginSpec, ...] = (
    PluginSpec(
        "jax-metal",
        "METAL",
        "metal",
        JAX_METAL_MAX,
        "Apple, 0.1.1 (Oct 2024), unmaintained; jax == jaxlib in 0.4.34-0.5.0, macOS >= 14.4",
    ),
    PluginSpec("metaljax", "metal", "metal", None, "community, MLX runtime bundled (beta)"),
    PluginSpec("jax-mps", "mps", "metal", None, "community, MLX-backed"),
    PluginSpec("metal-pjrt-plugin", "mtl", "metal", None, "community (dfm), macOS >= 26"),
    PluginSpec("jax-cuda13-plugin", "cuda", "cuda", None, "NVIDIA CUDA 13"),
    PluginSpec("jax-cuda12-plugin", "cuda", "cuda", None, "NVIDIA CUDA 12"),
    PluginSpec("libtpu", "tpu", "tpu", None, "Google TPU"),
)


@dataclass(frozen=True)
class Plugin:
    """An installed PJRT plugin and, when it cannot work with this jax, why."""

    spec: PluginSpec
    version: str
    problem: str | None


def plugin_problem(spec: PluginSpec, version: str, jax: str | None, jaxlib: str | None) -> str:
    """Why plugin `spec` at `version` cannot run with these jax/jaxlib ('' if it can)."""
    if jax is None or jaxlib is None:
        return "jax/jaxlib are not installed"
    need_jax = dist_requirement(spec.dist, "jax")
    need_lib = dist_requirement(spec.dist, "jaxlib")
    bad = []
    if need_jax and not satisfies(jax, need_jax):
        bad.append(f"jax {need_jax}")
    if need_lib and not satisfies(jaxlib, need_lib):
        bad.append(f"jaxlib {need_lib}")
    if spec.jax_max and (_cmp(jax, spec.jax_max) > 0 or _cmp(jaxlib, spec.jax_max) > 0):
        bad.append(f"jax/jaxlib <= {spec.jax_max}")
    if spec.dist == "jax-metal" and _cmp(jax, jaxlib) != 0:
        bad.append("jax == jaxlib")
    if not bad:
        return ""
    return f"{spec.dist} {version} needs {', '.join(bad)}; you have jax {jax}, jaxlib {jaxlib}"


def installed_plugins() -> list[Plugin]:
    """The known PJRT plugins installed here, each with its compatibility problem (or None)."""
    jax, jaxlib = dist_version("jax"), dist_version("jaxlib")
    out = []
    for spec in KNOWN_PLUGINS:
        version = dist_version(spec.dist)
        if version is not None:
            problem = plugin_problem(spec, version, jax, jaxlib) or None
            out.append(Plugin(spec, version, problem))
    return out


def jax_plugin_entry_points() -> list[str]:
    """Every `jax_plugins` entry point (the plugins JAX itself will import), as 'name=module'."""
    return sorted(f"{ep.name}={ep.value}" for ep in metadata.entry_points(group="jax_plugins"))


def is_apple_silicon() -> bool:
    """macOS on arm64 (an x86_64 Python under Rosetta does not count: Metal plugins are arm64)."""
    return sys.platform == "darwin" and _platform.machine() == "arm64"


def metal_plugin(plugins: list[Plugin] | None = None) -> Plugin:
    """The installed Metal plugin that works with this jax, or a ConfigError saying what to do."""
    plugins = installed_plugins() if plugins is None else plugins
    metal = [p for p in plugins if p.spec.kind == "metal"]
    for p in metal:
        if p.problem is None:
            return p
    where = (
        ""
        if is_apple_silicon()
        else f"Metal needs an Apple-silicon Mac with an arm64 Python; this is "
        f"{sys.platform} {_platform.machine()}. "
    )
    if not metal:
        raise ConfigError(
            f"--platform metal: {where}no Metal PJRT plugin is installed; {METAL_EXTRA_HINT}, "
            f"{COMMUNITY_HINT}"
        )
    problems = "; ".join(str(p.problem) for p in metal)
    raise ConfigError(f"--platform metal: {where}{problems}; {METAL_EXTRA_HINT}, {COMMUNITY_HINT}")


# ---------------------------------------------------------------------------------------------
# Platform selection


def _has_kind(plugins: list[Plugin], kind: str) -> bool:
    """Whether a working plugin of this kind is installed."""
    return any(p.spec.kind == kind and p.problem is None for p in plugins)


def _auto_platforms(plugins: list[Plugin]) -> str:
    """JAX_PLATFORMS for 'auto': '' (JAX's own priority order) unless a plugin must be excluded."""
    if not any(p.problem is not None for p in plugins):
        return ""
    # list what can work, fastest first; JAX skips cuda by itself when no NVIDIA GPU is visible
    order = [("cuda", "cuda"), ("rocm", "rocm"), ("tpu", "tpu")]
    keep = [name for kind, name in order if _has_kind(plugins, kind)]
    metal = [p for p in plugins if p.spec.kind == "metal" and p.problem is None]
    keep += [metal[0].spec.platform] if metal else []
    return ",".join([*keep, "cpu"])


def _apply(value: str) -> None:
    """Make JAX use platforms `value` ('' = JAX's choice); too late once backends exist."""
    if "jax" in sys.modules:
        import jax
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            running = jax.default_backend().lower()
            wanted = [v.lower() for v in value.split(",") if v]
            if wanted and running not in wanted and not (running == "gpu" and "cuda" in wanted):
                raise ConfigError(
                    f"JAX is already running on '{running}', so platform '{value}' cannot be "
                    "selected any more; select it before the first JAX computation "
                    f"(rwkv_jax.backends.select_platform at start-up, or JAX_PLATFORMS={value})"
                )
            return
        if value:
            jax.config.update("jax_platforms", value)
    if value:
        os.environ["JAX_PLATFORMS"] = value


def select_platform(name: str = "auto") -> str:
    """Choose the JAX platform before JAX initializes; returns the JAX_PLATFORMS now in force.

    cpu / cuda / metal select that platform (metal: the installed plugin that works with this
    jax — its JAX name is 'METAL', 'metal', 'mps' or 'mtl'); a ConfigError says what to
    install when there is none. auto keeps a JAX_PLATFORMS the user set, otherwise lets JAX
    take the fastest backend that initializes ('' is returned), excluding plugins that cannot
    work with this jax.
    """
    if name not in PLATFORMS:
        raise ConfigError(f"unknown platform '{name}'; choose one of {PLATFORMS}")
    plugins = installed_plugins()
    if name == "auto":
        if os.environ.get("JAX_PLATFORMS"):
            return os.environ["JAX_PLATFORMS"]
        value = _auto_platforms(plugins)
    elif name == "cpu":
        value = "cpu"
    elif name == "cuda":
        if not _has_kind(plugins, "cuda"):
            broken = [str(p.problem) for p in plugins if p.spec.kind == "cuda" and p.problem]
            why = "; ".join(broken) or "no CUDA plugin is installed"
            raise ConfigError(
                f"--platform cuda: {why}; install it with `pip install 'rwkv-jax[cuda]'` "
                "(jax[cuda13], for a machine with an NVIDIA GPU and driver)"
            )
        value = "cuda"
    else:
        value = metal_plugin(plugins).spec.platform
    _apply(value)
    return value
