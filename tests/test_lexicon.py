"""Word-list decoding (``[decoder] words``): flashlight-text's lexicon beam search over the CTC output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamer.checkpoint import demo_model_dir
from streamer.config import DecoderConfig, ModelConfig, load_config
from streamer.ctc import CtcSegment
from streamer.decoder import build_decoder
from streamer.endpoint import EndpointRules
from streamer.engine import Schedule, StreamSession, reference, run_session
from streamer.events import Final, Partial
from streamer.exceptions import ConfigError
from streamer.lexicon import Lexicon
from streamer.model import load_model
from streamer.testing import espeak, make_tiny_model

DEMO_VOCAB = json.loads((demo_model_dir() / "vocab.json").read_text())
BLANK, DELIM = DEMO_VOCAB["<pad>"], DEMO_VOCAB["|"]


def frames(*spec: dict[str, float] | str) -> np.ndarray:
    """Log-probs, one row per item: a token (probability 0.9) or {token: probability}; the rest share 0.01."""
    rows = np.full((len(spec), len(DEMO_VOCAB)), 0.01, np.float32)
    for t, item in enumerate(spec):
        for token, p in ({item: 0.9} if isinstance(item, str) else item).items():
            rows[t, DEMO_VOCAB[token]] = p
    rows /= rows.sum(axis=1, keepdims=True)
    return np.log(rows)


def greedy(lp: np.ndarray, vocab) -> str:
    seg = CtcSegment(vocab)
    ids = lp.argmax(axis=1)
    seg.push(0, ids, np.exp(lp[np.arange(len(ids)), ids]))
    return " ".join(seg.text().split())


def test_a_misspelling_becomes_the_listed_word_with_its_letter_times(model_runner):
    # "t h r e | o n": greedy spells "thre"; the second "e" is there at 0.3 after a blank
    lp = frames("<pad>", "t", "h", "r", "e", "<pad>", {"<pad>": 0.6, "e": 0.3}, "|", "o", "n", "<pad>")
    assert greedy(lp, model_runner.vocab) == "thre on"
    lex = Lexicon(["three", "the", "tree", "on", "one"], DEMO_VOCAB, BLANK, DELIM)
    words = lex.decode(lp, start_frame=100)
    assert [w.word for w in words] == ["three", "on"]
    # letters of "three" on frames 1..6, of "on" on 8..9 (global frames +100, 20 ms each)
    assert [(round(w.start, 2), round(w.end, 2)) for w in words] == [(2.02, 2.14), (2.16, 2.20)]
    assert 0 < words[1].conf <= 1 and words[1].conf > words[0].conf  # "on" is certain, "three" is not


def test_a_word_ending_on_the_last_frame_is_kept():
    """Listed words end with the delimiter; a segment cut right after a word's last letter (end of stream,
    flush, max_length) has none, and the search must still count the word."""
    lp = frames("<pad>", "h", "e", "l", "<pad>", "l", "o")
    lex = Lexicon(["hello", "help"], DEMO_VOCAB, BLANK, DELIM)
    words = lex.decode(lp, start_frame=10)
    assert [(w.word, round(w.start, 2), round(w.end, 2)) for w in words] == [("hello", 0.22, 0.34)]
    search = lex.search(0)
    search.step(lp[:3])
    assert [w.word for w in search.partial(lp[3:])] == ["hello"]


def test_every_decoded_word_is_in_the_list():
    rng = np.random.default_rng(0)
    listed = ["on", "off", "the", "kitchen", "lights", "three", "seven", "timer"]
    lex = Lexicon(listed, DEMO_VOCAB, BLANK, DELIM, beam_size=20)
    decoded = []
    for _ in range(20):
        logits = rng.normal(0, 3, (200, len(DEMO_VOCAB)))
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        decoded += [w.word for w in lex.decode(lp.astype(np.float32))]
    assert decoded and set(decoded) <= set(listed)
    assert lex.decode(np.zeros((0, len(DEMO_VOCAB)), np.float32)) == []


def test_word_list_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"'café'.*the letters are \"'abcdefghijklmnopqrstuvwxyz\""):
        Lexicon(["coffee", "café"], DEMO_VOCAB, BLANK, DELIM)
    with pytest.raises(ConfigError, match=r"'on\|off'"):  # the delimiter is no letter: it would shift word times
        Lexicon(["on|off"], DEMO_VOCAB, BLANK, DELIM)
    with pytest.raises(ConfigError, match="a word of 100000 letters.*at most 100"):  # not a crash in the trie
        Lexicon(["a" * 100_000], DEMO_VOCAB, BLANK, DELIM)
    with pytest.raises(ConfigError, match="no word delimiter"):
        Lexicon(["on"], DEMO_VOCAB, BLANK, None)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="has no words"):
        Lexicon.from_file(empty, DEMO_VOCAB, BLANK, DELIM)
    with pytest.raises(ConfigError, match="cannot read the word list"):
        Lexicon.from_file(tmp_path / "missing.txt", DEMO_VOCAB, BLANK, DELIM)
    bom = tmp_path / "bom.txt"
    bom.write_text("on\noff\n", encoding="utf-8-sig")  # as Windows editors save it
    assert Lexicon.from_file(bom, DEMO_VOCAB, BLANK, DELIM).words == ["on", "off"]
    # an upper-case tokenizer (as facebook/wav2vec2-base-960h) takes a lower-case list
    upper = {("<pad>" if k == "<pad>" else k.upper()): v for k, v in DEMO_VOCAB.items()}
    lex = Lexicon(["on", "three", "three"], upper, BLANK, DELIM)
    assert lex.words == ["ON", "THREE"]


def test_decoder_words_config_picks_the_list(tmp_path, model_runner):
    model = make_tiny_model(tmp_path / "m")
    runner = load_model(ModelConfig(id=str(model), device="cpu"))
    assert not hasattr(runner, "lexicon")  # a runner decodes nothing: the decoder is built from [decoder]
    assert build_decoder(DecoderConfig(), runner) is None  # auto, and this checkpoint ships no words.txt
    (model / "words.txt").write_text("on\noff\nthe\nlights\n")
    assert build_decoder(DecoderConfig(), runner).words == ["on", "off", "the", "lights"]  # auto finds it
    assert build_decoder(DecoderConfig(words=""), runner) is None  # greedy on request
    other = tmp_path / "domain.txt"
    other.write_text("# a domain list\nyes\nno\n")
    assert build_decoder(DecoderConfig(words=str(other)), runner).words == ["yes", "no"]
    with pytest.raises(ConfigError, match=r"decoder.words = '.*nope.txt': no such file"):
        build_decoder(DecoderConfig(words=str(tmp_path / "nope.txt")), runner)
    assert build_decoder(DecoderConfig(), model_runner) is not None  # the demo model ships one


@pytest.mark.parametrize("pad_last", [False, True])
def test_streaming_finals_equal_the_reference_for_any_arrival(tmp_path, speech, pad_last):
    """With a word list, a segment's final is decoded from its final frames' log-probs, so every arrival
    chunking gives the reference's finals (pad last: blank is the last id and the delimiter is id 0)."""
    runner = load_model(ModelConfig(id=str(make_tiny_model(tmp_path / "m", pad_last=pad_last)), device="cpu"))
    lex = Lexicon(["a", "an", "the", "on", "in", "it", "is", "tea", "eat", "sea", "see", "seat"],
                  runner.vocab.token_ids, runner.vocab.blank_id, runner.vocab.delimiter_id)
    schedule = Schedule(left=40, hop=10, lookahead=16)
    endpoint = EndpointRules(silence_after_speech_s=0.3, max_utterance_s=2.0)
    _, ref = reference(speech, runner, schedule, runner.vocab, endpoint, words=lex)
    assert len(ref) >= 2 and all(set(f.text.split()) <= set(lex.words) for f in ref)
    # each final holds the words of its own frames only: times increase across finals
    times = [t for f in ref for w in f.words for t in (w.start, w.end)]
    assert times == sorted(times) and ref[-1].end <= len(speech) / 16000 + 0.02
    for chunk in (160, 3200, 17000):
        session = StreamSession(schedule, runner.vocab, endpoint, words=lex)
        events = []
        for i in range(0, len(speech), chunk):
            session.accept_audio(speech[i : i + chunk])
            run_session(session, runner)
            events += session.events_received()
        session.finish()
        run_session(session, runner)
        events += session.events_received()
        finals = [e for e in events if isinstance(e, Final)]
        def key(finals):
            return [(f.text, f.start, f.end, [(w.word, w.start, w.end) for w in f.words]) for f in finals]

        assert key(finals) == key(ref)
        # confidences are means of probabilities: equal up to the float rounding of other batch sizes
        confs = [w.conf for f in finals for w in f.words]
        assert confs == pytest.approx([w.conf for f in ref for w in f.words], abs=1e-4)
        partials = [e for e in events if isinstance(e, Partial)]
        assert partials and all(set(p.text.split()) <= set(lex.words) for p in partials)


