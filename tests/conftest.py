"""Shared fixtures: tiny Wav2Vec2ForCTC checkpoints built in the test session, espeak-ng speech, the daemon; and
which tests the quick loop (``python -m pytest -m "not slow"``) leaves out.

The checkpoints and the speech come from :mod:`streamer.testing` (shared with the benchmarks and the recipe).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamer.testing import espeak, make_tiny_model

# --- the quick loop ------------------------------------------------------------------------------

SLOW_MODULES = {
    # the daemon on port 0 or in subprocesses, fed espeak-ng speech (a Debian package) per test
    "test_server", "test_limits", "test_hostile", "test_load", "test_offload", "test_openai", "test_vosk_exact",
    "test_wyoming", "test_processes", "test_clients", "test_loadtest", "test_cli", "test_vad",
    # other Debian packages: mosquitto, HAProxy, systemd, ALSA and PortAudio, Chromium; the Triton model server
    "test_mqtt", "test_haproxy", "test_systemd", "test_mic", "test_web", "test_web_languages", "test_triton",
    # minutes of model time: exports and int8 of every backend, Wav2Vec2-BERT models, the demo model's training
    "test_backends", "test_bert", "test_training",
}
"""test modules that ``-m "not slow"`` leaves out whole"""
SLOW_TESTS = {
    # espeak-ng speech of their own
    "test_lexicon.py::test_demo_model_streams_what_its_offline_pass_decodes",
    "test_lexicon.py::test_word_list_cuts_the_demo_models_word_errors_on_held_out_speech",
    "test_lexicon.py::test_partial_reads_like_a_search_over_all_frames",
    "test_lm.py::test_eval_compares_the_decoders_side_by_side",
    "test_demo_model.py::test_demo_model_transcribes_espeak_offline",
    "test_demo_model.py::test_eval_on_generated_manifest",
    "test_demo_model.py::test_default_endpointing_does_not_split_words_at_their_onset",
    "test_demo_model.py::test_final_comes_after_the_silence_not_after_the_lookahead",
    "test_demo_model.py::test_readme_quickstart_prints_what_it_says",
    "test_demo_model.py::test_readme_daemon_lines_caption_the_sample",
    "test_hotwords.py::test_stream_hotwords_affect_only_that_stream_and_finals_carry_alternatives",
    "test_hotwords.py::test_vosk_max_alternatives_and_unk",
    "test_languages.py::test_transcribe_prints_the_script_in_every_format",  # espeak-ng's ar, cmn and hi voices
    "test_languages.py::test_the_native_protocol_carries_the_script_unchanged",
    "test_languages.py::test_a_streams_arabic_words_and_hotwords_are_normalised_and_errors_name_the_letter",
    "test_languages.py::test_transcribe_decodes_over_an_arabic_word_list_typed_in_another_mark_order",
    "test_languages.py::test_finals_in_the_script_are_arrival_invariant",
    "test_languages.py::test_pipeline_parity_in_the_script",
    "test_languages.py::test_a_word_list_hotwords_and_an_lm_in_the_script",
    "test_languages.py::test_eval_reads_a_manifest_in_each_script_and_leads_with_cer_for_chinese",
    "test_languages.py::test_vosk_results_carry_the_script_and_its_words",
    "test_languages.py::test_openai_uploads_answer_the_script_in_every_format",
    "test_languages.py::test_wyoming_transcripts_carry_the_script",
    "test_languages.py::test_mqtt_payloads_carry_the_script",  # and mosquitto
    # over half a minute of model time each
    "test_engine.py::test_refreshes_cut_the_partial_delay_of_real_speech",
    "test_engine.py::test_word_list_finals_untouched_by_provisional_windows",
    "test_lm.py::test_streaming_finals_with_an_lm_equal_the_reference_for_any_arrival",
    "test_quality.py::test_mypy_strict",
}
"""single tests (any parameters) that ``-m "not slow"`` leaves out"""
SLOW_CHUNKS = {1, 7}
"""arrival chunkings (``chunk`` parameters, in samples) the quick loop leaves out: thousands of engine calls per
second of audio; its ``random`` chunking (1 to 8000 samples) still feeds odd sizes"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark :data:`SLOW_MODULES` and :data:`SLOW_TESTS` ``slow``: the quick loop runs the pure and in-process tests
    that need no Debian package, in under two minutes on two cores (``bash .ci/run`` runs everything)."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        path = Path(str(item.fspath))
        chunk = item.callspec.params.get("chunk") if hasattr(item, "callspec") else None
        if (path.stem in SLOW_MODULES or f"{path.name}::{item.originalname}" in SLOW_TESTS
                or (isinstance(chunk, int) and chunk in SLOW_CHUNKS)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four tiny checkpoints: layer/group norm x pad first/last."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for norm in ("layer", "group"):
        for pad_last in (False, True):
            name = f"{norm}-pad{'last' if pad_last else 'first'}"
            out[name] = make_tiny_model(root / name, norm=norm, pad_last=pad_last, seed=len(out))
    return out


SPEECH_FILE = Path(__file__).parent / "data" / "speech.flac"
"""espeak-ng's reading of :data:`SPEECH_SENTENCES`, recorded by ``python tests/data/make_speech.py`` (16-bit, 16 kHz,
lossless): the ``speech`` fixture needs no espeak-ng, so the quick loop runs the engine tests without it"""
SPEECH_SENTENCES = ("turn on the kitchen lights", "set a timer for twenty minutes")
SPEECH_PAUSE = 8000
"""samples of silence after each sentence of :data:`SPEECH_FILE`"""


def espeak_speech(tmp: Path) -> np.ndarray:
    """What :data:`SPEECH_FILE` holds, spoken afresh by espeak-ng (16-bit samples; ``tmp``: a folder for its WAVs)."""
    import soundfile as sf

    parts = []
    for i, text in enumerate(SPEECH_SENTENCES):
        audio, _ = sf.read(espeak(text, tmp / f"{i}.wav"), dtype="int16")
        parts += [audio, np.zeros(SPEECH_PAUSE, dtype=np.int16)]
    return np.concatenate(parts)


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """About five seconds of espeak-ng speech at 16 kHz, with pauses (:data:`SPEECH_FILE`), as float32."""
    import soundfile as sf

    audio, _ = sf.read(SPEECH_FILE, dtype="float32")
    return np.asarray(audio)


# --- the daemon, in-process, on port 0 -------------------------------------------------------


@pytest.fixture(scope="session")
def model_runner():
    """The model the daemon tests use: the shipped demo model, loaded once per session."""
    from streamer.config import ModelConfig
    from streamer.model import load_model

    return load_model(ModelConfig(id="demo", device="cpu"))


@pytest.fixture(scope="session")
def demo_words(model_runner):
    """The demo model's word list, as the default ``[decoder]`` builds it (``words = "auto"``)."""
    from streamer.config import DecoderConfig
    from streamer.decoder import build_decoder

    return build_decoder(DecoderConfig(), model_runner)


@pytest.fixture
async def daemon_factory(model_runner):
    """``await make("server.max_streams=2", ...)`` starts a Daemon on a free loopback port."""
    from streamer.aio.server import Daemon
    from streamer.config import load_config

    daemons = []

    async def make(*overrides, runner=None, services=()):
        cfg = load_config(None, ["server.port=0", "server.host='127.0.0.1'", *overrides])
        d = Daemon(cfg, runner or model_runner)
        d.services.extend(services)
        await d.start()
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        await d.shutdown()


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [-1, 1] -> s16le bytes."""
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()



# --- TLS: a self-signed certificate for 127.0.0.1 and localhost, made in the test session ------------------


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``cert``/``key``: a self-signed PEM certificate for 127.0.0.1 and localhost and its key (openssl);
    ``other_key``: a key that is not the certificate's; ``encrypted_key``: the key under a passphrase."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed; `apt-get install openssl` (.ci/run does it)")
    root = tmp_path_factory.mktemp("tls")
    files = {"cert": root / "cert.pem", "key": root / "key.pem", "other_key": root / "other.pem",
             "encrypted_key": root / "encrypted.pem"}
    ec = ["-pkeyopt", "ec_paramgen_curve:prime256v1"]
    for args in (["req", "-x509", "-newkey", "ec", *ec, "-nodes", "-keyout", files["key"], "-out", files["cert"],
                  "-days", "2", "-subj", "/CN=streamer test", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                 ["genpkey", "-algorithm", "EC", *ec, "-out", files["other_key"]],
                 ["pkey", "-in", files["key"], "-aes256", "-passout", "pass:pw", "-out", files["encrypted_key"]]):
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)
    return files
