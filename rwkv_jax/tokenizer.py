"""RWKV World tokenizer: greedy longest match over UTF-8 bytes (spec §4).

Encoding follows BlinkDL's reference `TRIE_TOKENIZER`: the text's UTF-8 bytes are split by
repeatedly taking the longest NORMAL vocabulary token that is a prefix of what remains. Every
single byte is a token, so encoding never fails; no BOS/EOS is added.

GGUF files store the vocabulary as llama.cpp's converter writes it: `tokenizer.ggml.tokens` holds
`repr(bytes)[2:-1]`-escaped ASCII strings, `"<s>"` (CONTROL) at id 0 and `"[PAD65530]"`...
(UNUSED) at the end; `escape_token`/`unescape_token` convert between the two forms.
"""

from __future__ import annotations

import ast
import codecs
import functools
import operator
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from rwkv_jax.errors import GGUFError, InputError

VOCAB_SIZE = 65536  # rows of emb/head in World models; ids 65530..65535 are padding
EOS_ID = 0  # "<s>": end of text, also used as BOS/separator by BlinkDL's evals
DOUBLE_NEWLINE_ID = 261  # "\n\n": llama.cpp's EOT for RWKV World

# gguf.TokenType values (llama_token_type); 0 is llama.cpp's LLAMA_TOKEN_TYPE_UNDEFINED.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_UNUSED = 5
_KNOWN_TOKEN_TYPES = range(0, 7)

_VOCAB_PATH = Path(__file__).parent / "data" / "rwkv_vocab_v20230424.txt"
_N_FILE_IDS = 65530  # ids 0..65529: id 0 is "<s>" (not in the file), 1..65529 are file lines

# An escaped token whose escapes are all ones `unicode_escape` decodes exactly as llama.cpp does:
# runs of plain characters between escapes. Possessive (Python >= 3.11), sre keeps no backtrack
# point per escape: 2.4 ms instead of 8-12 ms on the 65536 joined World tokens.
try:
    _SIMPLE_ESCAPES = re.compile(r"[^\\]*+(?:\\(?:[tnr\\'\"]|x[0-9a-f]{2})[^\\]*+)*+")
except re.error:  # Python 3.10: the same language, with backtracking
    _SIMPLE_ESCAPES = re.compile(r"[^\\]*(?:\\(?:[tnr\\'\"]|x[0-9a-f]{2})[^\\]*)*")


@functools.lru_cache(maxsize=4)
def _load_vocab_cached(path: str) -> tuple[bytes, ...]:
    """Parse a vocabulary file once per path; see `load_vocab_file`."""
    vocab: list[bytes] = [b""]
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            first, last = line.find(" "), line.rstrip("\n").rfind(" ")
            where = f"{path}:{line_no}"
            if first < 0 or last <= first:
                raise InputError(f"{where}: expected '<id> <python literal> <byte length>'")
            try:
                tok_id, n_bytes = int(line[:first]), int(line[last + 1 :])
            except ValueError as e:
                raise InputError(f"{where}: id and byte length must be integers ({e})") from e
            if tok_id != len(vocab):
                raise InputError(f"{where}: id {tok_id} out of order, expected {len(vocab)}")
            literal = line[first + 1 : last]
            # Fast path: a plain quoted str without escapes is its own content (most lines).
            q = literal[:1]
            if q in ("'", '"') and literal[-1:] == q and "\\" not in literal and len(literal) > 1:
                value: str | bytes = literal[1:-1]
            else:
                try:
                    value = ast.literal_eval(literal)
                except (ValueError, SyntaxError) as e:
                    raise InputError(f"{where}: token is not a Python literal ({e})") from e
            raw = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(raw, bytes) or len(raw) != n_bytes:
                raise InputError(f"{where}: token {literal} is not {n_bytes} bytes long")
            vocab.append(raw)
    return tuple(vocab)


def load_vocab_file(path: str | Path | None = None) -> list[bytes]:
    """Token bytes indexed by id from an `rwkv_vocab_v20230424.txt`-format file; [0] is b""."""
    resolved = str(Path(path).resolve()) if path is not None else str(_VOCAB_PATH)
    # A fresh list per call so callers cannot corrupt the cached copy.
    return list(_load_vocab_cached(resolved))


def escape_token(b: bytes) -> str:
    """llama.cpp converter's ASCII form of token bytes: `repr(bytes)[2:-1]` (spec §4.3)."""
    return repr(bytes(b))[2:-1]


