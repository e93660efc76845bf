"""meshctl's shared ground: the root Typer app, the options every command shares (declared once here:
--api, --timeout, --token-file, -o/--output and its alias --json) and the context object a command
reads them from (API client, console, output mode). Command modules import this module; it imports
none of them.

The shared options are accepted before the command (`meshctl --api URL status`) and after it
(`meshctl status --api URL`); a value given after the command wins. rich is imported on first use so
that `meshctl --help` starts fast.
"""

from __future__ import annotations

import enum
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import click
import typer
from typer.core import TyperCommand, TyperGroup

from .api import API_ENV, DEFAULT_API, DEFAULT_TIMEOUT, MeshdApiError, MeshdClient, MeshdUnreachable


class OutputMode(str, enum.Enum):
    """-o: how a read command prints."""

    TABLE = "table"
    WIDE = "wide"
    JSON = "json"


ACK_WAIT_S = 5.0
# Without a terminal nothing wraps: lines are as long as their values (a pipe has no width).
PLAIN_WIDTH = 1_000_000
COLUMN_GAP = "   "
_API_PANEL = "meshd connection"
_OUTPUT_PANEL = "output"


# ---- the context object ----------------------------------------------------------------------

@dataclass
class Meshctl:
    """One meshctl invocation: where meshd is, how to print, and the objects made from that on first use."""

    api: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    token_file: str | None = None
    output: str = "table"
    client: Any = None       # a MeshdClient made on first use; a test may put a fake here
    tty: bool | None = None  # None: ask whether stdout is a terminal when first printing
    _console: Any = field(default=None, repr=False)

    # -- meshd --

    def api_client(self):
        """The admin API client (made once from --api, --timeout and --token-file)."""
        if self.client is None:
            self.client = MeshdClient(self.api, timeout=self.timeout, token_file=self.token_file)
        return self.client

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """One admin API call; if meshd is down or refuses, print why (meshd's own words) and exit 1."""
        try:
            return self.api_client().request(method, path, body)
        except MeshdUnreachable as exc:
            typer.echo(f"meshd is DOWN: not reachable at {exc.url} ({exc.reason}).", err=True)
            typer.echo(f"Is meshd running? Point meshctl at it with --api URL or ${API_ENV}.", err=True)
            raise typer.Exit(1)
        except MeshdApiError as exc:
            typer.echo(f"error: {exc.error or exc}", err=True)
            raise typer.Exit(1)

    def get(self, path: str) -> Any:
        """GET `path` (see `call`)."""
        return self.call("GET", path)

    def read(self, path: str) -> Any:
        """GET `path` for a read command: under -o json print it and answer None (the command is done)."""
        data = self.get(path)
        if not self.json:
            return data
        self.print_json(data)
        return None

    def wait_for_acks(self, version: int, timeout: float = ACK_WAIT_S) -> tuple[int, int, float]:
        """Poll meshd until every connected node ACKed `version`: (acked, connected, seconds waited)."""
        start = time.monotonic()
        while True:
            nodes = [n for n in self.get("/v1/status")["nodes"] if n.get("connected")]
            acked = [n for n in nodes if (n.get("acked_version") or 0) >= version]
            waited = time.monotonic() - start
            if len(acked) == len(nodes) or waited >= timeout:
                return len(acked), len(nodes), waited
            time.sleep(0.02)

    def report_push(self, version: int, wait: bool) -> None:
        """With `wait`, say how fast every node ACKed snapshot `version` (exit 1 if not all did).
        Said on stderr under -o json, so that stdout stays one JSON document."""
        if not wait:
            return
        acked, connected, waited = self.wait_for_acks(version)
        typer.echo(f"snapshot version {version} ACKed by {acked}/{connected} connected nodes in "
                   f"{waited * 1000:.0f} ms", err=self.json)
        if acked < connected:
            typer.echo("some nodes did not ACK in time: see `meshctl status` for NACK reasons", err=True)
            raise typer.Exit(1)

    # -- output --

    @property
    def json(self) -> bool:
        """-o json (or --json): print the API's JSON, nothing else."""
        return self.output == "json"

    @property
    def wide(self) -> bool:
        """-o wide: values in full (serials, instance ids) and the extra columns."""
        return self.output == "wide"

    def is_terminal(self) -> bool:
        """Whether stdout is a terminal (then tables are drawn for people, else printed for scripts)."""
        if self.tty is None:
            self.tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
        return self.tty

    def print_json(self, data: Any) -> None:
        """`data` as indented JSON on stdout."""
        typer.echo(json.dumps(data, indent=2))

    @property
    def console(self):
        """A rich Console: the terminal's width on a terminal; otherwise no colour and no wrapping."""
        if self._console is None:
            from rich.console import Console

            if self.is_terminal():
                self._console = Console(highlight=False)
            else:
                self._console = Console(highlight=False, color_system=None, width=PLAIN_WIDTH, soft_wrap=True)
        return self._console

    def show(self, *renderables: Any) -> None:
        """Print text, Grids and rich renderables."""
        for item in renderables:
            self.console.print(self.renderable(item))

    def renderable(self, item: Any) -> Any:
        """A Grid drawn for this output (a rich Table on a terminal, padded plain lines otherwise)."""
        if isinstance(item, Grid):
            return item.rich_table() if self.is_terminal() else item.plain_text()
        return item


def session(ctx: typer.Context) -> Meshctl:
    """The invocation's Meshctl (made by the first command or group that runs)."""
    return ctx.ensure_object(Meshctl)


# ---- tables ----------------------------------------------------------------------------------

