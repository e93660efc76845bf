"""Process set-up shared by meshd, the sidecar and the gateway: JSON logs and the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

# structlog's optional extras, imported by structlog when installed (rich comes with meshctl,
# greenlet with some test tools): JSON logs on asyncio never use them, and the console ones cost
# every sidecar ~6 MiB.
_CONSOLE_EXTRAS = ("rich", "colorama", "better_exceptions", "greenlet")


def _import_structlog():
    """Import structlog with its console extras hidden; other code can still import them later."""
    hidden = [name for name in _CONSOLE_EXTRAS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # makes `import name` raise ImportError, which structlog expects
    try:
        import structlog as module
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]
    return module


structlog = _import_structlog()  # first, in the processes' import order: see sidecar.cli, gateway.cli


def configure_logging(process: str) -> None:
    """structlog JSON lines on stderr, level from MESH_LOG_LEVEL (default info)."""
    level = getattr(logging, os.environ.get("MESH_LOG_LEVEL", "info").upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)


def stop_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (`docker stop`, Ctrl-C): await it to begin a clean stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_forever(main) -> None:
    """Run a coroutine function on uvloop when available (the data path is ~40% faster on it)."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep meshctl tests light
        runner = asyncio.run
    try:
        runner(main())
    except KeyboardInterrupt:
        pass


def wants_run(prog: str, description: str, run_help: str, argv: list[str] | None = None) -> bool:
    """The nodes' command line: True for `<prog> run`; anything else goes to argparse (help, or a
    usage error naming what is wrong). argparse is imported only then: with the HelpFormatter it
    builds it loads shutil, bz2 and lzma, ~0.6 MiB of every node for one fixed command."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["run"]:
        return True
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help=run_help)
    return parser.parse_args(args).command == "run"
