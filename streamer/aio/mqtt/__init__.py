"""MQTT: the publisher of every stream's events (:mod:`~streamer.aio.mqtt.publisher`) and its connection settings
(:mod:`~streamer.aio.mqtt.settings`)."""

from streamer.aio.mqtt.publisher import MqttPublisher, PublisherThread, running_publisher
from streamer.aio.mqtt.settings import check_settings

__all__ = ["MqttPublisher", "PublisherThread", "check_settings", "running_publisher"]
