"""The recorded test speech (``tests/data/speech.flac``) is what espeak-ng says and what the demo model hears."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from conftest import SPEECH_FILE, SPEECH_PAUSE, SPEECH_SENTENCES, espeak_speech

from streamer.evaluation import offline_text


@pytest.mark.slow
def test_the_recording_is_what_espeak_ng_says(tmp_path):
    recorded, _ = sf.read(SPEECH_FILE, dtype="int16")
    fresh = espeak_speech(tmp_path)
    assert len(fresh) == len(recorded) and np.array_equal(fresh, recorded), (
        "espeak-ng says the test sentences differently now: python tests/data/make_speech.py records them anew")


def test_the_demo_model_reads_both_sentences(speech, model_runner, demo_words):
    assert len(speech) > len(SPEECH_SENTENCES) * SPEECH_PAUSE
    assert np.count_nonzero(speech[-SPEECH_PAUSE:]) == 0
    assert offline_text(model_runner, speech, demo_words) == " ".join(SPEECH_SENTENCES)
