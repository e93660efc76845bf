"""Security boundaries on real Docker (issue 22, item 4), on a project whose network has IPv6:

1. from an app container, meshd's admin API and the Docker socket are out of reach;
2. the control port takes nothing but what a node needs;
3. no secret (bootstrap token, private key, admin token, JWT) in any log line, `/config`, `docker
   inspect`, metrics or error message;
4. the app's port is unreachable past the sidecar over IPv6 too;
5. a bootstrap token is useless from any other container, and a second time.

Run (images built from this checkout first): python -m pytest tests/e2e/test_boundaries.py -x -q
meshd is brought up from compose/meshd.yml (recreated when its image changed) and left running; the
project `secbound` (tests/e2e/projects/boundaries.yml) is brought down at the end.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time

import pytest

from .conftest import ADMIN, GATEWAY, compose, get_json, http, metrics, run, wait_for
from .lifecycle import containers, project, service_containers

pytestmark = pytest.mark.e2e

P = "secbound"
FILE = "boundaries.yml"
NET = f"{P}_default"
ADMIN_PORT, CONTROL_PORT = 15014, 15012
TOKEN_FILE = "/run/mesh/bootstrap-token"          # meshcore.bootstrap.TOKEN_FILE
HOLD = ["iptables", "-D", "OUTPUT", "-p", "tcp", "--dport", str(CONTROL_PORT), "-m", "owner",
        "--uid-owner", "1337", "-j", "DROP"]       # the app's command added it (boundaries.yml)
# A JWT-shaped bearer (header.payload.signature) sent through the gateway and a sidecar: it must
# show up in no log or metric of the mesh.
JWT = ("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJib3VuZGFyeS10ZXN0IiwiaXNzIjoibWVzaCJ9."
       "c2VjYm91bmQtc2lnbmF0dXJlLXRoYXQtbXVzdC1uZXZlci1iZS1sb2dnZWQ")


def one(service: str) -> dict:
    found = service_containers(P, service)
    assert found, f"no running {service} container in {P}"
    return found[0]


def sidecar_of(app: dict) -> dict:
    found = [c for c in containers("label=mesh.role=sidecar", f"label=mesh.sidecar.for={app['Id']}")
             if c["State"]["Running"]]
    assert found, f"no running sidecar for {app['Name']}"
    return found[0]


def name(c: dict) -> str:
    return c["Name"].lstrip("/")


def execute(container: str, *cmd: str, check: bool = True):
    return run(["docker", "exec", container, *cmd], check=check, timeout=60)


def node_status(node: str) -> dict | None:
    return next((n for n in get_json(f"{ADMIN}/v1/status")["nodes"] if n["node"] == node), None)


def network_addresses() -> dict:
    """The project network's subnets and gateways (the host's addresses on it), by family."""
    net = json.loads(run(["docker", "network", "inspect", NET]).stdout)[0]
    out = {"ipv6": net.get("EnableIPv6"), "gateways": [], "subnets": []}
    for cfg in net["IPAM"]["Config"]:
        out["subnets"].append(cfg["Subnet"])
        if cfg.get("Gateway"):
            out["gateways"].append(cfg["Gateway"])
        else:   # Docker gives the first address of an IPv6 subnet to the bridge when none is named
            out["gateways"].append(str(next(ipaddress.ip_network(cfg["Subnet"]).hosts())))
    return out


def meshd_addresses() -> list[str]:
    """Every address of meshd: it runs in the host's network namespace, so all of the host's (but
    link-local IPv6 ones, which need an interface to be dialled)."""
    out = []
    for line in execute("meshd", "ip", "-o", "addr", "show").stdout.splitlines():
        m = re.search(r"\binet6? ([0-9a-f.:]+)/", line)
        if m and not ipaddress.ip_address(m.group(1)).is_link_local:
            out.append(m.group(1))
    return sorted(set(out), key=lambda a: (":" in a, a))


def url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


# Runs in an unmeshed container of the project's network (image meshd:latest: aiohttp, cryptography).
PROBE = r'''
import asyncio, datetime, json, os, socket, ssl, sys, tempfile
import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
args = json.loads(sys.argv[1])
out = {}

def attempt(label, fn):
    try:
        out[label] = "OK " + str(fn())[:300]
    except Exception as exc:
        out[label] = "FAIL " + type(exc).__name__ + ": " + str(exc)[:300]

def connect(addr, port):
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect((addr, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(200)

for addr, port in args.get("connect", []):
    attempt(f"{addr}:{port}", lambda: connect(addr, port))

def client_ctx(cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE          # what meshd accepts is the question, not who it is
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx

def self_signed(uri):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(key, hashes.SHA256()))
    d = tempfile.mkdtemp()
    open(d + "/c.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
    open(d + "/k.pem", "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return d + "/c.pem", d + "/k.pem"

def csr(identity):
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()

control = args.get("control")

async def hello(extra, cert=None):
    """A node's hello; what meshd sent back before it closed, and its close code and reason."""
    body = {"type": "hello", "kind": "sidecar", "node": args["node"], "container": args["app_id"],
            "last_version": 0, **extra}
    got = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"wss://{control}/v1/stream", ssl=client_ctx(cert)) as ws:
            await ws.send_str(json.dumps(body))
            while True:
                msg = await ws.receive(timeout=15)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    got.append(json.loads(msg.data).get("type"))
                    continue
                return {"kind": msg.type.name, "code": ws.close_code if ws.close_code is not None else msg.data,
                        "reason": msg.extra if isinstance(msg.extra, str) else "", "received": got}

