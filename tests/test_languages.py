"""Languages other than English: words in other scripts and Unicode forms spelled against a model's letters,
and text in Arabic, Chinese and Hindi through ``streamer transcribe`` and the native protocol.

Vocabularies here are laid out as :func:`streamer.testing.processor` lays out a checkpoint's (``<pad>`` the
blank, ``|`` the word delimiter, the letters, ``<unk>``); log-probabilities are drawn so that their best path
spells given words, which a word-list search must read back. The Arabic, Chinese and Hindi checkpoints are tiny
random models (their transcripts mean nothing) heard through espeak-ng's ``ar``, ``cmn`` and ``hi`` voices.
"""

from __future__ import annotations

import asyncio
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from recipes.demo.lm import write_arpa
from streamer.cli import main
from streamer.events import Final, Word, parse_event
from streamer.exceptions import ConfigError
from streamer.lexicon import Lexicon
from streamer.lm import load_language_model, parse_hotwords
from streamer.testing import ModelShape, espeak, processor, random_model, save_checkpoint
from streamer.text import Alphabet, join_words, normal_form, split_words, squeeze

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


def test_the_unigrams_of_an_nfd_language_model_are_spelled_and_scored(tmp_path):
    arpa = tmp_path / "fr.arpa"
    write_arpa([unicodedata.normalize("NFD", s) for s in ("le garçon très sage", "le café et l'élève")], arpa)
    alphabet = Alphabet({c: i for c, i in vocab(FRENCH).items() if len(c) == 1 and c != "|"})
    lm = load_language_model(arpa, alphabet)
    assert {"garçon", "très", "café", "l'élève"} <= set(lm.index)  # the model's spelling, NFC
    state = lm.kenlm.start(False)
    assert lm.kenlm.score(state, lm.index["garçon"])[1] > lm.kenlm.score(state, lm.unk_index)[1]


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


# --- Arabic, Chinese and Hindi text out of tiny checkpoints ---------------------------------------------------------

CHINESE = list("你好世界我们是的不了在人有这中大为上个国和")
SCRIPTS = {
    # name: (letters, espeak-ng voice, what it says, whether the model uses its word delimiter)
    "arabic": (ARABIC, "ar", "مرحبا بالعالم، كيف حالك اليوم", True),
    "chinese": (CHINESE, "cmn", "你好世界，我们今天在这里", False),
    "hindi": (HINDI, "hi", "नमस्ते दुनिया, आप कैसे हैं", True),
}


def tiny_checkpoint(path: Path, letters: list[str], *, delimiter: bool) -> Path:
    """A random tiny checkpoint over ``letters``; without ``delimiter`` it never writes ``|`` (as a Chinese
    fine-tune trained on text without spaces)."""
    import torch

    vocab = ["<pad>", "|", *letters, "<unk>"]
    shape = ModelShape("layer", 2, 32, heads=2, intermediate=64, conv_dim=16, conv_pos=16, conv_pos_groups=4)
    model = random_model(vocab, shape, seed=0, logit_std=2.0)
    with torch.no_grad():
        model.lm_head.bias[vocab.index("<unk>")] = -1e4  # its text would be the token's name
        if not delimiter:
            model.lm_head.bias[vocab.index("|")] = -1e4
    return save_checkpoint(path, model, *processor(vocab))


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, set[str]]]:
    """name -> (checkpoint, espeak-ng WAV in that language, the checkpoint's letters)."""
    root = tmp_path_factory.mktemp("languages")
    out = {}
    for name, (letters, voice, said, delimiter) in SCRIPTS.items():
        ckpt = tiny_checkpoint(root / name, letters, delimiter=delimiter)
        out[name] = (ckpt, espeak(said, root / f"{name}.wav", voice=voice), set(letters))
    return out


