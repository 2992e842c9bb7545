"""Languages other than English: words in other scripts and Unicode forms spelled against a model's letters.

Vocabularies here are laid out as :func:`streamer.testing.processor` lays out a checkpoint's (``<pad>`` the
blank, ``|`` the word delimiter, the letters, ``<unk>``); log-probabilities are drawn so that their best path
spells given words, which a word-list search must read back.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from streamer.exceptions import ConfigError
from streamer.lexicon import Lexicon
from streamer.lm import parse_hotwords
from streamer.text import Alphabet, normal_form

FRENCH = list("abcdefghijklmnopqrstuvwxyzéèçàêô'")
ARABIC = [*"ابتثجحخدذرسشصضطظعغفقكلمنهوية", "\u064e", "\u064f", "\u0650", "\u0651", "\u0652"]  # fatha .. sukun
HINDI = [*"कखगघचछजझटडतथदधनपफबभमयरलवशसह", *"अआइईउऊएओ", "\u093e", "\u093f", "\u0940", "\u0941", "\u0942",
         "\u0947", "\u094b", "\u0902", "\u094d", "\u093c"]  # matras, anusvara, virama, nukta


def vocab(letters: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(["<pad>", "|", *letters, "<unk>"])}


def spoken(words: list[str], ids: dict[str, int]) -> np.ndarray:
    """Log-probs whose best path spells ``words`` (each letter two frames, a blank between, ``|`` after)."""
    path: list[int] = [0]
    for word in words:
        for c in word:
            path += [ids[c], ids[c], 0]
        path += [ids["|"], 0]
    lp = np.full((len(path), len(ids)), np.log(0.01 / len(ids)), np.float32)
    lp[np.arange(len(path)), path] = np.log(0.99)
    return lp


def decoded(lex: Lexicon, words: list[str]) -> list[str]:
    return [w.word for w in lex.decode(spoken(words, lex.token_ids))]


def nfd(words: list[str]) -> list[str]:
    return [unicodedata.normalize("NFD", w) for w in words]


def test_a_french_word_list_saved_in_nfd_spells_with_precomposed_letters():
    ids = vocab(FRENCH)
    listed = ["café", "élève", "garçon", "très", "le"]
    lex = Lexicon(nfd(listed), ids, 0, 1)  # was: 3 word(s) cannot be spelled
    assert lex.alphabet.form == "NFC" and lex.words == listed
    assert decoded(lex, ["garçon", "très", "café"]) == ["garçon", "très", "café"]
    hw = parse_hotwords([(unicodedata.normalize("NFD", "Élève"), 4.0)], lex.alphabet, 2.0, "hotwords")
    assert dict(hw.weights) == {"élève": 4.0}


def test_a_decomposed_vocabulary_spells_precomposed_words():
    ids = vocab([*"abcdefghijklmnopqrstuvwxyz", "\u0301", "\u0300", "\u0327"])
    lex = Lexicon(["café", "garçon"], ids, 0, 1)
    assert lex.alphabet.form == "NFD" and lex.words == nfd(["café", "garçon"])
    assert decoded(lex, nfd(["garçon", "café"])) == nfd(["garçon", "café"])


def test_an_arabic_word_list_with_harakat():
    ids = vocab(ARABIC)
    # shadda typed before the fatha: canonical order puts the fatha (class 30) before the shadda (33)
    typed = ["م\u064fح\u064eم\u0651\u064eد", "كِتَاب", "سَلَام"]
    lex = Lexicon(typed, ids, 0, 1)
    assert normal_form(ids) == "NFD"
    assert all("\u0651\u064e" not in w for w in lex.words)
    assert decoded(lex, [lex.words[1], lex.words[0]]) == [lex.words[1], lex.words[0]]


def test_a_devanagari_word_list_with_combining_marks():
    ids = vocab(HINDI)
    # क़ (U+0958) is decomposed by both forms into क and the nukta; ज़ likewise
    lex = Lexicon(["नमस्ते", "क़लम", "ज़रूर", "हिंदी"], ids, 0, 1)
    assert lex.words[1] == "क\u093cलम" and lex.words[2] == "ज\u093cरूर"
    assert decoded(lex, [lex.words[3], lex.words[1], lex.words[0]]) == [lex.words[3], lex.words[1], lex.words[0]]


def test_a_word_that_cannot_be_spelled_is_named_with_the_letters_it_lacks():
    ids = vocab(list("abcdefghijklmnopqrstuvwxyz'"))
    with pytest.raises(ConfigError, match=r"2 word\(s\).*'garçon' \(lacks 'ç'\), 'naïve' \(lacks 'ï'\)"):
        Lexicon(["le", "garçon", "naïve"], ids, 0, 1)
    with pytest.raises(ConfigError, match=r"hotword 'straße' cannot be spelled with the model's letters \(lacks 'ß'\)"):
        parse_hotwords([("straße", None)], Alphabet({c: ids[c] for c in "abcdefghijklmnopqrstuvwxyz"}), 2.0,
                       "hotwords")
    arabic = vocab(ARABIC)
    with pytest.raises(ConfigError, match=r"\(lacks 'ڤ'\)"):  # veh: a Persian/Maghrebi letter
        Lexicon(["ڤيلم"], arabic, 0, 1)


def test_the_model_language_is_a_language_tag():
    from streamer.config import ModelConfig

    assert [ModelConfig(language=t).language for t in ("", "ar", "cmn", "pt-BR", "zh-Hans-CN")] == [
        "", "ar", "cmn", "pt-BR", "zh-Hans-CN"]
    for bad in ("a", "ar_EG", "ar-", "عربي", "<b>"):
        with pytest.raises(ConfigError, match="is not a language tag"):
            ModelConfig(language=bad)
