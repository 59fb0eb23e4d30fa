"""`rwkv-jax chat MODEL`: an RWKV World conversation that keeps the state between turns.

Format (BlinkDL's ChatRWKV `API_DEMO_CHAT.py`): each turn feeds only the new text
`User: {message}\\n\\nAssistant:`; the model's reply (it usually starts with a space) ends at
"\\n\\n" — token 261, or any tokens that spell "\\n\\n" — and the state keeps that separator, so the
next turn starts directly with "User: ". History is never re-fed: the state is the history. As in
ChatRWKV, messages are stripped and runs of newlines collapse to one newline (a blank line would
end the turn early), and token 0 (end of text) is banned. A reply that instead runs into
"\\nUser:" (the model starting to write the user's turn) is cut there; the state is then rolled
back to the start of the reply and the kept reply plus "\\n\\n" is re-fed, so the transcript the
state has seen is always well formed. A reply cut by --max-tokens gets "\\n\\n" fed after it.

Input: on a terminal, one message per prompt. From a pipe (non-interactive), every line is one
user message (blank lines are skipped); each reply is printed, stripped, followed by a blank line.
Lines starting with "/" are commands: `/save PATH` (state + position as safetensors), `/load PATH`
(such a file, or an RWKV-PEFT state-tuning `.pth`), `/reset` (back to the initial state: zero,
`--state`, plus `--system`). Command messages go to stderr. From a pipe, a failing command ends
the program with status 1 (a script should not continue from the wrong state); on a terminal it
is reported and the conversation goes on.

Sampling defaults are ChatRWKV's chat settings: temperature 1.0, top-p 0.3, presence 0.5,
frequency 0.5, decay 0.996. `--seed` makes a conversation reproducible: the key of every sampled
token is derived from the seed and the token's position in the conversation.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from jax import Array

from rwkv_jax import checkpoint, sampling
from rwkv_jax.errors import InputError, RwkvJaxError, StateError
from rwkv_jax.sampling import Sampler
from rwkv_jax.session import Generator
from rwkv_jax.tokenizer import DOUBLE_NEWLINE_ID, EOS_ID

USER_PREFIX = "User: "
ASSISTANT_PREFIX = "Assistant:"
TURN_END = "\n\n"
STOP_STRINGS = (TURN_END, "\nUser:")
CHAT_FORMAT = "rwkv-world-chat"  # recorded in saved states


def chat_sampler(**overrides) -> Sampler:
    """ChatRWKV's chat sampling settings, with token 0 (end of text) banned."""
    opts = dict(
        temperature=1.0,
        top_p=0.3,
        alpha_presence=0.5,
        alpha_frequency=0.5,
        alpha_decay=0.996,
        token_ban=(EOS_ID,),
    )
    return Sampler(**{**opts, **overrides})


def normalize_message(message: str) -> str:
    """Strip a message and collapse newline runs (a blank line would end the turn)."""
    return re.sub(r"\n+", "\n", message.replace("\r\n", "\n").strip())


