"""OTLP receivers (gRPC and HTTP): decode once at the edge, hand batches to the pipeline, map errors."""

from sidecar.receiver.decode import DecodedBatch, MalformedRequest, SpanDecoder
from sidecar.receiver.export import ExportHandler, ExportResult, ExportStatus
from sidecar.receiver.grpc_server import GrpcReceiver
from sidecar.receiver.http_server import HttpReceiver, OtlpHttpApp
from sidecar.receiver.replays import ReplayGuard

__all__ = [
    "DecodedBatch",
    "ExportHandler",
    "ExportResult",
    "ExportStatus",
    "GrpcReceiver",
    "HttpReceiver",
    "MalformedRequest",
    "OtlpHttpApp",
    "ReplayGuard",
    "SpanDecoder",
]
