import pytest

from data.tokenizer import CharTokenizer


def test_normalize_transliterates_lowercases_and_keeps_printable():
    tok = CharTokenizer()
    assert tok.normalize("Café Straße\tÆsop\r\nNAÏVE\x00\x07 “quoted”") == 'cafe strasse aesop\nnaive "quoted"'


def test_case_sensitive_option_keeps_capitals():
    tok = CharTokenizer(lowercase=False)
    assert tok.normalize("Hamlet, Prince") == "Hamlet, Prince"
    assert tok.vocab_size == 96 and CharTokenizer().vocab_size == 70


def test_round_trip_of_normalized_text():
    tok = CharTokenizer()
    text = tok.normalize("To be, or not to be: that is the question!\n  ~{[(|)]}~ 0123456789")
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == text


def test_unknown_characters_raise_by_default_and_are_dropped_with_skip():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"\['A', 'é'\]"):
        tok.encode("Aé b")
    assert tok.decode(tok.encode("Aé b", errors="skip")) == " b"


def test_vocab_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        CharTokenizer.from_vocab(CharTokenizer(lowercase=False).vocab, lowercase=True)


def test_fast_normalize_equals_transliterating_the_whole_text_at_once():
    """normalize transliterates only the non-ASCII runs: the same as anyascii on everything."""
    import random

    from anyascii import anyascii

    rng = random.Random(0)
    alphabet = "abcXYZ \n\t\r.,'\"-" + "éßÆø“”—…中文字한국어Ωπ∑😀\u0301\u00a0\x07"
    for lowercase in (True, False):
        tok = CharTokenizer(lowercase=lowercase)
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
            ref = anyascii(text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
            ref = ref.lower() if lowercase else ref
            assert tok.normalize(text) == "".join(c for c in ref if c in tok.vocab), repr(text)


def test_the_byte_tokenizer_round_trips_any_text_byte_for_byte():
    """data.tokenizer=bytes is lossless: decode(encode(s)) == s.encode("utf-8") for text the char
    tokenizer would change (accents, CJK, emoji, combining marks, controls, CRLF, capitals, XML)."""
    import random

    from data.tokenizer import ByteTokenizer

    tok, rng = ByteTokenizer(), random.Random(0)
    alphabet = "abcXYZ \n\t\r.,<>&;/=\"'" + "éßÆø“”—…中文字한국어Ωπ∑😀\u0301\u00a0\x00\x07\x7f\U0010ffff"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(300)]
    for text in [*texts, '<page><title>Zürich</title><text xml:space="preserve">東京 &amp; 😀</text></page>\r\n']:
        ids = tok.encode(text)
        assert tok.decode(ids) == text.encode("utf-8"), repr(text)
        assert tok.decode_text(ids) == text
    assert tok.vocab_size == len(tok.vocab) == len(set(tok.vocab)) == 256
    assert tok.decode(range(256)) == bytes(range(256))  # every id is a byte, raw bytes encode as themselves
    assert tok.encode(bytes(range(256))) == bytes(range(256))


def test_sampling_prints_bytes_as_utf8_with_errors_replaced():
    from data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cut = tok.encode("naïve 東京")[:-2]  # a model may stop (or wander) inside a character
    assert tok.decode_text(cut) == "naïve 東\ufffd"
    assert tok.decode_text([0xff, 0x41]) == "\ufffdA"


def test_the_tokenizer_is_rebuilt_from_what_the_data_and_checkpoints_recorded():
    """A manifest or checkpoint from before byte tokenizers records no kind: it is char."""
    from data.tokenizer import ByteTokenizer, from_vocab, make_tokenizer

    assert isinstance(from_vocab(None, CharTokenizer().vocab, True), CharTokenizer)
    assert from_vocab("char", CharTokenizer(lowercase=False).vocab, False).vocab_size == 96
    assert isinstance(from_vocab("bytes", ByteTokenizer.vocab, False), ByteTokenizer)
    with pytest.raises(ValueError, match="is not the bytes tokenizer's"):
        from_vocab("bytes", CharTokenizer().vocab, False)
    with pytest.raises(ValueError, match="data.tokenizer='bpe': choose char or bytes"):
        make_tokenizer("bpe")
