#!/usr/bin/env python3
"""The floor under the daemon's event loop: what receiving the clients' audio costs before streamer does anything.

A front end's CPU per stream (``clients/loadtest.py``) includes the websocket layer's: the kernel's TCP, the event
loop's wake-ups, websockets' frame parsing and permessage-deflate. This measures that part alone, with the load
test's traffic: N clients each send 16-bit speech (espeak-ng) in ``--message-ms`` messages at real time to a server
that only receives and drops them, on the daemon's CPU (``--server-cpu``; the clients on another), and prints the
server's CPU per audio second per stream, and per message, for three servers:

* ``tcp``: a bare uvloop protocol that counts the bytes (the kernel and the loop: no server can go below it),
* ``websockets``: a websockets server (as ``streamer serve`` runs it, on uvloop) without compression,
* ``deflate``: the same with permessage-deflate, as clients negotiate it by default (the daemon's default).

Compare the figures with the daemon's event loop at the same N (``loadtest.py --daemon-cpus 0 --model-server ...``)::

    python clients/wsfloor.py                          # 32, 64, 96 clients, 100 ms messages
    python clients/wsfloor.py --message-ms 20          # a phone call's media

Figures, not assertions; this machine is shared: compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time

import numpy as np
import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from streamer.testing import proc_cpu_seconds, speech_audio

LAYERS = ("tcp", "websockets", "deflate")
WARM_S = 3.0  # the clients' connections and first messages, before the measured span


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--clients", default="32,64,96", help="client counts, in order (default: %(default)s)")
    p.add_argument("--message-ms", type=float, default=100.0, metavar="MS",
                   help="audio per message (default: %(default)g)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured span per server and count (default: 10)")
    p.add_argument("--server-cpu", type=int, default=0, help="the CPU the server runs on (default: 0; the "
                   "clients run on the others)")
    p.add_argument("--serve", choices=LAYERS, help=argparse.SUPPRESS)  # (the server process)
    args = p.parse_args(argv)
    try:
        args.levels = [int(n) for n in args.clients.split(",")]
        if min(args.levels) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--clients {args.clients!r}: give counts of one or more, like 32,64,96")
    if not args.serve and (args.server_cpu not in os.sched_getaffinity(0) or len(os.sched_getaffinity(0)) < 2):
        p.error(f"--server-cpu {args.server_cpu}: this process may run on CPUs {sorted(os.sched_getaffinity(0))}; "
                "give one of them, and leave at least one other for the clients")
    return args


class _Received:
    """What a server took: the audio bytes (the tcp server's) or messages (a websocket server's), and its
    connections still open."""

    count = 0
    open = 0


class _Counter(asyncio.Protocol):
    """The ``tcp`` server's: counts the bytes that come and drops them."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Received.open += 1

    def data_received(self, data: bytes) -> None:
        _Received.count += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        _Received.open -= 1


async def _serve(layer: str) -> None:
    """Serve on a free loopback port: print the port; once stdin closes and the clients left (5 s at most), print
    what came (:class:`_Received`)."""
    loop = asyncio.get_running_loop()
    if layer == "tcp":
        server = await loop.create_server(_Counter, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        async def drop(ws: ServerConnection) -> None:
            _Received.open += 1
            try:
                async for _ in ws:
                    _Received.count += 1
            finally:
                _Received.open -= 1

        ws_server = await serve(drop, "127.0.0.1", 0, compression="deflate" if layer == "deflate" else None,
                                max_size=2**20)
        port = ws_server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes it
    for _ in range(50):
        if not _Received.open:
            break
        await asyncio.sleep(0.1)
    print(_Received.count, flush=True)


async def _client(layer: str, port: int, messages: list[bytes], delay: float, every: float, stop: float) -> int:
    """Send ``messages`` in turn, one every ``every`` seconds, from ``delay`` until ``stop``; what was sent, as
    the server counts it (:class:`_Received`)."""
    await asyncio.sleep(delay)
    sent = 0
    if layer == "tcp":
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        ws = await connect(f"ws://127.0.0.1:{port}", max_size=2**20,
                           compression="deflate" if layer == "deflate" else None)
    due = time.monotonic()
    i = int(delay * 1000)  # clients at different places in the speech
    while due < stop:
        message = messages[i % len(messages)]
        if layer == "tcp":
            writer.write(message)
            sent += len(message)
        else:
            await ws.send(message)
            sent += 1
        i += 1
        due += every
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    if layer == "tcp":
        writer.close()
        await writer.wait_closed()
    else:
        await ws.close()
    return sent


async def measure(layer: str, n: int, args: argparse.Namespace, messages: list[bytes]) -> float:
    """The ``layer`` server's CPU seconds per audio second per stream with ``n`` clients."""
    server = await asyncio.create_subprocess_exec(
        "taskset", "-c", str(args.server_cpu), sys.executable, __file__, "--serve", layer, "--server-cpu",
        str(args.server_cpu), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(await server.stdout.readline())
        every = args.message_ms / 1000
        stop = time.monotonic() + WARM_S + args.seconds + 1.0
        clients = asyncio.gather(*(_client(layer, port, messages, every * k / n, every, stop) for k in range(n)))
        await asyncio.sleep(WARM_S)
        before = proc_cpu_seconds(f"/proc/{server.pid}/stat")
        await asyncio.sleep(args.seconds)
        used = proc_cpu_seconds(f"/proc/{server.pid}/stat") - before
        sent = sum(await clients)
        assert server.stdin is not None
        server.stdin.close()
        received = int(await asyncio.wait_for(server.stdout.readline(), 10))
        if received != sent:  # (the figure would be of less work than the clients asked for)
            raise SystemExit(f"wsfloor: the {layer} server took {received} of the {sent} "
                             f"{'bytes' if layer == 'tcp' else 'messages'} sent")
        return used / (n * float(args.seconds))
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        await server.wait()


async def main_async(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, os.sched_getaffinity(0) - {args.server_cpu})
    speech = speech_audio(30.0)
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    size = int(16000 * args.message_ms / 1000) * 2
    messages = [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]
    print(f"server on CPU {args.server_cpu}, {args.message_ms:g} ms messages; CPU s per audio second per stream "
          f"(µs per message)")
    print(f"{'clients':>7} " + " ".join(f"{layer:>18}" for layer in LAYERS))
    for n in args.levels:
        row = []
        for layer in LAYERS:
            cost = await measure(layer, n, args, messages)
            row.append(f"{cost:.5f} ({cost * args.message_ms * 1000:5.1f})")
        print(f"{n:>7} " + " ".join(f"{cell:>18}" for cell in row), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        uvloop.run(_serve(args.serve))
    else:
        uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
