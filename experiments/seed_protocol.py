"""The seed's benchmark protocol, exactly (bench-protocol.md §1): RNG, phases, quality hash.

The seed is `examples/benchmark.rs` of JoelTankard/web-rwkv-gguf. Its random tokens come from the
Rust crate `fastrand` 2.3: the thread-local WyRand generator, `fastrand::seed(x)` and
`fastrand::u16(0..(vocab - 1) as u16)`. Read from the crate's `src/lib.rs` (2.x):

    gen_u64:      s += 0x2d358dccaa6c78a5; t = (s as u128) * ((s ^ 0x8bb84b93962eacc9) as u128);
                  return lo64(t) ^ hi64(t)
    gen_u32:      gen_u64() as u32                      (the low 32 bits)
    u16(range):   rng_integer!(u16, u16, gen_u32, gen_mod_u32): for 0..n (n < 65536, not the
                  full range) it returns gen_mod_u32(n) — there is no u16-specific path
    gen_mod_u32:  Lemire: r = gen_u32(); m = r * n (u64); hi = m >> 32; lo = m as u32;
                  if lo < n { t = n.wrapping_neg() % n; while lo < t { redraw r, hi, lo } }; hi

The phases run on one model state that is never reset (the seed's runtime keeps its state
across warm-up, prefill, generation and the quality check), so the quality hash depends on every
token fed before it, as in the seed. The engine is abstract (`SeedEngine`): rwkv_jax and
llama.cpp run the identical protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
WY_CONST_0 = 0x2D358DCCAA6C78A5  # fastrand 2.x gen_u64 increment (wyhash v4.2 constants)
WY_CONST_1 = 0x8BB84B93962EACC9  # ... and multiplier xor
HASH_MULT = 31  # the seed's quality fold: acc = acc * 31 + token (wrapping u64)


class WyRand:
    """fastrand 2.3's `Rng` (a WyRand generator over one u64 of state)."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def gen_u64(self) -> int:
        """`Rng::gen_u64`: one WyRand step."""
        self.state = (self.state + WY_CONST_0) & MASK64
        t = self.state * (self.state ^ WY_CONST_1)  # exact 128-bit product (Python ints)
        return (t & MASK64) ^ (t >> 64)

    def gen_u32(self) -> int:
        """`Rng::gen_u32`: the low 32 bits of gen_u64."""
        return self.gen_u64() & MASK32

    def gen_mod_u32(self, n: int) -> int:
        """`Rng::gen_mod_u32`: uniform in 0..n by Lemire's multiply-shift with rejection."""
        m = self.gen_u32() * n
        lo = m & MASK32
        if lo < n:
            t = ((-n) & MASK32) % n  # n.wrapping_neg() % n: 2^32 mod n
            while lo < t:
                m = self.gen_u32() * n
                lo = m & MASK32
        return m >> 32

    def u16(self, low: int, high: int) -> int:
        """`Rng::u16(low..high)` (exclusive upper bound), as the seed calls it."""
        if not 0 <= low < high <= 0x10000:
            raise ValueError(f"empty or out-of-range u16 range {low}..{high}")
        if low == 0 and high - 1 == 0xFFFF:
            return self.gen_u32() & 0xFFFF  # full range: `gen_u32() as u16`
        return low + self.gen_mod_u32(high - low)


def token_bound(vocab_size: int) -> int:
    """The seed's exclusive bound `(num_vocab - 1) as u16` (65535 for the 65536-token vocab)."""
    bound = (vocab_size - 1) & 0xFFFF
    if bound == 0:
        raise ValueError(f"vocabulary of {vocab_size} gives an empty u16 token range")
    return bound


def draw_tokens(rng: WyRand, n: int, vocab_size: int) -> list[int]:
    """n random tokens as the seed draws them: `fastrand::u16(0..(vocab - 1) as u16)`."""
    bound = token_bound(vocab_size)
    return [rng.u16(0, bound) for _ in range(n)]


def quality_hash(tokens: Sequence[int]) -> str:
    """Fold `acc = acc * 31 + t` in wrapping u64, lowercase hex without padding (`{:x}`)."""
    acc = 0
    for t in tokens:
        acc = (acc * HASH_MULT + int(t)) & MASK64
    return format(acc, "x")


