"""meshctl's commands one module at a time, against a fake admin API client put in the Meshctl context
object: -o json on every read command, output without a terminal (one row per line, nothing wrapped),
the shared options, every --help, and no import cycle among meshctl's modules."""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from meshctl import analyze, observe, overview, security, traffic
from meshctl.api import MeshdApiError
from meshctl.cli import app
from meshctl.context import Grid, Meshctl, plain_cell

ROOT = Path(__file__).resolve().parents[2]
NARROW = {"COLUMNS": "80", "MESHD_API": ""}  # what rich assumes when no terminal is attached
LONG_ID = "spiffe://mesh.local/ns/some-long-namespace-name/sa/some-very-long-service-name"
TRACE_ID = "ab" * 16
LONG_PATH = "GET /catalog/some-long-category-name/some-long-product-name/reviews"
NOW = time.time()


def identity(n: int) -> dict:
    return {"node": f"some-long-namespace-name-some-very-long-service-name-{n}-mesh", "kind": "sidecar",
            "identity": f"{LONG_ID}-{n}", "serial": "0123456789abcdef0123456789abcdef", "issuer": "root-1",
            "issued_at": NOW - 60, "not_before": NOW - 60, "not_after": NOW + 3600, "renew_at": NOW + 1800,
            "renewals": n, "expired": False, "connected": True}


CERTS = {"trust_domain": "mesh.local", "cert_ttl_s": 86400, "user_supplied_ca": False, "signing": "root-1",
         "roots": [{"name": "root-1", "serial": "ab", "not_after": NOW + 1e6}], "bundle_version": 1,
         "identities": [identity(n) for n in range(1, 4)], "rotation": None}
SERVICES = {"services": [
    {"name": "some-very-long-service-name", "namespace": "some-long-namespace-name", "protocol": "http",
     "port": 8080, "identity": LONG_ID, "mtls": "strict", "allow": ["gateway", "orders"], "versions": {"v1": 2},
     "endpoints": [{"instance": "a" * 64, "address": "172.18.0.5", "port": 15006, "version": "v1"},
                   {"instance": "b" * 64, "address": "172.18.0.6", "port": 15006, "version": "v1"}]},
    {"name": "db", "namespace": "shop", "protocol": "tcp", "port": 5432,
     "identity": "spiffe://mesh.local/ns/shop/sa/db", "versions": {}, "endpoints": []},
]}
STATUS = {"meshd": {"version": "0.1.0", "uptime_s": 61, "snapshot_version": 3},
          "nodes": [{"node": "orders-1-mesh", "kind": "sidecar", "service": "orders", "connected": True,
                     "acked_version": 3, "nacked_version": None, "nack_reason": None}],
          "label_errors": [],
          "sidecars": [{"app": "orders-1", "sidecar": "orders-1-mesh", "state": "running", "connected": True},
                       {"app": "users-1", "sidecar": "users-1-mesh", "state": "running", "connected": False,
                        "control_error": "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"}],
          "problems": [{"kind": "control_listen", "subject": "172.22.0.1", "since": 1796464800.0,
                        "last": 1796464830.0, "attempts": 7,
                        "message": "OSError: [Errno 99] Cannot assign requested address"}]}
STAT = {"window_s": 60, "targets": {"up": 1, "total": 1, "down": []}, "totals": [],
        "services": [{"service": "orders", "version": "v1", "rps": 12.5, "success_rate": 1.0, "p50_ms": 2.0,
                      "p90_ms": 4.0, "p99_ms": 9.0, "requests": 750, "error_rate": 0.0}],
        "edges": [{"source": "gateway", "destination": "orders", "rps": 12.5, "success_rate": 1.0, "p99_ms": 9.0,
                   "requests": 750, "error_rate": 0.0}]}
COMPARE = {"window_s": 60, "a": {"requests": 10}, "b": {"requests": 12}, "verdict": "no difference",
           "significant": False}
EVENTS = {"events": [{"ts": NOW, "kind": "nack", "service": "orders", "version": "v1",
                      "message": "orders-1-mesh refused snapshot version 3"}]}
TRACES = {"stored": 1, "traces": [{"trace_id": TRACE_ID, "start": NOW, "root": "gateway: GET /", "spans": 2,
                                   "duration_ms": 4.0, "errors": 0}]}
TRACE = {"trace": {"trace_id": TRACE_ID, "spans": 1, "duration_ms": 4.0, "services": ["gateway"]},
         "spans": [{"service": "gateway", "kind": "SERVER", "name": LONG_PATH, "start": NOW, "duration_ms": 4.0,
                    "depth": 0, "attributes": {"http.response.status_code": 200}}]}
SETTINGS = {"settings": {"sampling": 1.0, "otlp_endpoint": None, "access_log": "errors"}}
POLICIES = {"default": "allow", "rules": [{"action": "deny", "source": "orders", "destination": "payments",
                                           "path": None, "method": None}]}
