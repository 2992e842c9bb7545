"""Write ``tests/data/speech.flac``, the ``speech`` fixture's audio: ``python tests/data/make_speech.py``.

The quick test loop (``python -m pytest -m "not slow"``) needs no Debian package, so the speech the engine
tests run on is espeak-ng's output recorded once, losslessly. ``tests/test_data.py`` checks that espeak-ng still
says exactly this and that the demo model reads the two sentences from it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import SPEECH_FILE, espeak_speech  # noqa: E402  (tests/ is not a package)

from streamer.engine import SAMPLE_RATE  # noqa: E402

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        sf.write(SPEECH_FILE, espeak_speech(Path(tmp)), SAMPLE_RATE, subtype="PCM_16")
    print(f"{SPEECH_FILE}: {sf.info(SPEECH_FILE).duration:.2f} s")
