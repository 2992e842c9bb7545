"""The plain HTTP side of the daemon's ports: the front (health, metrics, the caption page, the checks before a
websocket upgrade), the OpenAI-compatible endpoints, origins and tokens, connection limits and TLS."""
