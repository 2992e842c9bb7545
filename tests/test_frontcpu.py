"""clients/frontcpu.py's comparison of two replays' partials: for how long another text was on screen."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients"))

import frontcpu  # noqa: E402


def test_the_same_partials_differ_for_no_time():
    shown = [[0.4, "turn"], [0.8, "turn on"], [1.2, "turn on the lights"]]
    assert frontcpu.partials_differ(shown, list(shown)) == "3 and 3 partials, another text shown for 0.0 s of 0.8 s"


def test_a_word_shown_a_hop_later_counts_until_both_show_it(capsys):
    """The base showed "turn on" at 0.8 s, this at 1.2 s: another text for those 0.4 s, and only those."""
    base = [[0.4, "turn"], [0.8, "turn on"], [1.6, "turn on the"], [2.0, "turn on the lights"]]
    this = [[0.4, "turn"], [1.2, "turn on"], [1.6, "turn on the"], [2.0, "turn on the lights"]]
    assert frontcpu.partials_differ(base, this) == "4 and 4 partials, another text shown for 0.4 s of 1.6 s"
    assert capsys.readouterr().out == ""
    frontcpu.partials_differ(base, this, "HEAD", show=True)
    out = capsys.readouterr().out
    assert "at    0.8 s" in out and "HEAD: ...turn on" in out and "this    : ...turn" in out
    assert "1.2 s" not in out


def test_a_partial_one_replay_never_showed_counts_to_the_next():
    base = [[0.4, "set"], [0.8, "set a timer for twelve in"], [1.2, "set a timer for twelve minutes"]]
    this = [[0.4, "set"], [1.2, "set a timer for twelve minutes"]]
    assert frontcpu.partials_differ(base, this) == "3 and 2 partials, another text shown for 0.4 s of 0.8 s"


def test_sessions_without_partials_replay_the_recorded_full_windows_and_read_the_same_finals():
    """``--without-partials``: the recorded provisional windows and refreshes are passed over, the full ones replayed
    in order, and the finals are those of the sessions that showed partials."""
    import numpy as np

    from streamer.testing import speech_audio

    args = frontcpu.parse_args(["--seconds", "6", "--refresh"])
    audio = (np.clip(speech_audio(6), -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768
    runner = frontcpu.load_runner()
    outputs = frontcpu.record(args, runner, audio)
    assert any(k.provisional for k, _ in outputs) and any(not k.provisional for k, _ in outputs)  # both kinds
    cfg, words = frontcpu.session_for([], True, runner)
    _, _, shown, partials = frontcpu.replay(cfg, runner, words, True, audio, outputs, 2, False)
    _, _, without, none = frontcpu.replay(cfg, runner, words, True, audio, outputs, 2, False, partials=False)
    assert without == shown and partials["texts"] and not none["texts"]