def seed_argmax(logits: np.ndarray) -> int:
    """The seed's greedy pick: argmax of the float32 softmax, the LAST maximum on ties.

    The seed calls `softmax_one` then `iter().enumerate().max_by(partial_cmp)`, and Rust's
    `max_by` returns the last of equal maxima (bench-protocol.md says "first maximum"; the
    source decides). Softmax in float32 can tie logits that differ by less than ~1 ulp of 1.0
    after `exp(x - max)`; taking the argmax of the probabilities reproduces that.
    """
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    e = np.exp(x - x.max())  # float32, the max element is exactly 1
    p = e / e.sum(dtype=np.float32)
    return int(p.size - 1 - np.argmax(p[::-1]))


class SeedEngine(Protocol):
    """What the seed protocol needs from an inference engine (one recurrent state)."""

    vocab_size: int

    def load_once(self) -> float:
        """Build the model from a parsed header; returns seconds; it becomes the active model."""
        ...

    def reset(self) -> None:
        """Start from a zero state (once, before the warm-up)."""
        ...

    def feed(self, tokens: Sequence[int], read: bool) -> np.ndarray | None:
        """One call over `tokens` continuing the state; with `read`, the last logits on host."""
        ...

    def step(self, token: int) -> np.ndarray:
        """One single-token call; its logits on the host."""
        ...


def feed_prompt(engine: SeedEngine, tokens: Sequence[int], chunk: int) -> np.ndarray:
    """Feed a prompt in calls of `chunk` tokens; only the last call's logits come to the host."""
    out = None
    for s in range(0, len(tokens), chunk):
        last = s + chunk >= len(tokens)
        out = engine.feed(tokens[s : s + chunk], read=last)
    assert out is not None
    return out


def run(
    engine: SeedEngine,
    p,
    log: Callable[[str], None] = print,
    after_load: Callable[[], None] | None = None,
) -> dict:
    """Run the seed protocol with parameters `p` (config.SeedProtocol); returns the figures.

    `after_load` runs between the timed loads and the warm-up (rwkv_jax times its compilation
    there, on a scratch state).
    """
    V = engine.vocab_size
    load_s = []
    for i in range(p.load_runs):
        load_s.append(engine.load_once())
        log(f"  load run {i + 1}: {load_s[-1] * 1e3:.2f} ms")
    log(f"  load time (mean of {p.load_runs}): {np.mean(load_s) * 1e3:.2f} ms")
    if after_load is not None:
        after_load()

    engine.reset()
    rng = WyRand(p.token_seed)  # seeded once for all warm-up prompts
    for _ in range(p.warmup_runs):
        feed_prompt(engine, draw_tokens(rng, p.warmup_len, V), p.chunk)

    prefill_s = []
    for _ in range(p.runs):
        toks = draw_tokens(WyRand(p.token_seed), p.prefill_len, V)
        t0 = time.perf_counter()
        feed_prompt(engine, toks, p.chunk)
        prefill_s.append(time.perf_counter() - t0)
    log(f"  prefill: {p.prefill_len / np.mean(prefill_s):.2f} tok/s")

    gen_s = []
    for _ in range(p.runs):
        rng = WyRand(p.token_seed)
        feed_prompt(engine, draw_tokens(rng, p.gen_prefill_len, V), p.chunk)  # untimed
        toks = draw_tokens(rng, p.gen_len, V)  # the same stream the seed draws inside its loop
        t0 = time.perf_counter()
        for tok in toks:
            engine.step(tok)  # random (not greedy) tokens, logits read back every step
        gen_s.append(time.perf_counter() - t0)
    log(f"  generation: {p.gen_len / np.mean(gen_s):.2f} tok/s")

    rng = WyRand(p.quality_seed)
    logits = feed_prompt(engine, draw_tokens(rng, p.quality_prompt_len, V), p.chunk)
    quality = []
    for _ in range(p.quality_gen_len):
        tok = seed_argmax(logits)
        quality.append(tok)
        logits = engine.step(tok)  # the seed also runs the last token through the model
    qhash = quality_hash(quality)
    log(f"  quality hash: {qhash}  first 8: {quality[:8]}")

    return {
        "load_ms_runs": [s * 1e3 for s in load_s],
        "load_ms": float(np.mean(load_s) * 1e3),
        "prefill_s_runs": prefill_s,
        "prefill_tps": float(p.prefill_len / np.mean(prefill_s)),
        "generation_s_runs": gen_s,
        "generation_tps": float(p.gen_len / np.mean(gen_s)),
        "quality_hash": qhash,
        "quality_tokens": quality,
    }