def _unescape_exact(s: str) -> bytes:
    """Byte-for-byte port of llama.cpp `llama_unescape_rwkv_token` (x86: `char` is signed)."""
    out = bytearray()
    escaping = False
    hex_remaining = 0
    hex_acc = 0
    for c in s.encode("utf-8"):
        if hex_remaining:
            # C: value = c >= 'a' ? c - 'a' + 10 : c - '0', in uint8 arithmetic; bytes >= 0x80
            # are negative chars on x86, hence below 'a'.
            value = c - 87 if 0x61 <= c < 0x80 else c - 48
            hex_acc = ((hex_acc << 4) + value) & 0xFF
            hex_remaining -= 1
            if hex_remaining == 0:
                out.append(hex_acc)
                hex_acc = 0
        elif escaping:
            if c == 0x78:  # 'x'
                hex_remaining = 2
            else:
                out.append({0x74: 0x09, 0x6E: 0x0A, 0x72: 0x0D}.get(c, c))
            escaping = False
        elif c == 0x5C:  # backslash
            escaping = True
        else:
            out.append(c)
    # A dangling "\" or incomplete "\xh" at the end emits nothing, as in llama.cpp.
    return bytes(out)


def unescape_token(s: str) -> bytes:
    """Raw bytes of a `tokenizer.ggml.tokens` entry, as llama.cpp's `llama_unescape_rwkv_token`."""
    if "\\" not in s:
        return s.encode("utf-8")
    if _SIMPLE_ESCAPES.fullmatch(s):
        # unicode_escape reads non-escape bytes as latin-1, so latin-1 gives the bytes back.
        return codecs.decode(s.encode("utf-8"), "unicode_escape").encode("latin-1")
    return _unescape_exact(s)


def unescape_tokens(tokens: Sequence[str]) -> list[bytes]:
    """`unescape_token` of every entry, in one codec pass when all escapes are simple."""
    joined = "\0".join(tokens)
    if joined.count("\0") == len(tokens) - 1:
        return _unescape_joined(joined)
    return [unescape_token(t) for t in tokens]  # a token contains "\0": no separator to use


def _unescape_joined(joined: str) -> list[bytes]:
    """`unescape_tokens` of tokens joined by "\0" (none containing it); ~5x the per-token speed."""
    # "\0" can neither finish nor continue an escape, so the joined string is all simple escapes
    # exactly when every token is.
    if _SIMPLE_ESCAPES.fullmatch(joined):
        try:
            data = joined.replace("\0", "\\u0100").encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: the per-token path raises the same error
        else:
            # Simple escapes and raw bytes decode below U+0100, so the separators are the only
            # U+0100 characters; latin-1 turns each piece back into its bytes.
            pieces = data.decode("unicode_escape").split("\u0100")
            return [p.encode("latin-1") for p in pieces]
    return [unescape_token(t) for t in joined.split("\0")]


def world_gguf_tokens() -> tuple[list[str], list[int]]:
    """`tokenizer.ggml.tokens` and `.token_type` exactly as llama.cpp's converter writes them."""
    vocab = _load_vocab_cached(str(_VOCAB_PATH))
    tokens = ["<s>"] + [escape_token(b) for b in vocab[1:]]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB_SIZE)]
    types = [TOKEN_TYPE_CONTROL] + [TOKEN_TYPE_NORMAL] * (len(vocab) - 1)
    types += [TOKEN_TYPE_UNUSED] * (VOCAB_SIZE - len(types))
    return tokens, types