def transcribe(capsys: pytest.CaptureFixture[str], ckpt: Path, wav: Path, fmt: str) -> str:
    code = main(["transcribe", "--model", str(ckpt), "--device", "cpu", "--format", fmt, str(wav)])
    out, err = capsys.readouterr()
    assert code == 0, err
    out.encode("utf-8")  # no lone surrogates: valid UTF-8 on the way out
    return out


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_transcribe_prints_the_script_in_every_format(capsys, scripts, name):
    ckpt, wav, letters = scripts[name]
    text = transcribe(capsys, ckpt, wav, "text")
    assert text.strip() and set(text) <= letters | {" ", "\n"}
    if not SCRIPTS[name][3]:
        assert " " not in text  # no delimiter written: the characters run on
    jsonl = transcribe(capsys, ckpt, wav, "jsonl")
    assert "\\u" not in jsonl  # the characters themselves, not escapes
    finals = [json.loads(line) for line in jsonl.splitlines()]
    texts = [f["text"] for f in finals if f["type"] == "final" and f["text"]]
    assert " ".join(texts) == " ".join(text.split())
    for fmt in ("srt", "vtt"):
        lines = transcribe(capsys, ckpt, wav, fmt).splitlines()
        shown = [lines[i + 1] for i, line in enumerate(lines) if " --> " in line]  # each cue's text
        assert shown and "".join(shown).replace(" ", "") == "".join(texts).replace(" ", "")


async def native_frames(port: int, wav: Path, start: dict | None = None) -> list[str]:
    """The text frames of a native stream of ``wav``'s own 16-bit samples (a random model hears every bit)."""
    audio, _ = sf.read(wav, dtype="int16")
    data = audio.astype("<i2").tobytes()
    frames: list[str] = []
    async with asyncio.timeout(120), connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        frames.append(str(await ws.recv()))
        if start is not None:
            await ws.send(json.dumps({"type": "start", **start}))
        for i in range(0, len(data), 3200):
            await ws.send(data[i : i + 3200])
        await ws.send(json.dumps({"type": "stop"}))
        try:
            async for msg in ws:
                frames.append(str(msg))
        except ConnectionClosed:
            pass
    return frames


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_the_native_protocol_carries_the_script_unchanged(capsys, scripts, daemon_factory, name):
    from streamer.config import ModelConfig
    from streamer.model import load_model

    ckpt, wav, _ = scripts[name]
    expected = [json.loads(line)["text"] for line in transcribe(capsys, ckpt, wav, "jsonl").splitlines()
                if json.loads(line)["type"] == "final"]
    d = await daemon_factory(runner=await asyncio.to_thread(load_model, ModelConfig(id=str(ckpt), device="cpu")))
    frames = await native_frames(d.port, wav)
    assert all("\\u" not in f for f in frames)
    got = [m["text"] for m in map(json.loads, frames) if m["type"] == "final"]
    assert got == expected and any(got)


