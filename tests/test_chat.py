"""`rwkv-jax chat`: World format, stops, state kept across turns, /save /load /reset, pipes."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import chat, cli
from rwkv_jax.chat import ChatSession, normalize_message
from rwkv_jax.errors import InputError
from rwkv_jax.sampling import Sampler
from rwkv_jax.tokenizer import DOUBLE_NEWLINE_ID


@pytest.fixture(scope="module")
def model_path(synth_model) -> str:
    return synth_model("tiny", "F32")


@pytest.fixture(scope="module")
def model(model_path) -> rwkv_jax.Model:
    return rwkv_jax.load(model_path)


def _forced(model, *pieces: str, then: int | None = None) -> Sampler:
    """Greedy decoding that emits `pieces` (single tokens) in order, then `then` if given.

    Biases 200, 180, 160, ... exceed the model's own logits (std ~3) by far more than any
    realistic spread, and a presence penalty of 1000 drops each token below all others once
    it has been emitted.
    """
    ids = []
    for p in pieces:
        (t,) = model.tokenizer.encode(p)
        ids.append(t)
    if then is not None:
        ids.append(then)
    bias = {t: 200.0 - 20.0 * i for i, t in enumerate(ids)}
    return Sampler.greedy(alpha_presence=1000.0, logit_bias=bias, token_ban=(0,))


def _close(a, b, atol=1e-4):
    """States equal up to float32 rounding of a different prefill split (chunk boundaries)."""
    for name in ("att_shift", "ffn_shift", "wkv"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=atol, rtol=0)


def test_normalize_message():
    assert normalize_message("  a\r\n\r\n\nb \n") == "a\nb"
    assert normalize_message(" \n ") == ""


def test_reply_printer_strips_streamed_whitespace():
    out = io.StringIO()
    p = chat._ReplyPrinter(out)
    for piece in [" ", " Hi", " ", "there", "\n", " "]:
        p(piece)
    assert out.getvalue() == "Hi there"


def test_state_is_kept_and_history_never_refed(model, monkeypatch):
    """Each turn feeds only 'User: …\\n\\nAssistant:'; the state after two turns equals one
    prefill of everything the conversation consumed."""
    session = ChatSession(model, Sampler(temperature=1.0, top_p=0.5), max_tokens=6, seed=3)
    fed: list[list[int]] = []
    results = []
    forward, generate = model.forward, session.generator.generate

    def spy_forward(tokens, state=None, **kw):
        fed.append([int(t) for t in np.asarray(tokens).reshape(-1)])
        return forward(tokens, state, **kw)

    def spy_generate(*a, **kw):
        results.append(generate(*a, **kw))
        return results[-1]

    monkeypatch.setattr(model, "forward", spy_forward)
    monkeypatch.setattr(session.generator, "generate", spy_generate)
    consumed: list[int] = []
    for msg in ["Hello!", "What is\n\n\nRWKV?"]:
        fed.clear()
        reply = session.say(msg)
        turn = model.tokenizer.encode(f"User: {normalize_message(msg)}\n\nAssistant:")
        assert fed[0] == turn  # only the new turn, never the history
        r = results[-1]
        assert reply == r.texts[0].strip() and "\n\n" not in reply
        consumed += turn + r.tokens[0]
        if r.finish_reasons[0] == "stop":
            consumed.append(DOUBLE_NEWLINE_ID)
        assert fed[1:] in ([], [model.tokenizer.encode("\n\n")])  # "length": the separator
        consumed += sum(fed[1:], [])
    assert session.position == len(consumed)
    monkeypatch.undo()
    _, want = model.forward(consumed)
    _close(session.state, want)


def test_reply_stops_on_double_newline_token(model):
    session = ChatSession(model, _forced(model, " Hello", then=DOUBLE_NEWLINE_ID), max_tokens=9)
    start = len(model.tokenizer.encode("User: hi\n\nAssistant:"))
    assert session.say("hi") == "Hello"
    assert session.position == start + 2  # " Hello" and the "\n\n" separator are in the state


def test_self_dialogue_is_cut_and_the_state_rewound(model):
    """The model starts writing the user's turn: the reply ends before "\\nUser:", and the
    state is the well-formed transcript 'User: hi\\n\\nAssistant:Hi\\n\\n'."""
    session = ChatSession(model, _forced(model, "Hi", "\n", "User", ":"), max_tokens=9)
    assert session.say("hi") == "Hi"
    transcript = model.tokenizer.encode("User: hi\n\nAssistant:") + model.tokenizer.encode("Hi\n\n")
    assert session.position == len(transcript)
    _, want = model.forward(transcript)
    _close(session.state, want)


def test_precompile_leaves_the_first_turn_nothing_to_compile(model):
    """precompile runs a turn's programs on a scratch state: the first real turn compiles
    nothing more, and the conversation (state, position, turns) is as if it had not run."""
    import jax

    from rwkv_jax import generate
    from rwkv_jax import session as sess

    fresh = ChatSession(model, max_tokens=6, seed=2)
    want = fresh.say("What is two and two?")
    jax.clear_caches()  # what the turn above compiled is gone: precompile must do it again
    s = ChatSession(model, max_tokens=6, seed=2)
    s.precompile()
    assert s.turns == 0 and s.position == 0
    sizes = (generate.prefill_call._cache_size(), sess.sample_steps_kept._cache_size())
    assert s.say("What is two and two?") == want
    assert (generate.prefill_call._cache_size(), sess.sample_steps_kept._cache_size()) == sizes
    _close(s.state, fresh.state, atol=0)
    chat._quietly(lambda: 1 / 0)  # a failing warm-up is left to the real turn


def test_save_load_reset(model, tmp_path):
    session = ChatSession(model, max_tokens=5, seed=1, system="Be brief.")
    session.say("One")
    path = str(tmp_path / "chat.safetensors")
    session.save(path)
    a = session.say("Two")
    session.reset()
    assert session.turns == 0
    session.load(path)
    assert session.turns == 1
    assert session.say("Two") == a  # same state, same positions -> same sampled reply
    with pytest.raises(InputError):
        session.say("  \n ")


def _run_cli(monkeypatch, capsys, argv, lines: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))  # not a TTY: pipe mode
    rc = chat.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_pipe_conversation(model_path, monkeypatch, capsys, tmp_path):
    state = tmp_path / "s.safetensors"
    lines = f"Hello\n\n/save {state}\nAgain\n/reset\n/load {state}\nAgain\n"
    argv = [model_path, "--max-tokens", "12", "--seed", "5", "--temperature", "0.8"]
    rc, out, err = _run_cli(monkeypatch, capsys, argv, lines)
    assert rc == 0, err
    replies = out.split("\n\n")
    assert len(replies) == 4 and replies[-1] == ""  # three replies, each ending a blank line
    assert replies[1] == replies[2]  # reloaded state + positions: the same reply again
    assert "[saved state to" in err and "[loaded state from" in err and "[state reset]" in err
    assert state.exists()


def test_cli_errors(model, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_load", lambda args: model)  # skip re-reading the file
    rc, _, err = _run_cli(monkeypatch, capsys, ["m.gguf"], f"/load {tmp_path}/none.st\nHi\n")
    assert rc == 1 and "no such state file" in err
    rc, _, err = _run_cli(monkeypatch, capsys, ["m.gguf"], "/bogus\n")
    assert rc == 1 and "unknown command" in err
    rc, _, err = _run_cli(monkeypatch, capsys, ["m.gguf", "--logit-bias", "5"], "Hi\n")
    assert rc == 1 and "ID=VALUE" in err
    rc, _, err = _run_cli(monkeypatch, capsys, ["m.gguf", "--top-p", "-1"], "Hi\n")
    assert rc == 1 and "top_p" in err


def test_add_chat_parser_registers_the_command():
    parser = argparse.ArgumentParser()
    chat.add_chat_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", "m.gguf", "--temperature", "0", "--ban", "5", "--ban", "7"])
    assert args.fn is chat.run_chat
    s = chat.sampler_from_args(args)
    assert s.temperature == 0 and s.token_ban == (0, 5, 7) and s.top_p == 0.3
