"""A stand-in Kubernetes API server for helm's ``lookup``: discovery of the kinds the chart renders and
one Secret, 404 for anything else. A stand-in because a real API server (kube-apiserver with etcd) does
not run here; helm asks it only what this answers (``helm template --dry-run=server --is-upgrade
--disable-openapi-validation``: the version, discovery, and a GET of each object looked up)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KINDS = {"v1": ["Secret", "ConfigMap", "Service", "PersistentVolumeClaim"],
         "apps/v1": ["Deployment", "StatefulSet"], "networking.k8s.io/v1": ["NetworkPolicy"],
         "monitoring.coreos.com/v1": ["PodMonitor", "ServiceMonitor", "PrometheusRule"]}


def _discovery(path: str) -> dict | None:
    if path == "/version":
        return {"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        groups = [gv for gv in KINDS if "/" in gv]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": "v1"}],
             "preferredVersion": {"groupVersion": gv, "version": "v1"}} for gv in groups]}
    group_version = path.removeprefix("/api/").removeprefix("/apis/")
    if group_version in KINDS:
        return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
            {"name": kind.lower() + "s", "singularName": kind.lower(), "namespaced": True, "kind": kind,
             "verbs": ["get", "list"]} for kind in KINDS[group_version]]}
    return None


@contextmanager
def kube_api_with_secret(tmp_path: Path, namespace: str, name: str, data: dict[str, str]) -> Iterator[Path]:
    """Serve a Secret ``namespace/name`` with ``data`` (base64 values) on 127.0.0.1; yields a
    kubeconfig for it."""
    secret_path = f"/api/v1/namespaces/{namespace}/secrets/{name}"
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": name, "namespace": namespace}, "data": data}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            body = _discovery(path) or (secret if path == secret_path else None)
            code = 200 if body else 404
            if body is None:
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                        "code": 404}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "stand-in", "user": {"token": "stand-in"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in",
                                                      "namespace": namespace}}]}))
    try:
        yield kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
