"""N-gram language models (``[decoder] lm``), ``[unk]`` and n-best: flashlight-text's searches with KenLM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recipes.demo.lm import write_arpa
from streamer.checkpoint import demo_model_dir
from streamer.config import DecoderConfig, ModelConfig
from streamer.ctc import CtcSegment
from streamer.decoder import build_decoder, word_list_decoder
from streamer.endpoint import EndpointRules
from streamer.engine import Schedule, StreamSession, reference, run_session
from streamer.events import Final
from streamer.exceptions import ConfigError
from streamer.lexicon import UNK, Lexicon, OpenVocabulary
from streamer.model import load_model
from streamer.testing import make_tiny_model

DEMO_VOCAB = json.loads((demo_model_dir() / "vocab.json").read_text())
BLANK, DELIM = DEMO_VOCAB["<pad>"], DEMO_VOCAB["|"]
TEXT = ["turn on the light", "turn off the light", "turn on the light please", "the light is on",
        "switch on the light", "a night in town", "good night"] * 5
WORDS = sorted({w for s in TEXT for w in s.split()})


def frames(*spec: dict[str, float] | str, rest: float = 0.01) -> np.ndarray:
    """Log-probs, one row per item: a token (probability 0.9) or {token: probability}; the others ``rest``."""
    rows = np.full((len(spec), len(DEMO_VOCAB)), rest, np.float32)
    for t, item in enumerate(spec):
        for token, p in ({item: 0.9} if isinstance(item, str) else item).items():
            rows[t, DEMO_VOCAB[token]] = p
    rows /= rows.sum(axis=1, keepdims=True)
    return np.log(rows)


def spelled(text: str, unsure: dict[int, dict[str, float]] | None = None, rest: float = 0.01) -> np.ndarray:
    """Frames spelling ``text`` (a blank between letters, ``|`` between words); ``unsure[i]``: letter i's row."""
    spec: list[dict[str, float] | str] = ["<pad>"]
    i = 0
    for word in text.split():
        for c in word:
            spec += [(unsure or {}).get(i, c), "<pad>"]
            i += 1
        spec.append("|")
    return frames(*spec[:-1], "<pad>", rest=rest)


# "turn on the ?ight": the acoustics say "night" a little more than "light"; the LM knows "the light"
AMBIGUOUS = spelled("turn on the light", {9: {"n": 0.5, "l": 0.4}})


def greedy(lp: np.ndarray) -> str:
    class V:
        blank_id, delimiter_id = BLANK, DELIM

        def token(self, i: int) -> str:
            return {v: k for k, v in DEMO_VOCAB.items()}[i]

    seg = CtcSegment(load_model(ModelConfig(id="demo", device="cpu")).vocab)
    ids = lp.argmax(axis=1)
    seg.push(0, ids, np.exp(lp[np.arange(len(ids)), ids]))
    return " ".join(seg.text().split())


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "small.arpa"
    write_arpa(TEXT, path, order=3)
    return path


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory, arpa):
    """The demo checkpoint (its files linked) in the Wav2Vec2ProcessorWithLM layout, with a small ARPA."""
    model = tmp_path_factory.mktemp("ckpt") / "m"
    model.mkdir()
    for f in demo_model_dir().iterdir():
        if f.is_file() and f.name != "words.txt":
            (model / f.name).symlink_to(f)
    folder = model / "language_model"
    folder.mkdir()
    (folder / "small.arpa").write_bytes(arpa.read_bytes())
    (folder / "attrs.json").write_text(json.dumps({"alpha": 0.8, "beta": 0.5, "unk_score_offset": -10.0,
                                                   "score_boundary": True}))
    (folder / "unigrams.txt").write_text("\n".join(WORDS) + "\n")
    return model


