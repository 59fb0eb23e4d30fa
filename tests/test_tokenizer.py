"""World tokenizer: GGUF escaping, greedy longest match vs BlinkDL's TRIE_TOKENIZER, decoding."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from rwkv_jax import tokenizer as tk
from rwkv_jax.errors import GGUFError, InputError

VOCAB_FILE = Path(tk.__file__).parent / "data" / "rwkv_vocab_v20230424.txt"
PARITY_BYTES = 1_000_000  # default-suite parity corpus size (brief: >= 1 MB, <= ~30 s)

# Text that exercises multi-byte tokens, whitespace runs and the special-looking literals.
EXTRA_TEXTS = [
    "中文分词测试：RWKV 是一种线性注意力的语言模型。日本語のテキストも、ひらがなとカタカナ。",
    "한국어 문장입니다. Ελληνικά και русский текст, עברית ועربي.",
    "emoji 🎉🚀👩‍👩‍👧‍👦🏳️‍🌈 flags 🇯🇵🇺🇸 skin 👋🏽 math 𝔸𝕓𝒸 ∑∫√ ≤≥",
    " " * 200,
    " " * 128 + "x" + " " * 129,
    "\t\t\t\tindent\n\t \t \n",
    "windows\r\nline\r\nendings\r\n\r\n\r\n",
    "\n" * 7 + "\n\n" + "\r" * 3,
    "-" * 300 + "=" * 81,
    "<s>literal control text</s> [PAD65530] [PAD65535]",
    "\x00\x01\x7f escapes \\ \\x41 ' \" '\"",
]


def _stdlib_files() -> list[Path]:
    """Top-level *.py / *.txt files of the standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for ext in ("*.py", "*.txt") for f in root.glob(ext) if f.is_file())


def _stdlib_files_recursive() -> list[Path]:
    """Every *.py / *.txt file under the standard library (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        f
        for ext in ("*.py", "*.txt")
        for f in root.rglob(ext)
        if f.is_file() and not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts)
    )


def _parity_corpus(limit: int | None) -> list[bytes]:
    """Real text as raw bytes: stdlib files (until `limit` bytes) plus the extra snippets."""
    files = _stdlib_files() if limit is not None else _stdlib_files_recursive()
    docs: list[bytes] = []
    total = 0
    for f in files:
        if limit is not None and total >= limit:
            break
        docs.append(f.read_bytes())
        total += len(docs[-1])
    # the test must not pass vacuously on a machine with a tiny stdlib
    assert total >= min(limit or PARITY_BYTES, PARITY_BYTES), f"only {total} bytes of stdlib text"
    return docs + [t.encode("utf-8") for t in EXTRA_TEXTS]


def _random_bytes(rng: random.Random, vocab: list[bytes], n: int) -> list[bytes]:
    """Byte strings mixing random bytes (invalid UTF-8) with concatenated vocabulary entries."""
    out = []
    for k in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.3:
                parts.append(rng.randbytes(rng.randint(1, 8)))
            else:
                tok = vocab[rng.randrange(1, len(vocab))]
                # a truncated token forces the matcher to back off from a near miss
                parts.append(tok[: rng.randint(1, len(tok))] if k % 2 else tok)
        out.append(b"".join(parts))
    return out


def _greedy(index: dict[bytes, int], data: bytes) -> list[int]:
    """Greedy longest match of `data` over the token -> id `index`, by brute force."""
    longest = max(map(len, index))
    ids, i = [], 0
    while i < len(data):
        for length in range(min(longest, len(data) - i), 0, -1):
            tok = index.get(data[i : i + length])
            if tok is not None:
                ids.append(tok)
                i += length
                break
    return ids


def _longest_match_reference(vocab: list[bytes], data: bytes) -> list[int]:
    """Brute-force greedy longest match (spec §4.2), independent of the trie implementation."""
    return _greedy({b: i for i, b in enumerate(vocab) if b}, data)


def _typed_longest_match(raw: list[bytes], types: list[int], data: bytes) -> list[int]:
    """Brute-force greedy longest match over NORMAL tokens only; the larger id of equal tokens."""
    return _greedy(
        {b: i for i, (b, t) in enumerate(zip(raw, types, strict=True)) if t == 1 and b}, data
    )


def _random_vocab(rng: random.Random, n: int) -> tuple[list[bytes], list[int]]:
    """Every byte plus `n` short tokens over 4 byte values: shared prefixes, NULs, duplicates."""
    raw = [b"<s>"] + [bytes([b]) for b in range(256)]
    types = [3] + [1] * 256
    for _ in range(n):
        if rng.random() < 0.1:  # an exact duplicate (any type) of an earlier entry
            raw.append(raw[rng.randrange(1, len(raw))])
        else:  # empty tokens included; b"a" < b"a\x00" < b"a\x00b" trips NUL-padded sorts
            raw.append(bytes(rng.choice(b"\x00\x01a\xff") for _ in range(rng.randint(0, 9))))
        types.append(rng.choice([1, 1, 1, 1, 0, 3, 5]))
    return raw, types


@pytest.fixture(scope="module")
def world() -> tk.Tokenizer:
    """The shipped World tokenizer."""
    return tk.Tokenizer.world()


@pytest.fixture(scope="module")
def vocab() -> list[bytes]:
    """Parsed vocabulary file."""
    return tk.load_vocab_file()


@pytest.fixture(scope="module")
def official():
    """BlinkDL's reference TRIE_TOKENIZER over the same vocabulary file."""
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(str(VOCAB_FILE))


