import threading
from pathlib import Path

import pytest

from sidecar.threads import name_os_thread

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux /proc only")


def _os_name_of(thread_name: str, name: str | None = None) -> str:
    seen: list[str] = []

    def body() -> None:
        name_os_thread(name)
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    thread = threading.Thread(target=body, name=thread_name)
    thread.start()
    thread.join()
    return seen[0]


def test_the_os_thread_takes_the_python_name_shortened_to_fit():
    assert _os_name_of("pathwatch-pipeline") == "pw-pipeline"
    assert _os_name_of("pathwatch-grpc_0") == "pw-grpc_0"
    assert _os_name_of("x", "a-name-longer-than-fifteen-bytes") == "a-name-longer-t"


def test_the_pipeline_names_its_thread():
    from prometheus_client import CollectorRegistry

    from sidecar.pipeline import Pipeline
    from sidecar.telemetry import Telemetry

    class Nothing:
        def record(self, findings):
            return []

        def notify(self, incidents):
            pass

    pipeline = Pipeline(detectors=[], incidents=Nothing(), alerts=Nothing(),
                        telemetry=Telemetry(CollectorRegistry()), max_pending_spans=10)
    pipeline.start()
    try:
        native_id = pipeline._thread.native_id
        assert Path(f"/proc/self/task/{native_id}/comm").read_text().strip() == "pw-pipeline"
    finally:
        assert pipeline.stop(5)