RULES = {"rules": {"routes": [], "split": None, "fault": None, "mirror": None}}

ANSWERS = {"/v1/status": STATUS, "/v1/services": SERVICES, "/v1/certs": CERTS, "/v1/stat": STAT,
           "/v1/compare": COMPARE, "/v1/events": EVENTS, "/v1/traces": TRACES, f"/v1/traces/{TRACE_ID}": TRACE,
           "/v1/telemetry/settings": SETTINGS, "/v1/policies": POLICIES, "/v1/rules/orders": RULES}


class FakeClient:
    """Answers GETs from ANSWERS (the query string ignored) and records every call."""

    base_url = "http://meshd.test:15014"
    token = "t0ken/+"

    def __init__(self):
        self.calls: list[tuple[str, str, dict | None]] = []

    def request(self, method: str, path: str, body: dict | None = None):
        self.calls.append((method, path, body))
        answer = ANSWERS.get(path.split("?")[0])
        if method != "GET" or answer is None:
            raise MeshdApiError(self.base_url + path, "not in the fake", status=404, error=f"no route {path}")
        return answer


def invoke(commands: typer.Typer, args: list[str], tty: bool | None = None, columns: int = 80):
    """Run one command module's Typer alone (cli.py not involved) with a FakeClient; (result, session)."""
    mesh = Meshctl(client=FakeClient(), tty=tty)
    result = CliRunner().invoke(commands, args, obj=mesh, env={**NARROW, "COLUMNS": str(columns)})
    return result, mesh


# (the module's Typer, argv, the JSON that -o json must print)
READS = [
    (overview.commands, ["status"], STATUS),
    (overview.commands, ["services"], SERVICES),
    (security.certs, [], CERTS),
    (security.policy, ["list"], {**POLICIES, "mesh_allow": {"some-very-long-service-name": ["gateway", "orders"]}}),
    (traffic.commands, ["route", "orders"], RULES),
    (observe.commands, ["stat"], STAT),
    (observe.commands, ["compare", "orders", "v1", "v2"], COMPARE),
    (observe.commands, ["events"], EVENTS),
    (observe.commands, ["traces"], TRACES),
    (observe.commands, ["trace", TRACE_ID], TRACE),
    (observe.commands, ["tracing"], SETTINGS),
    (observe.commands, ["dashboard"], {"url": "http://meshd.test:15014/dashboard#token=t0ken%2F%2B"}),
    (observe.commands, ["top"], {"stat": STAT, "events": EVENTS["events"]}),
]
READ_IDS = [" ".join(args) or "certs" for _, args, _ in READS]


@pytest.mark.parametrize("commands, args, expected", READS, ids=READ_IDS)
@pytest.mark.parametrize("flag", [["-o", "json"], ["--output", "json"], ["--json"]])
def test_every_read_command_prints_parseable_json(commands, args, expected, flag):
    result, _ = invoke(commands, args + flag)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == expected


@pytest.mark.parametrize("commands, args, expected", READS, ids=READ_IDS)
@pytest.mark.parametrize("mode", ["table", "wide"])
def test_every_read_command_prints_a_table_without_wrapping(commands, args, expected, mode):
    args = args + ["--once"] if args == ["top"] else args
    result, _ = invoke(commands, args + ["-o", mode])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    with pytest.raises(ValueError):
        json.loads(result.output)
    assert not set("┏┃┡┌┐┼") & set(result.output), "no table box drawn without a terminal"


@pytest.mark.parametrize("commands, args", [(security.certs, []), (overview.commands, ["services"])],
                         ids=["certs", "services"])
def test_piped_output_keeps_each_spiffe_id_on_one_line(commands, args):
    """`docker exec meshd meshctl certs | grep spiffe://` finds every identity (rich would wrap at 80)."""
    result, mesh = invoke(commands, args)  # CliRunner's stdout is no terminal, as a pipe
    assert result.exit_code == 0, result.output
    assert mesh.tty is False
    ids = [line for line in result.output.splitlines() if "spiffe://" in line]
    expected = ([i["identity"] for i in CERTS["identities"]] if commands is security.certs
                else [s["identity"] for s in SERVICES["services"]])
    assert len(ids) == len(expected)
    for line, spiffe_id in zip(ids, expected):
        assert re.search(rf"(^|\s){re.escape(spiffe_id)}(\s|$)", line), line
    assert max(len(line) for line in ids) > 80  # longer than rich's fallback width: nothing cut or folded


