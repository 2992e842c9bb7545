"""The protocols the daemon speaks on a connection, one module each, all behind :class:`~streamer.aio.host.StreamHost`.

:mod:`~streamer.aio.protocols.base` holds what they share (admission, the receive loop with its
idle timeout, errors, a stream's own decoder); :mod:`~streamer.aio.protocols.native`,
:mod:`~streamer.aio.protocols.vosk` and :mod:`~streamer.aio.protocols.realtime` are websocket
protocols, :mod:`~streamer.aio.protocols.viewer` the viewers at ``/v1/listen/NAME`` and
:mod:`~streamer.aio.protocols.wyoming` Home Assistant's protocol on its own listener. A new
protocol is one module here plus one route in :mod:`streamer.aio.server`.
"""
