"""The detector families: spans in, findings out (see docs/rules.md for the rule catalog).

``build_detectors`` makes the standard set for the pipeline. The consolidation inventory is one of
them (it raises nothing); pass your own ``Inventory`` to share it with the API. Adding a detector:
README.md, "Adding a role or a detector".
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from sidecar.config import RulesConfig, StateConfig
from sidecar.detectors.bleed import BleedDetector
from sidecar.detectors.delivery import DeliveryDetector
from sidecar.detectors.duplicates import DuplicatesDetector
from sidecar.inventory import Inventory
from sidecar.telemetry import Telemetry
from sidecar.types import Detector

__all__ = ["BleedDetector", "DeliveryDetector", "DuplicatesDetector", "Inventory", "build_detectors"]


def build_detectors(rules: RulesConfig, state: StateConfig, telemetry: Telemetry | None = None, *,
                    inventory: Inventory | None = None,
                    deploys: Detector | None = None, started_ns: int | None = None,
                    earlier_processes: Collection[str] = (),
                    note_process: Callable[[str], None] | None = None) -> list[Detector]:
    """``deploys``: a ``sidecar.detectors.deploys.DeployDetector`` to run last (the consolidation
    workflow; it is also the pipeline's finding observer). ``started_ns``: when the sidecar started
    (the runs in flight then are not judged for their events, see ``DeliveryDetector``), with
    ``earlier_processes`` and ``note_process`` (the backend processes an earlier sidecar process on
    the same state got spans of, and where to note those this one gets)."""
    if inventory is None:
        inventory = Inventory(rules, state, telemetry)
    detectors: list[Detector] = [
        BleedDetector(rules, state, telemetry),
        DuplicatesDetector(rules, state, telemetry),
        DeliveryDetector(rules, state, telemetry, started_ns, earlier_processes, note_process),
        inventory,
    ]
    if deploys is not None:
        detectors.append(deploys)
    return detectors
