"""Configuration: TOML files parsed into frozen, validated dataclasses.

Each TOML table maps to one dataclass below; ``configs/default.toml`` documents every key.
A value is checked when its dataclass is built, so a :class:`Config` that exists is valid.
Errors name the key (``stream.hop_ms``) and the accepted values.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from streamer.endpoint import EndpointRules
from streamer.engine import FRAME_SAMPLES, RECEPTIVE_FIELD, SAMPLE_RATE, Schedule
from streamer.exceptions import ConfigError
from streamer.protocol import valid_name

__all__ = [
    "AudioSocketConfig",
    "Config",
    "DecoderConfig",
    "DeepgramConfig",
    "EndpointConfig",
    "LoggingConfig",
    "ModelConfig",
    "ModelServerConfig",
    "MqttConfig",
    "OpenAIConfig",
    "ServerConfig",
    "SourceConfig",
    "StreamConfig",
    "VoskConfig",
    "WorkerConfig",
    "WyomingConfig",
    "load_config",
    "needs_restart",
    "parse_overrides",
]

FRAME_MS = 20
MAX_PROCESSES = 1024


def _opt(default: Any, *, choices: Iterable[Any] | None = None, min: float | None = None,
         max: float | None = None, doc: str = "", restart: bool = False) -> Any:
    """A config key: its default, allowed values, doc, and whether a reload can change it (``restart``: no)."""
    meta = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max, "doc": doc,
            "restart": restart}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Checks the type, range and choices of every field after construction."""

    _name: typing.ClassVar[str] = ""
    _restart: typing.ClassVar[bool] = False
    """every key of the section needs a restart (what it configures is built once, at start)"""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f"{self._name}.{f.name}" if self._name else f.name
            value = getattr(self, f.name)
            value = _coerce(key, value, hints[f.name])
            object.__setattr__(self, f.name, value)
            choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
            if choices is not None and value not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                raise ConfigError(f"{key} = {value!r} is not allowed; use one of {allowed}")
            if lo is not None and value < lo:
                raise ConfigError(f"{key} = {value!r} is too small; the minimum is {lo}")
            if hi is not None and value > hi:
                raise ConfigError(f"{key} = {value!r} is too large; the maximum is {hi}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return value  # only used for nested optional tables, already built
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Which checkpoint to load and where to run it."""

    _name = "model"
    _restart = True  # the loaded model
    id: str = _opt("demo", doc="'demo', a local directory, or a Hugging Face hub id")
    device: str = _opt("auto", doc="auto, cpu, cuda or cuda:N")
    backend: str = _opt("auto", choices=("auto", "torch", "onnxruntime"),
                        doc="auto = onnxruntime for a `streamer export` directory, else torch")
    dtype: str = _opt("auto", choices=("auto", "float32", "float16", "bfloat16", "int8"))
    attention: str = _opt("sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    threads: int = _opt(0, min=0, doc="CPU threads of the model (torch or onnxruntime); 0 keeps the library's default")
    revision: str = _opt("", doc="hub revision; empty = default branch")
    language: str = _opt("", doc="the language the model speaks, a BCP 47 tag ('ar', 'zh', 'hi', 'pt-BR'); "
                                 "the caption page's lang; empty = not known")

    def __post_init__(self) -> None:
        super().__post_init__()
        first, *rest = self.language.split("-")
        if self.language and not (2 <= len(first) <= 3 and first.isascii() and first.isalpha() and all(
                1 <= len(p) <= 8 and p.isascii() and p.isalnum() for p in rest)):
            raise ConfigError(f"model.language = {self.language!r} is not a language tag; use a BCP 47 tag such "
                              "as 'ar', 'zh', 'hi' or 'pt-BR', or '' when it is not known")
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(f"model.device = {d!r} is not allowed; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not self.id:
            raise ConfigError("model.id is empty; use 'demo', a local directory or a hub id")
        if self.backend == "onnxruntime" and self.dtype in ("float16", "bfloat16"):
            raise ConfigError(f"model.dtype = {self.dtype!r} is not available with model.backend = 'onnxruntime'; "
                              "use 'auto' (float32), 'float32' or 'int8', or model.backend = 'torch'")
        if self.dtype == "int8" and d.startswith("cuda"):
            raise ConfigError(f"model.dtype = 'int8' runs on the CPU, not model.device = {d!r}; set model.device = "
                              "'cpu', or use 'bfloat16' or 'float16' on a GPU")


@dataclass(frozen=True)
class StreamConfig(_Section):
    """Window schedule, in milliseconds, rounded to whole 20 ms frames."""

    _name = "stream"
    _restart = True  # the window schedule the model was warmed up with
    left_context_ms: int = _opt(1600, min=0, max=60_000)
    hop_ms: int = _opt(400, min=FRAME_MS, max=60_000)
    lookahead_ms: int = _opt(1000, min=0, max=60_000)
    pipeline_compatible: bool = _opt(False, doc="windows cut exactly as transformers' ASR pipeline")
    early_partials: bool = _opt(True, doc="partials from provisional windows before a stream's first full window")
    # 400 ms (one hop) shows a command's first text 0.3 s after its first word at p95 for +3-5 % CPU on 15-20 s
    # streams; 200 ms shows it 0.15 s after for +8-13 %: each short window costs most of a full one on a CPU.
    early_interval_ms: int = _opt(400, min=FRAME_MS, max=60_000, doc="audio between provisional windows")
    refresh_interval_ms: int = _opt(200, min=0, max=60_000,
                                    doc="audio between partial refreshes inside a hop (spare model time only); 0 = off")
    refresh_left_context_ms: int = _opt(800, min=0, max=60_000, doc="left context of a refresh window")

    @property
    def left_frames(self) -> int:
        return round(self.left_context_ms / FRAME_MS)

    @property
    def hop_frames(self) -> int:
        return max(1, round(self.hop_ms / FRAME_MS))

    @property
    def lookahead_frames(self) -> int:
        return round(self.lookahead_ms / FRAME_MS)

    @property
    def early_frames(self) -> int:
        """Frames between provisional windows; 0 with early partials off."""
        return max(1, round(self.early_interval_ms / FRAME_MS)) if self.early_partials else 0

    def _refresh(self, ms: float) -> dict[str, int]:
        """The schedule's refresh fields in frames of ``ms`` milliseconds (none with the pipeline's windows)."""
        if self.refresh_interval_ms <= 0 or self.pipeline_compatible:
            return {}
        return {"refresh": max(1, round(self.refresh_interval_ms / ms)),
                "refresh_left": min(round(self.refresh_left_context_ms / ms), round(self.left_context_ms / ms))}

    def schedule(self, frame_samples: int = FRAME_SAMPLES, receptive_field: int = RECEPTIVE_FIELD) -> Schedule:
        """The engine's window geometry in frames of the model's grid (the runner's ``geometry``).

        The defaults are wav2vec2's 20 ms frames; with other frames (Wav2Vec2-BERT's 40 ms adapter frames)
        each duration is rounded to whole frames of that length.
        """
        if (frame_samples, receptive_field) == (FRAME_SAMPLES, RECEPTIVE_FIELD):
            return Schedule(self.left_frames, self.hop_frames, self.lookahead_frames, self.pipeline_compatible,
                            self.early_frames, **self._refresh(FRAME_MS))
        ms = frame_samples * 1000 / SAMPLE_RATE
        early = max(1, round(self.early_interval_ms / ms)) if self.early_partials else 0
        lookahead = round(self.lookahead_ms / ms)
        if self.pipeline_compatible:
            lookahead = max(1, lookahead)
        return Schedule(round(self.left_context_ms / ms), max(1, round(self.hop_ms / ms)), lookahead,
                        self.pipeline_compatible, early, frame_samples, receptive_field, **self._refresh(ms))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pipeline_compatible and self.lookahead_frames < 1:
            raise ConfigError("stream.lookahead_ms must be at least 20 when stream.pipeline_compatible = true")
        if self.refresh_interval_ms and self.refresh_interval_ms < FRAME_MS:
            raise ConfigError(f"stream.refresh_interval_ms = {self.refresh_interval_ms} is below one 20 ms frame; "
                              "use 0 (no refreshes) or at least 20")
        if self.refresh_left_context_ms > self.left_context_ms:
            raise ConfigError(f"stream.refresh_left_context_ms = {self.refresh_left_context_ms} is more than "
                              f"stream.left_context_ms = {self.left_context_ms}; use at most that")


@dataclass(frozen=True)
class EndpointConfig(_Section):
    """When a segment ends (sherpa-onnx's three rules, counted over final frames)."""

    _name = "endpoint"
    enabled: bool = _opt(True)
    silence_no_speech_s: float = _opt(2.4, min=0.02, doc="trailing silence that ends a segment with no text")
    # "Silence" is CTC blank frames, which also fill the inside of words: a model may emit a word's first
    # letter at its onset and the rest 0.6 s later ("s ... et"), so 0.6 s split such words; 0.8 s does not.
    silence_after_speech_s: float = _opt(0.8, min=0.02, doc="trailing silence that ends a segment with text")
    max_utterance_s: float = _opt(20.0, min=0.2, doc="a segment is cut at this length regardless")
    # A voice-activity detector (Silero VAD, streamer/vad.py) beside the CTC evidence: a segment with text ends
    # vad_silence_ms after the detector last heard speech if the CTC frames over that silence are blank too.
    vad: bool = _opt(True, doc="end segments on the voice-activity detector's silence (and quiet CTC frames)")
    vad_silence_ms: int = _opt(300, min=32, max=10_000, doc="non-speech after speech that ends a segment with text")
    vad_threshold: float = _opt(0.5, min=0.01, max=1.0, doc="a speech probability at or above this is speech")
    vad_gather_ms: int = _opt(10, min=0, max=100, doc="with many streams (over about ten), how long a stream's new "
                              "audio may wait for other streams' to be scored with it in one batch (less CPU, "
                              "finals unchanged); 0 = never")

    def rules(self) -> EndpointRules:
        """The engine's endpoint rules."""
        return EndpointRules(self.enabled, self.silence_no_speech_s, self.silence_after_speech_s, self.max_utterance_s,
                             vad=self.enabled and self.vad, vad_silence_s=self.vad_silence_ms / 1000,
                             vad_threshold=self.vad_threshold)


@dataclass(frozen=True)
class DecoderConfig(_Section):
    """How CTC outputs become words: greedy letters, or beam search over a word list."""

    _name = "decoder"
    words: str = _opt("auto", doc="'auto' (the model's words.txt if it ships one), a word list file, or '' (greedy)")
    beam_size: int = _opt(50, min=1, max=10000, doc="hypotheses kept per frame by the word-list search")
    word_score: float = _opt(-1.0, doc="score added per word by the word-list search (without an LM)")
    # n-gram language models, [unk], hotwords, n-best (docs/decoding.md)
    lm: str = _opt("auto", doc="'auto' (the checkpoint's language_model/ folder if it has one), an ARPA or KenLM "
                   "binary file (or a language_model/ folder), or '' (none)")
    lm_weight: float = _opt(-1.0, max=100.0, doc="alpha: weight of the LM's natural-log word probabilities; negative = "
                            "alpha and beta from the LM's attrs.json (pyctcdecode's 0.5 and 1.0 without one)")
    lm_word_score: float = _opt(1.0, doc="beta: score added per word with an LM (used when lm_weight >= 0)")
    lm_beam_size: int = _opt(20, min=1, max=1000, doc="hypotheses kept per frame by the LM search without a word list")
    lm_beam_size_token: int = _opt(8, min=1, max=1000,
                                   doc="letters tried per frame by the LM search without a word list")
    unk_score: float = _opt(-4.0, max=0.0, doc="score per letter of speech read as [unk] (word lists asking for it)")
    hotwords: str = _opt("", doc="a file of words or phrases to boost, one per line, optionally 'phrase<TAB>weight'")
    hotword_weight: float = _opt(5.0, min=0.0, max=100.0, doc="the bonus of a hotword given without a weight")
    alternatives: int = _opt(0, min=0, max=10, doc="readings (n-best) each final carries from the search; 0 = none")


@dataclass(frozen=True)
class WorkerConfig(_Section):
    """The model worker that batches windows of all streams."""

    _name = "worker"
    _restart = True  # the worker thread
    max_batch: int = _opt(32, min=1, max=4096)
    max_wait_ms: float = _opt(10.0, min=0.0, max=10_000.0)
    queue_size: int = _opt(1024, min=1, doc="windows waiting for the model before streams are paused")
    max_windows_per_stream: int = _opt(2, min=1, max=4096,
                                       doc="most windows of one stream in one batch (streams are served in turn)")
    ahead_batch_ms: float = _opt(100.0, min=1.0, max=10_000.0,
                                 doc="model time a batch of audio sent ahead of real time is kept to (it runs only "
                                     "while no window is due; a window that falls due meanwhile waits for it)")
    refresh_max_load: float = _opt(0.5, min=0.0, max=1.0,
                                   doc="partial refreshes run only while the other windows keep the model busy "
                                       "less than this share of the time (0 = never)")


@dataclass(frozen=True)
class ModelServerConfig(_Section):
    """Where the model runs: in the daemon (``local``) or on a Triton Inference Server (``triton``)."""

    _name = "model_server"
    _restart = True  # the runner and its connection
    kind: str = _opt("local", choices=("local", "triton"),
                     doc="local = the model in this process; triton = windows sent to a Triton server over gRPC")
    url: str = _opt("", doc="host:port of a running server's gRPC endpoint; '' = `streamer serve` starts one")
    model_name: str = _opt("streamer", doc="the model's name on the server")
    dtype: str = _opt("float32", choices=("float32", "int16"),
                      doc="samples on the wire; int16 halves the bytes, exact for 16 kHz 16-bit audio")
    host: str = _opt("127.0.0.1", doc="address a started server (or `streamer model-server`) listens on")
    grpc_port: int = _opt(8001, min=0, max=65535, doc="its gRPC port; 0 = a free port")
    http_port: int = _opt(8000, min=0, max=65535, doc="its HTTP port; 0 = a free port")
    metrics_port: int = _opt(8002, min=0, max=65535, doc="its Prometheus metrics port; 0 = a free port")
    max_batch: int = _opt(64, min=1, max=4096, doc="most windows the server's dynamic batcher runs at once")
    max_queue_delay_ms: float = _opt(5.0, min=0.0, max=10_000.0,
                                     doc="how long the server's batcher waits for more windows")
    max_inflight: int = _opt(4, min=1, max=1024, doc="requests one front-end has on the server at once")
    timeout_s: float = _opt(10.0, min=0.1, doc="a request not answered in this time fails its windows")
    retry_s: float = _opt(30.0, min=0.0, doc="how long windows wait for an unreachable server before their "
                          "streams get inference_failed (1011); a restarted Triton takes 7-15 s to be ready")
    start_timeout_s: float = _opt(120.0, min=1.0, doc="how long to wait for the server to be ready at start")
    python: str = _opt("", doc="the interpreter that runs the server `streamer serve` starts ('' = this one): one "
                       "with streamer[triton-server], whose PyTriton holds numpy below 2")


@dataclass(frozen=True)
class ServerConfig(_Section):
    """The websocket / HTTP listener."""

    _name = "server"
    host: str = _opt("127.0.0.1", restart=True)
    port: int = _opt(8765, min=0, max=65535, restart=True)
    processes: int | str = _opt(1, restart=True, doc="front-end processes sharing the ports (SO_REUSEPORT); "
                                "'auto' = usable CPU cores")
    max_streams: int = _opt(64, min=1)
    max_viewers: int = _opt(256, min=0, doc="viewers (/v1/listen/NAME) at once; more are refused busy (1013)")
    max_message_bytes: int = _opt(1 << 20, min=1024)
    max_pending_handshakes: int = _opt(256, min=1, doc="connections whose request head has not all come yet; a new "
                                       "one beyond closes the oldest of them that waited 1 s (slow heads)")
    idle_timeout_s: float = _opt(30.0, min=0.1, doc="close a stream that sends nothing for this long")
    auth_token: str = _opt("", doc="shared secret; empty = no auth. Prefer auth_token_env or auth_token_file")
    auth_token_env: str = _opt("", doc="name of an environment variable that holds the token")
    auth_token_file: str = _opt("", doc="file whose first line is the token")
    allowed_origins: tuple[str, ...] = _opt([], doc="browser Origin values allowed besides the daemon's own host; "
                                            "['*'] = any")
    allowed_hosts: tuple[str, ...] = _opt([], doc="Host names the daemon answers to without a token besides "
                                          "loopback and one-label names, IP literals and server.host; ['*'] = any")
    shutdown_timeout_s: float = _opt(10.0, min=0.0)
    drain_timeout_s: float = _opt(60.0, min=0.0, doc="on SIGTERM, how long live streams may go on to their own end "
                                  "while no new one is taken (draining); then they are finalised as at shutdown. "
                                  "0 = finalise them at once")
    max_speed: float = _opt(10.0, min=0.0, doc="times real time a stream may send beyond max_burst_s; 0 = no limit")
    max_burst_s: float = _opt(60.0, min=0.0, doc="seconds of audio a stream may send ahead of real time at once")
    max_sample_rate: int = _opt(192_000, min=8000)
    min_sample_rate: int = _opt(8000, min=1000)
    tls_cert: str = _opt("", restart=True, doc="PEM certificate (chain): both ports speak TLS (https, wss); '' = no")
    tls_key: str = _opt("", restart=True, doc="the certificate's PEM private key, unencrypted")
    write_limit_bytes: int = _opt(1 << 15, min=1024, doc="outgoing bytes buffered per connection before sending waits")
    max_unsent_bytes: int = _opt(1 << 20, min=4096,
                                 doc="a client with more outgoing data waiting (it does not read) is closed 1008")
    compression: bool = _opt(True, restart=True, doc="websocket messages compressed (permessage-deflate) when the "
                             "client offers it; false = never (less CPU per message, more bytes)")
    ping_interval_s: float = _opt(20.0, min=0.0, doc="keepalive ping interval; 0 = no keepalive pings")
    ping_timeout_s: float = _opt(20.0, min=0.0, doc="close a client that sends nothing after a ping (no pong, "
                                 "no data), or reads nothing of what waits for it, for this long; 0 = never")
    max_word_list_letters: int = _opt(200_000, min=1, doc="letters of one stream's own word list (shared "
                                      "prefixes once, plus one per word); about 370 bytes of memory each")
    max_word_list_letters_total: int = _opt(1_000_000, min=1, doc="letters of all streams' own word lists at once; "
                                            "over it, a new list is refused busy (1013)")
    engine_thread: bool = _opt(True, doc="engine work (audio windowing, merging model outputs, word-list search) "
                               "in one thread beside the event loop; false = on the event loop")
    loop: str = _opt("auto", choices=("auto", "uvloop", "asyncio"), restart=True,
                     doc="the event loop: auto = uvloop when installed (1-4 % less CPU per stream: docs/scaling.md), "
                     "else asyncio's; asyncio = asyncio's always; uvloop = uvloop or no start")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_unsent_bytes <= self.write_limit_bytes:
            raise ConfigError(f"server.max_unsent_bytes = {self.max_unsent_bytes} must be larger than "
                              f"server.write_limit_bytes = {self.write_limit_bytes}")
        if self.max_word_list_letters_total < self.max_word_list_letters:
            raise ConfigError(f"server.max_word_list_letters_total = {self.max_word_list_letters_total} must be at "
                              f"least server.max_word_list_letters = {self.max_word_list_letters}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together: give both PEM files for TLS, or "
                              "neither")
        p = self.processes
        if not (p == "auto" or (isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= MAX_PROCESSES)):
            raise ConfigError(f"server.processes = {p!r} is not allowed; use a whole number from 1 to "
                              f"{MAX_PROCESSES}, or 'auto' (one per usable CPU core)")

    def process_count(self) -> int:
        """How many front-end processes to run: ``processes``, with ``auto`` = the CPU cores this process may use."""
        if self.processes == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.processes)

    def token(self) -> str:
        """Return the configured auth token from the first source that is set."""
        if self.auth_token_env:
            value = os.environ.get(self.auth_token_env, "")
            if not value:
                raise ConfigError(f"server.auth_token_env names {self.auth_token_env!r}, which is not set")
            return value
        if self.auth_token_file:
            try:
                return Path(self.auth_token_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"server.auth_token_file {self.auth_token_file!r} is unreadable: {exc}") from exc
        return self.auth_token


