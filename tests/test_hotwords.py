"""Hotwords (``[decoder] hotwords``, native start ``hotwords``) and n-best on the wire."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import pcm16
from test_lm import AMBIGUOUS, BLANK, DELIM, DEMO_VOCAB, greedy, spelled
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.config import DecoderConfig, ModelConfig
from streamer.decoder import build_decoder, stream_decoder
from streamer.events import Alternative, Final, Word
from streamer.exceptions import ConfigError, ProtocolError
from streamer.lexicon import Lexicon, OpenVocabulary
from streamer.lm import MAX_HOTWORDS, read_hotwords
from streamer.model import load_model
from streamer.protocol import parse_control, vosk_final

TIMEOUT = 120


@pytest.fixture(scope="module")
def vocab():
    return load_model(ModelConfig(id="demo", device="cpu")).vocab


def text(decoder, lp) -> str:
    return " ".join(w.word for w in decoder.decode(lp))


def test_a_boosted_word_is_read_where_it_was_not_and_other_words_stay(vocab):
    assert greedy(AMBIGUOUS) == "turn on the night"  # the acoustics lean to "night"
    boosted = stream_decoder(None, vocab, DecoderConfig(), [("light", None)])
    assert isinstance(boosted, OpenVocabulary)
    assert text(boosted, AMBIGUOUS) == "turn on the light"
    # without the boost the same search reads what the letters say; clear speech is never bent to a hotword
    assert text(stream_decoder(None, vocab, DecoderConfig(), [("zebra", None)]), AMBIGUOUS) == "turn on the night"
    assert text(boosted, spelled("good night")) == "good night"
    assert text(boosted, spelled("turn on the lamp")) == "turn on the lamp"  # not restricted to hotwords


def test_hotwords_join_a_word_list_and_are_boosted(vocab):
    base = Lexicon(["turn", "on", "the", "night"], DEMO_VOCAB, BLANK, DELIM)
    assert text(base, AMBIGUOUS) == "turn on the night"
    tuned = stream_decoder(base, vocab, DecoderConfig(), [("light", 3.0)])
    assert "light" in tuned.words and text(tuned, AMBIGUOUS) == "turn on the light"
    assert text(base, AMBIGUOUS) == "turn on the night"  # the daemon's list is untouched
    assert text(tuned, spelled("turn on the night")) == "turn on the night"  # a clear listed word stays


def test_hotword_file_and_config(tmp_path, vocab):
    path = tmp_path / "hot.txt"
    path.write_text("# product names\nlight\t4\nkitchen lights: 2.5\nzebra\n")
    hw = read_hotwords(path, lambda w: w, 5.0)
    assert dict(hw.weights) == {"light": 4.0, "kitchen": 2.5, "lights": 2.5, "zebra": 5.0}
    runner = load_model(ModelConfig(id="demo", device="cpu"))
    daemon = build_decoder(DecoderConfig(words="", lm="", hotwords=str(path)), runner)
    assert isinstance(daemon, OpenVocabulary) and text(daemon, AMBIGUOUS) == "turn on the light"
    listed = build_decoder(DecoderConfig(hotwords=str(path)), runner)  # the demo's words.txt + the hotwords
    assert isinstance(listed, Lexicon) and "zebra" in listed.words


@pytest.mark.parametrize(("entries", "message"), [
    ([("café", None)], r"hotword 'café' cannot be spelled with the model's letters"),
    ([(f"w{i}", None) for i in range(MAX_HOTWORDS + 1)], r"more than 1000 hotwords"),
    ([(" ".join(["on"] * 11), None)], r"has 11 words; a phrase may have at most 10"),
    ([("a" * 101, None)], r"has 101 letters; at most 100"),
    ([("light", 0.0)], r"weight 0.0; weights are numbers above 0"),
    ([("light", float("nan"))], r"weight nan"),
])
def test_bad_hotwords_are_clear_errors(vocab, entries, message):
    with pytest.raises(ConfigError, match=message):
        stream_decoder(None, vocab, DecoderConfig(), entries)


def test_bad_hotword_files(tmp_path):
    with pytest.raises(ConfigError, match=r"decoder.hotwords = '.*nope.txt': no such file"):
        read_hotwords(tmp_path / "nope.txt", lambda w: w, 5.0)
    bad = tmp_path / "bad.txt"
    bad.write_text("light\theavy\n")
    with pytest.raises(ConfigError, match=r"bad.txt:1: 'heavy' is not a weight"):
        read_hotwords(bad, lambda w: w, 5.0)


@pytest.mark.parametrize(("value", "message"), [
    ("light", "must be a list"),
    ([1], "has an entry '1'"),
    ([["light", "x"]], "has an entry"),
    (["  "], "has an empty entry"),
    (["x" * 201], "201 characters"),
    (["w"] * 1001, "1001 entries"),
    ([], "is empty"),
])
def test_bad_hotwords_in_a_start_message(value, message):
    with pytest.raises(ProtocolError, match=message) as err:
        parse_control(json.dumps({"type": "start", "hotwords": value}))
    assert err.value.kind == "bad_hotwords" and err.value.code == 1008
    with pytest.raises(ProtocolError, match="'alternatives' must be an integer from 0 to 10"):
        parse_control(json.dumps({"type": "start", "alternatives": 11}))
    start = parse_control(json.dumps({"type": "start", "hotwords": ["light", ["kitchen lights", 2]],
                                      "alternatives": 3})).start
    assert start.hotwords == (("light", None), ("kitchen lights", 2.0)) and start.alternatives == 3


def test_vosk_n_best_shape():
    words = (Word("turn", 0.1, 0.3, 0.9), Word("on", 0.4, 0.5, 0.8))
    alts = (Alternative("turn on", 0.7, words), Alternative("turn in", 0.2, (words[0], Word("in", 0.4, 0.5, 0.3))))
    final = Final(0, "turn on", 0.1, 0.5, words, "silence", alts)
    assert vosk_final([final], max_alternatives=5) == {"alternatives": [
        {"confidence": 0.7, "result": [{"word": "turn", "start": 0.1, "end": 0.3}, {"word": "on", "start": 0.4,
                                                                                     "end": 0.5}], "text": "turn on"},
        {"confidence": 0.2, "result": [{"word": "turn", "start": 0.1, "end": 0.3}, {"word": "in", "start": 0.4,
                                                                                     "end": 0.5}], "text": "turn in"},
    ]}
    assert vosk_final([final], max_alternatives=1, words=False) == {"alternatives": [
        {"confidence": 0.7, "text": "turn on"}]}
    assert "alternatives" not in vosk_final([final])  # not asked for: the plain result
    d = final.to_dict()
    assert d["alternatives"] == [{"text": "turn on", "confidence": 0.7}, {"text": "turn in", "confidence": 0.2}]
    assert Final.from_dict(d).alternatives[1].text == "turn in"
    assert "alternatives" not in Final(0, "x", 0, 1).to_dict()


async def native(port, audio, start=None):
    msgs = []
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        await ws.recv()
        if start:
            await ws.send(json.dumps({"type": "start", **start}))
        for i in range(0, len(audio), 6400):
            await ws.send(audio[i : i + 6400])
        await ws.send(json.dumps({"type": "stop"}))
        with pytest.raises(ConnectionClosed):
            while True:
                msgs.append(json.loads(await ws.recv()))
    return msgs


def finals(msgs):
    return [m for m in msgs if m["type"] == "final"]


async def test_stream_hotwords_affect_only_that_stream_and_finals_carry_alternatives(daemon_factory, tmp_path):
    """On a greedy daemon the demo model spells "pleas add doag food"; a stream that boosts "dog" reads "dog"
    (and only that: "pleas" stays), the other streams are not affected."""
    import soundfile as sf

    from streamer.testing import espeak

    speech, _ = sf.read(espeak("please add dog food to the shopping list", tmp_path / "dog.wav"), dtype="float32")
    d = await daemon_factory("decoder.words=''", "decoder.lm=''")
    audio = pcm16(speech)
    plain, boosted, nbest = await asyncio.gather(
        native(d.port, audio), native(d.port, audio, {"hotwords": ["dog"]}),
        native(d.port, audio, {"hotwords": [["dog", 8]], "alternatives": 3}))
    said = " ".join(f["text"] for f in finals(plain))
    assert "doag" in said.split() and "pleas" in said.split()
    assert all("alternatives" not in f for f in finals(plain) + finals(boosted))
    for msgs in (boosted, nbest):
        assert " ".join(f["text"] for f in finals(msgs)) == said.replace("doag", "dog")
    for f in finals(nbest):
        alts = f["alternatives"]
        assert 1 <= len(alts) <= 3 and alts[0]["text"] == f["text"]
        assert all(0 <= a["confidence"] <= 1 for a in alts) and sum(a["confidence"] for a in alts) <= 1.0001
        assert len({a["text"] for a in alts}) == len(alts)


async def test_bad_stream_hotwords_close_that_stream_only(daemon_factory, speech):
    d = await daemon_factory()
    healthy = asyncio.create_task(native(d.port, pcm16(speech)))
    msgs = await native(d.port, b"", {"hotwords": ["café"]})
    errors = [m for m in msgs if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["bad_hotwords"] and "'café' cannot be spelled" in errors[0]["message"]
    assert finals(await healthy)


async def vosk(port, audio, config):
    replies = []
    async with asyncio.timeout(TIMEOUT), connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.send(json.dumps({"config": config}))
        for i in range(0, len(audio), 6400):
            await ws.send(audio[i : i + 6400])
            replies.append(json.loads(await ws.recv()))
        await ws.send('{"eof" : 1}')
        replies.append(json.loads(await ws.recv()))
    return replies


async def test_vosk_max_alternatives_and_unk(daemon_factory, tmp_path):
    """Vosk clients: ``max_alternatives`` answers with the search's readings in vosk-server's shape; a
    ``phrase_list`` with ``[unk]`` reads speech outside it as ``[unk]``."""
    import soundfile as sf

    from streamer.testing import espeak

    speech, _ = sf.read(espeak("please add dog food to the shopping list", tmp_path / "dog.wav"), dtype="float32")
    d = await daemon_factory("vosk.enabled=true", "vosk.port=0")
    audio = pcm16(speech)
    listed = "please add food to the shopping list"
    plain, nbest, unk = await asyncio.gather(
        vosk(d.vosk_port, audio, {"sample_rate": 16000}),
        vosk(d.vosk_port, audio, {"sample_rate": 16000, "max_alternatives": 3}),
        vosk(d.vosk_port, audio, {"sample_rate": 16000, "phrase_list": [listed, "[unk]"]}))
    texts = [r["text"] for r in plain if "text" in r and r["text"]]
    results = [r for r in nbest if "alternatives" in r]
    assert results and all("text" not in r and "partial" not in r for r in results)
    said = [r["alternatives"][0]["text"] for r in results if r["alternatives"][0]["text"]]
    assert said == texts  # the best reading is the plain result's text
    for r in results:
        alts = r["alternatives"]
        assert 1 <= len(alts) <= 3 and [sorted(a) for a in alts] == [["confidence", "result", "text"]] * len(alts)
        assert all(0 <= a["confidence"] <= 1 for a in alts)
        assert all(" ".join(w["word"] for w in a["result"]) == a["text"] for a in alts)
        assert all(sorted(w) == ["end", "start", "word"] for a in alts for w in a["result"])
    words = " ".join(r["text"] for r in unk if r.get("text")).split()
    assert "[unk]" in words and set(words) - {"[unk]"} <= set(listed.split()), words
