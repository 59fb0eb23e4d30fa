"""The two jit sites — prefill (a scan over chunks) and the decode step — and the `Model` API.

prefill: one compiled program per (batch, chunk layout) runs a `lax.scan` over steps of
`chunks_per_step` WKV chunks of `chunk_size` tokens (steps that are entirely padding are skipped
with `lax.cond`), `chunks_per_call` chunks per call; longer prompts take several calls with the
state carried. A tail shorter than one step runs through a second program of shorter steps
(`Model.tail_chunks`) instead of a padded step, and a step holds at most MAX_STEP_TOKENS rows x
tokens (larger batches halve it). The layout defaults by backend (`default_layout`): 128-token
steps on the CPU (blocked native matmuls), 4096-token steps with 512-token tail steps on GPUs
(large matrix products, the packed weights dequantized once per layer per step).
decode: one token per sequence, state donated (updated in place on CPU/CUDA).
The profile (`backends.current_profile`) picks the variants: metal-safe decodes without
donation (`decode_fn`) and prefills with a host loop over one-chunk calls whose programs hold no
loop primitive (WKV "unrolled"), layers unrolled.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from rwkv_jax import backends, compile_cache, cpu_kernels, model, wkv
from rwkv_jax.errors import InputError
from rwkv_jax.gguf import GGUFFile, ModelConfig
from rwkv_jax.params import DTYPES, Params, load_params
from rwkv_jax.state import State
from rwkv_jax.tokenizer import Tokenizer

WKV_IMPLS = ("chunked", "sequential", "unrolled")


def _unrolled_wkv(S, r, k, v, alpha, beta, ld):
    """The token recurrence written out over T ([B, T, H, N] inputs): no loop primitive."""
    ys = []
    for t in range(r.shape[1]):
        y, S = wkv.wkv7_step(S, r[:, t], k[:, t], v[:, t], alpha[:, t], beta[:, t], ld[:, t])
        ys.append(y)
    return jnp.stack(ys, axis=1), S  # [B, T, H, N]


def _wkv_fn(impl: str, chunk_size: int) -> model.WkvFn:
    """The WKV-7 kernel over one scan step's tokens (a whole number of chunks)."""
    if impl == "chunked":
        return functools.partial(wkv.wkv7_chunked, chunk_size=chunk_size)
    if impl == "sequential":
        return wkv.wkv7_sequential
    if impl == "unrolled":
        return _unrolled_wkv
    raise InputError(f"wkv implementation '{impl}' is not one of {[*WKV_IMPLS, 'auto']}")


def _step_wkv(S, r, k, v, alpha, beta, ld):
    """Single-token WKV ([B, 1, H, N] inputs) without a loop."""
    y, S = wkv.wkv7_step(S, r[:, 0], k[:, 0], v[:, 0], alpha[:, 0], beta[:, 0], ld[:, 0])
    return y[:, None], S


@functools.partial(
    jax.jit, static_argnames=("cfg", "chunk_size", "step_len", "all_logits", "impl", "dtype")
)
def prefill_call(
    params: Params,
    tokens: Array,
    lengths: Array,
    state: State,
    *,
    cfg: ModelConfig,
    chunk_size: int,
    step_len: int,
    all_logits: bool,
    impl: str,
    dtype,
) -> tuple[Array, State]:
    """One prefill call: tokens [B, K*step_len] (row b valid up to lengths[b]) from state.

    A `lax.scan` over K steps of `step_len` tokens (a whole number of WKV chunks of
    `chunk_size`); each step runs every layer on its tokens — projections as [B, step_len, C]
    matrix products, the WKV chunk by chunk — and steps holding no valid token are skipped.
    Returns logits [B, V] of each row's last valid token (zeros for rows with length 0), or
    [B, K*step_len, V] for every position, and the new state. A call of one step (K = 1, the
    metal-safe host loop) runs it directly: no scan and no cond.
    """
    B, T = tokens.shape
    n_steps = T // step_len
    steps = tokens.reshape(B, n_steps, step_len).transpose(1, 0, 2)  # [K, B, S]
    starts = jnp.arange(n_steps, dtype=jnp.int32)[:, None] * step_len
    step_lens = jnp.clip(lengths[None, :] - starts, 0, step_len)  # [K, B]
    wkv_fn = _wkv_fn(impl, chunk_size)
    V = cfg.vocab_size
    out_shape = (B, step_len, V) if all_logits else (B, V)

    def run(state, tok, lens):
        return model.forward(
            params, cfg, tok, state, lengths=lens, wkv_fn=wkv_fn, all_logits=all_logits, dtype=dtype
        )

    def skip(state, tok, lens):
        return jnp.zeros(out_shape, jnp.float32), state

    def body(carry, xs):
        state, last = carry
        tok, lens = xs
        logits, state = lax.cond(jnp.any(lens > 0), run, skip, state, tok, lens)
        if not all_logits:  # keep the logits of the step holding each row's last token
            last = jnp.where((lens > 0)[:, None], logits, last)
            logits = None
        return (state, last), logits

    if n_steps == 1:
        logits, state = run(state, steps[0], step_lens[0])
        if not all_logits:
            logits = jnp.where((step_lens[0] > 0)[:, None], logits, 0.0)
        return logits, state

    (state, last), per_step = lax.scan(
        body, (state, jnp.zeros((B, V), jnp.float32)), (steps, step_lens)
    )
    if all_logits:
        return per_step.transpose(1, 0, 2, 3).reshape(B, T, V), state
    return last, state


