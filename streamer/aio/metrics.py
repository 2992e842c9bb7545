"""Prometheus metrics of one daemon (its own registry, so tests can run several daemons).

A daemon of several front-end processes (``server.processes``) runs prometheus-client's multiprocess
mode: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for every process it starts, each process
writes its values to files there, and :meth:`MqttMetrics.render` in any process sums them up, so
``/metrics`` describes the whole daemon whichever process answers. Counters and histograms of a
process that died stay counted (its files stay); gauges say how they combine (``multiprocess_mode``:
``livesum`` for the open streams, ``livemin`` for the worker being alive, ``livemax`` for lag and
RTF), counting only processes alive now (the supervisor calls ``mark_process_dead``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from streamer.engine import Window

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether this process is one of several that share their metrics (``server.processes`` > 1)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class MqttMetrics:
    """The metrics of an MQTT publisher; a daemon's :class:`Metrics` has them too.

    The supervisor of several front-end processes publishes to MQTT for all of them and has only these.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.mqtt_dropped = Counter("streamer_mqtt_dropped_total", "MQTT messages dropped (queue full)",
                                    ["kind"], registry=r)
        self.mqtt_published = Counter("streamer_mqtt_published_total", "MQTT messages published", ["kind"],
                                      registry=r)
        self.mqtt_connected = Gauge("streamer_mqtt_connected", "1 while connected to the broker", registry=r,
                                    multiprocess_mode="livemax")

    def render(self) -> bytes:
        """The text exposition: this registry's metrics, or with several processes all of theirs."""
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class Metrics(MqttMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.streams_active = Gauge("streamer_streams_active", "Streams open now", ["protocol"], registry=r,
                                    multiprocess_mode="livesum")
        self.streams_total = Counter("streamer_streams_total", "Streams accepted", ["protocol"], registry=r)
        self.streams_rejected = Counter("streamer_streams_rejected_total", "Streams refused", ["reason"],
                                        registry=r)
        self.audio_seconds = Counter("streamer_audio_seconds_total", "Audio received, in seconds", registry=r)
        self.windows = Counter("streamer_windows_total", "Windows run by the model", registry=r)
        self.model_seconds = Counter("streamer_model_seconds_total", "Wall time spent in model calls",
                                     registry=r)
        self.window_audio_seconds = Counter("streamer_window_audio_seconds_total",
                                            "Audio seconds inside the windows run", registry=r)
        self.provisional_windows = Counter("streamer_provisional_windows_total",
                                           "Provisional windows run (early partials before a stream's first full "
                                           "window and partial refreshes between full windows; also counted in "
                                           "streamer_windows_total)", registry=r)
        self.refresh_windows = Counter("streamer_refresh_windows_total",
                                       "Partial refreshes between full windows: run on spare model time, or skipped "
                                       "while the model was busy", ["outcome"], registry=r)
        self.provisional_model_seconds = Counter("streamer_provisional_model_seconds_total",
                                                 "Model wall time spent on provisional windows (each batch's time "
                                                 "shared by window audio)", registry=r)
        self.batch_size = Histogram("streamer_batch_size", "Windows per model call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_wait = Histogram("streamer_queue_wait_seconds", "Time a window waited for the model",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.partial_latency = Histogram("streamer_partial_latency_seconds",
                                         "From the audio that made a window ready to its partial",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.final_latency = Histogram("streamer_final_latency_seconds",
                                       "From the audio that made a window ready to its final",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.events = Counter("streamer_events_total", "Events sent", ["type"], registry=r)
        self.errors = Counter("streamer_errors_total", "Errors sent to clients", ["code"], registry=r)
        self.rtf = Gauge("streamer_rtf", "Model seconds per second of stream audio (lower is faster; with "
                         "several processes, the slowest one's)", registry=r, multiprocess_mode="livemax")
        self.stream_lag = Gauge("streamer_stream_lag_seconds",
                                "How long the oldest window of a stream has waited for the model", ["stream"],
                                registry=r, multiprocess_mode="livemax")
        self.worker_alive = Gauge("streamer_worker_alive", "1 while the model worker runs (with several "
                                  "processes: while every process's does)", registry=r, multiprocess_mode="livemin")
        self._model_s = 0.0
        self._audio_s = 0.0

    def add_audio(self, seconds: float) -> None:
        self.audio_seconds.inc(seconds)
        self._audio_s += seconds
        self._update_rtf()

    def add_model_time(self, seconds: float) -> None:
        self.model_seconds.inc(seconds)
        self._model_s += seconds
        self._update_rtf()

    def add_provisional(self, windows: Sequence[Window], model_seconds: float) -> None:
        """Count the provisional windows of a batch that took ``model_seconds``; call after each model call."""
        early = sum(len(w.samples) for w in windows if w.provisional)
        if early:
            self.provisional_windows.inc(sum(1 for w in windows if w.provisional))
            self.provisional_model_seconds.inc(model_seconds * early / sum(len(w.samples) for w in windows))

    @property
    def rtf_now(self) -> float:
        """This process's model seconds per second of stream audio so far (what ``streamer_rtf`` shows here)."""
        return self._model_s / self._audio_s if self._audio_s > 0 else 0.0

    def _update_rtf(self) -> None:
        if self._audio_s > 0:
            self.rtf.set(self._model_s / self._audio_s)