async def test_a_streams_arabic_words_and_hotwords_are_normalised_and_errors_name_the_letter(scripts, daemon_factory):
    from streamer.config import ModelConfig
    from streamer.model import load_model

    ckpt, wav, _ = scripts["arabic"]
    d = await daemon_factory(runner=await asyncio.to_thread(load_model, ModelConfig(id=str(ckpt), device="cpu")))
    typed = ["م\u064fح\u064eم\u0651\u064eد", "كِتَاب", "سَلَام", "بَيْت"]  # the shadda before the fatha
    frames = await native_frames(d.port, wav, {"words": typed, "hotwords": [[typed[0], 8]]})
    got = [w["word"] for m in map(json.loads, frames) if m["type"] == "final" for w in m["words"]]
    assert got and set(got) <= {unicodedata.normalize("NFC", w) for w in typed}
    frames = await native_frames(d.port, wav, {"hotwords": ["ڤيلم"]})
    errors = [m for m in map(json.loads, frames) if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["bad_hotwords"] and "(lacks 'ڤ')" in errors[0]["message"]
    assert any("'ڤيلم'" in f for f in frames)  # the frame itself, unescaped


def test_transcribe_decodes_over_an_arabic_word_list_typed_in_another_mark_order(capsys, scripts, tmp_path):
    ckpt, wav, _ = scripts["arabic"]
    typed = ["م\u064fح\u064eم\u0651\u064eد", "كِتَاب", "سَلَام", "بَيْت"]  # the shadda before the fatha
    listed = tmp_path / "words.txt"
    listed.write_text("\n".join(typed) + "\n", encoding="utf-8")
    hot = tmp_path / "hot.txt"
    hot.write_text("م\u064fح\u064eم\u0651\u064eد\t8\n", encoding="utf-8")
    code = main(["transcribe", "--model", str(ckpt), "--device", "cpu", "--words", str(listed),
                 "--set", f"decoder.hotwords={json.dumps(str(hot))}", str(wav)])
    out, err = capsys.readouterr()
    assert code == 0, err
    normal = {unicodedata.normalize("NFC", w) for w in typed}
    assert out.split() and set(out.split()) <= normal


# --- subtitle cues of long finals -------------------------------------------------------------------------------


def test_a_short_final_is_one_cue():
    from streamer.events import Final, Word
    from streamer.formats import final_cues

    f = Final(0, "turn on", 1.0, 2.0, (Word("turn", 1.0, 1.4, 0.9), Word("on", 1.5, 2.0, 0.9)))
    assert final_cues(f) == [(1.0, 2.0, "turn on")]


def test_a_long_final_is_cut_between_words_at_their_times():
    from streamer.events import Final, Word
    from streamer.formats import MAX_CUE_COLUMNS, MAX_CUE_S, final_cues

    words = tuple(Word(f"word{i:02d}", 0.5 * i, 0.5 * i + 0.4, 0.9) for i in range(40))
    f = Final(0, " ".join(w.word for w in words), 0.0, 19.9, words)
    cues = final_cues(f)
    assert len(cues) > 2 and " ".join(c[2] for c in cues) == f.text
    assert all(len(c[2]) <= MAX_CUE_COLUMNS and c[1] - c[0] <= MAX_CUE_S for c in cues)
    assert {c[0] for c in cues} <= {w.start for w in words} and {c[1] for c in cues} <= {w.end for w in words}


@pytest.mark.parametrize("text", ["你好世界我们是的不了在人有这中大为上个国和" * 4, "नमस्ते" * 30, "كِتَابٌ" * 40])
def test_an_utterance_without_spaces_is_cut_between_characters(text):
    from streamer.events import Final, Word
    from streamer.formats import MAX_CUE_S, final_cues

    f = Final(0, text, 2.0, 18.0, (Word(text, 2.0, 18.0, 0.5),))
    cues = final_cues(f)
    assert len(cues) > 1 and "".join(c[2] for c in cues) == text
    assert cues[0][0] == 2.0 and cues[-1][1] == pytest.approx(18.0)
    assert all(c[1] - c[0] <= MAX_CUE_S + 1e-9 and unicodedata.category(c[2][0])[0] != "M"
               and unicodedata.combining(cues[i - 1][2][-1]) != 9 for i, c in enumerate(cues))


def test_a_vosk_phrase_list_typed_in_nfd_is_spelled_as_the_search_spells_it():
    from types import SimpleNamespace

    from streamer.aio.protocols.vosk import unspellable

    ids = vocab(FRENCH)
    french = SimpleNamespace(token_ids=ids, blank_id=0, delimiter_id=1)
    assert unspellable(nfd(["café", "garçon", "Élève"]), french) == []  # was: all three skipped
    assert unspellable(["façade", "ñu"], french) == ["ñu"]


async def test_ready_names_the_models_language_when_it_is_known(daemon_factory):
    unknown = await daemon_factory()
    known = await daemon_factory("model.language='en'")
    for d, want in ((unknown, None), (known, "en")):
        async with connect(f"ws://127.0.0.1:{d.port}/v1/stream") as ws:
            ready = json.loads(await ws.recv())
        assert ready["type"] == "ready" and ready.get("language") == want
        assert parse_event(json.dumps(ready)).language == (want or "")  # a client reads it back
        async with connect(f"ws://127.0.0.1:{d.port}/v1/listen/desk") as ws:  # a caption viewer's too
            ready = json.loads(await ws.recv())
        assert ready["mode"] == "listen" and ready.get("language") == want
        assert parse_event(json.dumps(ready)).language == (want or "")


# --- scripts written without spaces: a word per character -------------------------------------------------------

LATIN = list("abcdefghijklmnopqrstuvwxyz")


def greedy_words(tokens: list[str], letters: list[str]) -> tuple[str, list[Word]]:
    """The text and words greedy CTC makes of ``tokens`` (one per frame, ``|`` the delimiter, ``<pad>`` blank)
    with a real tokenizer over ``letters``."""
    from streamer.ctc import CtcSegment
    from streamer.runner import TokenizerVocabulary

    ids = vocab(letters)
    seg = CtcSegment(TokenizerVocabulary(processor(list(ids))[0]))
    frame_ids = np.array([ids[t] for t in tokens])
    seg.push(0, frame_ids, np.full(len(tokens), 0.9, np.float32))
    return seg.text(), seg.words()


def test_a_script_without_spaces_has_a_word_per_character():
    # "gps定位" without a delimiter, then "|", then "你好" with a doubled frame and a blank between repeats
    tokens = ["<pad>", "g", "p", "s", "定", "<pad>", "位", "|", "你", "你", "<pad>", "好", "<pad>", "好", "<pad>"]
    text, words = greedy_words(tokens, CHINESE + ["定", "位"] + LATIN)
    assert text == "gps定位 你好好"
    assert [w.word for w in words] == ["gps", "定", "位", "你", "好", "好"]
    assert [(round(w.start, 2), round(w.end, 2)) for w in words] == [
        (0.02, 0.08), (0.08, 0.10), (0.12, 0.14), (0.16, 0.20), (0.22, 0.24), (0.26, 0.28)]
    assert join_words(w.word for w in words) == squeeze(text) == "gps定位你好好"
    assert split_words(text) == [w.word for w in words]


@pytest.mark.parametrize("name", ["arabic", "hindi"])
def test_scripts_with_spaces_keep_a_word_between_delimiters(name):
    said = {"arabic": ["كِتَاب", "سَلَام"], "hindi": ["नमस्ते", "दुनिया"]}[name]
    letters = ARABIC if name == "arabic" else HINDI + ["\u0941", "\u093f", "\u092f"]
    tokens = [t for w in said for t in [*w, "|"]]
    text, words = greedy_words(tokens, sorted(set(letters)))
    assert [w.word for w in words] == said and text == " ".join(said) == join_words(said) == squeeze(text)


def test_the_lm_and_hotword_search_cuts_a_word_per_character_as_greedy_does():
    from streamer.lexicon import OpenVocabulary

    ids = vocab(CHINESE)
    hotwords = parse_hotwords([("你好", 4.0)], Alphabet({c: i for c, i in ids.items() if len(c) == 1 and c != "|"}),
                              2.0, "hotwords")
    search = OpenVocabulary(ids, 0, 1, lm=None, hotwords=hotwords, alternatives=2)
    path = [0, *(t for c in "你好世界" for t in (ids[c], ids[c], 0))]  # no delimiter: a model trained without spaces
    lp = np.full((len(path), len(ids)), np.log(0.01 / len(ids)), np.float32)
    lp[np.arange(len(path)), path] = np.log(0.99)
    words = search.decode(lp, start_frame=50)
    assert [w.word for w in words] == ["你", "好", "世", "界"]
    assert [(round(w.start, 2), round(w.end, 2)) for w in words] == [(1.02, 1.06), (1.08, 1.12), (1.14, 1.18),
                                                                     (1.20, 1.24)]
    token = {i: t for t, i in ids.items()}
    text, greedy = greedy_words([token[i] for i in path], CHINESE)
    assert text == "你好世界" and [w.word for w in greedy] == [w.word for w in words]
    found = search.search(50)  # a stream's search: its final reads the same words, its readings have no spaces
    found.step(lp)
    assert [w.word for w in found.finish()] == ["你", "好", "世", "界"]
    assert all(" " not in a.text for a in found.alternatives)


def test_vosk_alternatives_in_chinese_join_their_characters_without_spaces():
    from streamer.events import Alternative
    from streamer.protocol import vosk_final

    best = tuple(Word(c, 0.2 * i, 0.2 * i + 0.15, 0.9) for i, c in enumerate("你好世界"))
    other = (*best[:2], Word("是", 0.4, 0.55, 0.5), best[3])
    f = Final(0, "你好世界", 0.0, 0.75, best, "silence", (Alternative("你好世界", 0.7, best),
                                                         Alternative("你好是界", 0.3, other)))
    reply = vosk_final([f], max_alternatives=2)
    assert [a["text"] for a in reply["alternatives"]] == ["你好世界", "你好是界"]
    assert [w["word"] for w in reply["alternatives"][1]["result"]] == list("你好是界")


def test_a_long_chinese_final_is_cut_at_its_characters_times():
    from streamer.events import Final
    from streamer.formats import MAX_CUE_S, final_cues

    text = "".join(CHINESE) * 3  # 60 characters, 120 columns, 12 s
    words = tuple(Word(c, 0.2 * i, 0.2 * i + 0.15, 0.9) for i, c in enumerate(text))
    cues = final_cues(Final(0, text, 0.0, words[-1].end, words))
    assert len(cues) > 1 and "".join(c[2] for c in cues) == text and " " not in "".join(c[2] for c in cues)
    assert {c[0] for c in cues} <= {w.start for w in words} and {c[1] for c in cues} <= {w.end for w in words}
    assert all(c[1] - c[0] <= MAX_CUE_S for c in cues)


def test_error_rates_count_a_script_without_spaces_by_characters():
    from streamer.scoring import ErrorRate

    e = ErrorRate()
    e.add("你好世界", "你好 世介")  # where the delimiter fell is no error; one character is
    assert (e.words, e.word_errors, e.chars, e.char_errors) == (4, 1, 4, 1)
    english = ErrorRate()
    english.add("turn on the light", "turn of the light")
    assert (english.words, english.word_errors, english.chars) == (4, 1, 17)


# --- the engine in three scripts: arrival invariance, pipeline parity, words, hotwords and an LM ---------------

WORDS = {
    # a word list in each script, of letters the random checkpoints favour (so that their speech reads as some
    # of these words), with harakat, a virama and vowel signs among them
    "arabic": ["غج", "لج", "غلج", "مغ", "طغ", "غّ", "جغ", "ذغ", "مرحبا"],
    "chinese": ["中国", "我们", "世界", "有我", "中大", "你好"],
    "hindi": ["दो", "डे", "ऊद", "चे", "भद", "द्द", "दड", "नमस्ते"],
}


@pytest.fixture(scope="module")
def runners(scripts) -> dict[str, object]:
    """name -> the script's tiny checkpoint loaded as the daemon loads it (float32 on the CPU)."""
    from streamer.config import ModelConfig
    from streamer.model import load_model

    return {name: load_model(ModelConfig(id=str(ckpt), device="cpu")) for name, (ckpt, _, _) in scripts.items()}


def heard(scripts, name: str) -> np.ndarray:
    """The script's espeak-ng sentence as the daemon hears it: its 16-bit samples as float32."""
    audio, _ = sf.read(scripts[name][1], dtype="int16")
    return audio.astype(np.float32) / 32768


def check_words(name: str, finals) -> None:
    """A final's words spell its text: one per character in Chinese, one per space-separated word otherwise."""
    for f in finals:
        words = [w.word for w in f.words]
        if SCRIPTS[name][3]:
            assert words == f.text.split()
        else:
            assert words == list(f.text) and join_words(words) == f.text
        assert all(a.end <= b.start for a, b in zip(f.words, f.words[1:], strict=False))


@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest.mark.parametrize("chunk", [1, 7, 320, 1000, "random"])
def test_finals_in_the_script_are_arrival_invariant(scripts, runners, name, chunk):
    from test_engine import SCHEDULES, arrival, stream

    from streamer.engine import n_frames, reference

    runner, audio = runners[name], heard(scripts, name)
    schedule = SCHEDULES["stream"]
    ref_ids, ref_finals = reference(audio, runner, schedule, runner.vocab)
    ids, events = stream(audio, runner, schedule, arrival(chunk, len(audio)))
    assert ids == ref_ids and len(ids) == n_frames(len(audio))
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.text for f in finals] == [f.text for f in ref_finals] and any(f.text for f in finals)
    assert [(f.start, f.end) for f in finals] == [(f.start, f.end) for f in ref_finals]
    assert [(w.word, w.start, w.end) for f in finals for w in f.words] == [
        (w.word, w.start, w.end) for f in ref_finals for w in f.words]
    check_words(name, finals)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_pipeline_parity_in_the_script(scripts, runners, name):
    from test_engine import SCHEDULES, arrival, stream
    from transformers import pipeline

    from streamer.endpoint import EndpointRules

    runner, audio = runners[name], heard(scripts, name)
    schedule = SCHEDULES["pipeline"]
    pipe = pipeline("automatic-speech-recognition", model=runner.model, tokenizer=runner.tokenizer,
                    feature_extractor=runner.feature_extractor, device="cpu")
    n = schedule.left + schedule.hop + schedule.lookahead
    expected = pipe(audio.copy(), chunk_length_s=n * 0.02,
                    stride_length_s=(schedule.left * 0.02, schedule.lookahead * 0.02))["text"]
    _, events = stream(audio, runner, schedule, arrival(1600, len(audio)), EndpointRules(enabled=False))
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 1 and finals[0].text == expected and expected
    check_words(name, finals)


