#!/usr/bin/env python3
"""Latency per protocol, side by side in one run: first text after speech starts, final after speech ends.

Starts ``streamer serve`` (or uses --url), then plays the same spoken commands (espeak-ng, each with
silence before and after) at 1x real time through every protocol in turn, one utterance at a time, and
reports per protocol the median and p95 of

* first text: from sending the audio where speech starts to receiving the first non-empty text (a native
  ``partial``, an OpenAI Realtime ``...input_audio_transcription.delta``, ...);
* final:      from sending the audio where speech ends to receiving the utterance's final text (a native
  ``final``, a Realtime ``...input_audio_transcription.completed``, ...), closed by the daemon's endpointing
  (no stop or commit is sent before it).

Every protocol is one ``async def NAME(url, utterance) -> Timing`` in :data:`PROTOCOLS`; add one to compare
another protocol (it gets the daemon's ``ws://host:port`` URL and plays ``utterance.pcm16(rate)``)::

    python clients/protocol_latency.py                       # demo model, 12 utterances per protocol
    python clients/protocol_latency.py --rounds 30 --protocols native,openai-realtime
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import connect

from streamer.audio import encode_g711
from streamer.telephony import KIND_AUDIO, KIND_HANGUP, KIND_UUID, frame
from streamer.testing import espeak_audio

CHUNK_S = 0.1
"""audio per message, sent every CHUNK_S seconds (1x real time)"""
LEAD_S = 0.6
"""silence before the speech"""
TAIL_S = 2.0
"""silence after the speech: the endpoint (0.8 s of silence by default) closes the utterance in it"""
COMMANDS = ["turn on the kitchen lights", "what time is it", "set a timer for ten minutes", "play some music",
            "turn off the bedroom lights", "what is the weather like", "open the garage door", "stop the music"]


@dataclass
class Utterance:
    """One spoken command between silences (16 kHz mono float32) and where its speech starts and ends."""

    text: str
    audio: np.ndarray
    speech_start_s: float
    speech_end_s: float

    def pcm16(self, rate: int = 16000) -> bytes:
        """The audio as s16le at ``rate`` Hz."""
        audio = self.audio
        if rate != 16000:
            import soxr

            audio = np.asarray(soxr.resample(audio, 16000, rate), dtype=np.float32)
        pcm: bytes = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        return pcm


def make_utterance(text: str, voice: str) -> Utterance:
    speech = espeak_audio(text, voice=voice, speed=160)
    loud = np.flatnonzero(np.abs(speech) > 0.02)
    speech = speech[loud[0] : loud[-1] + 1]
    audio = np.concatenate([np.zeros(int(LEAD_S * 16000), np.float32), speech,
                            np.zeros(int(TAIL_S * 16000), np.float32)])
    return Utterance(text, audio, LEAD_S, LEAD_S + len(speech) / 16000)


@dataclass
class Timing:
    """What one utterance through one protocol measured (seconds; NaN when it never came)."""

    first_text: float = float("nan")
    final: float = float("nan")
    text: str = ""
    ok: bool = True


@dataclass
class Player:
    """Sends audio at 1x real time and remembers when each stream second had been sent."""

    rate: int
    chunk_s: float = CHUNK_S
    """seconds of audio a message"""
    sent: list[tuple[float, float]] = field(default_factory=list)
    """(audio seconds sent so far, wall time) after each message"""

    async def play(self, pcm: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
        step = int(self.rate * self.chunk_s) * 2
        t0 = time.perf_counter()
        for n, i in enumerate(range(0, len(pcm), step), 1):
            await send(pcm[i : i + step])
            self.sent.append(((i + len(pcm[i : i + step])) / 2 / self.rate, time.perf_counter()))
            await asyncio.sleep(max(0.0, t0 + n * self.chunk_s - time.perf_counter()))

    def sent_at(self, t: float) -> float:
        """Wall time the audio up to stream second ``t`` had been sent."""
        for end, wall in self.sent:
            if end >= t - 1e-6:
                return wall
        return float("nan")


# -- one function per protocol ------------------------------------------------------------------------------


async def native(url: str, utt: Utterance) -> Timing:
    """The native protocol (``/v1/stream``): partials and finals."""
    out, player = Timing(), Player(16000)
    first_text_at = final_at = float("nan")
    async with connect(f"{url}/v1/stream", max_size=None) as ws:
        await ws.recv()  # ready
        task = asyncio.create_task(player.play(utt.pcm16(16000), ws.send))
        async for raw in ws:
            ev = json.loads(raw)
            now = time.perf_counter()
            if ev["type"] in ("partial", "final") and ev["text"] and first_text_at != first_text_at:
                first_text_at = now
            if ev["type"] == "final" and ev["text"]:
                final_at, out.text = now, ev["text"]
                break
            if ev["type"] == "error":
                out.ok = False
                break
        await task
        await ws.send(json.dumps({"type": "stop"}))
    out.first_text = first_text_at - player.sent_at(utt.speech_start_s)
    out.final = final_at - player.sent_at(utt.speech_end_s)
    return out


async def openai_realtime(url: str, utt: Utterance) -> Timing:
    """OpenAI Realtime transcription (``/v1/realtime?intent=transcription``, GA events, 24 kHz pcm)."""
    out, player = Timing(), Player(24000)
    first_text_at = final_at = float("nan")
    async with connect(f"{url}/v1/realtime?intent=transcription", max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {
            "type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}}}))

        async def send(chunk: bytes) -> None:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))

        task = asyncio.create_task(player.play(utt.pcm16(24000), send))
        async for raw in ws:
            ev = json.loads(raw)
            now = time.perf_counter()
            kind = ev["type"]
            if kind == "conversation.item.input_audio_transcription.delta" and ev["delta"].strip():
                if first_text_at != first_text_at:
                    first_text_at = now
            elif kind == "conversation.item.input_audio_transcription.completed" and ev["transcript"]:
                if first_text_at != first_text_at:
                    first_text_at = now
                final_at, out.text = now, ev["transcript"]
                break
            elif kind == "error":
                out.ok = False
                break
        await task
    out.first_text = first_text_at - player.sent_at(utt.speech_start_s)
    out.final = final_at - player.sent_at(utt.speech_end_s)
    return out


async def deepgram(url: str, utt: Utterance) -> Timing:
    """Deepgram's live API (``/v1/listen``, linear16 at 16 kHz, interim results): the first Results with text,
    and the final (``is_final``) that the endpoint closed (``speech_final``)."""
    out, player = Timing(), Player(16000)
    first_text_at = final_at = float("nan")
    async with connect(f"{url}/v1/listen?encoding=linear16&sample_rate=16000&interim_results=true",
                       max_size=None) as ws:
        task = asyncio.create_task(player.play(utt.pcm16(16000), ws.send))
        async for raw in ws:
            ev = json.loads(raw)
            now = time.perf_counter()
            if ev["type"] == "Error":
                out.ok = False
                break
            if ev["type"] != "Results" or not (text := ev["channel"]["alternatives"][0]["transcript"]):
                continue
            if first_text_at != first_text_at:
                first_text_at = now
            if ev["is_final"] and ev["speech_final"]:
                final_at, out.text = now, text
                break
        await task
        await ws.send(json.dumps({"type": "CloseStream"}))
    out.first_text = first_text_at - player.sent_at(utt.speech_start_s)
    out.final = final_at - player.sent_at(utt.speech_end_s)
    return out


ENDPOINTS: dict[str, str] = {}
"""the daemon's other listeners: ``vosk`` (ws://host:port) and ``wyoming`` (tcp://host:port)"""


