"""Thin asyncio layers around the sans-I/O engine: they move bytes in and events out, and decide nothing.

    server.py      the daemon: one model, one batching worker, the listeners, the services; routes connections
    host.py        what a handler sees of the daemon (StreamHost): handlers never import server.py
    stream.py      live streams: audio in, events out, the model reached through the worker
    worker.py      the batching model worker (one thread owns the model)
    hub.py         events by stream name, to viewers and sinks (MQTT)
    metrics.py     Prometheus metrics
    loop.py        which event loop runs the daemon (uvloop where installed)
    protocols/     one module per protocol on a connection (native, vosk, realtime, viewer, wyoming) and base.py,
                   what they share (admission, the receive loop with its idle timeout, errors, names, words.py)
    http/          plain HTTP on the websocket ports: the front, the OpenAI endpoints, uploads, origins and
                   tokens, connection limits, TLS
    mqtt/          the MQTT publisher and its connection settings
    sources/       audio the daemon captures itself (sound devices, [[sources]])
    processes/     the daemon as processes: run.py (what streamer serve runs), the supervisor of several
                   front-end processes and their typed messages, a local model server, systemd

A new protocol is one module in protocols/ plus one route in server.py.
"""