@dataclass
class Grid:
    """A table that prints as a rich Table on a terminal and, without one, as padded columns with one
    row per line (as kubectl does): values are never wrapped or cut, a cell's newlines become ', '."""

    title: str
    columns: Sequence[str | tuple[str, str]]  # header, or (header, justify) for a terminal
    title_style: str | None = None
    show_header: bool = True
    rows: list[tuple[tuple[Any, ...], str | None]] = field(default_factory=list)

    def add_row(self, *cells: Any, style: str | None = None) -> None:
        """Cells are str or rich Text; `style` colours the row on a terminal."""
        self.rows.append((cells, style))

    def _headers(self) -> list[tuple[str, str]]:
        return [(c, "left") if isinstance(c, str) else c for c in self.columns]

    def rich_table(self):
        """The terminal form."""
        from rich.table import Table

        table = Table(title=self.title or None, title_justify="left", show_header=self.show_header,
                      title_style=self.title_style)
        for header, justify in self._headers():
            table.add_column(header, justify=justify, overflow="fold")
        for cells, style in self.rows:
            table.add_row(*cells, style=style)
        return table

    def plain_lines(self) -> list[str]:
        """The form for scripts: optional title, UPPERCASE headers, then one line per row."""
        rows = [[plain_cell(c) for c in cells] for cells, _ in self.rows]
        if self.show_header:
            rows.insert(0, [h.upper() or "-" for h, _ in self._headers()])
        widths = [max((len(r[i]) for r in rows if i < len(r)), default=0) for i in range(len(self.columns))]
        lines = [self.title] if self.title else []
        for row in rows:
            padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + row[-1:]
            lines.append(COLUMN_GAP.join(padded).rstrip())
        return lines

    def plain_text(self):
        """plain_lines as a rich Text (so that it composes with other renderables)."""
        from rich.text import Text

        return Text("\n".join(self.plain_lines()))


def plain_cell(value: Any) -> str:
    """A cell as one line of text: '-' when empty (columns stay countable), newlines as ', '."""
    whole = getattr(value, "plain", None)  # a rich Text's characters
    whole = str(value) if whole is None else whole
    return ", ".join(part.strip() for part in whole.splitlines() if part.strip()) or "-"


def text(value: Any) -> str:
    """None or '' as '-'; anything else as str."""
    return "-" if value is None or value == "" else str(value)


# ---- the shared options, declared once -------------------------------------------------------

def _api_options(
    api: Optional[str] = typer.Option(None, "--api", show_default=False, rich_help_panel=_API_PANEL,
                                      help=f"meshd admin API base URL (default {DEFAULT_API}, or ${API_ENV})"),
    timeout: Optional[float] = typer.Option(None, "--timeout", show_default=False, rich_help_panel=_API_PANEL,
                                            help=f"seconds to wait for meshd (default {DEFAULT_TIMEOUT:g})"),
    token_file: Optional[str] = typer.Option(
        None, "--token-file", show_default=False, rich_help_panel=_API_PANEL,
        help="meshd's admin token file (<state dir>/admin.token, or $MESHD_ADMIN_TOKEN_FILE); "
             "or set MESHD_ADMIN_TOKEN"),
) -> None:
    """The options of every command that talks to meshd (their declaration; see _params_of)."""


def _output_options(
    output: Optional[OutputMode] = typer.Option(
        None, "--output", "-o", show_default=False, rich_help_panel=_OUTPUT_PANEL,
        help="table (the default; without a terminal: padded columns, one row per line), "
             "wide (values in full), or json (the API's JSON)"),
    as_json: bool = typer.Option(False, "--json", rich_help_panel=_OUTPUT_PANEL, help="same as -o json"),
) -> None:
    """The options of every command that prints what it read (their declaration; see _params_of)."""


@functools.cache
def _params_of(declaration: Callable[..., None]) -> tuple[click.Parameter, ...]:
    """The click parameters Typer makes from a declaration's signature (made once, shared)."""
    probe = typer.Typer(add_completion=False)
    probe.command()(declaration)
    return tuple(typer.main.get_command(probe).params)


_SHARED = ("api", "timeout", "token_file", "output", "as_json")


class _SharedOptions:
    """Adds the shared options to a click command and moves their values into the Meshctl object."""

    option_sets: tuple[Callable[..., None], ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for declaration in self.option_sets:
            self.params.extend(_params_of(declaration))

    def invoke(self, ctx: click.Context) -> Any:
        mesh = ctx.ensure_object(Meshctl)
        for name in _SHARED:
            value = ctx.params.pop(name, None)
            if name == "as_json":
                if value:
                    mesh.output = "json"
            elif value is not None:
                setattr(mesh, name, getattr(value, "value", value))  # -o: an OutputMode or its value
        return super().invoke(ctx)


class ReadCommand(_SharedOptions, TyperCommand):
    """A command that talks to meshd and prints what it got: the API options and -o/--json."""

    option_sets = (_api_options, _output_options)


class ApiCommand(_SharedOptions, TyperCommand):
    """A command that talks to meshd and prints progress, not a document: the API options only."""

    option_sets = (_api_options,)


class ReadGroup(_SharedOptions, TyperGroup):
    """A command group taking the API options and -o/--json (the root app, `certs`)."""

    option_sets = (_api_options, _output_options)


class ApiGroup(_SharedOptions, TyperGroup):
    """A command group taking the API options (`policy`)."""

    option_sets = (_api_options,)


def command_group(help: str | None = None, **kwargs: Any) -> typer.Typer:
    """A Typer for one module's commands (cli.py adds its commands to the root app)."""
    return typer.Typer(help=help, add_completion=False, **kwargs)


app = typer.Typer(
    name="meshctl",
    cls=ReadGroup,
    help="Inspect a meshd service mesh (status, services) and check compose files (analyze).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(ctx: typer.Context) -> None:
    session(ctx)
