import gc
import tracemalloc

import pytest
from prometheus_client import CollectorRegistry

from sidecar import gcpauses
from sidecar.gcpauses import GcPauseCollector


def test_collector_pauses_are_counted_per_generation_and_the_hook_is_removed():
    registry = CollectorRegistry()
    pauses = GcPauseCollector().install(registry)
    try:
        gc.collect()  # a full collection: generation 2
        gc.collect(0)
        count = registry.get_sample_value
        assert count("pathwatch_gc_pause_seconds_count", {"generation": "2"}) >= 1
        assert count("pathwatch_gc_pause_seconds_count", {"generation": "0"}) >= 1
        assert count("pathwatch_gc_pause_seconds_sum", {"generation": "2"}) > 0
        infinite = count("pathwatch_gc_pause_seconds_bucket", {"generation": "2", "le": "+Inf"})
        assert infinite == count("pathwatch_gc_pause_seconds_count", {"generation": "2"})
    finally:
        pauses.uninstall(registry)
    assert pauses.callback not in gc.callbacks
    assert registry.get_sample_value("pathwatch_gc_pause_seconds_count", {"generation": "2"}) is None
    pauses.uninstall(registry)  # a second shutdown does nothing


def test_a_sidecar_that_cannot_start_leaves_no_hook_behind(tmp_path):
    from sidecar.app import Sidecar
    from sidecar.config import SidecarConfig
    from sidecar.incidents import IncidentStoreError

    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the incident store's directory should be
    hooks = list(gc.callbacks)
    config = SidecarConfig.model_validate({"incidents": {"path": str(blocked / "incidents.db")}})
    with pytest.raises(IncidentStoreError, match="is not a directory"):  # that failure, not any
        Sidecar(config)
    assert gc.callbacks == hooks


def test_every_pause_between_scrapes_is_counted_in_fixed_memory():
    # /tmp/s19/labels/repro_gc_pauses_forgotten.py: pauses beyond 10,000 between two scrapes were
    # forgotten, silently
    pauses = GcPauseCollector()
    registry = CollectorRegistry()
    registry.register(pauses)

    def pause(times: int, generation: int) -> None:
        for _ in range(times):
            pauses.callback("start", {"generation": generation})
            pauses.callback("stop", {"generation": generation})

    pause(20_000, 0)
    pause(3, 2)
    count = registry.get_sample_value
    assert count("pathwatch_gc_pause_seconds_count", {"generation": "0"}) == 20_000
    assert count("pathwatch_gc_pause_seconds_bucket", {"generation": "0", "le": "+Inf"}) == 20_000
    assert count("pathwatch_gc_pause_seconds_count", {"generation": "2"}) == 3
    # what the collector holds does not grow with the pauses nobody scraped
    tracemalloc.start()
    try:
        pause(1000, 1)  # warm up (the generation's bucket counts pass the small ints CPython caches)
        before = tracemalloc.take_snapshot()
        pause(50_000, 1)
        grown = tracemalloc.take_snapshot().compare_to(before, "filename")
    finally:
        tracemalloc.stop()
    assert sum(stat.size_diff for stat in grown if stat.traceback[0].filename == gcpauses.__file__) < 1024
    assert count("pathwatch_gc_pause_seconds_count", {"generation": "1"}) == 51_000
