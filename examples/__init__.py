"""Examples: a demo agent backend with switchable seeded bugs, and a traffic driver.

- ``examples.agent_backend``: the FastAPI backend (``uvicorn examples.agent_backend.app:app``),
  modelled on the reference case (the scenario table in ``examples/README.md``); it knows nothing of pathwatch and
  is instrumented only through ``examples/agent_backend/pathmap.yaml``.
- ``examples.traffic``: N simulated users on real WebSocket connections; returns what each client
  really received (the ground truth the sidecar's findings are compared with).
"""
