"""experiments.paired: interleaved rwkv_jax / llama.cpp rounds and their per-pair ratios."""

from __future__ import annotations

import pytest

from experiments import paired
from rwkv_jax.errors import InputError


class Fake:
    """An engine whose runs take the seconds given, in order, and that logs every call."""

    def __init__(self, name: str, secs: list[float], calls: list[str], vocab_size: int = 100):
        self.name, self.secs, self.calls, self.vocab_size = name, list(secs), calls, vocab_size

    def _next(self, what: str) -> float:
        self.calls.append(f"{self.name}:{what}")
        return self.secs.pop(0)

    def pp(self, tokens) -> float:
        return self._next(f"pp{len(tokens)}")

    def tg(self, first, n: int) -> float:
        return self._next(f"tg{n}")


class LB:
    pp, tg = [8], [4]


def test_interleave_ratios_rotation_and_warmup():
    calls: list[str] = []
    # warm-up pp, tg; then per round pp, tg (seconds chosen so the ratios are known)
    ours = Fake("ours", [9, 9, 1.0, 1.0, 2.0, 1.0, 1.0, 4.0], calls)
    ref = Fake("llama.cpp", [9, 9, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0], calls)
    pauses: list[float] = []
    tests = paired.tests_of(LB, 100)
    assert [t[:2] for t in tests] == [("pp8", 8), ("tg4", 4)]
    out = paired.interleave({"ours": ours, "llama.cpp": ref}, tests, 3, 0.5, sleep=pauses.append)
    # warm-up first (each engine, each test), then the order rotates every round
    assert calls[:4] == ["ours:pp8", "ours:tg4", "llama.cpp:pp8", "llama.cpp:tg4"]
    assert calls[4:8] == ["ours:pp8", "llama.cpp:pp8", "ours:tg4", "llama.cpp:tg4"]
    assert calls[8:12] == ["llama.cpp:pp8", "ours:pp8", "llama.cpp:tg4", "ours:tg4"]
    assert pauses == [0.5] * 12
    # after the warm-up: ours pp/tg per round (1.0, 1.0), (2.0, 1.0), (1.0, 4.0) s; the
    # reference's (2.0, 1.0), (1.0, 2.0), (1.0, 1.0) s, whichever runs first
    pp, tg = out["pp8"], out["tg4"]
    assert pp["ours"]["tps"] == [8.0, 4.0, 8.0] and pp["llama.cpp"]["tps"] == [4.0, 8.0, 8.0]
    assert tg["ours"]["tps"] == [4.0, 4.0, 1.0] and tg["llama.cpp"]["tps"] == [4.0, 2.0, 4.0]
    assert pp["ours"]["ratios"] == [2.0, 0.5, 1.0] and tg["ours"]["ratios"] == [1.0, 2.0, 0.25]
    assert pp["ours"]["median_ratio"] == 1.0 and pp["ours"]["wins"] == 2
    assert tg["ours"]["median_ratio"] == 1.0 and tg["ours"]["wins"] == 2
    assert "ratios" not in pp["llama.cpp"]
    text = paired.table(out)
    assert "| pp8 | ours | 8.0 | 8.0 | 1.00x | 0.50-2.00x | 2 of 3 |" in text
    assert "| tg4 | ours | 4.0 | 4.0 | 1.00x | 0.25-2.00x | 2 of 3 |" in text


def test_interleave_refuses_bad_input():
    calls: list[str] = []
    tests = paired.tests_of(LB, 100)
    with pytest.raises(InputError, match="pairs"):
        paired.interleave({"a": Fake("a", [], calls), "llama.cpp": Fake("b", [], calls)}, tests, 0)
    with pytest.raises(InputError, match="llama.cpp"):
        paired.interleave({"a": Fake("a", [], calls)}, tests, 1)
    assert calls == []


def test_cli_without_llama_cpp_is_one_line(monkeypatch, capsys):
    from experiments import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert paired.main(["configs/default.yaml", "--pairs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("paired: error: llama-cpp-python is not installed")
    assert "Traceback" not in err


def _args(**kw):
    import argparse

    base = dict(config="configs/default.yaml", overrides=[], variants=None, dtypes=None)
    return argparse.Namespace(**(base | {"no_llama": False} | kw))


def test_variant_configs():
    from experiments import config as cfgmod

    cfg = cfgmod.load("configs/default.yaml", [])
    got = paired.variant_configs(
        _args(
            overrides=["engine.chunk_size=32"],
            variants=["seq:engine.wkv_impl=sequential", "bf:engine.dtype=bfloat16,"],
        ),
        cfg,
    )
    assert list(got) == ["seq", "bf"]
    assert got["seq"].engine.wkv_impl == "sequential" and got["seq"].engine.chunk_size == 32
    assert got["bf"].engine.dtype == "bfloat16" and got["bf"].engine.chunk_size == 32
    by_dtype = paired.variant_configs(_args(dtypes=["float32", "bfloat16"]), cfg)
    assert [c.engine.dtype for c in by_dtype.values()] == ["float32", "bfloat16"]
    assert list(by_dtype) == ["rwkv_jax float32", "rwkv_jax bfloat16"]
    assert list(paired.variant_configs(_args(), cfg)) == [f"rwkv_jax {cfg.engine.dtype}"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(variants=["nocolon"]), "NAME:KEY=VALUE"),
        (dict(variants=["a:engine.dtype=bfloat16", "a:engine.chunk_size=32"]), "distinct"),
        (dict(variants=["a:engine.dtype=bfloat16"], no_llama=True), "at least two"),
        (dict(no_llama=True), "at least two engines"),
        (dict(variants=["a:"], dtypes=["float32"]), "do not go together"),
        (dict(variants=["a:engine.dtype=float64", "b:"]), "engine.dtype"),
    ],
)
def test_variant_configs_refuse_bad_specs(kw, match):
    from experiments import config as cfgmod
    from rwkv_jax.errors import RwkvJaxError

    cfg = cfgmod.load("configs/default.yaml", [])
    with pytest.raises(RwkvJaxError, match=match):
        paired.variant_configs(_args(**kw), cfg)
