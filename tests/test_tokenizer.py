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
