"""Thin asyncio layers around the sans-I/O engine: model worker, websocket server, MQTT, sources."""
