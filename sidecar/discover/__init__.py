"""Static discovery of duplicate implementations: read a backend's source with ``ast`` (never import
it) and propose a draft path map. Import-light on purpose: stdlib only, no backend or sidecar runtime.
"""

from sidecar.discover.cli import main, run
from sidecar.discover.discovery import DiscoveryError, discover
from sidecar.discover.model import Discovery, RoleProposal
from sidecar.discover.render import pathmap_dict, render_json, render_yaml

__all__ = ["Discovery", "DiscoveryError", "RoleProposal", "discover", "main", "pathmap_dict",
           "render_json", "render_yaml", "run"]