async def http_get(path, method="GET", cert=None):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"https://{control}{path}", ssl=client_ctx(cert),
                             timeout=aiohttp.ClientTimeout(total=10)) as r:
            return {"status": r.status, "body": (await r.text())[:120]}

def run_async(label, coro):
    try:
        out[label] = asyncio.run(coro)
    except Exception as exc:
        out[label] = {"error": type(exc).__name__ + ": " + str(exc)[:200]}

if args.get("mode") == "control":
    run_async("no_credentials", hello({}))
    run_async("csr_without_token", hello({"csr": csr(args["identity"])}))
    run_async("self_signed_cert", hello({}, cert=self_signed(args["identity"])))
    for path in args["paths"]:
        run_async("GET " + path, http_get(path))
    run_async("POST /v1/traces", http_get("/v1/traces", "POST"))
    def plaintext():
        host, port = control.rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as s:
            s.sendall(b"GET /v1/status HTTP/1.1\r\nhost: meshd\r\nconnection: close\r\n\r\n")
            return s.recv(200)
    attempt("plaintext", plaintext)
if args.get("mode") == "replay":
    run_async("replay", hello({"token": args["token"], "csr": csr(args["identity"])}))
print("@@" + json.dumps(out))
'''


def probe(args: dict) -> dict:
    """PROBE in a fresh unmeshed container on the project's network; its findings."""
    proc = run(["docker", "run", "--rm", "--network", NET, "--label", f"mesh.test={P}", "meshd:latest",
                "python", "-c", PROBE, json.dumps(args)], timeout=180)
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("@@"))
    return json.loads(line[2:])


class Bound:
    """The project, its held app sidecar's token (read before it is spent), and the hold's release."""

    def __init__(self) -> None:
        self.app = one("app")
        self.web = one("web")
        self.app_sidecar = sidecar_of(self.app)
        self.node = name(self.app_sidecar)
        env = dict(e.split("=", 1) for e in self.app_sidecar["Config"]["Env"])
        self.identity = env["MESH_IDENTITY"]
        self.control = env["MESH_CONTROL_URL"].split("//", 1)[1].split("/", 1)[0]   # gateway:15012
        self.token = ""
        self.released_at: float | None = None

    def read_token(self) -> str:
        """The token file in the held sidecar (the test reads it as Docker's root, like `docker cp`)."""
        proc = execute(self.node, "cat", TOKEN_FILE, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def release(self) -> None:
        """Lift the hold; wait until the sidecar bootstrapped with its token and the mesh is settled."""
        if self.released_at is None:
            execute(name(self.app), *HOLD)
            self.released_at = time.time()
        wait_for(lambda: (node_status(self.node) or {}).get("connected")
                 and node_status(self.node)["auth"] in ("token", "certificate"), 90, interval=0.5,
                 what=f"{self.node} connected and authenticated (its token, then its certificate)")
        web_node = name(sidecar_of(self.web))
        wait_for(lambda: (node_status(web_node) or {}).get("connected"), 60, what=f"{web_node} connected")


@pytest.fixture(scope="module")
def bound(images):
    # meshd from this checkout's image (compose recreates it when the image changed); left running.
    compose("up", "-d", project="meshd", file="compose/meshd.yml")
    wait_for(lambda: get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"], 90, what="meshd serving")
    project(P, "down", "--remove-orphans", file=FILE, check=False)
    project(P, "up", "-d", file=FILE)
    try:
        wait_for(lambda: service_containers(P, "app") and service_containers(P, "web")
                 and [c for c in containers("label=mesh.role=sidecar",
                                            f"label=mesh.sidecar.for={one('app')['Id']}") if c["State"]["Running"]],
                 90, what="the app's sidecar running")
        state = Bound()
        # Held: the sidecar cannot reach meshd, so its token is not spent and its file is still there.
        state.token = wait_for(state.read_token, 30, what=f"the bootstrap token file in {state.node}")
        yield state
    finally:
        project(P, "down", "--remove-orphans", file=FILE, check=False, timeout=180)


# ---- 5. a bootstrap token: useless from another container, useless a second time ---------------

def test_a_bootstrap_token_is_useless_from_another_container_and_a_second_time(bound):
    since = time.time()
    token = bound.token
    assert len(token) >= 40, "a 256-bit token"
    inspected = run(["docker", "inspect", bound.node]).stdout
    assert token not in inspected and "MESH_BOOTSTRAP_TOKEN" not in inspected     # not in its environment
    args = {"mode": "replay", "control": bound.control, "node": bound.node, "app_id": bound.app["Id"],
            "identity": bound.identity, "token": token}

    # Unspent, but from another container: the token checks, the placement does not.
    first = probe(args)["replay"]
    print(f"\nunspent token from another container: {first}")
    assert first["kind"] == "CLOSE" and first["code"] == 4403, first
    assert "not from the app container" in first["reason"], first
    assert "certs" not in first["received"] and "snapshot" not in first["received"], first
    assert bound.read_token() == token, "the refused attempt must not spend the node's token"

    bound.release()
    wait_for(lambda: bound.read_token() == "", 20, what="the sidecar to delete its token file once spent")
    sidecar_id = bound.app_sidecar["Id"]

    # Spent: refused before any other check, and the real sidecar is left alone (placement fails).
    second = probe(args)["replay"]
    print(f"spent token from another container: {second}")
    assert second["kind"] == "CLOSE" and second["code"] == 4401 and "already used" in second["reason"], second
    assert "recreates" not in second["reason"], second
    assert second["received"] == [], second
    assert sidecar_of(bound.app)["Id"] == sidecar_id and node_status(bound.node)["connected"]

    def refusal_events() -> list[dict]:
        events = [e for e in get_json(f"{ADMIN}/v1/events?since={since}")["events"]
                  if e["kind"] == "node_refused" and bound.node in e["message"]]
        return events if len(events) >= 2 else []

    events = wait_for(refusal_events, 20, what="two node_refused events")
    for e in events:
        print(f"event: {e['message']}")
    assert any("4403" in e["message"] and "not from the app container" in e["message"] for e in events)
    assert any("4401" in e["message"] and "already used" in e["message"] for e in events)
    listed = execute("meshd", "sh", "-c", "COLUMNS=250 meshctl events").stdout
    assert "node_refused" in listed and bound.node in listed, listed[-2000:]
    assert token not in json.dumps(events) and token not in listed


# ---- 1. from an app container: no admin API, no Docker socket ------------------------------------

def test_an_app_reaches_neither_the_admin_api_nor_the_docker_socket(bound):
    bound.release()
    net = network_addresses()
    targets = sorted(set(net["gateways"]) | set(meshd_addresses()) | {"127.0.0.1", "::1"},
                     key=lambda a: (":" in a, a))
    app = name(bound.app)
    answers = {}
    for addr in targets:
        # The app's own view (its IPv4 goes through its sidecar): any HTTP answer from meshd (200, or
        # 401 without the admin token) would be a breach; 000 is no connection, 502 the sidecar's
        # answer for a destination that refused it.
        proc = execute(app, "curl", "-s", "-g", "-m", "4", "-o", "/dev/stdout", "-w", "\n%{http_code}",
                       f"http://{url_host(addr)}:{ADMIN_PORT}/v1/status", check=False)
        body, _, code = proc.stdout.rpartition("\n")
        answers[addr] = code.strip()
        assert code.strip() in ("000", "502", "503", "504"), (addr, code, body[:300])
        assert "snapshot_version" not in body and "admin token" not in body.lower(), (addr, body[:300])
    print(f"\nmeshd admin port {ADMIN_PORT} from the app ({len(targets)} addresses): {answers}")
    # The network's own view, without a sidecar in the way: an unmeshed container of the same network.
    found = probe({"connect": [[a, p] for a in targets if a not in ("127.0.0.1", "::1")
                               for p in (ADMIN_PORT, 2375, 2376)]})
    print("unmeshed container, admin port and Docker's TCP ports: "
          + ", ".join(f"{k} {v.split(':')[0]}" for k, v in found.items()))
    assert found and all(v.startswith("FAIL") for v in found.values()), found
    # The Docker socket: neither mounted into the app or its sidecar, nor anywhere in the app.
    for c in (bound.app, sidecar_of(bound.app), bound.web, sidecar_of(bound.web)):
        mounts = [m.get("Source", "") + " -> " + m.get("Destination", "") for m in c.get("Mounts", [])]
        assert not [m for m in mounts if "docker.sock" in m], (name(c), mounts)
    sockets = execute(app, "sh", "-c", "find / -xdev -type s 2>/dev/null; "
                      "test -e /var/run/docker.sock || test -e /run/docker.sock; echo exists=$?").stdout
    assert "docker.sock" not in sockets and "exists=1" in sockets, sockets
    # The probe is not blind: the same kind of container does reach meshd's control port.
    gateway = bound.control.rsplit(":", 1)[0]
    reached = probe({"connect": [[gateway, CONTROL_PORT]]})
    assert all(v.startswith("OK") for v in reached.values()), reached


# ---- 2. the control port: only what a node needs ---------------------------------------------------

ADMIN_PATHS = ["/v1/status", "/v1/snapshot", "/v1/services", "/v1/certs", "/v1/events", "/v1/policies",
               "/v1/rules", "/v1/acks", "/v1/traces", "/v1/telemetry/settings", "/metrics", "/dashboard",
               "/v1/swarm/tasks", "/"]


def test_the_control_port_takes_only_what_a_node_needs(bound):
    bound.release()
    found = probe({"mode": "control", "control": bound.control, "node": bound.node, "app_id": bound.app["Id"],
                   "identity": bound.identity, "paths": ADMIN_PATHS})
    print("\n" + "\n".join(f"{k}: {v}" for k, v in found.items()))
    # A TLS client without a node certificate gets through the handshake (a bootstrap has none) but
    # nothing else: no snapshot, no certificate, a 4401 close naming what is missing.
    got = found["no_credentials"]
    assert got.get("code") == 4401 and got["received"] == [], got
    assert "no bootstrap token and no client certificate" in got["reason"], got
    # A CSR without a token is not even a valid hello (meshcore.protocol): 4400.
    got = found["csr_without_token"]
    assert got.get("code") == 4400 and got["received"] == [] and "expected hello" in got["reason"], got
    # A client certificate the mesh did not issue ends at the handshake.
    assert "error" in found["self_signed_cert"] or found["self_signed_cert"].get("received") == [], found
    assert "certs" not in str(found["self_signed_cert"]) and "snapshot" not in str(found["self_signed_cert"])
    # No admin path is served there: 404 (or 405/401), never an answer with data.
    for path in ADMIN_PATHS:
        got = found[f"GET {path}"]
        assert got.get("status") in (400, 401, 403, 404, 405), (path, got)
    assert found["POST /v1/traces"].get("status") == 401, found["POST /v1/traces"]
    assert "HTTP/1.1 200" not in found["plaintext"] and "snapshot" not in found["plaintext"], found["plaintext"]


# ---- 3. no secret anywhere an operator or a tool reads --------------------------------------------

def _key_line(sidecar: str) -> str:
    """One base64 line of the sidecar's private key (long enough to be unique)."""
    pem = execute(sidecar, "cat", "/tmp/mesh-tls/key.pem").stdout
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    assert lines, "the sidecar saved its key"
    return max(lines, key=len)


def test_no_secret_in_logs_config_inspect_metrics_or_errors(bound):
    bound.release()
    from meshctl.api import load_admin_token

    admin_token = load_admin_token() or execute("meshd", "cat", "/var/lib/meshd/admin.token").stdout.strip()
    app = name(bound.app)
    # Every node made by this meshd: nodes of an older one (the demo shop's, say: on an older image,
    # or even on this one when the old meshd saw the new image first) are replaced, as after any
    # upgrade, also for a bootstrap token in their environment (meshd.plan).
    image = run(["docker", "image", "inspect", "-f", "{{.Id}}", "meshd:latest"]).stdout.strip()

    def current_nodes() -> list[str]:
        nodes = [c for c in containers("label=mesh.owner=meshd") if c["State"]["Running"]]
        old = [name(c) for c in nodes if c["Image"] != image
               or any(e.startswith("MESH_BOOTSTRAP_TOKEN=") for e in c["Config"]["Env"])]
        return [] if old or not nodes else [name(c) for c in nodes]

    nodes = wait_for(current_nodes, 120, interval=1.0, what="every sidecar and the gateway on meshd:latest")
    assert "meshd-gateway" in nodes, nodes
    for node in nodes:
        if node != "meshd-gateway":
            wait_for(lambda: (node_status(node) or {}).get("connected"), 60, what=f"{node} connected")
    sidecars = [n for n in nodes if n != "meshd-gateway"]
    secrets = {"bootstrap token": bound.token, "admin token": admin_token, "JWT": JWT,
               "JWT signature": JWT.rsplit(".", 1)[1],
               f"{bound.node} key": _key_line(bound.node),
               f"{name(sidecar_of(bound.web))} key": _key_line(name(sidecar_of(bound.web)))}
    assert all(len(v) >= 20 for v in secrets.values()), {k: len(v) for k, v in secrets.items()}

    # Traffic that carries a JWT and errors that get logged: through the gateway (no route: 404) and
    # through the app's sidecar (200 from web, 404 from web, 502 for a mesh name with no endpoint).
    for path in ("/secbound/none", "/api/orders/1"):
        wait_for(lambda: http("GET", GATEWAY + path, headers={"Authorization": f"Bearer {JWT}"})[0], 30,
                 what="the gateway answering")
    codes = []
    for url in ("http://web/", "http://web/missing", "http://nosuchservice/"):
        proc = execute(app, "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                       "-H", f"Authorization: Bearer {JWT}", url, check=False)
        codes.append(proc.stdout.strip())
    assert codes[0] == "200", codes

    sources: dict[str, str] = {}
    for node in ["meshd"] + nodes:
        proc = run(["docker", "logs", node], check=False)
        sources[f"logs {node}"] = proc.stdout + proc.stderr
        sources[f"inspect {node}"] = run(["docker", "inspect", node], check=False).stdout
    for sc in sidecars:
        ip = next(a for a in run(["docker", "inspect", "-f",
                                   "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                                   sc.removesuffix("-mesh")]).stdout.split())
        sources[f"/config {sc}"] = http("GET", f"http://{ip}:15020/config")[2].decode(errors="replace")
        sources[f"/metrics {sc}"] = metrics(ip)
    sources["/metrics gateway"] = metrics("127.0.0.1", 15021)
    for path in ("/v1/status", "/v1/certs", "/v1/events", "/v1/snapshot"):
        sources[f"admin {path}"] = http("GET", ADMIN + path)[2].decode(errors="replace")
    for cmd in ("meshctl status", "meshctl events", "meshctl certs"):
        proc = execute("meshd", "sh", "-c", f"COLUMNS=250 {cmd}", check=False)
        sources[cmd] = proc.stdout + proc.stderr
    # An error message a client gets: a refused replay (its close reason) and an unauthenticated admin call.
    replay = probe({"mode": "replay", "control": bound.control, "node": bound.node, "app_id": bound.app["Id"],
                    "identity": bound.identity, "token": bound.token})
    sources["replay refusal"] = json.dumps(replay)
    sources["admin 401"] = http("GET", ADMIN + "/v1/status", headers={"Authorization": "Bearer wrong"})[2].decode()

    leaks = [f"{what} in {where}" for where, text in sources.items() for what, secret in secrets.items()
             if secret in text]
    leaks += [f"a private key PEM in {where}" for where, text in sources.items() if "PRIVATE KEY-----" in text]
    total = sum(len(t) for t in sources.values())
    print(f"\nsearched {len(sources)} sources ({total} characters: logs and inspect of meshd, the gateway and "
          f"{len(sidecars)} sidecars, /config and /metrics of each sidecar, the admin API, meshctl, error "
          f"messages) for {len(secrets)} secrets: {len(leaks)} found; curl codes through the sidecar {codes}")
    assert not leaks, leaks
    # The sidecars' environment: what meshd gives them, and nothing secret (the CA bundle is public).
    for node in nodes:
        env = json.loads(run(["docker", "inspect", "-f", "{{json .Config.Env}}", node]).stdout)
        assert not [e for e in env if e.startswith(("MESH_BOOTSTRAP_TOKEN=", "MESHD_ADMIN_TOKEN="))], (node, env)


# ---- 4. IPv6: the app's port is not reachable past the sidecar ---------------------------------------

def test_the_app_port_is_not_reachable_past_the_sidecar_over_ipv6(bound):
    bound.release()
    net = network_addresses()
    assert net["ipv6"] and any(":" in s for s in net["subnets"]), net
    web = run(["docker", "inspect", name(bound.web)]).stdout
    web_v6 = json.loads(web)[0]["NetworkSettings"]["Networks"][NET]["GlobalIPv6Address"]
    web_v4 = json.loads(web)[0]["NetworkSettings"]["Networks"][NET]["IPAddress"]
    assert web_v6, "the web container has an IPv6 address"
    web_sidecar = name(sidecar_of(bound.web))
    # nginx does listen on IPv6 (inside its namespace, loopback is allowed through).
    assert execute(name(bound.web), "curl", "-s", "-g", "-o", "/dev/null", "-w", "%{http_code}",
                   "http://[::1]:80/").stdout == "200"
    rules = execute(web_sidecar, "ip6tables", "-S").stdout
    assert re.search(r"-A MESH_INBOUND6 .*--dport 80 .*-j REJECT --reject-with tcp-reset", rules), rules
    assert re.search(r"-A MESH_INBOUND6 -i lo -j RETURN", rules), rules

    def rejected() -> int:
        out = execute(web_sidecar, "ip6tables", "-L", "MESH_INBOUND6", "-v", "-n", "-x").stdout
        return sum(int(ln.split()[0]) for ln in out.splitlines() if "REJECT" in ln)

    before = rejected()
    found = probe({"connect": [[web_v6, 80], [web_v4, 80]]})
    print(f"\nfrom an unmeshed container: web [{web_v6}]:80 {found[f'{web_v6}:80']}; "
          f"web {web_v4}:80 {found[f'{web_v4}:80']}; REJECT counter {before} -> {rejected()}")
    assert found[f"{web_v6}:80"].startswith("FAIL ConnectionRefusedError"), found
    assert rejected() > before                   # refused by the guard, not lost on the way
    # IPv4 goes to the sidecar's inbound listener, which takes mutual TLS only: no HTTP answer.
    assert "HTTP/1.1 200" not in found[f"{web_v4}:80"], found
    # Without the guard the app's port would answer over IPv6, past the sidecar: lift it, see, restore.
    execute(web_sidecar, "ip6tables", "-D", "INPUT", "-p", "tcp", "-j", "MESH_INBOUND6")
    try:
        open_port = probe({"connect": [[web_v6, 80]]})[f"{web_v6}:80"]
    finally:
        execute(web_sidecar, "ip6tables", "-I", "INPUT", "-p", "tcp", "-j", "MESH_INBOUND6")
    print(f"without the guard: [{web_v6}]:80 {open_port[:60]}")
    assert open_port.startswith("OK") and "HTTP/1.1" in open_port, open_port
    assert probe({"connect": [[web_v6, 80]]})[f"{web_v6}:80"].startswith("FAIL"), "the guard is back"
