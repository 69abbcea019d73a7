"""End-to-end tests: real sidecar processes, instrumented apps, real clients (see each module)."""