def _decode(
    params: Params,
    tokens: Array,
    state: State,
    active: Array | None = None,
    *,
    cfg: ModelConfig,
    dtype,
) -> tuple[Array, State]:
    """One token per sequence: tokens [B] -> logits [B, V] and the new state.

    Rows whose `active` [B] is False take no step: their state comes back unchanged (bit for bit
    up to the sign of zero: the token is fed as padding, model.forward's `lengths` 0) and their
    logits are not meaningful. This freezes finished streams without a second pass over the state.
    """
    lengths = None if active is None else active.astype(jnp.int32)
    return model.forward(
        params, cfg, tokens[:, None], state, lengths=lengths, wkv_fn=_step_wkv, dtype=dtype
    )


# the decode jit site in two variants: state donated (CPU/CUDA) or kept (Metal plugins)
decode_step = jax.jit(_decode, static_argnames=("cfg", "dtype"), donate_argnames=("state",))
decode_step_kept = jax.jit(_decode, static_argnames=("cfg", "dtype"))


def decode_fn():
    """The decode step of the current profile: `decode_step` (donating) or `decode_step_kept`."""
    return decode_step if backends.current_profile().donate else decode_step_kept


@dataclass
class Model:
    """A loaded model: weights on the device, config, tokenizer and the two compiled paths."""

    params: Params
    config: ModelConfig
    tokenizer: Tokenizer
    path: str = ""
    dtype: object = jnp.float32
    chunk_size: int = 16
    chunks_per_call: int = 16
    wkv_impl: str = "chunked"
    chunks_per_step: int = 1
    # a prompt tail shorter than one step runs in steps of this many chunks (a second program;
    # 0 = as one whole padded step): one chunk on the CPU, where compute scales with tokens;
    # 512 tokens on GPUs, where small steps are launch-bound
    tail_chunks: int = 0

    # ---- state -------------------------------------------------------------------------------

    def new_state(self, batch: int = 1) -> State:
        """A zero state for `batch` sequences."""
        return State.zeros(self.config, batch, self.dtype)

    # ---- forward -----------------------------------------------------------------------------

    def _tokens(self, tokens) -> np.ndarray:
        """Tokens as int32 [B, T], range-checked."""
        arr = np.asarray(tokens)
        if arr.size == 0:
            raise InputError("no tokens to feed: the prompt is empty")
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(
                f"tokens must be integer ids of shape [T] or [B, T], got {arr.dtype} {arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.config.vocab_size)][0])
            raise InputError(
                f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        return arr.astype(np.int32)

    def forward(
        self,
        tokens,
        state: State | None = None,
        *,
        all_logits: bool = False,
        lengths: Sequence[int] | None = None,
    ) -> tuple[Array, State]:
        """Feed tokens ([T] or [B, T]); logits of the last token [B, V] (or [B, T, V]) + state.

        `lengths` (ragged batches): row b uses only tokens[b, :lengths[b]]; the padding after it
        never reaches its state, and its logits are those of its own last token.
        """
        toks = self._tokens(tokens)
        B, T = toks.shape
        if state is None:
            state = self.new_state(B)
        if state.batch != B:
            raise InputError(f"state holds {state.batch} sequences but tokens have {B} rows")
        lens = np.full((B,), T, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if lens.shape != (B,) or lens.min() < 1 or lens.max() > T:
            raise InputError(
                f"lengths must give 1..{T} tokens for each of the {B} rows, got {lens.tolist()}"
            )
        # metal-safe: one loop-free call per chunk, the token recurrence unrolled inside it
        host = backends.current_profile().prefill_loop == "host"
        steps, tail = (1, 0) if host else (self.chunks_per_step, self.tail_chunks)
        while B * steps * self.chunk_size > MAX_STEP_TOKENS and steps % 2 == 0 and steps > tail:
            steps //= 2  # bound the activations of one step: rows x tokens
        step_len, tail_len = self.chunk_size * steps, self.chunk_size * min(tail, steps)
        span = step_len if host else self.chunk_size * self.chunks_per_call
        impl = "unrolled" if host else self.wkv_impl
        outs, last = [], None
        s, end = 0, int(lens.max())
        while s < end:
            step, n = step_len, min(span, end - s)
            if tail_len:
                # whole long steps while they fill; the tail shorter than one step goes through
                # shorter steps (a second program): at most tail_len - 1 padding tokens
                whole = (end - s) // step_len * step_len
                step, n = (step_len, min(span, whole)) if whole else (tail_len, end - s)
            padded = np.zeros((B, span), np.int32)
            padded[:, :n] = toks[:, s : s + n]
            piece_lens = np.clip(lens - s, 0, n).astype(np.int32)
            logits, state = prefill_call(
                self.params,
                jnp.asarray(padded),
                jnp.asarray(piece_lens),
                state,
                cfg=self.config,
                chunk_size=self.chunk_size,
                step_len=step,
                all_logits=all_logits,
                impl=impl,
                dtype=self.dtype,
            )
            if all_logits:
                outs.append(logits[:, :n])
            else:  # rows that ended in an earlier piece keep their logits from there
                has = jnp.asarray(piece_lens > 0)[:, None]
                last = logits if last is None else jnp.where(has, logits, last)
            s += n
        return (jnp.concatenate(outs, axis=1) if all_logits else last), state

    def step(self, tokens, state: State) -> tuple[Array, State]:
        """Decode one token per sequence (tokens [B]); `state` is consumed (donated if the
        profile donates: treat it as gone either way)."""
        toks = self._tokens(np.asarray(tokens).reshape(1, -1))[0]
        step = decode_fn()
        return step(self.params, jnp.asarray(toks), state, cfg=self.config, dtype=self.dtype)

    # ---- text --------------------------------------------------------------------------------

    def generate_tokens(
        self, prompt: str | Sequence[int], max_tokens: int, state: State | None = None
    ) -> Iterator[int]:
        """Greedy continuation of a prompt (text or ids), one token id at a time."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str | bytes) else list(prompt)
        if not ids:
            raise InputError("the prompt is empty: give at least one token or character")
        logits, state = self.forward(ids, state)
        for _ in range(max_tokens):
            tok = int(jnp.argmax(logits[0]))
            yield tok
            logits, state = self.step([tok], state)

    def generate(
        self, prompt: str | Sequence[int], max_tokens: int = 64, *, stream: bool = False
    ) -> str:
        """Greedy text continuation; with stream=True text is printed as it is produced.

        The tokens of `generate_tokens` (one decode call per token), sampled on the device in
        blocks by session.Generator: on the 2-core CPU, 0.1b Q4_K_M, 128 tokens, 114 tok/s one
        token per call against 151 in blocks of 16 (BENCHMARKS.md, "Stop strings in blocks")."""
        from rwkv_jax.session import Generator  # session imports this module

        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str | bytes) else list(prompt)
        if not ids:
            raise InputError("the prompt is empty: give at least one token or character")

        def show(_row: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        res = Generator(self).generate([ids], max_tokens, on_text=show if stream else None)
        if stream:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return res.texts[0]


# rows x tokens of one prefill step at most: a larger batch runs shorter steps (Model.forward),
# bounding the activations (the 2.9b FFN's float32 [tokens, 10240] is 168 MB per 4096)
MAX_STEP_TOKENS = 4096


def default_layout(backend: str | None = None) -> tuple[int, int, int]:
    """(tokens per scan step, tokens per call, tokens per tail step; 0 = one chunk) of prefill.

    CPU: 128-token steps and 256 tokens per call: the native kernels' blocked matrix product
    runs near the FMA peak from ~64 rows and the LM head runs once per step (pp512 on 2 cores,
    0.1b Q4_K_M: 16-token steps 514-532 tok/s, 64: ~600, 128: 655-677); a tail shorter than
    one step runs in one-chunk steps (Model.tail_chunks: a second program, padding < a chunk).
    Over prompt lengths (experiments/layout_sweep, 2-core AVX2) 256- and 512-token steps gain
    2-8% from 512 tokens and lose 15-20% on prompts shorter than a step.
    GPU: 4096-token steps and calls, 512-token tail steps: each packed matrix is dequantized once
    per layer per step, and every layer runs large matrix products (H200, 2.9b Q4_K_M, pp4096:
    512-token steps 14672 tok/s, 1024: 18167, 4096: 23665; experiments/gpu_trace).
    """
    backend = backend or jax.default_backend()
    return (128, 256, 0) if backend == "cpu" else (4096, 4096, 512)


def default_wkv(backend: str | None = None) -> str:
    """The prefill's WKV-7 kernel for wkv_impl="auto": the token recurrence on the CPU, the
    chunked form on accelerators.

    CPU: the token scan does less work than the chunked form's small matrix products (the whole
    WKV of one layer, T = 512: 5.0 ms against 10.0 ms at chunk 16, wkv.py), and whole prefills
    follow: 0.1b Q4_K_M pp512 on 2 cores, eight interleaved rounds (experiments/paired.py
    --variants, two runs), float32 598 -> 700 and 649 -> 679 tok/s, bfloat16 760 -> 976 and
    810 -> 911. GPUs: the chunked form's matrix products run in parallel where a token scan is
    a chain of small launches (H200, T = 512: 0.40-0.80 ms chunked against 3.0 ms sequential).
    """
    backend = backend or jax.default_backend()
    return "sequential" if backend == "cpu" else "chunked"


def load(path: str | os.PathLike[str], **options) -> Model:
    """Open a `.gguf` file and put its weights on the default device (options: `from_gguf`)."""
    return from_gguf(GGUFFile(path), **options)


def from_gguf(
    f: GGUFFile,
    *,
    mode: str = "packed",
    dtype: str = "auto",
    chunk_size: int = 16,
    chunks_per_call: int | None = None,
    chunks_per_step: int | None = None,
    wkv_impl: str = "auto",
    stack_layers: bool | None = None,
) -> Model:
    """Build a `Model` from an opened file: upload weights, build the tokenizer.

    mode: "packed" (dequantize inside jit) or "dense" (dequantize once now); dtype: compute
    dtype of the matrix products ("auto": the profile's, else float32 on the CPU and bfloat16 on
    accelerators, where float32 matrix products run at a fraction of the bf16 rate); chunk_size:
    WKV chunk length (16, 32 or 64); chunks_per_step / chunks_per_call: prefill layout (None =
    `default_layout` for the backend); wkv_impl: "chunked", "sequential", "unrolled" or "auto"
    (`default_wkv` for the backend: sequential on the CPU, chunked elsewhere);
    stack_layers: scan over stacked layers (True), unroll them (False), or the profile's choice
    (None: stack when formats allow; unrolled under metal-safe). Turns on JAX's persistent
    compilation cache first (compile_cache.py; RWKV_JAX_COMPILE_CACHE=0 leaves it off).
    """
    compile_cache.enable()
    prof = backends.current_profile()
    if dtype == "auto":
        dtype = prof.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if stack_layers is None:
        stack_layers = prof.stack_layers
    if jax.default_backend() == "cpu":
        # build the native kernels now rather than inside the first trace; they read a stacked
        # layer in place (quant.LayerOf), so layers stay stacked on the CPU too
        cpu_kernels.available()
    if dtype not in DTYPES:
        raise InputError(f"dtype '{dtype}' is not one of {['auto', *DTYPES]}")
    if chunk_size not in (16, 32, 64):
        raise InputError(f"chunk_size {chunk_size} must be 16, 32 or 64")
    step_tokens, call_tokens, tail_tokens = default_layout()
    step = chunks_per_step or max(1, step_tokens // chunk_size)
    if chunks_per_step is None and chunks_per_call:  # a default step must divide the call
        step = int(np.gcd(step, chunks_per_call))
    call = chunks_per_call or max(step, call_tokens // chunk_size // step * step)
    if step < 1 or call < step or call % step:
        raise InputError(
            f"chunks_per_call {call} must be a positive multiple of chunks_per_step {step}"
        )
    if wkv_impl == "auto":
        wkv_impl = default_wkv()
    _wkv_fn(wkv_impl, chunk_size)
    # the tokenizer (checks and the decode table, ~25 ms for 65536 tokens on a 2-core CPU; its
    # encoding trie is built on the first encode) builds while the weights upload: device_put
    # and the device programs release the GIL
    with ThreadPoolExecutor(1) as pool:
        tok = pool.submit(
            Tokenizer.from_gguf,
            f.metadata.get("tokenizer.ggml.tokens") or [],
            f.metadata.get("tokenizer.ggml.token_type"),
        )
        params = load_params(f, mode=mode, dtype=DTYPES[dtype], stack_layers=stack_layers)
        tokenizer = tok.result()
    tail = min(step, max(1, tail_tokens // chunk_size))  # see Model.tail_chunks
    return Model(
        params, f.config, tokenizer, f.path, DTYPES[dtype], chunk_size, call, wkv_impl, step, tail
    )
