"""Real-time streaming speech recognition for wav2vec2 / XLSR CTC models."""

from streamer.exceptions import StreamerError

__version__ = "0.1.0"
__all__ = ["StreamerError", "__version__"]
