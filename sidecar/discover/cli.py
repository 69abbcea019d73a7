"""``pathwatch discover PACKAGE_DIR``: print a draft path map for a backend's source tree.

Exit codes: 0 on success (also when some files were skipped: they are listed in the output),
2 when the arguments are wrong or PACKAGE_DIR cannot be read at all (missing, not a directory, not listable)
or the output cannot be written; 141 when the reader of stdout went away (SIGPIPE).
"""

from __future__ import annotations

import argparse
import sys

from sidecar.discover.discovery import DiscoveryError, discover
from sidecar.discover.render import render_json, render_yaml
from sidecar.output import write_output
from sidecar.discover.walk import DEFAULT_MAX_FILE_BYTES

EXIT_OK = 0
EXIT_USAGE = 2


def build_parser(prog: str = "pathwatch discover") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Read a backend's source statically (nothing is imported) and propose a "
                               "draft path map of its duplicate implementations.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Also used by ``sidecar.cli`` to hang these options on its ``discover`` subcommand."""
    parser.add_argument("package_dir", metavar="PACKAGE_DIR", help="the backend's package or source folder")
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument("--json", action="store_true", help="a machine-readable report instead of YAML")
    parser.add_argument("--include-tests", action="store_true",
                        help="also read tests/ folders and test_*.py files (skipped by default)")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES, metavar="N",
                        help=f"skip (and report) files larger than N bytes (default {DEFAULT_MAX_FILE_BYTES})")
    parser.add_argument("--show-skipped", type=int, default=20, metavar="N",
                        help="list the first N skipped files in the YAML summary (default 20)")


def execute(args: argparse.Namespace) -> int:
    if not args.package_dir:  # `discover "$DIR"` with DIR unset: Path("") is the current directory
        print("pathwatch discover: PACKAGE_DIR is empty: give the backend's package or source folder "
              "('.' for the current one)", file=sys.stderr)
        return EXIT_USAGE
    if args.max_file_bytes <= 0:
        print(f"pathwatch discover: --max-file-bytes must be positive, got {args.max_file_bytes}", file=sys.stderr)
        return EXIT_USAGE
    try:
        found = discover(args.package_dir, include_tests=args.include_tests, max_file_bytes=args.max_file_bytes)
    except DiscoveryError as exc:
        print(f"pathwatch discover: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text = render_json(found) if args.json else render_yaml(found, skipped_limit=max(0, args.show_skipped))
    if args.output is None:  # `-o ""` is a file that cannot be written, not stdout
        # the path map loader reads UTF-8: on a stdout of another encoding (latin-1, ascii) every
        # non-ASCII character is escaped instead (\xe9: still the same name inside the draft's
        # double-quoted YAML strings), neither written in that encoding nor a UnicodeEncodeError
        encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding != "utf8" and sys.stdout is not None and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(encoding="ascii", errors="backslashreplace")
        # a full disk or a closed stdout: one line and exit 2, as for --output
        return EXIT_OK if write_output(text, "discover", "the draft") else EXIT_USAGE
    try:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        print(f"pathwatch discover: cannot write {args.output!r}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    roles = ", ".join(f"{role.name} ({len(role.members)})" for role in found.roles) or "none"
    print(f"pathwatch discover: wrote {args.output}: roles {roles}; "
          f"{found.files_read} modules read, {len(found.skipped)} files skipped", file=sys.stderr)
    return EXIT_OK


def run(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    return execute(args)


def main() -> None:
    sys.exit(run(sys.argv[1:]))
