"""``python -m sidecar.discover PACKAGE_DIR``."""

from sidecar.discover.cli import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