class ChatSession:
    """A conversation: one-row state, its position, and the sampling settings."""

    def __init__(
        self,
        model,
        sampler: Sampler | None = None,
        *,
        max_tokens: int = 500,
        seed: int = 0,
        system: str | None = None,
        initial: checkpoint.Checkpoint | None = None,
    ) -> None:
        """Start a conversation (from `initial` if given, then the system prompt)."""
        if max_tokens < 1:
            raise InputError(f"--max-tokens {max_tokens} must be at least 1")
        self.model = model
        self.sampler = sampler or chat_sampler()
        self.sampler.check(model.config.vocab_size)
        self.max_tokens = max_tokens
        self.system = system
        self.generator = Generator(model)
        self.keys = sampling.stream_keys(seed, 1)
        if initial is not None and initial.state.batch != 1:
            raise StateError(f"a chat needs a one-row state, this one has {initial.state.batch}")
        self._initial = initial
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        """Back to the initial state (zero or loaded), then the system prompt."""
        if self._initial is None:
            self.state, self.position = self.model.new_state(1), 0
        else:
            self.state = checkpoint.fork(self._initial.state)
            self.position = self._initial.positions[0]
        self.turns = 0
        if self.system:
            self._feed(f"System: {normalize_message(self.system)}{TURN_END}")

    def _feed(self, text: str) -> Array:
        """Feed text to the state; returns the logits after it."""
        ids = self.model.tokenizer.encode(text)
        logits, self.state = self.model.forward(ids, self.state)
        self.position += len(ids)
        return logits

    def say(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        """One turn: feed the user message, generate the reply (streamed to on_text), keep state.

        Returns the reply without its leading space and trailing whitespace.
        """
        msg = normalize_message(message)
        if not msg:
            raise InputError("the message is empty: say something")
        logits = self._feed(f"{USER_PREFIX}{msg}{TURN_END}{ASSISTANT_PREFIX}")
        start_state, start_position = checkpoint.fork(self.state), self.position  # for a rewind
        res = self._reply(logits, self.state, self.position, self.max_tokens, on_text)
        reply, finish, tail = res.texts[0], res.finish_reasons[0], res.tails[0]
        self.state, self.position = res.state, res.positions[0]
        if finish == "length":  # the state saw the whole reply but no end of turn
            self._feed(TURN_END)
        elif finish == "stop_string" and not (tail.strip() == b"" and b"\n\n" in tail):
            # the state went past the reply into text that is not a turn separator: rewind
            self.state, self.position = start_state, start_position
            self._feed(reply + TURN_END)
        self.turns += 1
        return reply.strip()

    def _reply(self, logits, state, position: int, max_tokens: int, on_text=None):
        """Generate a reply from `state` (the prompt fed, its last logits given)."""
        return self.generator.generate(
            [[]],
            max_tokens,
            self.sampler,
            stop_tokens=[DOUBLE_NEWLINE_ID],
            stop_strings=STOP_STRINGS,
            keys=self.keys,
            state=state,
            logits=logits,
            positions=[position],
            on_text=None if on_text is None else (lambda _b, piece: on_text(piece)),
        )

    def precompile(self) -> None:
        """Run a short turn on a scratch state (the conversation is not touched), so that the
        programs a turn runs — the message's prefill and the reply's generation loop — are
        compiled before the first message; `rwkv-jax chat` does this while it waits for it."""
        ids = self.model.tokenizer.encode(f"{USER_PREFIX}Hi{TURN_END}{ASSISTANT_PREFIX}")
        logits, state = self.model.forward(ids, self.model.new_state(1))
        self._reply(logits, state, len(ids), 2)

    def save(self, path: str) -> None:
        """Save the conversation state (after a complete turn) to a safetensors file."""
        checkpoint.save_state(
            path,
            self.state,
            self.model,
            positions=[self.position],
            extra={"chat": CHAT_FORMAT, "turns": self.turns},
        )

    def load(self, path: str, *, check_model: bool = True) -> None:
        """Continue from a saved state file or a state-tuning `.pth`."""
        ck = checkpoint.load_any(path, self.model, check_model=check_model)
        if ck.state.batch != 1:
            raise StateError(f"{path}: a chat needs a one-row state, this one has {ck.state.batch}")
        self.state, self.position = ck.state, ck.positions[0]
        self.turns = int(ck.extra.get("turns", 0)) if isinstance(ck.extra, dict) else 0


# ---- the command ----------------------------------------------------------------------------


class _ReplyPrinter:
    """Streams reply text without its leading and trailing whitespace."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = False
        self.pending = ""  # whitespace held until something follows it

    def __call__(self, piece: str) -> None:
        """Print a piece of the reply."""
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            if not text:
                self.pending = ""
                return
            self.started = True
        body = text.rstrip()
        self.pending = text[len(body) :]
        if body:
            self.out.write(body)
            self.out.flush()


def _lines(stream: TextIO, interactive: bool) -> Iterator[str]:
    """User input: prompted lines on a terminal, every line of a pipe otherwise."""
    if interactive:
        while True:
            try:
                yield input(USER_PREFIX)
            except EOFError:
                print(file=sys.stderr)
                return
    for line in stream:
        yield line.rstrip("\n")


def _command(session: ChatSession, line: str, force: bool) -> None:
    """Run one /command."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/save", "/load") and not arg:
        raise InputError(f"{name} needs a path: {name} PATH")
    if name == "/save":
        session.save(arg)
        print(f"[saved state to {arg}: {session.position} tokens]", file=sys.stderr)
    elif name == "/load":
        session.load(arg, check_model=not force)
        print(f"[loaded state from {arg}: {session.position} tokens]", file=sys.stderr)
    elif name == "/reset":
        session.reset()
        print("[state reset]", file=sys.stderr)
    else:
        raise InputError(f"unknown command {name!r}: use /save PATH, /load PATH or /reset")