@pytest.mark.parametrize("min_count", [1, 2])
def test_arpa_writer_distributions_sum_to_one(tmp_path, min_count):
    """Every context's next-word distribution (the words, </s> and <unk>) sums to one through KenLM,
    with every n-gram written and with the singletons of order 2 and up left out."""
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    arpa = tmp_path / "x.arpa"
    sizes = write_arpa([*TEXT, "switch off the night", "a light in town"], arpa, order=3, min_count=min_count)
    assert sizes[1] == len(WORDS) + 3  # and <s>, </s>, <unk>
    assert ("\tswitch off the\n" in arpa.read_text()) == (min_count == 1)  # seen once
    d = Dictionary()
    for w in [*WORDS, "<unk>"]:
        d.add_entry(w)
    lm = KenLM(str(arpa), d)
    for context in ([], ["turn"], ["turn", "on"], ["good"], ["the", "light"], ["night", "turn"]):
        state = lm.start(False)
        for w in context:
            state, _ = lm.score(state, WORDS.index(w))
        total = sum(10 ** lm.score(state, i)[1] for i in range(len(WORDS) + 1)) + 10 ** lm.finish(state)[1]
        assert total == pytest.approx(1.0, abs=1e-4), context


def test_auto_picks_the_checkpoints_language_model_and_reads_what_only_the_lm_can(lm_checkpoint, tmp_path):
    runner = load_model(ModelConfig(id=str(lm_checkpoint), device="cpu"))
    assert greedy(AMBIGUOUS) == "turn on the night"
    plain = Lexicon(WORDS, DEMO_VOCAB, BLANK, DELIM)
    assert " ".join(w.word for w in plain.decode(AMBIGUOUS)) == "turn on the night"

    free = build_decoder(DecoderConfig(words=""), runner)  # lm = "auto": the language_model/ folder
    assert isinstance(free, OpenVocabulary) and free.lm is not None
    assert (free.lm.alpha, free.lm.beta) == (0.8, 0.5)  # attrs.json, as Wav2Vec2ProcessorWithLM reads it
    assert " ".join(w.word for w in free.decode(AMBIGUOUS)) == "turn on the light"

    listed = build_decoder(DecoderConfig(words=str(_word_file(tmp_path))), runner)
    assert isinstance(listed, Lexicon) and listed.lm is not None
    assert " ".join(w.word for w in listed.decode(AMBIGUOUS)) == "turn on the light"

    assert build_decoder(DecoderConfig(words="", lm=""), runner) is None  # lm = "" turns it off: greedy
    off = build_decoder(DecoderConfig(words=str(_word_file(tmp_path)), lm=""), runner)
    assert off.lm is None and " ".join(w.word for w in off.decode(AMBIGUOUS)) == "turn on the night"
    # explicit weights replace attrs.json's; alpha 0 is the plain search
    zero = build_decoder(DecoderConfig(words="", lm_weight=0.0, lm_word_score=0.0), runner)
    assert (zero.lm.alpha, zero.lm.beta) == (0.0, 0.0)


def _word_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


def test_a_path_takes_arpa_and_a_folder(lm_checkpoint, arpa, tmp_path):
    runner = load_model(ModelConfig(id=str(lm_checkpoint), device="cpu"))
    by_file = build_decoder(DecoderConfig(words="", lm=str(arpa)), runner)
    assert by_file.lm.source == str(arpa) and by_file.lm.alpha == 0.5  # no attrs.json: pyctcdecode's defaults
    by_folder = build_decoder(DecoderConfig(words="", lm=str(lm_checkpoint / "language_model")), runner)
    assert by_folder.lm.alpha == 0.8