def test_piped_certs_columns_line_up_with_the_header():
    result, _ = invoke(security.certs, [])
    lines = result.output.splitlines()
    header = next(n for n, line in enumerate(lines) if line.startswith("NODE"))
    spiffe_at = lines[header].index("SPIFFE ID")
    for line in lines[header + 1:header + 4]:
        assert line[spiffe_at:].startswith(LONG_ID)
    serials = [re.split(r" {3,}", line)[2] for line in lines[header + 1:header + 4]]
    assert serials == ["0123456789abcdef"] * 3                     # cut to 16 hex digits, as on a terminal
    result, _ = invoke(security.certs, ["-o", "wide"])
    assert "0123456789abcdef0123456789abcdef" in result.output     # wide: in full


def test_piped_services_one_service_per_line_with_its_endpoints():
    result, _ = invoke(overview.commands, ["services"])
    lines = result.output.splitlines()
    assert re.split(r" {3,}", lines[0]) == ["NAME", "NAMESPACE", "PROTOCOL", "PORT", "IDENTITY", "MTLS", "ALLOW",
                                            "VERSIONS", "ENDPOINTS"]
    first = re.split(r" {3,}", lines[1])
    assert first == ["some-very-long-service-name", "some-long-namespace-name", "http", "8080", LONG_ID, "strict",
                     "gateway, orders", "v1: 2 instances", "172.18.0.5:15006 v1, 172.18.0.6:15006 v1"]
    assert re.split(r" {3,}", lines[2])[-3:] == ["(no mesh.allow label)", "none", "-"]
    assert len(lines) == 3
    wide, _ = invoke(overview.commands, ["services", "-o", "wide"])
    assert f"172.18.0.5:15006 v1 {'a' * 64}" in wide.output


@pytest.mark.parametrize("commands, args", [(security.certs, []), (overview.commands, ["services"])],
                         ids=["certs", "services"])
def test_on_a_terminal_the_tables_stay_pretty(commands, args):
    result, _ = invoke(commands, args, tty=True, columns=400)
    assert result.exit_code == 0, result.output
    assert "│" in result.output and LONG_ID in result.output
    narrow, _ = invoke(commands, args, tty=True)
    assert "│" in narrow.output and LONG_ID not in narrow.output  # folded to the terminal's 80 columns


def test_status_on_a_terminal_and_piped():
    pretty, _ = invoke(overview.commands, ["status"], tty=True)
    assert "┃ node" in pretty.output and "meshd UP" in pretty.output
    plain, _ = invoke(overview.commands, ["status"])
    assert plain.output.splitlines()[1:4] == [
        "nodes (1)",
        "NODE            KIND      SERVICE   CONNECTED   ACKED   NACK REASON",
        "orders-1-mesh   sidecar   orders    yes         3       -"]


def test_status_names_unconnected_sidecars_and_problems():
    plain, _ = invoke(overview.commands, ["status"])
    lines = plain.output.splitlines()
    users = next(line for line in lines if line.startswith("users-1 "))
    assert users.split()[2:4] == ["running", "no"] and "CERTIFICATE_VERIFY_FAILED" in users
    assert "problems (1)" in lines
    problem = next(line for line in lines if line.startswith("control_listen "))
    assert "172.22.0.1" in problem and " 7 " in problem and "Cannot assign requested address" in problem


def test_trace_tree_is_not_wrapped_when_piped():
    result, _ = invoke(observe.commands, ["trace", TRACE_ID])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if f"gateway server {LONG_PATH}  200" in line]
    assert len(lines) == 1 and lines[0].rstrip().endswith("|") and len(lines[0]) > 80


