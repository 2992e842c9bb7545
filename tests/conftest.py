"""Shared fixtures: tiny Wav2Vec2ForCTC checkpoints built in the test session, espeak-ng speech, the daemon.

The checkpoints and the speech come from :mod:`streamer.testing` (shared with the benchmarks and the recipe).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamer.testing import espeak, make_tiny_model


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


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About six seconds of espeak-ng speech at 16 kHz, with pauses."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("speech")
    parts = []
    for i, text in enumerate(["turn on the kitchen lights", "set a timer for twenty minutes"]):
        audio, _ = sf.read(espeak(text, root / f"{i}.wav"), dtype="float32")
        parts += [audio, np.zeros(8000, dtype=np.float32)]
    return np.concatenate(parts)


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
