"""pathwatch sidecar: receives the backend's spans over OTLP and finds bleed, duplicates and lost events."""

__version__ = "0.1.0"
