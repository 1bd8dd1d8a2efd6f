"""Caption tokens must equal the public pipeline's: nltk.tokenize.word_tokenize(caption.lower())."""
import warnings

import pytest

from rcar_fast import data

nltk = pytest.importorskip("nltk", reason="nltk is not installed (the GPU image); the tokenizer "
                                          "then refuses: tests/test_data.py::"
                                          "test_missing_nltk_names_the_install")
from nltk.tokenize.punkt import PunktSentenceTokenizer  # noqa: E402

# Captions with the tokens a regex gets wrong, and some that punkt may split.
TRICKY = [
    "A man in a t-shirt holds a 3.5 inch phone.",
    "The clock shows 11:20 on a well-lit tower",
    "Salt and/or pepper on a table",
    "A dog can't catch it, it cannot fly and it's gone",
    "A sign that says 'stop' next to a \"yield\" sign",
    "A woman wearing a \u201cfunny\u201d hat",
    "A cat sitting on a couch ...",
    "a baby eating a cupcake .",
    "A caf\u00e9 in M\u00fcnchen with na\u00efve art \u00bd price",
    "Two dogs play (one is brown) in the snow!",
    "Is this a bird?",
    "\"Quoted start\" of a caption",
    "A man's dog and the dogs' bowl, isn't it",
    "  padded caption with spaces  ",
    "",
    "   ",
    "A cake. It has candles on it",
    "Wait... what is this",
    "St. Mary church at 5 p.m. on a sunny day",
    "A bus? No, a truck!",
    "Mr. Smith rides a bike.",
]


def _untrained_punkt(monkeypatch):
    """Makes nltk's word_tokenize split sentences with an untrained punkt model: the same
    candidate boundaries as the English model, other decisions on the untrained defaults."""
    if not hasattr(nltk.tokenize, "_get_punkt_tokenizer"):
        pytest.skip(f"nltk {nltk.__version__} has no _get_punkt_tokenizer hook to substitute")
    monkeypatch.setattr(nltk.tokenize, "_get_punkt_tokenizer", lambda language="english":
                        PunktSentenceTokenizer())


def _without_punkt_data(monkeypatch):
    monkeypatch.setattr(data, "_punkt_installed", lambda nltk_module: False)


def test_corpus_covers_both_kinds(monkeypatch):
    _without_punkt_data(monkeypatch)
    tok = data.Tokenizer()
    split = [c for c in TRICKY if tok.may_split(c.lower())]
    assert "A cake. It has candles on it" in split and "Wait... what is this" in split
    assert "A man in a t-shirt holds a 3.5 inch phone." not in split   # final period only
    assert len(split) >= 4 and len(TRICKY) - len(split) >= 12


@pytest.mark.skipif(not data._punkt_installed(nltk),
                    reason=f"nltk's punkt data is not installed here (python -m nltk.downloader "
                           f"{data.punkt_resource(nltk)}); the punkt-free path is tested below")
def test_tokens_equal_word_tokenize_with_punkt_data():
    tok = data.Tokenizer()
    assert tok.mode == "punkt"
    for caption in TRICKY:
        assert tok(caption) == nltk.tokenize.word_tokenize(caption.lower()), caption


def test_without_punkt_single_sentence_captions_are_exact(monkeypatch):
    _without_punkt_data(monkeypatch)
    tok = data.Tokenizer()
    assert tok.mode == "preserve_line"
    _untrained_punkt(monkeypatch)
    checked = 0
    for caption in TRICKY:
        if tok.may_split(caption.lower()):
            continue
        # The public call, sentence split included.
        assert tok(caption) == nltk.tokenize.word_tokenize(caption.lower()), caption
        checked += 1
    assert checked >= 12
    assert tok.describe()["unsplit_captions"] == 0
    assert tok("A man in a t-shirt holds a 3.5 inch phone.") == [
        "a", "man", "in", "a", "t-shirt", "holds", "a", "3.5", "inch", "phone", "."]
    assert tok("A dog can't catch it")[2:4] == ["ca", "n't"]
    assert "can" in tok("it cannot fly") and "not" in tok("it cannot fly")