class Tokenizer:
    """Greedy longest-match byte tokenizer with the reference (`TRIE_TOKENIZER`) semantics.

    Only NORMAL tokens are matched when encoding, as in BlinkDL's reference tokenizer, so the
    literal text "<s>" encodes as ordinary bytes. llama.cpp (with `parse_special`) would turn it
    into id 0; the two differ only for text containing "<s>" or "[PAD6553x]" literally. When two
    NORMAL tokens have the same bytes, the larger id wins (as in both the reference and llama.cpp).
    Decoding drops CONTROL and UNUSED tokens.
    """

    def __init__(self, token_bytes: Sequence[bytes], token_types: Sequence[int]) -> None:
        """Check and index raw token bytes and their gguf.TokenType values (matcher: lazily)."""
        if len(token_bytes) != len(token_types):
            raise GGUFError(
                f"tokenizer has {len(token_bytes)} tokens but {len(token_types)} token types"
            )
        self._bytes = list(token_bytes)
        types = np.asarray(token_types)
        self._types = types.tolist() if types.dtype.kind in "biu" else list(token_types)
        n = len(self._bytes)
        if types.dtype.kind in "biu":
            normal = types == TOKEN_TYPE_NORMAL
            silent = (types == TOKEN_TYPE_CONTROL) | (types == TOKEN_TYPE_UNUSED)
        else:  # floats, objects: compare one by one, with Python's equality
            normal = np.array([t == TOKEN_TYPE_NORMAL for t in self._types], bool)
            silent = np.array(
                [t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNUSED) for t in self._types], bool
            )
        lens = np.fromiter(map(len, self._bytes), np.int64, n)  # [n] byte length per id
        # decode table: control/unused tokens contribute nothing to decoded text
        self._decode = list(self._bytes)
        for i in np.flatnonzero(silent).tolist():
            self._decode[i] = b""
        # Checked here, not when the matcher is built: a bad vocabulary fails at load time.
        singles = {self._bytes[i][0] for i in np.flatnonzero(normal & (lens == 1)).tolist()}
        missing = [c for c in range(256) if c not in singles]
        if missing:
            shown = ", ".join(f"0x{c:02x}" for c in missing[:8])
            raise GGUFError(
                f"tokenizer has no NORMAL single-byte token for {len(missing)} byte value(s) "
                f"({shown}{', ...' if len(missing) > 8 else ''}); text containing them could "
                "not be encoded. Is tokenizer.ggml.token_type correct for this RWKV vocabulary?"
            )
        # empty tokens can never be matched (llama.cpp puts them on the root)
        self._matchable = np.flatnonzero(normal & (lens > 0))
        # (trans.get, root, best_id, best_len), built by the first `encode` (~75 ms for World)
        self._matcher: tuple | None = None

    def _build_matcher(self) -> tuple:
        """Byte trie as a flat dict (node << 8 | byte) -> child, with the best match per node."""
        trans: dict[int, int] = {}
        node_token = [-1]  # token id ending exactly at each node, -1 if none
        parent = [0]
        depth = [0]
        for tok_id in self._matchable.tolist():
            node = 0
            for c in self._bytes[tok_id]:
                key = (node << 8) | c
                child = trans.get(key)
                if child is None:
                    child = len(node_token)
                    trans[key] = child
                    node_token.append(-1)
                    parent.append(node)
                    depth.append(depth[node] + 1)
                node = child
            node_token[node] = tok_id  # later ids overwrite: the larger id wins
        # Longest token that is a prefix of each node's path: children are created after their
        # parents, so one pass in creation order sees the parent's answer first.
        best_id = [0] * len(node_token)
        best_len = [0] * len(node_token)
        for node in range(1, len(node_token)):
            if node_token[node] >= 0:
                best_id[node], best_len[node] = node_token[node], depth[node]
            else:
                best_id[node], best_len[node] = best_id[parent[node]], best_len[parent[node]]
        root = [trans[c] for c in range(256)]
        self._matcher = (trans.get, root, best_id, best_len)
        return self._matcher

    @classmethod
    def from_gguf(cls, tokens: Sequence[str], token_types: Sequence[int] | None) -> Tokenizer:
        """Tokenizer from `tokenizer.ggml.tokens` and (optional) `tokenizer.ggml.token_type`."""
        try:
            joined = "\0".join(tokens) if tokens else None
        except TypeError:
            joined = None
        if joined is None:
            raise GGUFError("tokenizer.ggml.tokens must be a non-empty array of strings")
        if token_types is None:
            # Without types, id 0 and "[PAD<id>]" entries are the converter's CONTROL/UNUSED.
            types = [TOKEN_TYPE_NORMAL] * len(tokens)
            types[EOS_ID] = TOKEN_TYPE_CONTROL
            for i, t in enumerate(tokens):
                if i != EOS_ID and t.startswith("[PAD") and t == f"[PAD{i}]":
                    types[i] = TOKEN_TYPE_UNUSED
        else:
            arr = np.asarray(token_types)
            fast = arr.ndim == 1 and arr.dtype.kind in "iu"  # plain integers: no int() each
            types = arr.tolist() if fast else [int(t) for t in token_types]
            if len(types) != len(tokens):
                raise GGUFError(
                    f"tokenizer.ggml.token_type has {len(types)} entries but "
                    f"tokenizer.ggml.tokens has {len(tokens)}; the arrays must be the same length"
                )
            lo, hi = (arr.min(), arr.max()) if fast else (min(types), max(types))
            if lo < 0 or hi >= len(_KNOWN_TOKEN_TYPES):
                bad = [(i, t) for i, t in enumerate(types) if t not in _KNOWN_TOKEN_TYPES]
                raise GGUFError(
                    f"tokenizer.ggml.token_type[{bad[0][0]}] = {bad[0][1]} is not a llama.cpp "
                    f"token type (0..6); {len(bad)} entries are out of range"
                )
        if joined.count("\0") == len(tokens) - 1:  # no "\0" inside a token: the join is a key
            return _from_gguf_cached(joined, tuple(types))
        return cls([unescape_token(t) for t in tokens], types)

    @classmethod
    @functools.lru_cache(maxsize=1)
    def world(cls) -> Tokenizer:
        """The RWKV World tokenizer (`rwkv_vocab_v20230424`, 65536 ids) shipped with rwkv_jax."""
        tokens, types = world_gguf_tokens()
        vocab = _load_vocab_cached(str(_VOCAB_PATH))
        # Same bytes as unescaping the GGUF strings, without the round trip.
        raw = [b"<s>", *vocab[1:]] + [t.encode("ascii") for t in tokens[len(vocab) :]]
        return cls(raw, types)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (65536 for World)."""
        return len(self._bytes)

    def token_type(self, token_id: int) -> int:
        """gguf.TokenType of one id (1 NORMAL, 3 CONTROL, 5 UNUSED, ...)."""
        return self._types[self._check_id(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one vocabulary entry (also for CONTROL/UNUSED ids, e.g. b"<s>")."""
        return self._bytes[self._check_id(token_id)]

    def _check_id(self, token_id: int) -> int:
        """Validate one token id and return it as a plain int."""
        try:
            i = operator.index(token_id)  # ints and numpy integers; rejects floats
        except TypeError as e:
            raise InputError(f"token id {token_id!r} is not an integer") from e
        if not 0 <= i < len(self._bytes):
            raise InputError(
                f"token id {token_id!r} is outside the vocabulary: valid ids are "
                f"0..{len(self._bytes) - 1}"
            )
        return i

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of `text` (str is UTF-8 encoded) by greedy longest match; no BOS added."""
        if isinstance(text, str):
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(
                    f"text is not encodable as UTF-8 ({e}); pass the raw bytes instead"
                ) from e
        elif isinstance(text, bytes | bytearray | memoryview):
            data = bytes(text)
        else:
            raise InputError(f"encode takes str or bytes, not {type(text).__name__}")
        # Hot loop: walk the trie as deep as the input allows, then emit the longest token
        # seen on that path and restart right after it (TRIE_TOKENIZER.find_longest).
        out: list[int] = []
        append = out.append
        get, root, best_id, best_len = self._matcher or self._build_matcher()
        i, n = 0, len(data)
        while i < n:
            node = root[data[i]]
            for j in range(i + 1, n):
                child = get((node << 8) | data[j])
                if child is None:
                    break
                node = child
            append(best_id[node])
            i += best_len[node]
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of `ids`; CONTROL and UNUSED tokens contribute nothing."""
        table = self._decode
        ids = list(ids)
        try:
            # bool/float/negative ids would index silently; check the range explicitly.
            if ids and (min(ids) < 0 or max(ids) >= len(table)):
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            for i in ids:
                self._check_id(i)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: UTF-8 decoded, invalid sequences become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        """A fresh incremental decoder for streaming generated ids."""
        return StreamDecoder(self)


@functools.lru_cache(maxsize=2)
def _from_gguf_cached(joined: str, types: tuple[int, ...]) -> Tokenizer:
    """Tokenizer of NUL-joined GGUF token strings, cached: a reload reuses it and its matcher."""
    return Tokenizer(_unescape_joined(joined), types)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get only complete characters back.

    A multi-byte UTF-8 character split over several tokens is held back until its last byte
    arrives; the concatenation of all `feed` results and `flush()` equals `Tokenizer.decode`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Start an empty stream over `tokenizer`."""
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Text completed by this token (possibly "")."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Text still pending at the end of the stream (an incomplete sequence gives U+FFFD)."""
        return self._utf8.decode(b"", final=True)
