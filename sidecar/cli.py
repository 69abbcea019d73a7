"""``pathwatch`` command line: ``pathwatch sidecar --config FILE``, ``pathwatch report`` and
``pathwatch discover PACKAGE_DIR`` (docs/discover.md).

Exit codes: 0 done (after a clean drain on SIGTERM/SIGINT), 1 runtime failure (a port taken, the
store unreadable, spans left unprocessed, incidents not written at shutdown), 2 bad usage or
configuration (the message names the key), 141 (128 + SIGPIPE) the reader of the output went away
before it was written (``pathwatch report | head -1``), without a traceback; ``sidecar``: 130 / 143
(128 + SIGINT / SIGTERM) the same signal again during the shutdown cut it short (``app.run``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: the reader of stdout has gone: what a shell reports for a command ended by SIGPIPE
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE
DEFAULT_API = "http://127.0.0.1:9464"
# as sidecar.report.WIDE_HELP (not imported: the parser must not need the sidecar extra's httpx)
REPORT_WIDE_HELP = ("full implementation names and every column, however wide (by default the "
                    "tables fit the terminal, or 120 columns, naming a class by as little of its "
                    "module as tells it apart)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathwatch", description="pathwatch: watch a backend's execution paths for "
        "cross-user bleed, duplicate paths and undelivered events")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sidecar = commands.add_parser("sidecar", help="run the sidecar (OTLP receivers, detectors, API)")
    sidecar.add_argument("--config", metavar="FILE", help="YAML configuration (docs/sidecar.md); "
                         "defaults apply when omitted")
    sidecar.add_argument("--endpoints-file", metavar="FILE",
                         help="once every server listens, write where to FILE (JSON: each endpoint "
                         "setting to its host:port, port 0 resolved to the port it got)")
    report = commands.add_parser("report", help="print the incidents and the path inventory of a "
                                 "running sidecar")
    report.add_argument("--api", default=DEFAULT_API, metavar="URL",
                        help="the sidecar's HTTP API, http:// or https://; host:port alone is "
                        f"http://host:port (default {DEFAULT_API})")
    report.add_argument("--token-env", default="PATHWATCH_API_TOKEN", metavar="NAME",
                        help="environment variable holding the API bearer token (default "
                        "PATHWATCH_API_TOKEN)")
    report.add_argument("--consolidation", action="store_true",
                        help="the consolidation picture: roles, canonical share, paths per entry point, "
                        "callers to migrate, versions, deletable classes")
    report.add_argument("--wide", action="store_true", help=REPORT_WIDE_HELP)
    from sidecar.discover.cli import add_arguments as add_discover_arguments   # stdlib-only, cheap

    add_discover_arguments(commands.add_parser(
        "discover", help="read a backend's source statically (no import) and print a draft path map"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # here, not at exit: stdout to a pipe is block-buffered, and a short output is only written
        # by the interpreter's last flush, after main() returned ("Exception ignored ...", exit 120)
        if sys.stdout is not None:
            sys.stdout.flush()
        return code
    except BrokenPipeError:  # `pathwatch report | head -1`: head has what it wanted, and has gone
        return _output_closed()


def _output_closed() -> int:
    """No traceback for a reader that has gone; stdout is pointed at /dev/null, so that the
    interpreter's last flush of what is still buffered does not fail again at exit."""
    from sidecar.output import discard_output

    discard_output()
    return EXIT_OUTPUT_CLOSED


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if args.command == "discover":  # the standard library only
        from sidecar.discover.cli import execute

        return execute(args)
    try:
        return (_sidecar(args.config, args.endpoints_file) if args.command == "sidecar"
                else _report(args))
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _SIDECAR_EXTRA_MODULES:
            raise
        print(f"pathwatch {args.command}: the module {exc.name!r} is missing: install the sidecar's "
              f"dependencies with  pip install 'pathwatch[sidecar]'", file=sys.stderr)
        return EXIT_USAGE


# what the ``sidecar`` extra brings (pyproject.toml); the backend's ``pathwatch`` has none of them
_SIDECAR_EXTRA_MODULES = frozenset({"grpc", "grpc_status", "google", "httpcore", "httpx",
                                    "prometheus_client", "starlette", "uvicorn", "opentelemetry",
                                    "zstandard"})


def _hold_stop_signals() -> list[int]:
    """SIGTERM and SIGINT received from here until the sidecar sets its own handlers
    (``app.run``), which acts on them then, in order: before, the first half second of a start (the
    imports, the config read) ended the process by the signal, a SIGTERM as if cut short by a
    second one (143) and a SIGINT with a KeyboardInterrupt traceback (a pod deleted as it starts).
    The same signal again exits at once, 128 + its number, as during the shutdown: a config that
    never comes (``--config /dev/stdin``, a FIFO, a hung mount) must stay stoppable; nothing is
    open yet."""
    received: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if signum in received:
            _say(f"pathwatch sidecar: {name} received again before the sidecar started: exiting at once")
            os._exit(128 + signum)
        received.append(signum)
        _say(f"pathwatch sidecar: {name} received while starting: it stops once started ({name} "
             "again exits at once)")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, hold)
    return received


def _say(line: str) -> None:
    """A line on stderr from a signal handler, before logging is set up (one write, never raising)."""
    try:
        os.write(2, f"{line}\n".encode(errors="replace"))
    except OSError:
        pass


def _sidecar(config_path: str | None, endpoints_file: str | None = None) -> int:
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    received = _hold_stop_signals()
    ran = False
    try:
        code = _start_sidecar(config_path, endpoints_file, received)
        ran = code != EXIT_USAGE
        return code
    finally:
        if not ran:  # a configuration error: a caller in this process (a test) keeps its handlers
            for signum, handler in before.items():
                if handler is not None:
                    signal.signal(signum, handler)


def _start_sidecar(config_path: str | None, endpoints_file: str | None, received: list[int]) -> int:
    from sidecar.config import ConfigError, load_config, parse_config

    if config_path == "":  # `--config "$CONFIG"` with CONFIG unset: not the defaults, unseen
        print("pathwatch: configuration error: --config is empty: give the YAML file's path, or leave "
              "--config out for the defaults", file=sys.stderr)
        return EXIT_USAGE
    if endpoints_file == "":
        print("pathwatch: --endpoints-file is empty: give a file's path, or leave it out",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(config_path) if config_path is not None else parse_config({})
        from sidecar.app import run

        return run(config, endpoints_file, received_before=received)
    except ConfigError as exc:
        # errors found once the config is parsed (a token it needs) name the file too
        where = "" if not config_path or config_path in str(exc) else f"{config_path}: "
        message = f"pathwatch: configuration error: {where}{exc}"
        from sidecar.logsetup import writes_json

        if writes_json():  # found once the sidecar logs JSON lines (a token it needs): one of them
            logging.getLogger("pathwatch.sidecar").error("%s", message)
        else:
            print(message, file=sys.stderr)
        return EXIT_USAGE


def _report(args: argparse.Namespace) -> int:
    from sidecar import report

    return report.main(api=args.api, token_env=args.token_env, consolidation=args.consolidation,
                       wide=args.wide)


if __name__ == "__main__":
    sys.exit(main())
