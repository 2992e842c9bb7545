#!/usr/bin/env python3
"""Live captions in a terminal from a streamer daemon.

Streams an audio file (any format libsndfile reads) or raw s16le PCM from stdin to
``ws://HOST:PORT/v1/stream`` and shows the captions as they come: the partial line is
rewritten in place, each final is committed as a line with its time.

    python clients/caption.py talk.wav                       # at real time
    python clients/caption.py --fast talk.wav                # as fast as the server takes it
    arecord -f S16_LE -r 16000 -c 1 | python clients/caption.py --rate 16000 -
    python clients/caption.py --url ws://host:8765/v1/stream --token SECRET talk.flac
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Show live captions from a streamer daemon in the terminal.")
    p.add_argument("input", help="audio file, or '-' for raw s16le PCM on stdin")
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/stream", help="daemon URL (default: %(default)s)")
    p.add_argument("--token", help="auth token, if the daemon requires one")
    p.add_argument("--fast", action="store_true", help="send as fast as possible instead of at real time")
    p.add_argument("--rate", type=int, default=16000, help="sample rate of stdin PCM (default: 16000)")
    p.add_argument("--channels", type=int, default=1, help="channels of stdin PCM (default: 1)")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per message (default: 100)")
    p.add_argument("--name", help="stream name (MQTT topic / viewer name)")
    p.add_argument("--jsonl", action="store_true", help="print raw events as JSON lines instead")
    return p.parse_args(argv)


def blocks(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Yield (s16le bytes, seconds) blocks and set args.rate/args.channels from the file."""
    if args.input == "-":
        size = int(args.rate * args.chunk_ms / 1000) * 2 * args.channels
        while data := sys.stdin.buffer.read(size):
            yield data[: len(data) - len(data) % (2 * args.channels)], len(data) / (2 * args.channels * args.rate)
        return
    import soundfile as sf

    data, rate = sf.read(args.input, dtype="int16", always_2d=True)
    args.rate, args.channels = rate, data.shape[1]
    step = int(rate * args.chunk_ms / 1000)
    for i in range(0, len(data), step):
        block = data[i : i + step]
        yield np.ascontiguousarray(block).astype("<i2").tobytes(), len(block) / rate


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

    def final(self, event: dict) -> None:
        stamp = f"[{event['start']:7.2f} - {event['end']:7.2f}]"
        sys.stdout.write(("\r\033[2K" if self.tty else "") + f"{stamp} {event['text']}\n")
        sys.stdout.flush()


async def send_audio(ws, args: argparse.Namespace, gen) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    sent = 0.0
    for data, seconds in gen:
        await ws.send(data)
        sent += seconds
        if not args.fast:
            await asyncio.sleep(max(0.0, t0 + sent - time.monotonic()))
    await ws.send(json.dumps({"type": "stop"}))


async def main_async(args: argparse.Namespace) -> int:
    url = args.url
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    gen = blocks(args)
    first = next(gen, None)
    if first is None:
        print("caption: no audio in input", file=sys.stderr)
        return 1
    screen = Screen()
    try:
        async with connect(url, additional_headers=headers, max_size=None) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") == "error":
                print(f"caption: server refused: {ready['message']}", file=sys.stderr)
                return 1
            start = {"type": "start", "sample_rate": args.rate, "encoding": "s16le", "channels": args.channels}
            if args.name:
                start["name"] = args.name
            await ws.send(json.dumps(start))

            def all_blocks():  # type: ignore[no-untyped-def]
                yield first
                yield from gen

            sender = asyncio.create_task(send_audio(ws, args, all_blocks()))
            code = 0
            async for raw in ws:
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
            await asyncio.gather(sender, return_exceptions=True)
            return code
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