def test_bad_language_model_files_are_clear_errors_at_start(lm_checkpoint, tmp_path):
    runner = load_model(ModelConfig(id=str(lm_checkpoint), device="cpu"))

    def build(lm):
        return build_decoder(DecoderConfig(words="", lm=str(lm)), runner)

    with pytest.raises(ConfigError, match=r"language model '.*missing.arpa': no such file"):
        build(tmp_path / "missing.arpa")
    text = tmp_path / "notes.arpa"
    text.write_text("these are my notes\n")
    with pytest.raises(ConfigError, match=r"'.*notes.arpa' is neither an ARPA file .*nor a KenLM binary"):
        build(text)
    truncated = tmp_path / "cut.arpa"
    truncated.write_text("\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\tone\n")
    with pytest.raises(ConfigError, match=r"KenLM cannot read the language model '.*cut.arpa'"):
        build(truncated)
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ConfigError, match=r"'.*x.bin' is neither an ARPA file"):
        build(binary)
    kenlm_binary = tmp_path / "lm.bin"
    kenlm_binary.write_bytes(b"mmap lm http://kheafield.com/code" + b"\x00" * 64)
    with pytest.raises(ConfigError, match=r"KenLM binary '.*lm.bin' needs its vocabulary beside it as unigrams.txt"):
        build(kenlm_binary)
    (tmp_path / "unigrams.txt").write_text("turn\non\n")
    with pytest.raises(ConfigError, match=r"KenLM cannot read the language model '.*lm.bin'"):
        build(kenlm_binary)  # a damaged binary: KenLM's own reason, the file named
    foreign = tmp_path / "greek.arpa"
    write_arpa(["καλή νύχτα", "καλή μέρα"], foreign, order=2)
    with pytest.raises(ConfigError, match=r"'.*greek.arpa' does not fit the model's vocabulary: 3 of its 3 words"):
        build(foreign)
    folder = tmp_path / "language_model"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"exactly one n-gram file"):
        build(folder)


def test_unk_reads_unlisted_speech_as_unk_only_when_asked():
    lp = spelled("turn on the zebra", rest=1e-4)  # a model's outputs are about this certain
    cfg = DecoderConfig()
    vocab = load_model(ModelConfig(id="demo", device="cpu")).vocab
    forced = word_list_decoder(vocab, ["turn", "on", "the", "light", "lights"], cfg, "test")
    assert UNK not in [w.word for w in forced.decode(lp)]
    unk = word_list_decoder(vocab, ["turn", "on", "the", "light", "lights"], cfg, "test", unk=True)
    words = unk.decode(lp)
    assert [w.word for w in words] == ["turn", "on", "the", UNK]
    assert words[-1].start < words[-1].end and 0 < words[-1].conf <= 1
    # listed words still win where the letters fit them
    assert [w.word for w in unk.decode(spelled("turn on the light"))] == ["turn", "on", "the", "light"]
    # a slip ("lihgt") is still read as the listed word: one wrong letter costs less than [unk]'s letters
    assert [w.word for w in unk.decode(spelled("turn on the lihgt"))] == ["turn", "on", "the", "light"]


def test_n_best_readings_with_confidences():
    lex = Lexicon(WORDS, DEMO_VOCAB, BLANK, DELIM, alternatives=3)
    search = lex.search(0)
    search.step(AMBIGUOUS)
    best = search.finish()
    alts = search.alternatives
    assert [a.text for a in alts][:2] == ["turn on the night", "turn on the light"]
    assert " ".join(w.word for w in best) == alts[0].text
    assert alts[0].confidence > alts[1].confidence > 0 and sum(a.confidence for a in alts) <= 1 + 1e-9
    assert len({a.text for a in alts}) == len(alts) <= 3
    assert Lexicon(WORDS, DEMO_VOCAB, BLANK, DELIM).search(0).alternatives == ()