async def vosk(url: str, utt: Utterance) -> Timing:
    """vosk-server's protocol (``[vosk] port``): a config, 0.1 s frames each answered with a partial or a result."""
    out, player = Timing(), Player(16000)
    first_text_at = final_at = float("nan")
    async with connect(ENDPOINTS["vosk"], max_size=None) as ws:
        await ws.send(json.dumps({"config": {"sample_rate": 16000}}))

        async def send(chunk: bytes) -> None:  # lock-step: every frame gets its reply before the next
            nonlocal first_text_at, final_at
            await ws.send(chunk)
            reply = json.loads(await ws.recv())
            now = time.perf_counter()
            if "error" in reply:
                out.ok = False
            text = reply.get("partial") or reply.get("text") or ""
            if text and first_text_at != first_text_at:
                first_text_at = now
            if reply.get("text") and final_at != final_at:
                final_at, out.text = now, reply["text"]

        await player.play(utt.pcm16(16000), send)
        await ws.send('{"eof" : 1}')
        await ws.recv()
    out.first_text = first_text_at - player.sent_at(utt.speech_start_s)
    out.final = final_at - player.sent_at(utt.speech_end_s)
    return out


async def wyoming(url: str, utt: Utterance) -> Timing:
    """Wyoming (``[wyoming] uri``), as Home Assistant streams a voice command: audio up to the end of speech,
    ``audio-stop`` there (a perfect VAD's; Home Assistant's own adds its silence wait), then ``transcript``.
    First text: the first ``transcript-chunk``; final: ``transcript`` after the audio-stop at the speech end."""
    from urllib.parse import urlsplit

    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    out, player = Timing(), Player(16000)
    first_text_at = final_at = float("nan")
    where = urlsplit(ENDPOINTS["wyoming"])
    pcm = utt.pcm16(16000)[: int(utt.speech_end_s * 16000) * 2]
    async with AsyncTcpClient(where.hostname or "127.0.0.1", where.port or 10300) as client:

        async def read() -> None:
            nonlocal first_text_at, final_at
            while (event := await client.read_event()) is not None:
                now = time.perf_counter()
                if event.type == "transcript-chunk" and event.data.get("text", "").strip():
                    if first_text_at != first_text_at:
                        first_text_at = now
                elif Transcript.is_type(event.type):
                    final_at, out.text = now, Transcript.from_event(event).text
                elif event.type == "error":
                    out.ok = False
                    return
                elif event.type == "transcript-stop":
                    return

        reader = asyncio.create_task(read())
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())

        async def send(chunk: bytes) -> None:
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=chunk).event())

        await player.play(pcm, send)
        await client.write_event(AudioStop().event())
        await reader
    out.first_text = first_text_at - player.sent_at(utt.speech_start_s)
    out.final = final_at - player.sent_at(utt.speech_end_s)
    return out


