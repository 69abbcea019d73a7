"""The consolidation workflow at run time (docs/consolidation.md).

- ``paths``: per run, the ordered implementations it went through; per entry point the distinct
  paths with counts and shares;
- ``callers``: per implementation, the functions that still call it (the migration to-do list);
- ``deploys``: runs, findings and paths per backend ``service.version``, each version compared with
  the previous one;
- ``verdicts``: per implementation the last call, persisted, and the safe-to-delete verdict.

``sidecar.detectors.deploys.DeployDetector`` feeds them from the span stream and the pipeline's
findings, raises the ``deploy.*`` findings and answers ``/api/v1/consolidation``.
"""

from sidecar.consolidation.callers import CallerIndex
from sidecar.consolidation.deploys import Thresholds, VersionBook
from sidecar.consolidation.paths import CompletedPath, PathTracker, describe, path_id
from sidecar.consolidation.verdicts import ActivityLedger, LedgerError, ledger_path_beside

__all__ = ["ActivityLedger", "CallerIndex", "CompletedPath", "LedgerError", "PathTracker",
           "Thresholds", "VersionBook", "describe", "ledger_path_beside", "path_id"]
