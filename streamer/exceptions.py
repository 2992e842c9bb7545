"""Exceptions raised by streamer.

Every error that streamer raises on purpose derives from :class:`StreamerError`::

    StreamerError
    ├── ConfigError        a config file, key or value is wrong
    ├── ModelLoadError     a checkpoint cannot be found or loaded
    ├── AudioError         audio that cannot be read or used (empty, NaN, bad format)
    ├── ProtocolError      a client broke the wire protocol (bad JSON, unknown type, ...)
    ├── InferenceError     the model call failed for a batch of windows
    └── DeviceError        an audio input device is missing, cannot be opened, or stopped delivering audio

Messages are lower case, without a trailing period, and say what was wrong and what
is accepted, so that the CLI can print them as they are.
"""

from __future__ import annotations


class StreamerError(Exception):
    """Base class of every error raised by streamer."""


class ConfigError(StreamerError):
    """A configuration file, key or value is invalid."""


class ModelLoadError(StreamerError):
    """A model checkpoint cannot be found or loaded."""


class AudioError(StreamerError):
    """Audio cannot be read, decoded or used."""


class ProtocolError(StreamerError):
    """A client message breaks the wire protocol.

    ``code`` is the websocket close code to use, ``kind`` a short machine-readable name.
    """

    def __init__(self, message: str, *, kind: str = "bad_request", code: int = 1003) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


class InferenceError(StreamerError):
    """The model failed on a batch of windows."""


class DeviceError(StreamerError):
    """An audio input device is missing, cannot be opened, or stopped delivering audio."""