@pytest.mark.parametrize(("with_list", "hot"), [(False, False), (True, False), (False, True)])
def test_streaming_finals_with_an_lm_equal_the_reference_for_any_arrival(tmp_path, speech, with_list, hot):
    runner = load_model(ModelConfig(id=str(make_tiny_model(tmp_path / "m")), device="cpu"))
    path = tmp_path / "lm.arpa"
    words = ["a", "an", "the", "on", "in", "it", "is", "tea", "eat", "sea", "see", "seat"]
    write_arpa(["the tea is on", "eat it", "see the sea", "a seat in the sea"], path, order=3)
    hotwords = tmp_path / "hot.txt"
    hotwords.write_text("tea\t3\nseat\n")
    cfg = DecoderConfig(words=str(_list(tmp_path, words)) if with_list else "", lm=str(path), lm_weight=1.0,
                        lm_word_score=0.5, hotwords=str(hotwords) if hot else "", alternatives=2)
    dec = build_decoder(cfg, runner)
    assert isinstance(dec, Lexicon if with_list else OpenVocabulary) and dec.lm is not None
    schedule = Schedule(left=40, hop=10, lookahead=16)
    endpoint = EndpointRules(silence_after_speech_s=0.3, max_utterance_s=2.0)
    _, ref = reference(speech, runner, schedule, runner.vocab, endpoint, words=dec)
    assert len(ref) >= 2
    for chunk in (160, 3200, 17000):
        session = StreamSession(schedule, runner.vocab, endpoint, words=dec)
        events = []
        for i in range(0, len(speech), chunk):
            session.accept_audio(speech[i : i + chunk])
            run_session(session, runner)
            events += session.events_received()
        session.finish()
        run_session(session, runner)
        events += session.events_received()
        finals = [e for e in events if isinstance(e, Final)]
        assert [(f.text, f.start, f.end, [(w.word, w.start, w.end) for w in f.words]) for f in finals] == [
            (f.text, f.start, f.end, [(w.word, w.start, w.end) for w in f.words]) for f in ref]
        assert [[a.text for a in f.alternatives] for f in finals] == [[a.text for a in f.alternatives] for f in ref]
    assert all(f.alternatives and f.alternatives[0].text == f.text for f in ref)


def _list(tmp_path, words):
    path = tmp_path / "list.txt"
    path.write_text("\n".join(words))
    return path


def test_lm_scores_are_pyctcdecodes(arpa):
    """alpha · ln P + beta per word, unk_score_offset for a word the LM lacks."""
    from streamer.lm import load_language_model, make_search_lm

    lm = load_language_model(arpa, lambda w: w, alpha=0.5, beta=1.0)
    search_lm = make_search_lm(lm, None, labels=["turn", "zzz"])
    state = search_lm.start(False)
    _, turn = search_lm.score(state, 0)
    _, zzz = search_lm.score(state, 1)
    ken = lm.kenlm
    s0 = ken.start(False)
    assert turn == pytest.approx(0.5 * ken.score(s0, lm.index["turn"])[1] * math.log(10) + 1.0)
    assert zzz == pytest.approx(0.5 * ken.score(s0, lm.unk_index)[1] * math.log(10) + 1.0 - 10.0)


def test_eval_compares_the_decoders_side_by_side(tmp_path, capsys):
    """``streamer eval --decoders all``: greedy, word list, LM and LM + word list (the demo model ships both)."""
    import re

    from recipes.demo.data import write_manifest
    from streamer.cli import main

    manifest = write_manifest(tmp_path / "m", "test", 2, seed=0, jobs=1, augmented=False, progress=False)
    assert main(["eval", "--device", "cpu", "--decoders", "all", str(manifest)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(greedy|words|lm|lm\+words)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)%", out,
                      flags=re.M)
    assert [r[0] for r in rows] == ["greedy", "words", "lm", "lm+words"], out
    assert all(float(r[2]) < 25 and float(r[4]) >= 0 for r in rows), out  # CER of a trained model; CPU figures
    assert "language_model/lm.arpa" in out and "words.txt" in out
    assert main(["eval", "--device", "cpu", "--decoders", "lm", "--set", "decoder.lm=", str(manifest)]) == 1
    assert "--decoders lm: no language model" in capsys.readouterr().err
    assert main(["eval", "--device", "cpu", "--decoders", "beam", str(manifest)]) == 1
