"""Process set-up shared by meshd, the sidecar and the gateway: JSON logs and the event loop."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import datetime
import json
import logging
import os
import signal
import sys
import threading
from json.encoder import encode_basestring_ascii as json_str
from typing import Any

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
get_contextvars = structlog.contextvars.get_contextvars
_get_running_loop = asyncio._get_running_loop   # None off a loop; no exception to raise and catch
_thread_id = threading.get_ident


def configure_logging(process: str) -> None:
    """structlog JSON lines on stderr, level from MESH_LOG_LEVEL (default info); EventLines write
    theirs the same way past the chain."""
    global _lines
    level = getattr(logging, os.environ.get("MESH_LOG_LEVEL", "info").upper(), logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    render = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=log_processors(render),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)
    if _lines is not None:
        _lines.flush()
    _lines = LogLines(sys.stderr, level, render)


def log_processors(render: Any) -> list:
    """configure_logging's processor chain, ending in `render` (its JSONRenderer)."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _flush_held_lines,
        render,
    ]


def _flush_held_lines(logger: Any, name: str, event: dict) -> dict:
    """A chain step: the EventLines' held lines go out before this event's, so the stream keeps
    the order in which events happened."""
    lines = _lines
    if lines is not None and lines.held:
        lines.flush()
    return event


@atexit.register
def _flush_at_exit() -> None:
    if _lines is not None:
        _lines.flush()


