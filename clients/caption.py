#!/usr/bin/env python3
"""Live captions in a terminal from a streamer daemon.

Streams an audio file (any format libsndfile reads) or raw s16le PCM from stdin to
``ws://HOST:PORT/v1/stream`` and shows the captions as they come: the partial line is
rewritten in place, each final is committed as a line with its time. Written to a file or a pipe (not a
terminal, and without ``--jsonl``) it shows finals only, and asks the daemon for those only.

    python clients/caption.py talk.wav                       # at real time
    python clients/caption.py --fast talk.wav                # as fast as the server takes it
    arecord -f S16_LE -r 16000 -c 1 | python clients/caption.py --rate 16000 -
    python clients/caption.py --url ws://host:8765/v1/stream --token SECRET talk.flac

Sending and receiving are two tasks, so events are read while audio goes out. The audio in flight
is bounded: after every second of audio the client sends a ping, and it sends no more once
``--max-ahead`` seconds of audio have no pong yet (the server answers a ping when it reaches it, so a
pong means the server has taken the audio before it). A server that is behind therefore slows the
client down instead of piling audio up in socket buffers, the server's keepalive pings and their
pongs never wait behind minutes of audio, and the client never closes itself while the server is
working: it gives up only when the server has sent nothing and answered no ping for ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

PING_EVERY_S = 1.0
"""audio seconds between two flow-control pings"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Show live captions from a streamer daemon in the terminal.")
    p.add_argument("input", help="audio file, or '-' for raw s16le PCM on stdin")
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/stream", help="daemon URL (default: %(default)s)")
    p.add_argument("--token", help="auth token, if the daemon requires one")
    p.add_argument("--fast", action="store_true", help="send as fast as the server takes it instead of at real time")
    p.add_argument("--rate", type=int, default=16000, help="sample rate of stdin PCM (default: 16000)")
    p.add_argument("--channels", type=int, default=1, help="channels of stdin PCM (default: 1)")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per message (default: 100)")
    p.add_argument("--name", help="stream name (MQTT topic / viewer name)")
    p.add_argument("--jsonl", action="store_true", help="print raw events as JSON lines instead")
    p.add_argument("--max-ahead", type=float, default=10.0, metavar="SECONDS",
                   help="most audio sent that the server has not taken yet (default: 10)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up when the server sends nothing and answers no ping for this long; "
                   "0 waits forever (default: 120)")
    args = p.parse_args(argv)
    for key in ("rate", "channels", "chunk_ms"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if args.max_ahead < PING_EVERY_S:
        p.error(f"--max-ahead must be at least {PING_EVERY_S:g}")
    if args.timeout < 0:
        p.error("--timeout must not be negative")
    return args


async def blocks(args: argparse.Namespace) -> AsyncIterator[tuple[bytes, float]]:
    """(s16le bytes, seconds) blocks of ``--chunk-ms``, read as they are sent (the file is never all in memory).

    A file sets ``args.rate`` and ``args.channels`` before the first block; stdin is read in a thread, so a
    slow pipe never stops the client from reading the server's events.
    """
    if args.input == "-":
        frame = 2 * args.channels
        size = max(1, int(args.rate * args.chunk_ms / 1000)) * frame
        while data := await asyncio.to_thread(sys.stdin.buffer.read, size):
            data = data[: len(data) - len(data) % frame]
            if data:
                yield data, len(data) / (frame * args.rate)
        return
    import soundfile as sf

    with sf.SoundFile(args.input) as f:
        args.rate, args.channels = f.samplerate, f.channels
        step = max(1, int(f.samplerate * args.chunk_ms / 1000))
        for block in f.blocks(blocksize=step, dtype="int16", always_2d=True):
            yield np.ascontiguousarray(block).astype("<i2").tobytes(), len(block) / f.samplerate


class Screen:
    """Partial rewritten in place on a terminal; finals committed as lines."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.width = shutil.get_terminal_size().columns

    def partial(self, text: str) -> None:
        if self.tty:
            shown = text[-(self.width - 4):] if len(text) > self.width - 4 else text
            sys.stdout.write(f"\r\033[2K\033[2m… {shown}\033[0m")
            sys.stdout.flush()

    def final(self, event: dict[str, Any]) -> None:
        stamp = f"[{event['start']:7.2f} - {event['end']:7.2f}]"
        sys.stdout.write(("\r\033[2K" if self.tty else "") + f"{stamp} {event['text']}\n")
        sys.stdout.flush()


class Progress:
    """When the server last showed it is working: an event received or a ping answered."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def touch(self, *_: object) -> None:
        self.at = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.at


async def send_audio(ws: ClientConnection, args: argparse.Namespace, audio: AsyncIterator[tuple[bytes, float]],
                     progress: Progress) -> None:
    """Send the audio (at real time unless ``--fast``) with at most ``--max-ahead`` seconds unanswered, then stop."""
    t0 = time.monotonic()
    sent = since_ping = 0.0
    pongs: deque[asyncio.Future[float]] = deque()  # one per PING_EVERY_S of audio sent, oldest first
    async for data, seconds in audio:
        await ws.send(data)
        sent += seconds
        since_ping += seconds
        if since_ping >= PING_EVERY_S:
            since_ping = 0.0
            pong = asyncio.ensure_future(await ws.ping())
            pong.add_done_callback(progress.touch)
            pongs.append(pong)
            while len(pongs) * PING_EVERY_S > args.max_ahead:  # the server is behind: wait for it
                await pongs.popleft()
        if not args.fast:
            await asyncio.sleep(max(0.0, t0 + sent - time.monotonic()))
    await ws.send(json.dumps({"type": "stop"}))


async def show_events(ws: ClientConnection, args: argparse.Namespace, progress: Progress) -> int:
    """Print events until the server closes; 1 if it sent an error event."""
    screen = Screen()
    code = 0
    async for raw in ws:
        progress.touch()
        event = json.loads(raw)
        if args.jsonl:
            print(json.dumps(event), flush=True)
        elif event["type"] == "partial":
            screen.partial(event["text"])
        elif event["type"] == "final":
            screen.final(event)
        elif event["type"] == "error":
            print(f"\ncaption: server error {event['code']}: {event['message']}", file=sys.stderr)
            code = 1
    return code


async def stream(ws: ClientConnection, args: argparse.Namespace, audio: AsyncIterator[tuple[bytes, float]]) -> int:
    """Run the sender and the receiver side by side; watch that the server keeps making progress."""
    progress = Progress()
    receiver = asyncio.create_task(show_events(ws, args, progress))
    sender = asyncio.create_task(send_audio(ws, args, audio, progress))
    try:
        while not receiver.done():
            await asyncio.wait({receiver}, timeout=1.0)
            if sender.done() and sender.exception() is not None and not receiver.done():
                exc = sender.exception()
                if not isinstance(exc, ConnectionClosed):  # closed: the receiver says how
                    print(f"caption: cannot read {args.input}: {exc}", file=sys.stderr)
                    return 1
            if args.timeout and progress.idle_for() > args.timeout and not receiver.done():
                print(f"caption: the server sent nothing and answered no ping for {args.timeout:g} s; giving up",
                      file=sys.stderr)
                return 1
        return receiver.result()
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)


