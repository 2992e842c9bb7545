"""Configuration parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.config import Config, load_config, parse_overrides
from streamer.exceptions import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_default_toml_documents_every_key_with_its_default():
    from streamer.config import iter_keys

    text = (ROOT / "configs" / "default.toml").read_text()
    for section, key, _, _ in iter_keys():
        if section != "sources":
            assert f"\n{key} = " in text, f"configs/default.toml lacks {section}.{key}"
    assert load_config(ROOT / "configs" / "default.toml") == Config()


def test_overrides_are_typed():
    cfg = load_config(None, ["stream.hop_ms=500", "model.id=/models/x", "server.allowed_origins=['a', 'b']",
                             "endpoint.enabled=false", "endpoint.max_utterance_s=10"])
    assert cfg.stream.hop_ms == 500 and cfg.stream.hop_frames == 25
    assert cfg.model.id == "/models/x"
    assert cfg.server.allowed_origins == ("a", "b")
    assert cfg.endpoint.enabled is False and cfg.endpoint.max_utterance_s == 10.0


def test_ms_round_to_whole_frames():
    cfg = load_config(None, ["stream.hop_ms=410", "stream.left_context_ms=1590", "stream.lookahead_ms=31"])
    assert (cfg.stream.left_frames, cfg.stream.hop_frames, cfg.stream.lookahead_frames) == (80, 20, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stream.hop_ms=abc", "stream.hop_ms must be an integer"),
        ("stream.hop_ms=0", "stream.hop_ms = 0 is too small; the minimum is 20"),
        ("stream.bogus=1", "unknown key stream.bogus; keys of [stream] are"),
        ("model.dtype='int4'", "model.dtype = 'int4' is not allowed; use one of 'auto', 'float32'"),
        ("model.device='tpu'", "model.device = 'tpu' is not allowed"),
        ("mqtt.qos_final=3", "mqtt.qos_final = 3 is not allowed; use one of 0, 1, 2"),
        ("nosuch.key=1", "unknown section [nosuch]"),
        ("endpoint.enabled=1", "endpoint.enabled must be true or false"),
        ("hop_ms=1", "must look like section.key=value"),
    ],
)
def test_bad_values_name_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[stream\nhop_ms = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    src = tmp_path / "src.toml"
    src.write_text('[[sources]]\nname = "room"\n[[sources]]\nname = "room"\n')
    with pytest.raises(ConfigError, match="duplicate"):
        load_config(src)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.stream.hop_ms = 1  # type: ignore[misc]


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c='x'"]) == {"a": {"b": 1, "c": "x"}}