class LogLines:
    """What configure_logging's processor chain adds after an event's own fields, and where the line
    goes: the way past the chain for EventLine. On an event loop, lines are held and written together
    (after FLUSH_SECONDS, at MAX_HELD lines, before the chain writes any other event, and at exit), as
    Envoy flushes its access log: one write system call for many lines."""

    def __init__(self, stream: Any, level: int, render: Any):
        self.level = level
        self.render = render                        # the chain's JSONRenderer
        self.out = structlog.WriteLogger(stream)    # under structlog's lock of the stream
        self.second: tuple[int, str] = (-1, "")     # (Unix second, its ISO 8601 text up to the seconds)
        self.held: list[str] = []                   # lines not yet written, oldest first
        self.flush_on: Any = None                   # the event loop whose timer will flush them
        self.flush_thread = 0                       # the thread that loop runs in

    def add(self, line: str) -> None:
        """Write `line` now, or hold it for the flush that the running event loop has due."""
        held = self.held
        held.append(line)
        if len(held) >= MAX_HELD:
            self.flush()
            return
        flush_on = self.flush_on
        # The loop of the due flush runs, in this thread: it is this thread's running loop (one at a
        # time per thread), found without asking asyncio, whose answer costs a getpid() system call.
        if flush_on is not None and self.flush_thread == _thread_id() and flush_on.is_running():
            return
        loop = _get_running_loop()
        if loop is None:   # no loop (a tool, a test, another thread): nothing would flush later
            self.flush()
        elif loop is not flush_on:   # the first held line, or a loop that ended left lines held
            self.flush_on = loop
            self.flush_thread = _thread_id()
            loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write the held lines, oldest first, in one write."""
        self.flush_on = None
        held = self.held
        if held:
            # the same list stays: a line another thread adds meanwhile is kept for the next flush
            lines = held[:]
            del held[:len(lines)]
            self.out.msg("\n".join(lines))

    def second_text(self, second: int) -> str:
        """'YYYY-MM-DDTHH:MM:SS' of the Unix `second` in UTC (the last one remembered)."""
        cached = self.second
        if cached[0] != second:
            cached = self.second = (second, datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
                                    .isoformat()[:19])
        return cached[1]

    def timestamp(self, ns: int) -> str:
        """TimeStamper(fmt="iso", utc=True)'s text for the instant `ns` (ns since the epoch)."""
        second, micro = divmod(ns // 1000, 1_000_000)
        # datetime.isoformat leaves out a zero microsecond
        return f"{self.second_text(second)}.{micro:06d}Z" if micro else self.second_text(second) + "Z"


_lines: LogLines | None = None   # set by configure_logging
_CHAIN_KEYS = frozenset(("event", "level", "timestamp", "exc_info"))   # what the chain sets or reads
_MAX_TEMPLATES = 128            # line templates kept per context (a few routes recur)
FLUSH_SECONDS = 0.1             # the longest a held line waits (Envoy's file access log: 1 s)
MAX_HELD = 64                   # lines held at most (~29 KiB of access lines)
RECURRING = None               # EventLine: a field whose value recurs from line to line


class EventLine:
    """One hot event with fixed fields, written as configure_logging's processor chain writes it
    (its fields in order, then event, the context variables, level and timestamp, as json.dumps
    writes them; the same stream and lock; the same level filter) without running the chain.

    `fields`: (key, the JSON text of its value around one `%s`), e.g. ("path", "%s") or ("trace_id",
    '"%s"'), where the caller passes the value as a str already JSON-encoded (json_str) or fit to be
    quoted (hex); or (key, RECURRING) for a value that recurs (names of a route, a status; str, int,
    bool or None, one type per field, as equal values of two types share a text): those are encoded
    once into the line's template, kept per distinct set. Where the process did not run
    configure_logging (tests capturing structlog's events, tools) or a context variable would merge
    differently (it has one of the line's keys), `write` returns False and the caller logs the event
    through structlog instead.
    """

    def __init__(self, event: str, fields: tuple[tuple[str, str | None], ...], level: str = "info"):
        self.event = event
        self.level = level
        self.level_no = logging.getLevelName(level.upper())
        for key, text in fields:
            if text is not RECURRING and text.count("%s") != 1:
                raise ValueError(f"EventLine {event!r}: field {key!r} has {text!r}, not one %s")
        self.fields = fields
        self.keys = frozenset(key for key, _ in fields)
        # (the context these templates were made in, or None; recurring values -> the whole line's
        # template: its literal texts, with a place between each two for the other fields' values,
        # then the timestamp's second and fraction)
        self._templates: tuple[contextvars.Context | None, dict[tuple, list]] = (None, {})

    def write(self, recurring: tuple[str | None, ...], values: tuple, ns: int) -> bool:
        """Write the line of `recurring` and `values` (each in its field's order) stamped `ns`
        (time.time_ns()); False: log it through structlog instead."""
        lines = _lines
        if lines is None:
            return False
        if self.level_no < lines.level:
            return True                           # the chain's logger drops it too
        context = contextvars.copy_context()
        made_in, templates = self._templates
        if context != made_in:                    # one compare while no context variable was set
            templates = {}
            self._templates = (context, templates)
        template = templates.get(recurring)
        if template is None:
            variables = get_contextvars()
            if not self.keys.isdisjoint(variables) or not _CHAIN_KEYS.isdisjoint(variables):
                return False
            template = self._template(lines, recurring, variables)
            # Equal contexts render alike only when their values do: str and None (1 == True).
            if all(value is None or value.__class__ is str for value in variables.values()):
                if len(templates) >= _MAX_TEMPLATES:
                    templates.clear()
                templates[recurring] = template
        micros = ns // 1000
        second = micros // 1_000_000
        micro = micros - second * 1_000_000
        # A list's join, not a %-format of the whole line: % reads every character of its format.
        line = template[:]
        # datetime.isoformat leaves out a zero microsecond
        line[1::2] = (*values, lines.second_text(second), ".%06d" % micro if micro else "")
        lines.add("".join(line))
        return True

    def _template(self, lines: LogLines, recurring: tuple, context: dict) -> list:
        """The line's template: the fields with the recurring ones filled in, then what
        merge_contextvars, add_log_level and TimeStamper add; literal texts at the even places,
        None at the odd ones for each other field's value, the timestamp's second and its fraction."""
        texts = iter(recurring)
        out = ["{"]
        for key, text in self.fields:
            out[-1] += json_str(key) + ": "
            if text is RECURRING:
                out[-1] += json.dumps(next(texts)) + ", "
            else:
                before, after = text.split("%s")
                out[-1] += before
                out += (None, after + ", ")
        merged = lines.render(None, self.level, {"event": self.event, **context, "level": self.level,
                                                 "timestamp": ""})
        # no braces; up to the opening quote of the (empty) timestamp, whose text is written last
        out[-1] += merged[1:-2]
        out += (None, "", None, 'Z"}')
        return out


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