async def main_async(args: argparse.Namespace) -> int:
    url = args.url
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    audio = blocks(args)
    first = await anext(audio, None)
    if first is None:
        print("caption: no audio in input", file=sys.stderr)
        return 1

    async def all_blocks() -> AsyncIterator[tuple[bytes, float]]:
        assert first is not None
        yield first
        async for block in audio:
            yield block

    try:
        # No keepalive of its own: its pings would wait behind the audio in flight, and a server that is
        # behind is not a dead one. The flow-control pings and --timeout tell a dead server instead.
        async with connect(url, additional_headers=headers, max_size=None, ping_interval=None) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") == "error":
                print(f"caption: server refused: {ready['message']}", file=sys.stderr)
                return 1
            start = {"type": "start", "sample_rate": args.rate, "encoding": "s16le", "channels": args.channels}
            if args.name:
                start["name"] = args.name
            if not (args.jsonl or sys.stdout.isatty()):
                start["partials"] = False  # only a terminal shows them: the server need not form them for a file

            await ws.send(json.dumps(start))
            return await stream(ws, args, all_blocks())
    except InvalidStatus as exc:
        status = exc.response.status_code
        hint = " (wrong or missing --token)" if status == 401 else ""
        print(f"caption: the server answered HTTP {status}{hint}", file=sys.stderr)
    except (OSError, ConnectionClosed) as exc:
        print(f"caption: cannot stream to {url}: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(main_async(parse_args(argv)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
