# syntax=docker/dockerfile:1
# The pathwatch sidecar image, the chart's default `image` (ghcr.io/pathwatch/pathwatch:<appVersion>):
#   docker build -t ghcr.io/pathwatch/pathwatch:0.1.0 .
# The chart runs it as `pathwatch sidecar --config /etc/pathwatch/sidecar.yaml` (its `command`, the same
# as CMD here), as user and group 10001 (values.yaml securityContext) on a read-only root filesystem;
# the incident store lives on the volume at /var/lib/pathwatch, /tmp is an emptyDir.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# only what the package is built from (pyproject.toml: packages instrumentation*, sidecar*)
COPY pyproject.toml README.md ./
COPY instrumentation/ instrumentation/
COPY sidecar/ sidecar/
# the `sidecar` extra: its receiver, API and metrics (the base install has only the instrumentation)
RUN python -m venv /opt/pathwatch \
 && /opt/pathwatch/bin/pip install ".[sidecar]" \
 && /opt/pathwatch/bin/pathwatch --help > /dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 pathwatch \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/pathwatch \
      --shell /usr/sbin/nologin pathwatch \
 && mkdir -p /etc/pathwatch /var/lib/pathwatch \
 && chown 10001:10001 /var/lib/pathwatch
COPY --from=build /opt/pathwatch /opt/pathwatch
ENV PATH=/opt/pathwatch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/pathwatch
# OTLP/gRPC, OTLP/HTTP, API and /metrics (the chart's `ports`)
EXPOSE 4317 4318 9464
CMD ["pathwatch", "sidecar", "--config", "/etc/pathwatch/sidecar.yaml"]