async def viewed(url: str, name: str, player: Player, utt: Utterance, call: Awaitable[None]) -> Timing:
    """A protocol that answers nothing (a phone call's): a viewer at ``/v1/listen/NAME`` reads the stream's partials
    and finals, as an application reads a call's transcripts, while ``call`` sends the audio."""
    out = Timing()
    first_text_at = final_at = float("nan")
    async with connect(f"{url}/v1/listen/{name}", max_size=None) as viewer:
        await viewer.recv()  # ready: subscribed before the call starts
        task = asyncio.ensure_future(call)
        try:
            async with asyncio.timeout(len(utt.audio) / 16000 + 30):
                async for raw in viewer:
                    ev = json.loads(raw)
                    now = time.perf_counter()
                    if ev["type"] in ("partial", "final") and ev["text"] and first_text_at != first_text_at:
                        first_text_at = now
                    if ev["type"] == "final" and ev["text"]:
                        final_at, out.text = now, ev["text"]
                        break
        except TimeoutError:
            out.ok = False
        finally:
            await task
    out.first_text = first_text_at - player.sent_at(utt.speech_start_s)
    out.final = final_at - player.sent_at(utt.speech_end_s)
    return out


async def twilio(url: str, utt: Utterance) -> Timing:
    """Twilio Media Streams (``/v1/twilio``): mu-law at 8 kHz, 20 ms a media message, as Twilio sends a call."""
    name, player = f"latency-{uuid.uuid4().hex[:8]}", Player(8000, chunk_s=0.02)

    async def call() -> None:
        async with connect(f"{url}/v1/twilio") as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(json.dumps({"event": "start", "start": {
                "callSid": f"CA{uuid.uuid4().hex}", "streamSid": f"MZ{uuid.uuid4().hex}", "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {"name": name}}}))
            chunk = 0

            async def send(pcm: bytes) -> None:
                nonlocal chunk
                chunk += 1
                payload = base64.b64encode(encode_g711(np.frombuffer(pcm, "<i2"), "mulaw")).decode()
                await ws.send(json.dumps({"event": "media", "media": {
                    "track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20), "payload": payload}}))

            await player.play(utt.pcm16(8000), send)
            await ws.send(json.dumps({"event": "stop", "stop": {}}))
            await ws.wait_closed()

    return await viewed(url, name, player, utt, call())


async def audiosocket(url: str, utt: Utterance) -> Timing:
    """Asterisk AudioSocket (``[audiosocket] uri``): the call's UUID, then 20 ms frames of 8 kHz signed linear."""
    from urllib.parse import urlsplit

    call_id, player = uuid.uuid4(), Player(8000, chunk_s=0.02)

    async def call() -> None:
        where = urlsplit(ENDPOINTS["audiosocket"])
        reader, writer = await asyncio.open_connection(where.hostname or "127.0.0.1", where.port or 9092)
        try:
            writer.write(frame(KIND_UUID, call_id.bytes))

            async def send(pcm: bytes) -> None:
                writer.write(frame(KIND_AUDIO, pcm))
                await writer.drain()

            await player.play(utt.pcm16(8000), send)
            writer.write(frame(KIND_HANGUP))
            await writer.drain()
            await reader.read()  # until the daemon closes the call
        finally:
            writer.close()

    return await viewed(url, str(call_id), player, utt, call())


PROTOCOLS: dict[str, Callable[[str, Utterance], Awaitable[Timing]]] = {
    "native": native,
    "openai-realtime": openai_realtime,
    "deepgram": deepgram,
    "vosk": vosk,
    "wyoming": wyoming,
    "twilio": twilio,
    "audiosocket": audiosocket,
}


# -- the run --------------------------------------------------------------------------------------------------


async def start_daemon(model: str, overrides: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    """``streamer serve`` on a free loopback port; its ``ws://host:port``."""
    cmd = [sys.executable, "-m", "streamer", "serve", "--model", model, "--port", "0"]
    for o in overrides:
        cmd += ["--set", o]
    proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    while True:
        line = (await proc.stderr.readline()).decode()
        if not line:
            raise SystemExit("protocol_latency: the daemon exited before listening")
        if line.startswith("streamer: listening on "):
            url = line.split()[3].rstrip(",")
            break

    async def drain() -> None:
        assert proc.stderr is not None
        while await proc.stderr.readline():
            pass

    asyncio.get_running_loop().create_task(drain())
    return proc, url.rsplit("/v1/", 1)[0]


def free_port() -> int:
    """A TCP port free on loopback now (for the started daemon's Vosk and Wyoming listeners)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ok = sorted(v for v in values if v == v)
    if not ok:
        return float("nan")
    return ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))]


async def main_async(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.protocols.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise SystemExit(f"unknown protocol(s) {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    voices = ["en-us", "en", "en-gb-x-rp"]
    utterances = [make_utterance(COMMANDS[i % len(COMMANDS)], voices[i % len(voices)]) for i in range(args.rounds)]
    proc = None
    url = args.url
    if url is None:
        vosk_port, wyoming_port = free_port(), free_port()
        ENDPOINTS.update(vosk=f"ws://127.0.0.1:{vosk_port}", wyoming=f"tcp://127.0.0.1:{wyoming_port}")
        overrides = ["vosk.enabled=true", f"vosk.port={vosk_port}", "wyoming.enabled=true",
                     f"wyoming.uri='tcp://127.0.0.1:{wyoming_port}'", *args.set]
        audiosocket_port = free_port()
        ENDPOINTS["audiosocket"] = f"tcp://127.0.0.1:{audiosocket_port}"
        overrides = ["audiosocket.enabled=true", f"audiosocket.uri='tcp://127.0.0.1:{audiosocket_port}'", *overrides]
        proc, url = await start_daemon(args.model, overrides)
    else:
        ENDPOINTS.update(vosk=args.vosk_url, wyoming=args.wyoming_url)
        ENDPOINTS["audiosocket"] = args.audiosocket_url
    results: dict[str, list[Timing]] = {n: [] for n in names}
    try:
        for utt in utterances:  # protocols take turns on each utterance: the same load for each
            for name in names:
                results[name].append(await PROTOCOLS[name](url, utt))
    finally:
        if proc is not None:
            proc.terminate()
            await proc.wait()
    print(f"{len(utterances)} utterances per protocol at 1x real time, {CHUNK_S * 1000:.0f} ms messages; seconds")
    print(f"{'protocol':<18} {'first text p50':>14} {'p95':>6} {'final p50':>10} {'p95':>6}  ok  same text as native")
    for name in names:
        rs = results[name]
        same = sum(r.text == n.text for r, n in zip(rs, results.get("native", rs), strict=True))
        print(f"{name:<18} {pct([r.first_text for r in rs], 0.5):>14.3f} {pct([r.first_text for r in rs], 0.95):>6.3f} "
              f"{pct([r.final for r in rs], 0.5):>10.3f} {pct([r.final for r in rs], 0.95):>6.3f}  "
              f"{sum(r.ok for r in rs):>2}  {same}/{len(rs)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running daemon, ws://host:port (default: start one)")
    p.add_argument("--vosk-url", default="ws://127.0.0.1:2700", help="with --url: its Vosk listener")
    p.add_argument("--wyoming-url", default="tcp://127.0.0.1:10300", help="with --url: its Wyoming listener")
    p.add_argument("--audiosocket-url", default="tcp://127.0.0.1:9092", help="with --url: its AudioSocket listener")
    p.add_argument("--model", default="demo", help="model for the started daemon (default: demo)")
    p.add_argument("--set", action="append", default=[], help="config override for the started daemon")
    p.add_argument("--rounds", type=int, default=12, help="utterances per protocol (default: 12)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated: {', '.join(PROTOCOLS)}")
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
