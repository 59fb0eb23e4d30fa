"""`rwkv-jax` command line: info, synth, quantize, tokenize, logits, generate, chat, doctor."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rwkv_jax.errors import RwkvJaxError


def _cmd_info(args: argparse.Namespace) -> None:
    from rwkv_jax.gguf import GGUFFile

    f = GGUFFile(args.model)
    c = f.config
    total = sum(t.n_bytes for t in f.tensors.values())
    print(f"file          {f.path}")
    print(f"architecture  {f.metadata.get('general.architecture')}")
    print(f"name          {c.name}")
    print(f"file type     {_ftype_name(c.file_type)} ({c.file_type})")
    print(f"layers        {c.n_layer}")
    print(f"embedding     {c.n_embd} ({c.n_head} heads x {c.head_size})")
    print(f"ffn           {c.ffn}")
    print(f"lora ranks    decay {c.rank_w}, iclr {c.rank_a}, value {c.rank_v}, gate {c.rank_g}")
    print(
        f"vocabulary    {c.vocab_size} (tokenizer {f.metadata.get('tokenizer.ggml.model')}, "
        f"{len(f.metadata.get('tokenizer.ggml.tokens') or [])} tokens)"
    )
    print(f"tensors       {len(f.tensors)}, {total / 1e6:.1f} MB")
    for name, (count, size) in sorted(f.bytes_by_type().items()):
        print(f"  {name:<6} {count:5d} tensors {size / 1e6:12.2f} MB")
    if args.tensors:
        for t in f.tensors.values():
            print(f"{t.name:<40} {t.type_name:<6} {str(list(t.ne)):<22} {t.n_bytes:>12}")


def _ftype_name(ftype: int) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_")
    except ValueError:
        return "unknown"


def _cmd_synth(args: argparse.Namespace) -> None:
    from rwkv_jax import synth

    synth.synth(args.preset, args.type, args.seed, args.output, progress=not args.quiet)


def _cmd_quantize(args: argparse.Namespace) -> None:
    from rwkv_jax import quantize

    quantize.quantize_file(args.input, args.output, args.type, progress=not args.quiet)


def _load(args: argparse.Namespace):
    import rwkv_jax

    return rwkv_jax.load(
        args.model, mode=args.weights, dtype=args.dtype, chunk_size=args.chunk_size
    )


def _prompt_tokens(args: argparse.Namespace, tokenizer) -> list[int]:
    if getattr(args, "tokens_file", None):
        try:
            with open(args.tokens_file) as fh:
                ids = json.load(fh)
        except (OSError, ValueError) as exc:
            raise RwkvJaxError(
                f"{args.tokens_file}: cannot read a JSON list of token ids ({exc})"
            ) from None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise RwkvJaxError(f"{args.tokens_file}: expected a JSON list of integers")
        return ids
    # raw bytes: a prompt of invalid UTF-8 from the shell arrives with surrogate escapes
    return tokenizer.encode(os.fsencode(args.prompt))


def _cmd_tokenize(args: argparse.Namespace) -> None:
    from rwkv_jax.gguf import GGUFFile
    from rwkv_jax.tokenizer import Tokenizer

    f = GGUFFile(args.model)
    tok = Tokenizer.from_gguf(
        f.metadata.get("tokenizer.ggml.tokens") or [], f.metadata.get("tokenizer.ggml.token_type")
    )
    if args.text_file:
        try:
            with open(args.text_file, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise RwkvJaxError(f"{args.text_file}: cannot read ({exc.strerror})") from None
    else:
        data = args.text
    print(json.dumps(tok.encode(data)))


def _cmd_logits(args: argparse.Namespace) -> None:
    import numpy as np

    m = _load(args)
    ids = _prompt_tokens(args, m.tokenizer)
    logits, _ = m.forward(ids, all_logits=True)
    out = args.output
    tmp = f"{out}.tmp-{os.getpid()}.npz"
    np.savez(tmp, tokens=np.asarray(ids, np.int32), logits=np.asarray(logits[0], np.float32))
    os.replace(tmp, out)
    print(f"wrote {out}: {len(ids)} tokens x {m.config.vocab_size} logits", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> None:
    m = _load(args)
    t0 = time.perf_counter()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    m.generate(os.fsencode(args.prompt), args.max_tokens, stream=True)
    if args.verbose:
        print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to an rwkv7 .gguf file")
    p.add_argument(
        "--weights",
        choices=["packed", "dense"],
        default="packed",
        help="packed: keep quantized blocks, dequantize inside jit (default); "
        "dense: dequantize once at load",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="compute dtype of the matrix products (auto: float32 on the CPU, bfloat16 on GPUs)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=16,
        choices=[16, 32, 64],
        help="prefill chunk length (default 16)",
    )
    from rwkv_jax.backends import PLATFORMS, profile_names

    p.add_argument(
        "--platform",
        choices=list(PLATFORMS),
        default="auto",
        help="JAX backend: auto (the fastest that works), cpu, cuda, or metal (jax-metal or a "
        "community Metal plugin)",
    )
    p.add_argument(
        "--profile",
        choices=list(profile_names()),
        help="code paths: auto (by platform), default, or metal-safe (the Metal path, on any "
        "platform); default: $RWKV_JAX_PROFILE, else auto",
    )
    p.set_defaults(select_backend=True)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every sub-command."""
    p = argparse.ArgumentParser(prog="rwkv-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a GGUF model")
    s.add_argument("model")
    s.add_argument("--tensors", action="store_true", help="list every tensor")
    s.set_defaults(fn=_cmd_info)

    from rwkv_jax.synth import PRESETS, TYPES

    s = sub.add_parser("synth", help="write a random-weight RWKV-7 GGUF (llama.cpp layout)")
    s.add_argument("--preset", choices=list(PRESETS), default="tiny")
    s.add_argument("--type", choices=list(TYPES), default="F32")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=_cmd_synth)

    s = sub.add_parser("quantize", help="re-quantize a GGUF with llama.cpp's rules for RWKV-7")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--type", required=True, choices=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"])
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("tokenize", help="print the token ids of a text as JSON")
    s.add_argument("model")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--text-file")
    s.set_defaults(fn=_cmd_tokenize)

    s = sub.add_parser("logits", help="write the logits after every prompt token to .npz")
    _add_load_options(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--tokens-file", help="JSON list of token ids")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(fn=_cmd_logits)

    s = sub.add_parser("generate", help="greedy generation, streamed to stdout")
    _add_load_options(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(fn=_cmd_generate)

    from rwkv_jax.chat import add_chat_parser

    add_chat_parser(sub)
    from rwkv_jax.doctor import add_doctor_parser

    add_doctor_parser(sub)
    return p


def _select_backend(args: argparse.Namespace) -> None:
    """Apply --platform and --profile before anything initializes JAX's backends."""
    from rwkv_jax import backends

    backends.select_platform(args.platform)
    if args.profile is not None:
        backends.set_profile(args.profile)


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors from bad input print one line and exit 1, without a traceback."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed sub-command; bad input -> one line on stderr and status 1."""
    try:
        if getattr(args, "select_backend", False):
            _select_backend(args)
        args.fn(args)
    except RwkvJaxError as exc:
        print(f"rwkv-jax: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # unreadable/unwritable paths, full disks: say which file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"rwkv-jax: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkv-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