# ----------------------------------------------------------------------------- vocabulary file


def test_vocab_file_layout(vocab: list[bytes]) -> None:
    assert len(vocab) == 65530
    assert vocab[0] == b""
    # ids 1..256 are the single bytes, id = byte + 1
    assert [vocab[b + 1] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert vocab[11] == b"\n" and vocab[33] == b" " and vocab[261] == b"\n\n"
    assert vocab[65529] == b" " * 128
    assert max(map(len, vocab)) == 128
    # sorted by byte length, as the spec says
    assert all(len(a) <= len(b) for a, b in zip(vocab[1:], vocab[2:], strict=False))
    assert len(set(vocab[1:])) == len(vocab) - 1  # no duplicate entries


def test_load_vocab_file_returns_a_fresh_list(vocab: list[bytes]) -> None:
    again = tk.load_vocab_file()
    again[5] = b"corrupted"
    assert tk.load_vocab_file()[5] == vocab[5] == b"\x04"


@pytest.mark.oracle
def test_load_vocab_file_matches_official_parser(official, vocab: list[bytes]) -> None:
    assert {i: vocab[i] for i in range(1, len(vocab))} == official.idx2token


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 'ab' 3\n", "not 3 bytes"),
        ("2 'a' 1\n", "out of order"),
        ("1 nonsense( 1\n", "not a Python literal"),
        ("1 'a'\n", "expected"),
    ],
)
def test_load_vocab_file_rejects_malformed_lines(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text(line, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        tk.load_vocab_file(path)


def test_load_vocab_file_parses_literals(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("1 'a b' 3\n2 b'\\xff\\x00' 2\n3 \"it's\" 4\n4 '\\n' 1\n", encoding="utf-8")
    assert tk.load_vocab_file(path) == [b"", b"a b", b"\xff\x00", b"it's", b"\n"]


# ----------------------------------------------------------------------------- GGUF escaping


def test_escape_examples() -> None:
    assert tk.escape_token(b"\n\n") == "\\n\\n"
    assert tk.escape_token("中".encode()) == "\\xe4\\xb8\\xad"
    assert tk.escape_token(b"a\\b") == "a\\\\b"
    assert tk.escape_token(b"'") == "'"  # repr picks double quotes, so no escape
    assert tk.escape_token(b"'\"") == "\\'\""  # both quotes: repr escapes the single one
    assert tk.escape_token(b"\x7f\x80\xff") == "\\x7f\\x80\\xff"


def test_escape_unescape_round_trip_every_vocab_entry(vocab: list[bytes]) -> None:
    for b in vocab[1:]:
        assert tk.unescape_token(tk.escape_token(b)) == b, b


def test_unescape_fast_path_equals_llama_cpp_port(vocab: list[bytes]) -> None:
    # The codec fast path must agree with the byte-level port on every real token string.
    for b in vocab[1:]:
        s = tk.escape_token(b)
        assert tk._unescape_exact(s) == tk.unescape_token(s), s


@pytest.mark.parametrize(
    ("escaped", "raw"),
    [
        ("plain", b"plain"),
        ("\\t\\n\\r", b"\t\n\r"),
        ("\\x00\\xff", b"\x00\xff"),
        ("\\q\\\\\\'", b"q\\'"),  # backslash + other char -> that char
        ("\\a\\0", b"a0"),  # no C-style \a or octal: just the character
        ("tail\\", b"tail"),  # dangling escape emits nothing
        ("\\x4", b""),  # incomplete hex emits nothing
        # llama.cpp's hex parser handles only 0-9a-f: 'A' -> 0x41-48=17, 'B' -> 18,
        # (17 << 4) + 18 = 290 -> 290 & 0xff = 0x22
        ("\\xAB", b"\x22"),
        ("\\xzz", bytes([((ord("z") - 87) * 16 + ord("z") - 87) & 0xFF])),
        ("ünï", "ünï".encode()),  # non-ASCII copied as UTF-8 bytes
        ("[PAD65530]", b"[PAD65530]"),
    ],
)
def test_unescape_llama_cpp_semantics(escaped: str, raw: bytes) -> None:
    assert tk.unescape_token(escaped) == raw
    assert tk._unescape_exact(escaped) == raw


def test_world_gguf_tokens_layout(vocab: list[bytes]) -> None:
    tokens, types = tk.world_gguf_tokens()
    assert len(tokens) == len(types) == tk.VOCAB_SIZE == 65536
    assert all(t.isascii() for t in tokens)
    assert tokens[0] == "<s>" and types[0] == 3
    assert tokens[11] == "\\n" and tokens[33] == " " and tokens[261] == "\\n\\n"
    assert tokens[65529] == " " * 128
    assert tokens[65530:] == [f"[PAD{i}]" for i in range(65530, 65536)]
    assert types[1:65530] == [1] * 65529 and types[65530:] == [5] * 6
    assert [tk.unescape_token(t) for t in tokens[1:65530]] == vocab[1:]


# ----------------------------------------------------------------------------- from_gguf


def test_from_gguf_equals_world(world: tk.Tokenizer) -> None:
    tokens, types = tk.world_gguf_tokens()
    for t in (tk.Tokenizer.from_gguf(tokens, types), tk.Tokenizer.from_gguf(tokens, None)):
        assert t.vocab_size == 65536
        assert [t.token_bytes(i) for i in range(65536)] == [
            world.token_bytes(i) for i in range(65536)
        ]
        assert [t.token_type(i) for i in (0, 1, 65529, 65530, 65535)] == [3, 1, 1, 5, 5]
        text = "".join(EXTRA_TEXTS)
        assert t.encode(text) == world.encode(text)


def test_from_gguf_rejects_length_mismatch() -> None:
    tokens, types = tk.world_gguf_tokens()
    with pytest.raises(GGUFError, match="65535 entries"):
        tk.Tokenizer.from_gguf(tokens, types[:-1])


def test_from_gguf_rejects_missing_single_byte() -> None:
    tokens, types = tk.world_gguf_tokens()
    types = list(types)
    types[ord("A") + 1] = 3  # "A" becomes CONTROL: no NORMAL token for byte 0x41
    with pytest.raises(GGUFError, match="0x41"):
        tk.Tokenizer.from_gguf(tokens, types)


def test_from_gguf_rejects_unknown_token_type_and_non_strings() -> None:
    tokens, types = tk.world_gguf_tokens()
    types = list(types)
    types[7] = 42
    with pytest.raises(GGUFError, match=r"token_type\[7\] = 42"):
        tk.Tokenizer.from_gguf(tokens, types)
    with pytest.raises(GGUFError, match="array of strings"):
        tk.Tokenizer.from_gguf([b"a"], None)  # type: ignore[list-item]


def test_from_gguf_duplicate_tokens_larger_id_wins() -> None:
    # 256 byte tokens plus two identical NORMAL "ab" entries: the larger id is matched.
    tokens = ["<s>"] + [tk.escape_token(bytes([b])) for b in range(256)] + ["ab", "ab"]
    t = tk.Tokenizer.from_gguf(tokens, None)
    assert t.encode("abc") == [258, ord("c") + 1]


def test_unescape_tokens_equals_per_token() -> None:
    # The batch path must agree with `unescape_token` token by token, including the cases that
    # leave it (non-simple escapes, "\0" inside a token) and escapes cut at a token boundary:
    # joined naively, "tail\\" + "x41" would read as "\x41".
    tokens, _ = tk.world_gguf_tokens()
    edge = ["tail\\", "x41", "\\x4", "1", "\\", "u0100", "a\\", "\\b", "", "ünï", "\\xAB"]
    cases = [tokens, tokens[:300] + ["x\\q", "\\0"], edge, ["a\0b", "\\n\0"], [""]]
    cases += [edge[i : i + 2] for i in range(len(edge) - 1)]  # each boundary on its own
    for case in cases:
        assert tk.unescape_tokens(case) == [tk.unescape_token(t) for t in case], case[-3:]
    for bad in (["ok", "\udc80"], ["\\x41", "\udc80\\q"]):  # lone surrogates raise the same
        with pytest.raises(UnicodeEncodeError):
            tk.unescape_tokens(bad)
        with pytest.raises(UnicodeEncodeError):
            [tk.unescape_token(t) for t in bad]


def test_from_gguf_matcher_is_lazy_but_checks_are_eager() -> None:
    # The trie is built by the first encode (a model that only decodes never pays for it) ...
    tokens, types = tk.world_gguf_tokens()
    tk._from_gguf_cached.cache_clear()
    t = tk.Tokenizer.from_gguf(tokens, types)
    assert t._matcher is None
    assert t.decode(t.encode("lazy ok")) == "lazy ok" and t._matcher is not None
    # ... but every check runs at construction: byte 0x41's token made UNUSED is rejected
    # without any encode call, by the constructor and by from_gguf
    raw = [tk.unescape_token(s) for s in tokens]
    bad_types = list(types)
    bad_types[0x41 + 1] = tk.TOKEN_TYPE_UNUSED
    with pytest.raises(GGUFError, match="1 byte value"):
        tk.Tokenizer(raw, bad_types)
    with pytest.raises(GGUFError, match="1 byte value"):
        tk.Tokenizer.from_gguf(tokens, bad_types)
    raw_dup = raw + [b"A"]  # a NORMAL duplicate with a larger id restores byte 0x41
    assert tk.Tokenizer(raw_dup, bad_types + [1]).encode("A") == [len(raw)]


def test_from_gguf_cache_keys_on_tokens_and_types() -> None:
    tokens, types = tk.world_gguf_tokens()
    a = tk.Tokenizer.from_gguf(tokens, types)
    assert tk.Tokenizer.from_gguf(list(tokens), np.array(types, np.int32)) is a
    assert tk.Tokenizer.from_gguf(tokens, None) is a  # the same derived types
    assert tk.Tokenizer.from_gguf(tokens, [float(t) for t in types]) is a  # int() of each
    other = list(types)
    other[300] = tk.TOKEN_TYPE_CONTROL
    b = tk.Tokenizer.from_gguf(tokens, other)
    assert b is not a and b.token_type(300) == 3 and a.token_type(300) == 1
    assert 300 not in b.encode(tk.unescape_token(tokens[300]))  # no longer matched
    assert a.encode(tk.unescape_token(tokens[300])) == [300]
    with pytest.raises(GGUFError, match=r"token_type\[5\] = 9"):
        tk.Tokenizer.from_gguf(tokens, np.array([9 if i == 5 else t for i, t in enumerate(types)]))
    # a "\0" inside a token disables the cache but not the tokenizer
    nul = [*tokens[:257], "a\0b", "\\x00\0"]
    t1, t2 = tk.Tokenizer.from_gguf(nul, None), tk.Tokenizer.from_gguf(nul, None)
    assert t1 is not t2
    assert t1.encode(b"a\x00b\x00\x00") == t2.encode(b"a\x00b\x00\x00") == [257, 258]


def test_matcher_on_random_vocabularies() -> None:
    # Many shared prefixes, NUL bytes, empty and duplicate tokens, non-NORMAL types: the numpy
    # trie must give the brute-force greedy match on every input.
    rng = random.Random(7)
    for trial in range(6):
        raw, types = _random_vocab(rng, 400 if trial % 2 else 60)
        t = tk.Tokenizer.from_gguf([tk.escape_token(b) for b in raw], types)
        docs = [bytes(rng.choice(b"\x00\x01a\xff") for _ in range(rng.randint(0, 60)))]
        docs += [b"".join(rng.choice(raw) for _ in range(20)) for _ in range(40)]
        docs += [rng.randbytes(30)]
        for data in docs:
            assert t.encode(data) == _typed_longest_match(raw, types, data), (trial, data)


def test_matcher_deep_tokens() -> None:
    # depths past 255 and 65535: the node sort's uint16 fast path must not be taken past 65535
    raw = [bytes([b]) for b in range(256)] + [b"a" * 300, b"a" * 299 + b"b", b"a" * 70_000]
    raw += [b"a" * n + b"b" for n in range(240, 520, 7)]  # branches at many deep levels
    t = tk.Tokenizer(raw, [1] * len(raw))
    data = b"a" * 70_000 + b"a" * 300 + b"a" * 299 + b"b" + b"a" * 5
    assert t.encode(data)[:3] == [258, 256, 257]
    for doc in [data] + [b"a" * n + b"b" for n in range(200, 600, 3)]:
        assert t.encode(doc) == _typed_longest_match(raw, [1] * len(raw), doc)


def test_every_world_token_encodes_to_itself(world: tk.Tokenizer, vocab: list[bytes]) -> None:
    # The longest match of a whole token is the token (World has no duplicates), so this walks
    # every node of the trie; the trie has one node per distinct token prefix.
    assert [world.encode(b) for b in vocab[1:]] == [[i] for i in range(1, len(vocab))]
    prefixes = {b[:k] for b in vocab[1:] for k in range(1, len(b) + 1)}
    world.encode("")
    assert len(world._matcher[2]) == len(prefixes) + 1  # + the root


# ----------------------------------------------------------------------------- encoding


def test_spot_ids(world: tk.Tokenizer) -> None:
    assert world.encode("\n\n") == [tk.DOUBLE_NEWLINE_ID] == [261]
    assert world.encode("\n") == [11] and world.encode(" ") == [33]
    assert world.encode(b"\x00\xff") == [1, 256]
    assert world.encode("") == [] and world.encode(b"") == []
    spaces = world.encode(" " * 200)
    assert spaces[0] == 65529 and world.decode(spaces) == " " * 200  # 128 spaces, then the rest
    # "<s>" is ordinary text for the reference tokenizer (llama.cpp would give id 0)
    assert tk.EOS_ID not in world.encode("<s>")
    assert world.decode(world.encode("<s>")) == "<s>"


def test_encode_accepts_bytes_like_and_rejects_others(world: tk.Tokenizer) -> None:
    ids = world.encode("hello")
    assert world.encode(b"hello") == world.encode(bytearray(b"hello")) == ids
    assert world.encode(memoryview(b"hello")) == ids
    with pytest.raises(InputError, match="UTF-8"):
        world.encode("lone surrogate \udc80")
    with pytest.raises(InputError, match="str or bytes"):
        world.encode(123)  # type: ignore[arg-type]


def test_encode_matches_brute_force_reference(world: tk.Tokenizer, vocab: list[bytes]) -> None:
    # Runs without the `rwkv` package: an independent longest-match on random byte strings.
    rng = random.Random(0)
    for data in _random_bytes(rng, vocab, 300) + [t.encode() for t in EXTRA_TEXTS]:
        assert world.encode(data) == _longest_match_reference(vocab, data), data


def _check_parity(world: tk.Tokenizer, official, docs: list[bytes]) -> None:
    """Token ids equal the reference on every document, and decode back to the same bytes."""
    for doc in docs:
        ids = world.encode(doc)
        assert ids == official.encodeBytes(doc), doc[:80]
        assert world.decode_bytes(ids) == doc


@pytest.mark.oracle
def test_parity_with_official_on_real_text(world: tk.Tokenizer, official) -> None:
    _check_parity(world, official, _parity_corpus(PARITY_BYTES))


@pytest.mark.oracle
def test_parity_with_official_on_random_bytes(world, official, vocab) -> None:
    # invalid UTF-8 included: both tokenizers work on bytes (TRIE_TOKENIZER.encodeBytes)
    _check_parity(world, official, _random_bytes(random.Random(1), vocab, 2000))


@pytest.mark.oracle
def test_parity_with_official_str_api(world: tk.Tokenizer, official) -> None:
    for text in EXTRA_TEXTS:
        assert world.encode(text) == official.encode(text)
        assert world.decode(world.encode(text)) == official.decode(official.encode(text)) == text


@pytest.mark.oracle
@pytest.mark.slow
def test_parity_with_official_on_whole_stdlib(world: tk.Tokenizer, official) -> None:
    _check_parity(world, official, _parity_corpus(None))


# ----------------------------------------------------------------------------- decoding


def test_decode_round_trip_on_real_text(world: tk.Tokenizer) -> None:
    checked = 0
    for doc in _parity_corpus(PARITY_BYTES):
        try:
            text = doc.decode("utf-8")
        except UnicodeDecodeError:
            continue  # not valid UTF-8: covered at the bytes level by the parity tests
        assert world.decode(world.encode(text)) == text
        checked += len(doc)
    assert checked >= PARITY_BYTES * 0.9  # nearly all of the stdlib is UTF-8


def test_decode_invalid_utf8_and_control_tokens(world: tk.Tokenizer) -> None:
    assert world.decode([256, 11]) == "\ufffd\n"  # 0xff is never valid UTF-8
    assert world.decode([0, 11, 65530, 65535]) == "\n"  # CONTROL and UNUSED decode to nothing
    assert world.decode_bytes([0]) == b"" and world.token_bytes(0) == b"<s>"
    assert world.token_bytes(65530) == b"[PAD65530]"
    assert world.decode(np.array([11, 33], dtype=np.int32)) == "\n "


@pytest.mark.parametrize("bad", [65536, -1, 10**9])
def test_out_of_range_id_raises(world: tk.Tokenizer, bad: int) -> None:
    with pytest.raises(InputError, match=rf"token id {bad}.*0\.\.65535"):
        world.decode([11, bad])
    with pytest.raises(InputError, match=rf"token id {bad}.*0\.\.65535"):
        world.token_bytes(bad)
    with pytest.raises(InputError, match=rf"token id {bad}"):
        world.stream().feed(bad)


def test_non_integer_id_raises(world: tk.Tokenizer) -> None:
    with pytest.raises(InputError, match="not an integer"):
        world.decode([1.5])  # type: ignore[list-item]


def test_stream_never_splits_characters(world: tk.Tokenizer) -> None:
    text = "🎉中文 ok 👩‍👩‍👧‍👦"
    # one token per byte: every multi-byte character arrives in pieces
    ids = [b + 1 for b in text.encode("utf-8")]
    stream = world.stream()
    pieces = [stream.feed(i) for i in ids]
    assert stream.flush() == ""
    assert "".join(pieces) == text == world.decode(ids)
    assert "\ufffd" not in "".join(pieces)
    # the 4-byte emoji appears whole on its 4th byte, nothing before
    assert pieces[:4] == ["", "", "", "🎉"]


def test_stream_equals_decode_on_random_ids(world: tk.Tokenizer) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50, 400):
        # mix arbitrary ids (continuation bytes, invalid UTF-8, control) with real text
        ids = [int(i) for i in rng.integers(0, tk.VOCAB_SIZE, n)]
        ids += world.encode(EXTRA_TEXTS[n % len(EXTRA_TEXTS)])
        stream = world.stream()
        out = "".join(stream.feed(i) for i in ids) + stream.flush()
        assert out == world.decode(ids)


def test_stream_flush_reports_truncated_character(world: tk.Tokenizer) -> None:
    stream = world.stream()
    assert stream.feed(0xE4 + 1) == ""  # first byte of a 3-byte character
    assert stream.flush() == "\ufffd"