@dataclass(frozen=True)
class VoskConfig(_Section):
    """A second listener speaking vosk-server's websocket protocol."""

    _name = "vosk"
    enabled: bool = _opt(False, restart=True)
    port: int = _opt(2700, min=0, max=65535, restart=True)
    sample_rate: int = _opt(8000, min=8000, doc="rate assumed until the client sends a config message "
                            "(8000, as vosk-server's VOSK_SAMPLE_RATE)")


@dataclass(frozen=True)
class WyomingConfig(_Section):
    """A listener speaking the Wyoming protocol (Home Assistant's voice pipeline) as a speech-to-text server."""

    _name = "wyoming"
    enabled: bool = _opt(False, restart=True)
    uri: str = _opt("tcp://0.0.0.0:10300", restart=True, doc="tcp://HOST:PORT or unix://PATH")
    zeroconf: bool = _opt(False, restart=True, doc="advertise _wyoming._tcp over mDNS so Home Assistant finds it")
    languages: tuple[str, ...] = _opt(["en"], doc="the languages the model speaks (Home Assistant offers it for "
                                      "pipelines in these), e.g. [\"de\"]")
    max_audio_s: float = _opt(300.0, min=1.0, doc="longest transcription; longer audio ends it with an error")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.languages or not all(self.languages):
            raise ConfigError("wyoming.languages must name at least one language, e.g. [\"en\"]")
        scheme, sep, rest = self.uri.partition("://")
        if not sep or scheme not in ("tcp", "unix") or not rest:
            raise ConfigError(f"wyoming.uri = {self.uri!r} is not allowed; use tcp://HOST:PORT or unix://PATH")
        if scheme == "tcp":
            host, colon, port = rest.rpartition(":")
            if not colon or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"wyoming.uri = {self.uri!r} needs a host and a port from 0 to 65535, e.g. "
                                  "tcp://0.0.0.0:10300")


