"""The `rwkv-jax` command line: every sub-command on a tiny synthetic model."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax.cli import main


def test_info(synth_model, capsys):
    path = synth_model("tiny", "Q4_K_M")
    assert main(["info", path, "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "architecture  rwkv7" in out
    assert "lora ranks    decay 32, iclr 32, value 32, gate 64" in out
    assert "Q4_K" in out and "Q6_K" in out and "file type     MOSTLY_Q4_K_M" not in out
    assert "blk.1.channel_mix_value.weight" in out and "[1024, 256]" in out


def test_tokenize(synth_model, capsys, tmp_path):
    path = synth_model("tiny", "F32")
    assert main(["tokenize", path, "--text", "Hello\n\nworld"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert 261 in ids
    assert rwkv_jax.load(path).tokenizer.decode(ids) == "Hello\n\nworld"
    f = tmp_path / "t.txt"
    f.write_bytes("naïve 🦀".encode())
    assert main(["tokenize", path, "--text-file", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)


def test_logits_matches_api(synth_model, tmp_path):
    path = synth_model("tiny", "F32")
    out = tmp_path / "l.npz"
    assert (
        main(
            [
                "logits",
                path,
                "--prompt",
                "The quick brown fox",
                "-o",
                str(out),
                "--chunk-size",
                "32",
            ]
        )
        == 0
    )
    z = np.load(out)
    model = rwkv_jax.load(path)
    ids = model.tokenizer.encode("The quick brown fox")
    assert z["tokens"].dtype == np.int32 and z["tokens"].tolist() == ids
    assert z["logits"].dtype == np.float32 and z["logits"].shape == (len(ids), 65536)
    want = np.asarray(model.forward(ids, all_logits=True)[0][0])
    np.testing.assert_allclose(z["logits"], want, atol=1e-4)  # chunk 32 vs 16: see test_prefill
    tf = tmp_path / "ids.json"
    tf.write_text(json.dumps(ids))
    out2 = tmp_path / "l2.npz"
    assert main(["logits", path, "--tokens-file", str(tf), "-o", str(out2)]) == 0
    np.testing.assert_allclose(np.load(out2)["logits"], want, atol=1e-4)


def test_generate_streams_greedy_text(synth_model, capsys):
    path = synth_model("tiny", "F32")
    assert main(["generate", path, "--prompt", "Once upon", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    model = rwkv_jax.load(path)
    assert out == "Once upon" + model.generate("Once upon", 8) + "\n"


def test_synth_and_quantize(tmp_path, capsys):
    src = tmp_path / "f16.gguf"
    assert main(["synth", "--preset", "tiny", "--type", "F16", "-o", str(src), "-q"]) == 0
    dst = tmp_path / "q.gguf"
    assert main(["quantize", str(src), str(dst), "--type", "Q4_K_M", "-q"]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(dst)).tensors}
    assert types["blk.0.time_mix_key.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q6_K
    assert types["blk.0.time_mix_a1.weight"] == gguf.GGMLQuantizationType.F16
    logits, _ = rwkv_jax.load(str(dst)).forward([1, 2, 3])
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/nonexistent.gguf"], "no such file"),
        (["generate", "/nonexistent.gguf", "--prompt", "x"], "no such file"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("rwkv-jax: error:") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_bad_tokens_file(synth_model, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert (
        main(
            [
                "logits",
                synth_model("tiny", "F32"),
                "--tokens-file",
                str(bad),
                "-o",
                str(tmp_path / "o.npz"),
            ]
        )
        == 1
    )
    assert "expected a JSON list of integers" in capsys.readouterr().err