@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest.mark.parametrize("decoder", ["words", "hotwords", "lm", "lm+words"])
def test_a_word_list_hotwords_and_an_lm_in_the_script(scripts, runners, tmp_path, name, decoder):
    from test_engine import SCHEDULES, arrival, stream

    from streamer.config import DecoderConfig
    from streamer.decoder import build_decoder
    from streamer.engine import reference

    runner, audio, listed = runners[name], heard(scripts, name), WORDS[name]
    words = tmp_path / "words.txt"
    words.write_text("\n".join(nfd(listed)) + "\n", encoding="utf-8")  # as a macOS editor saves it
    hot = tmp_path / "hot.txt"
    hot.write_text(f"{listed[0]}\t8\n{listed[1]} {listed[2]}\n", encoding="utf-8")
    arpa = tmp_path / "lm.arpa"
    write_arpa([" ".join(listed[:4]), " ".join(listed[2:]), " ".join(reversed(listed))], arpa)
    cfg = DecoderConfig(words=str(words) if "words" in decoder else "", lm=str(arpa) if "lm" in decoder else "",
                        hotwords=str(hot) if decoder == "hotwords" else "")
    dec = build_decoder(cfg, runner)
    normal = {unicodedata.normalize("NFC", w) for w in listed}
    assert dec is not None and (dec.lm is not None) == ("lm" in decoder)
    if dec.lm is not None:
        assert normal <= set(dec.lm.index)  # every unigram spelled with the model's letters
    _, ref_finals = reference(audio, runner, SCHEDULES["stream"], runner.vocab, words=dec)
    _, events = stream(audio, runner, SCHEDULES["stream"], arrival("random", len(audio)), words=dec)
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.text for f in finals] == [f.text for f in ref_finals]
    assert [(w.word, w.start, w.end) for f in finals for w in f.words] == [
        (w.word, w.start, w.end) for f in ref_finals for w in f.words]
    got = [w.word for f in finals for w in f.words]
    assert got
    if "words" in decoder:
        assert set(got) <= normal  # listed words, in the vocabulary's form whatever form the file was saved in
    elif not SCRIPTS[name][3]:  # the lexicon-free search cuts a word per character, as greedy decoding does
        assert all(len(w) == 1 for w in got) and [f.text for f in finals] == ["".join(got)]
    letters = scripts[name][2]
    assert all(set(w) <= letters for w in got)


