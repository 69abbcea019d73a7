import gc

import pytest
from prometheus_client import CollectorRegistry

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
    with pytest.raises(IncidentStoreError, match="cannot open"):  # that failure, not any
        Sidecar(config)
    assert gc.callbacks == hooks


def test_pauses_between_scrapes_are_bounded():
    pauses = GcPauseCollector()
    for _ in range(20_000):
        pauses.callback("start", {"generation": 0})
        pauses.callback("stop", {"generation": 0})
    registry = CollectorRegistry()
    registry.register(pauses)
    assert registry.get_sample_value("pathwatch_gc_pause_seconds_count", {"generation": "0"}) == 10_000