def sampler_from_args(args: argparse.Namespace) -> Sampler:
    """The Sampler described by the chat command's options."""
    bias = {}
    for item in args.logit_bias or []:
        tok, sep, value = item.partition("=")
        try:
            bias[int(tok)] = float(value)
        except ValueError:
            raise InputError(
                f"--logit-bias {item!r} must look like ID=VALUE, e.g. 33=-2.5"
            ) from None
        if not sep:
            raise InputError(f"--logit-bias {item!r} must look like ID=VALUE")
    return chat_sampler(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        alpha_presence=args.presence,
        alpha_frequency=args.frequency,
        alpha_decay=args.decay,
        token_ban=(EOS_ID, *(args.ban or [])),
        logit_bias=bias,
    )


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None):
    """The `chat` sub-command: load the model, then talk until the input ends."""
    from rwkv_jax import cli

    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    sampler = sampler_from_args(args)
    model = cli._load(args)
    initial = None
    if args.state:
        initial = checkpoint.load_any(args.state, model, check_model=not args.force)
    session = ChatSession(
        model,
        sampler,
        max_tokens=args.max_tokens,
        seed=args.seed,
        system=args.system,
        initial=initial,
    )
    interactive = stdin.isatty() and stdin is sys.stdin
    # on a terminal, compile a turn's programs while the user types the first message (a first
    # reply otherwise waits for them: seconds on a GPU); a failure there is left to the real turn
    warm = threading.Thread(target=_quietly, args=(session.precompile,)) if interactive else None
    if warm is not None:
        warm.start()
    for line in _lines(stdin, interactive):
        if warm is not None:
            warm.join()
            warm = None
        if line.strip().startswith("/"):
            try:
                _command(session, line, args.force)
            except RwkvJaxError as exc:
                if not interactive:
                    raise
                print(f"error: {exc}", file=sys.stderr)
            continue
        if not normalize_message(line):
            continue
        if interactive:
            stdout.write(ASSISTANT_PREFIX + " ")
        session.say(line, on_text=_ReplyPrinter(stdout))
        stdout.write(TURN_END)
        stdout.flush()
    if warm is not None:  # input ended before any line: let the compilation finish first
        warm.join()


def _quietly(fn: Callable[[], object]) -> None:
    """Run fn, ignoring its errors (a background warm-up: the real call reports them)."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - reported by the real turn, which runs the same code
        pass


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `chat` sub-command on an argparse subparsers object."""
    from rwkv_jax import cli

    d = chat_sampler()
    p = subparsers.add_parser(
        "chat",
        help="chat in the RWKV World format (User:/Assistant:), state kept between turns",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli._add_load_options(p)
    p.add_argument("--max-tokens", type=int, default=500, help="reply length limit (500)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (1.0)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus cut, 1 = off (0.3)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely, 0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="cut below min_p * p_max, 0 = off")
    p.add_argument("--presence", type=float, default=d.alpha_presence, help="alpha_presence")
    p.add_argument("--frequency", type=float, default=d.alpha_frequency, help="alpha_frequency")
    p.add_argument("--decay", type=float, default=d.alpha_decay, help="alpha_decay per token")
    p.add_argument("--ban", type=int, action="append", help="never sample this token id")
    p.add_argument("--logit-bias", action="append", metavar="ID=VALUE", help="add to a logit")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--state", help="initial state: a saved .safetensors or a state-tuning .pth")
    p.add_argument("--system", help='system prompt, fed once as "System: TEXT\\n\\n"')
    p.add_argument("--force", action="store_true", help="load states made by other weights")
    p.set_defaults(fn=run_chat)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m rwkv_jax.chat MODEL ...`: the chat command alone (errors: one line, status 1)."""
    parser = argparse.ArgumentParser(prog="rwkv-jax")
    add_chat_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["chat", *(sys.argv[1:] if argv is None else argv)])
    from rwkv_jax import cli

    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