def test_eval_reads_a_manifest_in_each_script_and_leads_with_cer_for_chinese(capsys, scripts, tmp_path):
    for name, (ckpt, _, _) in scripts.items():
        voice, said = SCRIPTS[name][1], SCRIPTS[name][2]
        lines = []
        for i, text in enumerate(said.replace("،", ",").replace("，", ",").split(",")):
            espeak(text.strip(), tmp_path / f"{name}{i}.wav", voice=voice)
            lines.append(json.dumps({"audio": f"{name}{i}.wav", "text": text.strip()}, ensure_ascii=False))
        manifest = tmp_path / f"{name}.jsonl"
        manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert main(["eval", "--model", str(ckpt), "--device", "cpu", str(manifest)]) == 0
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if "exact" in line).split()
        assert header[:2] == (["CER", "WER"] if name == "chinese" else ["WER", "CER"])
        assert ("script without spaces: CER first" in out) == (name == "chinese")
        assert [line.split()[0] for line in out.splitlines()[-3:]] == ["offline", "streaming", "difference"]


# --- every protocol carries the script unchanged: the raw bytes on the wire ----------------------------------------


def raw_text(data: bytes | str) -> str:
    """Bytes off the wire as a client shows them: strict UTF-8, the characters themselves and not ``\\u`` escapes."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # (raises on mojibake's invalid bytes)
    assert "\\u" not in text
    return text


@pytest.fixture(scope="module")
def expected(scripts, runners) -> dict[str, list[Final]]:
    """name -> the finals with text that the default configuration gives the script's speech."""
    from streamer.config import load_config
    from streamer.decoder import build_decoder
    from streamer.transcribe import new_session, stream_array

    cfg = load_config(None)
    out = {}
    for name, runner in runners.items():
        session = new_session(cfg, runner.vocab, build_decoder(cfg.decoder, runner))
        events = stream_array(session, runner, heard(scripts, name))
        out[name] = [e for e in events if isinstance(e, Final) and e.text]
        assert out[name]
    return out


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_vosk_results_carry_the_script_and_its_words(scripts, runners, expected, daemon_factory, name):
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0", runner=runners[name])
    audio, _ = sf.read(scripts[name][1], dtype="int16")
    data = audio.astype("<i2").tobytes()
    raw: list[str] = []
    async with asyncio.timeout(120), connect(f"ws://127.0.0.1:{d.vosk_port}/") as ws:
        await ws.send(json.dumps({"config": {"sample_rate": 16000, "words": True}}))
        for i in range(0, len(data), 6400):
            await ws.send(data[i : i + 6400])
            raw.append(str(await ws.recv()))
        await ws.send('{"eof" : 1}')
        raw.append(str(await ws.recv()))
    results = [r for r in map(json.loads, map(raw_text, raw)) if r.get("text")]
    assert [r["text"] for r in results] == [f.text for f in expected[name]]
    assert [[w["word"] for w in r["result"]] for r in results] == [[w.word for w in f.words] for f in expected[name]]
    for r in results:
        assert join_words(w["word"] for w in r["result"]) == squeeze(r["text"])


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_openai_uploads_answer_the_script_in_every_format(scripts, runners, expected, daemon_factory, name):
    import httpx

    from streamer.formats import cue_lines

    d = await daemon_factory(runner=runners[name])
    finals = expected[name]
    wav = scripts[name][1].read_bytes()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{d.port}/v1", timeout=120) as http:

        async def create(fmt: str, **fields: str) -> str:
            r = await http.post("/audio/transcriptions", files={"file": ("said.wav", wav, "audio/wav")},
                                data={"model": "whisper-1", "response_format": fmt, **fields})
            assert r.status_code == 200, r.text
            kind = r.headers["content-type"].lower().replace(" ", "")
            assert "charset=utf-8" in kind or kind == "application/json"  # (JSON is UTF-8 by definition)
            return raw_text(r.content)

        text = " ".join(f.text for f in finals)
        assert json.loads(await create("json"))["text"] == text
        assert (await create("text")).strip() == text
        for fmt in ("srt", "vtt"):
            assert await create(fmt) == "\n".join(cue_lines(finals, fmt))
        verbose = json.loads(await create("verbose_json", **{"timestamp_granularities[]": "word"}))
        assert verbose["text"] == text
        assert [w["word"] for w in verbose["words"]] == [w.word for f in finals for w in f.words]
        assert join_words(w["word"] for w in verbose["words"]) == squeeze(text)


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_wyoming_transcripts_carry_the_script(scripts, runners, expected, daemon_factory, name):
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.event import async_read_event, async_write_event

    d = await daemon_factory("wyoming.enabled=true", "wyoming.uri='tcp://127.0.0.1:0'", runner=runners[name])
    assert d.wyoming is not None
    audio, _ = sf.read(scripts[name][1], dtype="int16")
    data = audio.astype("<i2").tobytes()
    raw = bytearray()
    tap = asyncio.StreamReader()  # what the server sent, read back as the wyoming client reads it
    events = []
    async with asyncio.timeout(120):
        reader, writer = await asyncio.open_connection("127.0.0.1", d.wyoming.port)

        async def pump() -> None:
            while chunk := await reader.read(65536):
                raw.extend(chunk)
                tap.feed_data(chunk)
            tap.feed_eof()

        pumping = asyncio.ensure_future(pump())
        await async_write_event(Transcribe(language=SCRIPTS[name][1]).event(), writer)
        await async_write_event(AudioStart(rate=16000, width=2, channels=1).event(), writer)
        for i in range(0, len(data), 3200):
            await async_write_event(AudioChunk(rate=16000, width=2, channels=1, audio=data[i : i + 3200]).event(),
                                    writer)
        await async_write_event(AudioStop().event(), writer)
        while (event := await async_read_event(tap)) is not None:
            events.append(event)
            if event.type == "transcript-stop":
                break
        writer.close()
        pumping.cancel()
    raw_text(bytes(raw))  # headers and data are JSON: the characters, not escapes
    transcripts = [e.data["text"] for e in events if e.type == "transcript"]
    chunks = [e.data["text"] for e in events if e.type == "transcript-chunk"]
    assert transcripts == [" ".join(f.text for f in expected[name])]
    assert squeeze("".join(chunks)) == squeeze(transcripts[0])


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_mqtt_payloads_carry_the_script(scripts, runners, expected, daemon_factory, tmp_path, name):
    import aiomqtt
    from test_mqtt import Broker, mqtt_overrides

    from streamer.aio.mqtt import MqttPublisher
    from streamer.config import load_config

    broker = Broker(tmp_path)
    await broker.start()
    try:
        overrides = mqtt_overrides(broker.port)
        publisher = MqttPublisher(load_config(None, overrides).mqtt)
        d = await daemon_factory(*overrides, runner=runners[name], services=[publisher])
        d.hub.sinks.append(publisher)
        payloads: list[bytes] = []
        async with asyncio.timeout(120), aiomqtt.Client("127.0.0.1", broker.port) as sub:
            await publisher.wait_connected()
            await sub.subscribe("streamer/+/final", qos=1)
            await native_frames(d.port, scripts[name][1], {"name": "kitchen"})
            async for message in sub.messages:
                payloads.append(bytes(message.payload))  # type: ignore[arg-type]
                if len([p for p in payloads if json.loads(p)["text"]]) == len(expected[name]):
                    break
        finals = [json.loads(raw_text(p)) for p in payloads]
        assert [f["text"] for f in finals if f["text"]] == [f.text for f in expected[name]]
        assert [w["word"] for f in finals for w in f["words"]] == [w.word for f in expected[name] for w in f.words]
    finally:
        await broker.kill()