def test_demo_model_streams_what_its_offline_pass_decodes(model_runner, demo_words, tmp_path):
    """The demo model decodes with its words.txt by default; the streamed final equals the offline pass."""
    import soundfile as sf

    from streamer.evaluation import offline_text
    from streamer.transcribe import new_session, stream_array, text_of

    assert demo_words is not None
    text = "set the thermostat to twenty two degrees"
    audio, _ = sf.read(espeak(text, tmp_path / "a.wav", voice="en-gb-scotland", speed=190), dtype="float32")
    session = new_session(load_config(None), model_runner.vocab, demo_words)
    streamed = text_of(stream_array(session, model_runner, audio))
    assert streamed == offline_text(model_runner, audio, demo_words)
    assert set(streamed.split()) <= set(demo_words.words)


def test_word_list_cuts_the_demo_models_word_errors_on_held_out_speech(model_runner, demo_words):
    """On held-out utterances (unseen sentences, voices across the ranges, noise), the word list removes most
    of greedy decoding's misspellings."""
    from test_demo_model import _held_out

    from streamer.scoring import ErrorRate

    lex, greedy_rate = ErrorRate(), ErrorRate()
    for ref, audio in _held_out(list(range(40))):
        lp = model_runner.run([audio])[0]
        greedy_rate.add(ref, greedy(lp, model_runner.vocab))
        lex.add(ref, " ".join(w.word for w in demo_words.decode(lp)))
    assert greedy_rate.wer > 0.05, "greedy decoding makes no errors here: pick harder utterances"
    assert lex.wer < greedy_rate.wer / 2, (lex.wer, greedy_rate.wer)


