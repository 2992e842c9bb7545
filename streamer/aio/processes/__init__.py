"""The daemon as processes: the wiring of one daemon (:mod:`~streamer.aio.processes.run`), several front-end
processes and their supervisor, a local model server, and systemd."""