def test_without_punkt_multi_sentence_captions_are_refused(monkeypatch):
    _without_punkt_data(monkeypatch)
    tok = data.Tokenizer()
    for caption in ("A cake. It has candles on it", "Wait... what is this", "A bus? No, a truck!"):
        with pytest.raises(data.TokenizerError,
                           match=f"python -m nltk.downloader {data.punkt_resource(nltk)}"):
            tok(caption)


def test_allow_unsplit_warns_and_records(monkeypatch):
    _without_punkt_data(monkeypatch)
    tok = data.Tokenizer(allow_unsplit=True)
    with pytest.warns(RuntimeWarning, match="tokenised as one sentence"):
        got = tok("A cake. It has candles on it")
    assert got == nltk.tokenize.word_tokenize("a cake. it has candles on it", preserve_line=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # warned once, not per caption
        tok("Wait... what is this")
    info = tok.describe()
    assert info["unsplit_captions"] == 2 and info["mode"] == "preserve_line"
    assert info["nltk_version"] == nltk.__version__ and "missing" in info["punkt_data"]


def test_vocabulary_encode_uses_the_tokenizer(monkeypatch):
    _without_punkt_data(monkeypatch)
    vocab = data.Vocabulary({"<start>": 0, "<end>": 1, "<unk>": 2, "t-shirt": 3, "3.5": 4, "n't": 5})
    assert vocab.encode("T-shirt 3.5 don't", data.Tokenizer()) == [0, 3, 4, 2, 5, 1]


@pytest.mark.parametrize("bad", [-1, "x", 1.5, True])
def test_vocabulary_ids_must_be_non_negative_integers(bad):
    with pytest.raises(ValueError, match="must be a non-negative integer"):
        data.Vocabulary({"<unk>": 0, "dog": bad})


class _BreakEverywhere(PunktSentenceTokenizer):
    """Punkt that takes every candidate boundary: the worst case for one-sentence captions."""

    def text_contains_sentbreak(self, text):
        return True


class _BreakNowhere(PunktSentenceTokenizer):
    def text_contains_sentbreak(self, text):
        return False


def _random_captions(n, seed=0):
    import random

    rng = random.Random(seed)
    pieces = ["a", "dog", "T-shirt", "3.5", "11:20", "and/or", "can't", "cannot", "it's", "Mr.",
              "St.", "U.S.", "caf\u00e9", "na\u00efve", "\u65e5\u672c", ".", "?", "!", "...", ",",
              ";", ":", "'", '"', "(", ")", "[", "]", "{", "}", "\u201c", "\u201d", "--", "-",
              "''", "``", "*", "@"]
    for _ in range(n):
        out = []
        for _ in range(rng.randint(0, 9)):
            out.append(rng.choice(pieces))
            out.append(rng.choice(["", " ", " ", "  "]))
        yield "".join(out)


@pytest.mark.parametrize("punkt", [_BreakEverywhere, _BreakNowhere])
def test_one_sentence_rule_holds_whatever_punkt_decides(monkeypatch, punkt):
    _without_punkt_data(monkeypatch)
    tok = data.Tokenizer()
    if not hasattr(nltk.tokenize, "_get_punkt_tokenizer"):
        pytest.skip(f"nltk {nltk.__version__} has no _get_punkt_tokenizer hook to substitute")
    monkeypatch.setattr(nltk.tokenize, "_get_punkt_tokenizer", lambda language="english": punkt())
    exact = refused = 0
    for caption in _random_captions(3000, seed=1):
        if tok.may_split(caption.lower()):
            refused += 1
            continue
        assert tok(caption) == nltk.tokenize.word_tokenize(caption.lower()), repr(caption)
        exact += 1
    assert exact > 500 and refused > 500
    # Closing quotes after a final period keep a caption one sentence: not refused.
    assert not tok.may_split('a sign that says "stop."') and not tok.may_split("(a dog.) ")
    assert tok.may_split('he said "stop." and left')


def test_refused_captions_can_really_differ(monkeypatch):
    _without_punkt_data(monkeypatch)
    tok = data.Tokenizer(allow_unsplit=True)
    monkeypatch.setattr(nltk.tokenize, "_get_punkt_tokenizer",
                        lambda language="english": _BreakEverywhere())
    with pytest.warns(RuntimeWarning):
        assert tok("A cake. It has candles") != nltk.tokenize.word_tokenize("a cake. it has candles")