def test_partial_reads_like_a_search_over_all_frames(model_runner, demo_words):
    """A partial (words completed by the incremental search, then a fresh search over the rest and the
    look-ahead) reads like one search over all the frames, wherever the final frames end."""
    from test_demo_model import _held_out

    lex = demo_words
    same = total = 0
    for _, audio in _held_out(list(range(10))):
        lp = model_runner.run([audio])[0]
        whole = lex.decode(lp)
        for k in range(0, len(lp), 20):
            search = lex.search(0)
            for i in range(0, k, 7):  # final frames arrive in pieces
                search.step(lp[i : min(i + 7, k)])
            words = search.partial(lp[k:])
            times = [t for w in words for t in (w.start, w.end)]
            assert times == sorted(times)
            same += [w.word for w in words] == [w.word for w in whole]
            total += 1
        assert [w.word for w in search.finish()] == [w.word for w in lex.decode(lp[:k])]
        with pytest.raises(RuntimeError, match="finished"):
            search.step(lp[:1])
    assert same >= 0.9 * total, (same, total)


def test_words_read_again_every_hop_keep_their_first_reading(model_runner, demo_words):
    """A segment's search remembers the confidence of each word it read (its frames and letters) for the partials of
    the next hops and its final: every partial and the final are those of a search that never read any before."""
    from test_demo_model import _held_out

    utterances = [audio for _, audio in _held_out(list(range(6)))]
    for audio in (utterances[0], np.concatenate(utterances)):  # (the words of six utterances: some twice)
        lp = model_runner.run([audio])[0]
        search = demo_words.search(5)
        for k in range(20, len(lp), 20):
            search.step(lp[k - 20 : k])
            fresh = demo_words.search(5)
            fresh.step(lp[:k])
            assert search.partial(lp[k:]) == fresh.partial(lp[k:])
        search.step(lp[k:])
        fresh = demo_words.search(5)
        fresh.step(lp)
        words = search.finish()
        assert words and words == fresh.finish()
        assert all(0 < w.conf <= 1 for w in words)


def test_a_partial_reads_its_segment_on_from_the_last_word_read_before(model_runner, demo_words):
    """Every hop a partial reads its segment's best hypothesis: when it begins with the tokens and labels the reading
    before had up to its last word, the words to there are that reading's and only the rest is read (a segment may run
    to 20 s); when the hypothesis changed before that word, it is read afresh."""
    from types import SimpleNamespace

    from test_demo_model import _held_out

    from streamer.lexicon import Walked

    lp = model_runner.run([np.concatenate([audio for _, audio in _held_out(list(range(3)))])])[0]
    search = demo_words.search(0)
    search.step(lp)
    best = search._decoder.get_best_hypothesis(0)
    toks, labels = list(best.tokens), list(best.words)
    first = demo_words._words(best, lp, 0)[0]
    assert len(first) >= 6
    other = lp.copy()
    other[:, :] = other[::-1]  # other rows: another confidence for every word read from them
    assert demo_words._words(best, other, 0)[0] != first

    half = next(t for t in range(len(labels) // 2, len(labels)) if labels[t] >= 0)  # a word ends on this frame
    walked = Walked()
    head = SimpleNamespace(tokens=toks[: half + 1], words=labels[: half + 1])
    read = demo_words._words(head, lp, 0, walked=walked)[0]
    assert read == first[: len(read)] and len(walked.toks) == half  # (tokens[0] is the start state)
    # the whole hypothesis begins as that one did: the words to there are not read again (from other rows they would
    # read otherwise), the rest is
    resumed = demo_words._words(best, other, 0, walked=walked)[0]
    fresh = demo_words._words(best, other, 0)[0]
    assert resumed[: len(read)] == read != fresh[: len(read)]
    assert resumed[len(read):] == fresh[len(read):] and len(resumed) == len(first)

    # the first word's first letter frame read as a blank: the hypothesis changed before every word read
    t = next(t for t in range(1, len(toks)) if toks[t] not in (demo_words.blank_id, demo_words.delimiter_id))
    changed = SimpleNamespace(tokens=[*toks[:t], demo_words.blank_id, *toks[t + 1:]], words=labels)
    walked = Walked()
    demo_words._words(best, lp, 0, walked=walked)
    assert demo_words._words(changed, other, 0, walked=walked)[0] == demo_words._words(changed, other, 0)[0]