def test_top_once_piped_prints_plain_tables():
    result, mesh = invoke(observe.commands, ["top", "--once"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "meshctl top  http://meshd.test:15014" in out and "recent events (1)" in out
    assert "orders-1-mesh refused snapshot version 3" in out
    assert [c for c in mesh.client.calls if c[0] == "GET"][:2] == [("GET", "/v1/stat?window=10", None),
                                                                 ("GET", "/v1/events?since=15m&limit=8", None)]


def test_top_piped_prints_a_frame_per_interval_until_interrupted(monkeypatch):
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(observe.time, "sleep", sleep)
    result, _ = invoke(observe.commands, ["top", "--interval", "0.5"])
    assert result.exit_code == 0, result.output
    assert result.output.count("meshctl top  ") == 2 and sleeps == [0.5, 0.5]


# ---- the shared options --------------------------------------------------------------------------

@pytest.mark.parametrize("args, api, output", [
    (["--api", "http://a:1", "status"], "http://a:1", "table"),
    (["status", "--api", "http://b:2"], "http://b:2", "table"),
    (["--api", "http://a:1", "-o", "wide", "status", "--api", "http://b:2"], "http://b:2", "wide"),
    (["-o", "json", "status"], None, "json"),
    (["status", "-o", "wide", "--json"], None, "json"),           # --json wins over -o at one level
    (["--json", "status", "-o", "wide"], None, "wide"),
    (["certs", "--json"], None, "json"),
    (["--api", "http://a:1", "certs", "rotate", "--api", "http://c:3", "--no-wait"], "http://c:3", "table"),
    (["policy", "--api", "http://d:4", "list", "-o", "json"], "http://d:4", "json"),
])
def test_shared_options_before_or_after_the_command_later_wins(args, api, output):
    mesh = Meshctl(client=FakeClient())
    mesh.client.request = lambda method, path, body=None: {"kind": "leaf", **ANSWERS.get(path.split("?")[0], {})}
    result = CliRunner().invoke(app, args, obj=mesh, env=NARROW)
    assert result.exit_code == 0, result.output
    assert (mesh.api, mesh.output) == (api, output)


def test_timeout_and_token_file_reach_the_client(tmp_path, monkeypatch):
    monkeypatch.delenv("MESHD_ADMIN_TOKEN", raising=False)
    token = tmp_path / "admin.token"
    token.write_text("s3cret\n")
    mesh = Meshctl()
    result = CliRunner().invoke(app, ["--timeout", "0.5", "dashboard", "--token-file", str(token),
                                      "--api", "http://127.0.0.1:9"], obj=mesh, env=NARROW)
    assert result.exit_code == 1 and "DOWN" in result.output        # nothing listens on port 9
    client = mesh.client
    assert (client.base_url, client.timeout, client.token) == ("http://127.0.0.1:9", 0.5, "s3cret")


def test_each_shared_option_is_declared_once():
    sources = "\n".join(p.read_text() for p in (ROOT / "meshctl").glob("*.py"))
    for option in ('"--api"', '"--token-file"', '"--timeout"', '"--json"', '"--output"'):
        assert sources.count(option) == 1, option


def test_bad_output_mode_is_a_usage_error():
    result, _ = invoke(overview.commands, ["status", "-o", "yaml"])
    assert result.exit_code == 2 and "yaml" in result.output


def test_meshd_error_is_explained_and_exit_1():
    result, _ = invoke(traffic.commands, ["route", "nobody"])
    assert result.exit_code == 1 and "error: no route /v1/rules/nobody" in result.output


# ---- help --------------------------------------------------------------------------------------

def command_paths(command: click.Command, path: tuple[str, ...] = ()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, path + (name,))


ALL_COMMANDS = list(command_paths(typer.main.get_command(app)))


def test_the_command_tree_is_complete():
    names = {" ".join(p) for p in ALL_COMMANDS}
    assert names >= {"", "status", "services", "analyze", "split", "route", "fault", "mirror", "stat", "top",
                     "compare", "dashboard", "events", "trace", "traces", "tracing", "certs", "certs rotate",
                     "policy", "policy allow", "policy deny", "policy default", "policy remove", "policy list"}


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "meshctl")
def test_every_help_works(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    if path and path != ("analyze",):
        assert "--api" in result.output


# ---- the pieces ----------------------------------------------------------------------------------

def test_grid_plain_lines():
    grid = Grid("things (2)", ("name", ("count", "right"), "note"))
    grid.add_row("a", "1", "first\nsecond")
    grid.add_row("longer-name", "22", "")
    assert grid.plain_lines() == ["things (2)",
                                  "NAME          COUNT   NOTE",
                                  "a             1       first, second",
                                  "longer-name   22      -"]
    assert Grid("", ("k", "v"), show_header=False, rows=[(("x", "y"), None)]).plain_lines() == ["x   y"]


@pytest.mark.parametrize("value, expected", [("", "-"), (None, "None"), ("a\n\n b ", "a, b"), (7, "7")])
def test_plain_cell(value, expected):
    assert plain_cell(value) == expected


def test_analyze_runs_alone(tmp_path):
    compose = tmp_path / "compose.yaml"
    compose.write_text("services:\n  web:\n    image: x\n    expose: [80]\n    labels: ['mesh.enable=true']\n")
    result = CliRunner().invoke(analyze.commands, [str(compose)])
    assert result.exit_code == 0 and "OK" in result.output


# ---- imports ---------------------------------------------------------------------------------------

def meshctl_imports() -> dict[str, set[str]]:
    """meshctl module -> the meshctl modules it imports (anywhere in it, function bodies included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "meshctl").glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meshctl."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("meshctl.")}
        graph[path.stem] = found - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of the graph as a path that ends where it starts; [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return []


def test_no_import_cycle_among_meshctl_modules():
    graph = meshctl_imports()
    assert "cli" in graph and "context" in graph
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_command_modules_import_only_the_shared_leaf():
    graph = meshctl_imports()
    assert graph["context"] == {"api"}
    for module in ("overview", "observe", "security", "traffic"):
        assert graph[module] == {"context"}, module
    assert graph["analyze"] == {"context", "compose"}
    assert not any("cli" in deps for deps in graph.values())        # only the entry point assembles


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
])
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle
