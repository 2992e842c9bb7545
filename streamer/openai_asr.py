"""OpenAI's speech-to-text API without I/O: the transcription form, its errors and its answers.

``POST /v1/audio/transcriptions`` sends a multipart form (:func:`parse_form` reads it into a
:class:`TranscriptionForm`); the answer is the finals in one of OpenAI's response formats
(:func:`answer`), or a stream of ``transcript.text.delta`` events. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (:class:`ApiError`), with the HTTP status its SDK
maps to an exception. :mod:`streamer.aio.http.openai` moves the bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer.events import Final
from streamer.formats import cue_lines

__all__ = ["MODELS_PATH", "TRANSCRIPTIONS_PATH", "ApiError", "TranscriptionForm", "answer", "parse_form",
           "transcript_text", "verbose_json"]

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
MODELS_PATH = "/v1/models"
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
MAX_PARTS = 64
"""parts of a multipart form (OpenAI's form has about ten fields)"""
MAX_BOUNDARY = 256
"""the longest multipart boundary accepted, whatever python-multipart's own limit (recent releases refuse longer
ones as the parser is made, older ones take any)"""
MAX_FIELD_BYTES = 64 << 10
"""the largest form field other than ``file`` (a ``prompt`` is at most a few KiB)"""

class ApiError(Exception):
    """An answer in OpenAI's error shape: HTTP ``status``, ``type``, the ``param`` at fault and a ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, text: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.text = text
        """what was transcribed before the error, when some audio was (a shutdown)"""

    def body(self) -> dict[str, Any]:
        error = {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}
        return error if self.text is None else {**error, "text": self.text}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- the form --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriptionForm:
    """The fields of a transcription request that change the answer (``prompt``, ``temperature``... are ignored)."""

    file: bytes
    filename: str
    model: str = ""
    language: str = ""
    response_format: str = "json"
    granularities: tuple[str, ...] = ()
    stream: bool = False


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/form-data body: (their Content-Disposition parameters, their data)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise _bad(f"the request body must be multipart/form-data with a boundary (got Content-Type "
                   f"{content_type[:80]!r}); send the audio as the form field 'file'", "file")
    if len(boundary) > MAX_BOUNDARY:
        raise _bad(f"the multipart boundary is {len(boundary)} characters long; at most {MAX_BOUNDARY} are "
                   "accepted (RFC 2046 allows 70)")
    parts: list[tuple[dict[str, str], bytes]] = []
    field, value, data = bytearray(), bytearray(), bytearray()
    disposition = ""
    ended = False

    def on_part_begin() -> None:
        nonlocal disposition
        if len(parts) >= MAX_PARTS:
            raise _bad(f"the form has more than {MAX_PARTS} fields")
        disposition = ""
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        field.extend(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        value.extend(chunk[start:end])

    def on_header_end() -> None:
        nonlocal disposition
        if field.strip().lower() == b"content-disposition":
            disposition = value.decode("utf-8", "replace")
        field.clear()
        value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.extend(chunk[start:end])

    def on_part_end() -> None:
        _, params = parse_options_header(disposition)
        parts.append(({k.decode("latin-1"): v.decode("utf-8", "replace") for k, v in params.items()}, bytes(data)))

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks: Any = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                      "on_header_value": on_header_value, "on_header_end": on_header_end,
                      "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end}
    try:  # the parser refuses a boundary over 256 bytes as it is made
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise _bad(f"malformed multipart/form-data body: {exc}") from None
    if not ended:
        raise _bad("the multipart/form-data body ends before its closing boundary")
    return parts


def parse_form(content_type: str, body: bytes) -> TranscriptionForm:
    """Read a transcription request's form; :class:`ApiError` (400) names the field at fault."""
    fields: dict[str, str] = {}
    granularities: list[str] = []
    file: tuple[bytes, str] | None = None
    for params, data in _multipart_parts(content_type, body):
        name = params.get("name", "")
        if name == "file":
            file = (data, params.get("filename", "file"))
            continue
        if len(data) > MAX_FIELD_BYTES:
            raise _bad(f"form field {name[:40]!r} has {len(data)} bytes; at most {MAX_FIELD_BYTES}", name[:40])
        text = data.decode("utf-8", "replace").strip()
        if name in ("timestamp_granularities[]", "timestamp_granularities"):
            granularities.append(text)
        else:
            fields[name] = text
    if file is None:
        raise _bad("the form has no 'file' field: send the audio as the form field 'file' "
                   "(curl -F file=@audio.wav)", "file")
    fmt = fields.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise _bad(f"response_format {fmt[:40]!r} is not supported; use one of {', '.join(RESPONSE_FORMATS)}",
                   "response_format")
    for g in granularities:
        if g not in GRANULARITIES:
            raise _bad(f"timestamp_granularities[] {g[:40]!r} is not supported; use word and/or segment",
                       "timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise _bad("timestamp_granularities[] needs response_format verbose_json", "timestamp_granularities")
    stream = fields.get("stream", "false").lower()
    if stream not in ("true", "false", "1", "0", ""):
        raise _bad(f"stream {stream[:20]!r} is not a boolean; use true or false", "stream")
    return TranscriptionForm(file[0], file[1], fields.get("model", ""), fields.get("language", ""), fmt,
                             tuple(dict.fromkeys(granularities)), stream in ("true", "1"))


# -- the answers -------------------------------------------------------------------------------------------------


def _r(x: float) -> float:
    return round(x, 3)


def transcript_text(finals: list[Final]) -> str:
    """The whole text, as ``streamer transcribe`` prints it (:func:`streamer.transcribe.text_of`)."""
    return " ".join(f.text for f in finals if f.text).strip()


def verbose_json(finals: list[Final], form: TranscriptionForm, seconds: float) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: segments (one per final) unless only words were asked for, words when asked.

    Whisper's decoding statistics have no CTC counterpart: ``avg_logprob`` is the mean log of the words'
    confidences, ``compression_ratio`` 1 and ``no_speech_prob`` 0; ``tokens`` is empty.
    """
    spoken = [f for f in finals if f.text]
    out: dict[str, Any] = {"task": "transcribe", "language": form.language or "", "duration": _r(seconds),
                           "text": transcript_text(spoken)}
    if "segment" in form.granularities or not form.granularities:
        out["segments"] = [{
            "id": i, "seek": 0, "start": _r(f.start), "end": _r(f.end), "text": f.text, "tokens": [],
            "temperature": 0.0, "compression_ratio": 1.0, "no_speech_prob": 0.0,
            "avg_logprob": _r(float(np.mean([math.log(max(w.conf, 1e-6)) for w in f.words]))) if f.words else 0.0,
        } for i, f in enumerate(spoken)]
    if "word" in form.granularities:
        out["words"] = [{"word": w.word, "start": _r(w.start), "end": _r(w.end)} for f in spoken for w in f.words]
    out["usage"] = {"type": "duration", "seconds": math.ceil(seconds)}
    return out


def answer(finals: list[Final], form: TranscriptionForm, seconds: float) -> tuple[str, str]:
    """The body of a non-streamed answer and its content type."""
    fmt = form.response_format
    if fmt == "text":
        return transcript_text(finals) + "\n", "text/plain; charset=utf-8"
    if fmt in ("srt", "vtt"):
        cues = cue_lines([f for f in finals if f.text], fmt)
        return "\n".join(cues), ("text/vtt" if fmt == "vtt" else "application/x-subrip") + "; charset=utf-8"
    if fmt == "verbose_json":
        body: dict[str, Any] = verbose_json(finals, form, seconds)
    else:
        body = {"text": transcript_text(finals), "usage": {"type": "duration", "seconds": math.ceil(seconds)}}
    return json.dumps(body, ensure_ascii=False), "application/json"
