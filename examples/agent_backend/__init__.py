"""The demo agent backend, modelled on the reference case (see ``examples/README.md``).

Modules, bottom-up: ``settings`` and ``scenarios`` (switches), ``context`` (per-request contexts),
``registry`` (run -> thread -> user maps), ``sockets`` (the socket manager), ``emitters`` (bridge,
unified emitter, notifier), ``agents`` (the fake workload), ``engines`` (five engine classes),
``wiring`` (which engine and emitter a run gets), ``supervisors``, ``runs`` (one run end to end),
``app`` (HTTP + WebSocket routes) and ``server`` (start it in a subprocess).
"""
