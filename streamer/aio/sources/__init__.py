"""Audio captured by the daemon itself: sound devices (:mod:`~streamer.aio.sources.capture`) and the
``[[sources]]`` that caption them into named streams (:mod:`~streamer.aio.sources.mic`)."""
