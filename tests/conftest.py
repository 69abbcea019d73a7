import sys
from pathlib import Path

# tests import helpers as `from tests.support import ...`; the repository root must be importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