@dataclass(frozen=True)
class AudioSocketConfig(_Section):
    """A listener speaking Asterisk's AudioSocket protocol: phone calls whose audio Asterisk sends over TCP."""

    _name = "audiosocket"
    enabled: bool = _opt(False, restart=True)
    uri: str = _opt("tcp://127.0.0.1:9092", restart=True, doc="tcp://HOST:PORT that Asterisk's AudioSocket() "
                    "connects to (loopback: Asterisk on this machine; the protocol has no token)")

    def __post_init__(self) -> None:
        super().__post_init__()
        scheme, sep, rest = self.uri.partition("://")
        host, colon, port = rest.rpartition(":")
        if scheme != "tcp" or not sep or not colon or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"audiosocket.uri = {self.uri!r} is not allowed; use tcp://HOST:PORT with a port from "
                              "0 to 65535, e.g. tcp://127.0.0.1:9092")


@dataclass(frozen=True)
class MqttConfig(_Section):
    """Publishing transcripts to an MQTT broker."""

    _name = "mqtt"
    _restart = True  # the publisher and its connection
    enabled: bool = _opt(False)
    host: str = _opt("localhost")
    port: int = _opt(1883, min=1, max=65535)
    tls: bool = _opt(False)
    tls_ca_file: str = _opt("")
    tls_cert_file: str = _opt("")
    tls_key_file: str = _opt("")
    username: str = _opt("")
    password_env: str = _opt("", doc="environment variable holding the password")
    password_file: str = _opt("", doc="file whose first line is the password")
    client_id: str = _opt("")
    keepalive_s: int = _opt(60, min=5)
    topic_prefix: str = _opt("streamer")
    qos_final: int = _opt(1, choices=(0, 1, 2))
    qos_partial: int = _opt(0, choices=(0, 1, 2))
    publish_partials: bool = _opt(True)
    retain_final: bool = _opt(False)
    retain_partial: bool = _opt(False)
    queue_size: int = _opt(10_000, min=1)
    hermes: bool = _opt(False, doc="also publish finals as hermes/asr/textCaptured")
    site_id: str = _opt("default")
    flush_timeout_s: float = _opt(5.0, min=0.0)
    reconnect_max_s: float = _opt(30.0, min=0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (not self.topic_prefix or "#" in self.topic_prefix or "+" in self.topic_prefix
                or not self.topic_prefix.isprintable()):
            raise ConfigError(f"mqtt.topic_prefix = {self.topic_prefix!r} must be non-empty without '#', '+' or "
                              "control characters")


@dataclass(frozen=True)
class SourceConfig(_Section):
    """A capture source run by the daemon (``[[sources]]``)."""

    _name = "sources"
    _restart = True  # the capture sources
    name: str = _opt("")
    kind: str = _opt("mic", choices=("mic",))
    device: str = _opt("", doc="sounddevice name or index; empty = default input")
    sample_rate: int = _opt(0, min=0, doc="0 = the device's default rate")
    channels: int = _opt(0, min=0, doc="0 = the device's default channel count")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not valid_name(self.name):  # the rule of stream names: a topic level and a viewer path
            raise ConfigError(f"sources.name = {self.name!r} must be 1-64 letters, digits, '_', '-' or '.'")


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """Log output."""

    _name = "logging"
    level: str = _opt("info", choices=("debug", "info", "warning", "error"))
    json: bool = _opt(False, restart=True)


@dataclass(frozen=True)
class OpenAIConfig(_Section):
    """OpenAI-compatible transcription on ``server.port``: REST uploads, ``/v1/models`` and ``/v1/realtime``."""

    _name = "openai"
    enabled: bool = _opt(True, doc="answer the OpenAI endpoints (the same token as the websockets)")
    max_upload_bytes: int = _opt(25 << 20, min=1024, doc="largest request body of /v1/audio/transcriptions (413)")
    upload_timeout_s: float = _opt(120.0, min=1.0, doc="the whole request body must arrive within this time (408)")
    max_audio_s: float = _opt(3600.0, min=1.0, doc="longest audio one request may hold (400)")


@dataclass(frozen=True)
class DeepgramConfig(_Section):
    """Deepgram's listen API on ``server.port``: the live websocket and pre-recorded ``POST /v1/listen``."""

    _name = "deepgram"
    enabled: bool = _opt(True, doc="answer /v1/listen as Deepgram does (the same token as the websockets)")
    max_upload_bytes: int = _opt(100 << 20, min=1024, doc="largest body of a pre-recorded POST /v1/listen (413)")
    upload_timeout_s: float = _opt(120.0, min=1.0, doc="a pre-recorded body must arrive within this time (408)")
    max_audio_s: float = _opt(3600.0, min=1.0, doc="longest audio one pre-recorded request may hold (400)")


@dataclass(frozen=True)
class Config:
    """The whole configuration; build it with :func:`load_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    model_server: ModelServerConfig = field(default_factory=ModelServerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    vosk: VoskConfig = field(default_factory=VoskConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)
    audiosocket: AudioSocketConfig = field(default_factory=AudioSocketConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sources: tuple[SourceConfig, ...] = ()
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    deepgram: DeepgramConfig = field(default_factory=DeepgramConfig)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "sources"
}

T = TypeVar("T")


def _build(cls: type[T], section: str, data: Any) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{section}] must be a table, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"unknown key {section}.{key}; keys of [{section}] are: {allowed}")
    return cls(**data)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a parsed TOML document."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "sources":
            if not isinstance(value, list):
                raise ConfigError("sources must be an array of tables ([[sources]])")
            kwargs["sources"] = tuple(_build(SourceConfig, "sources", v) for v in value)
            names = [s.name for s in kwargs["sources"]]
            if len(set(names)) != len(names):
                raise ConfigError(f"sources have duplicate names: {names}")
        elif key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], key, value)
        else:
            allowed = ", ".join([*_SECTIONS, "sources"])
            raise ConfigError(f"unknown section [{key}]; sections are: {allowed}")
    return Config(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as --set model.id=/models/x


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["stream.hop_ms=500", ...]`` into a nested dict of TOML values."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r} must look like section.key=value, e.g. stream.hop_ms=500")
        out.setdefault(parts[0], {})
        if not isinstance(out[parts[0]], dict):
            raise ConfigError(f"--set cannot override [{parts[0]}]")
        out[parts[0]][parts[1]] = _parse_value(raw.strip())
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: Iterable[str] | Mapping[str, Mapping[str, Any]] = ()) -> Config:
    """Read a TOML file (or none: the defaults) and apply overrides.

    ``overrides``: ``--set`` strings (``["stream.hop_ms=500"]``) or their parsed form
    (``{"stream": {"hop_ms": 500}}``, what :func:`streamer.cli.cli_overrides` returns).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None
    data = _merge(data, overrides if isinstance(overrides, Mapping) else parse_overrides(overrides))
    return config_from_dict(data)


def needs_restart(key: str) -> bool:
    """Whether ``section.key`` (or ``sources``) keeps its running value on a reload until a restart."""
    section, _, name = key.partition(".")
    if section == "sources":
        return SourceConfig._restart
    cls = _SECTIONS[section]
    if cls._restart:
        return True
    return bool(next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("restart", False))


def iter_keys() -> Iterable[tuple[str, str, Any, str]]:
    """Yield (section, key, default, doc) for every key; used to check configs/default.toml."""
    sections: list[tuple[str, Any]] = [*_SECTIONS.items(), ("sources", SourceConfig)]
    for section, cls in sections:
        for f in dataclasses.fields(cls):
            factory: Any = f.default_factory
            default = f.default if f.default is not dataclasses.MISSING else factory()
            yield section, f.name, default, f.metadata.get("doc", "")
