"""Tokenizers with a fixed vocabulary, so streaming sources never need two passes: characters
(normalized to printable ASCII, lossy) and bytes (UTF-8, lossless, vocab 256)."""
from __future__ import annotations

import re
import string
from functools import lru_cache

from anyascii import anyascii

NON_ASCII = re.compile(r"[^\x00-\x7f]+")

# Printable ASCII plus newline; tabs become spaces and every other control character is dropped.
_PRINTABLE = "\n" + "".join(chr(c) for c in range(32, 127))


@lru_cache(maxsize=1)
def transliterations() -> dict[str, str]:
    """Every non-ASCII character that `normalize` turns into ASCII text, with that text (anyascii's,
    before lowercasing); any other non-ASCII character is dropped. For exporting the normalization."""
    table = {}
    for code in range(0x80, 0x110000):
        if not 0xD800 <= code < 0xE000:  # surrogates are no characters
            if ascii_text := anyascii(chr(code)):
                table[chr(code)] = ascii_text
    return table


class CharTokenizer:
    """`data.tokenizer=char`: normalizes text to printable ASCII (optionally lowercased) and maps each
    character to a uint8.

    Normalization: transliterate with anyascii (e.g. "é" -> "e", "ß" -> "ss"), turn tabs into spaces
    and CRLF/CR into LF, drop any other control character, and lowercase unless `lowercase=False`.
    Encoding text that still holds a character outside the vocabulary (only possible when the text
    skipped `normalize`) raises ValueError naming it, or drops it with `errors="skip"`.
    """

    kind = "char"

    def __init__(self, lowercase: bool = True):
        self.lowercase = lowercase
        chars = _PRINTABLE
        if lowercase:
            chars = "".join(c for c in chars if c not in string.ascii_uppercase)
        self.vocab = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        # Lookup table from byte to id; 255 marks "not in vocab".
        self._table = bytes(self._stoi.get(chr(b), 255) for b in range(256))
        self._drop = bytes(b for b in range(128) if chr(b) not in self._stoi)  # ASCII outside the vocab

    @classmethod
    def from_vocab(cls, vocab: str, lowercase: bool) -> CharTokenizer:
        tok = cls(lowercase=lowercase)
        if tok.vocab != vocab:
            raise ValueError(
                f"vocab stored with the shards ({len(vocab)} chars) does not match this tokenizer "
                f"({len(tok.vocab)} chars, lowercase={lowercase})"
            )
        return tok

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def normalize(self, text: str) -> str:
        # anyascii maps each code point on its own: only the non-ASCII runs need it (the fast path)
        text = NON_ASCII.sub(lambda m: anyascii(m.group()), text)
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
        if self.lowercase:
            text = text.lower()
        return text.encode("ascii").translate(None, self._drop).decode("ascii")

    def encode(self, text: str, errors: str = "strict") -> bytes:
        """Ids of already-normalized text, one byte per character."""
        if errors not in ("strict", "skip"):
            raise ValueError(f"errors must be 'strict' or 'skip', got {errors!r}")
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raw = None
        if raw is not None:
            ids = raw.translate(self._table)
            if b"\xff" not in ids:
                return ids
        bad = sorted({c for c in text if c not in self._stoi})
        if errors == "strict":
            raise ValueError(f"characters not in the vocabulary: {bad!r} (normalize the text first)")
        return bytes(self._stoi[c] for c in text if c in self._stoi)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def decode_text(self, ids) -> str:
        """What sampling prints."""
        return self.decode(ids)


class ByteTokenizer:
    """`data.tokenizer=bytes`: the UTF-8 bytes of the text are the ids, so nothing is lost:
    decode(encode(s)) == s.encode("utf-8") for any text. The vocabulary, as stored with the shards,
    is the 256 characters U+0000..U+00FF, one per byte value (JSON holds it as a string, as it holds
    the char tokenizer's)."""

    kind = "bytes"
    lowercase = False  # never: the manifest and checkpoints record it beside the kind
    vocab = "".join(map(chr, range(256)))

    @property
    def vocab_size(self) -> int:
        return 256

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str | bytes, errors: str = "strict") -> bytes:
        """Ids of text (its UTF-8) or of raw bytes (themselves). `errors` is accepted for the char
        tokenizer's callers: every text has ids here."""
        return text if isinstance(text, bytes) else text.encode("utf-8")

    def decode(self, ids) -> bytes:
        return bytes(map(int, ids))

    def decode_text(self, ids) -> str:
        """What sampling prints: the bytes as UTF-8, a byte that is no UTF-8 shown as U+FFFD."""
        return self.decode(ids).decode("utf-8", errors="replace")


TOKENIZERS = ("char", "bytes")


def make_tokenizer(kind: str, lowercase: bool = True) -> Tokenizer:
    """`data.tokenizer`'s tokenizer (lowercase: the char tokenizer's option)."""
    if kind == "char":
        return CharTokenizer(lowercase=lowercase)
    if kind == "bytes":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer={kind!r}: choose {' or '.join(TOKENIZERS)}")


def from_vocab(kind: str | None, vocab: str, lowercase: bool) -> Tokenizer:
    """The tokenizer a manifest or checkpoint recorded (kind None: saved before byte tokenizers,
    so char), checked against its stored vocabulary."""
    if kind in (None, "char"):
        return CharTokenizer.from_vocab(vocab, lowercase)
    tok = make_tokenizer(kind)
    if tok.vocab != vocab:
        raise ValueError(f"vocab stored ({len(vocab)} chars) is not the {kind} tokenizer's ({tok.vocab_size})")
    return tok


Tokenizer = CharTokenizer | ByteTokenizer
