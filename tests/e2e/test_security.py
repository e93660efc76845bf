"""Zero trust end to end on real Docker: mTLS on every mesh hop, a rogue container kept out,
authorization pushed in under a second, certificate and root rotations under load, meshd outage.

Run: python -m pytest tests/e2e/test_security.py -x -q   (the `mesh` fixture builds images and
starts meshd + the demo shop). The tests run in file order; the last one restarts meshd twice and
restores the default certificate lifetime.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from .conftest import (
    ADMIN, GATEWAY, PROJECT, container_ip, docker_ps, get_json, http, metrics, recreate_meshd, run, wait_for,
)

pytestmark = pytest.mark.e2e

NET = f"{PROJECT}_default"


def app_name(service: str) -> str:
    apps = [c["Names"] for c in docker_ps(f"label=com.docker.compose.service={service}",
                                          f"label=com.docker.compose.project={PROJECT}")]
    assert apps, f"no {service} container"
    return sorted(apps)[0]


def meshctl(*args: str, check: bool = True):
    return run(["meshctl", *args], env={**os.environ, "COLUMNS": "250"}, check=check)


def tls_series(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("mesh_tls_connections_total{"):
            head, _, value = line.rpartition(" ")
            labels = dict(kv.split("=", 1) for kv in head[head.index("{") + 1:-1].split(","))
            out[(labels["direction"].strip('"'), labels["tls_version"].strip('"'))] = float(value)
    return out


def certs() -> dict:
    return get_json(f"{ADMIN}/v1/certs")


def connected_nodes() -> list[dict]:
    return [n for n in get_json(f"{ADMIN}/v1/status")["nodes"] if n["connected"]]


class Load:
    """A steady request rate through the gateway in a thread; every non-200 is a failure."""

    def __init__(self, rate: float = 20.0, path: str = "/api/orders/{i}"):
        self.rate = rate
        self.path = path
        self.results: list[tuple[int, bytes]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        i = 0
        while not self.stop.is_set():
            try:
                status, _, body = http("GET", GATEWAY + self.path.format(i=i), timeout=10)
            except Exception as exc:  # noqa: BLE001 - a connection error is a failed request too
                status, body = 0, repr(exc).encode()
            self.results.append((status, body[:300]))
            i += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(15)

    @property
    def failures(self) -> list:
        return [r for r in self.results if r[0] != 200]


# ---- (a) TLS 1.3 on every mesh hop ----------------------------------------------------------------

def test_mesh_hops_are_tls13_by_the_sidecars_own_counters(mesh):
    for i in range(10):
        status, _, body = http("GET", f"{GATEWAY}/api/orders/{i}")
        assert status == 200, body
    names = ["orders", "payments", "inventory", "users", "notifications"]
    seen = {}
    for name in names:
        series = tls_series(metrics(container_ip(app_name(name))))
        seen[name] = series
        assert series.get(("inbound", "TLSv1.3"), 0) >= 1, (name, series)
        assert all(version == "TLSv1.3" for (_, version) in series), (name, series)   # no plaintext, no 1.2
    assert seen["orders"].get(("outbound", "TLSv1.3"), 0) >= 1
    gw = tls_series(metrics("127.0.0.1", 15021))
    assert gw.get(("outbound", "TLSv1.3"), 0) >= 1 and all(v == "TLSv1.3" for _, v in gw), gw
    print(f"\nTLS evidence: gateway {gw}; " + "; ".join(f"{n} {s}" for n, s in seen.items()))
    # The gateway serves HTTPS (8443) with a mesh-CA certificate for localhost.
    import ssl
    import urllib.request
    ctx = ssl.create_default_context(cadata=certs_bundle())
    with urllib.request.urlopen("https://localhost:8443/api/orders/1", context=ctx, timeout=5) as resp:
        assert resp.status == 200


def certs_bundle() -> str:
    env = inspect_env(f"{app_name('orders')}-mesh")
    return env["MESH_CA_BUNDLE"]


def inspect_env(container: str) -> dict[str, str]:
    out = run(["docker", "inspect", "-f", "{{json .Config.Env}}", container]).stdout
    return dict(item.split("=", 1) for item in json.loads(out))


# ---- (b) a rogue container ---------------------------------------------------------------------

ROGUE = r'''
import asyncio, json, os, socket, ssl, sys, tempfile, datetime, urllib.request
import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
out = {}
pay = os.environ["PAY_IP"]
def attempt(name, fn):
    try:
        out[name] = "OK " + str(fn())[:200]
    except Exception as exc:
        out[name] = "FAIL " + type(exc).__name__ + ": " + str(exc)[:200]
def plain(port):
    return urllib.request.urlopen(f"http://{pay}:{port}/healthz", timeout=5).status
attempt("plain_8080", lambda: plain(8080))
attempt("plain_15006", lambda: plain(15006))
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            "spiffe://mesh.local/ns/shop/sa/orders")]), critical=False)
        .sign(key, hashes.SHA256()))
d = tempfile.mkdtemp()
open(d + "/c.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(d + "/k.pem", "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
def selfsigned():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(d + "/c.pem", d + "/k.pem")
    with socket.create_connection((pay, 15006), timeout=5) as s:
        with ctx.wrap_socket(s) as t:
            t.sendall(b"GET /healthz HTTP/1.1\r\nhost: payments\r\nconnection: close\r\n\r\n")
            data = t.recv(100)
            if not data:
                raise ConnectionError("closed without an answer")
            return data
attempt("selfsigned_15006", selfsigned)
control_host = os.environ["CONTROL"].split("//", 1)[1].split(":", 1)[0]
attempt("admin_api", lambda: urllib.request.urlopen(f"http://{control_host}:15014/v1/status", timeout=3).status)
attempt("docker_socket", lambda: socket.socket(socket.AF_UNIX).connect("/var/run/docker.sock"))
async def hello(extra):
    ctx = ssl.create_default_context(cadata=os.environ["BUNDLE"])
    ctx.check_hostname = False
    body = {"type": "hello", "kind": "sidecar", "node": os.environ["NODE"], "container": os.environ["APP_ID"],
            "last_version": 0, **extra}
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(os.environ["CONTROL"], ssl=ctx) as ws:
            await ws.send_str(json.dumps(body))
            msg = await ws.receive(timeout=10)
            return {"type": msg.type.name, "data": msg.data if isinstance(msg.data, int) else str(msg.data)[:80],
                    "extra": msg.extra}
key2 = ec.generate_private_key(ec.SECP256R1())
csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
       .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(os.environ["IDENTITY"])]),
                      critical=True).sign(key2, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()
out["replay"] = asyncio.run(hello({"token": os.environ["TOKEN"], "csr": csr}))
out["no_credentials"] = asyncio.run(hello({}))
print(json.dumps(out))
'''


def test_a_rogue_container_cannot_call_payments_nor_get_a_certificate(mesh):
    pay_ip = container_ip(app_name("payments"))
    orders = app_name("orders")
    env = inspect_env(f"{orders}-mesh")   # what a thief with `docker inspect` would read
    # The token is not there (meshd copies it in as a file): the rogue guesses one. A real token
    # replayed from another container: tests/e2e/test_boundaries.py.
    assert "MESH_BOOTSTRAP_TOKEN" not in env, "no bootstrap token in the sidecar's environment"
    guess = "x" * 43
    app_id = run(["docker", "inspect", "-f", "{{.Id}}", orders]).stdout.strip()
    proc = run(["docker", "run", "--rm", "--network", NET,
                "-e", f"PAY_IP={pay_ip}", "-e", f"TOKEN={guess}",
                "-e", f"BUNDLE={env['MESH_CA_BUNDLE']}", "-e", f"CONTROL={env['MESH_CONTROL_URL']}",
                "-e", f"NODE={orders}-mesh", "-e", f"APP_ID={app_id}", "-e", f"IDENTITY={env['MESH_IDENTITY']}",
                "meshd:latest", "python", "-c", ROGUE], timeout=120)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nrogue container: {json.dumps(out)}")
    assert out["plain_8080"].startswith("FAIL"), out
    assert out["plain_15006"].startswith("FAIL"), out
    assert out["selfsigned_15006"].startswith("FAIL"), out
    assert out["admin_api"].startswith("FAIL") and out["docker_socket"].startswith("FAIL"), out
    assert http("GET", f"{ADMIN}/v1/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    # The guessed token: meshd closes the channel with 4401 and a reason, and sends no certificate.
    assert out["replay"]["type"] == "CLOSE" and out["replay"]["data"] == 4401, out
    assert "wrong bootstrap token" in out["replay"]["extra"], out
    assert out["no_credentials"]["data"] == 4401, out
    logs = run(["docker", "logs", "meshd"]).stderr + run(["docker", "logs", "meshd"]).stdout
    assert "node_refused" in logs
    assert "PRIVATE KEY" not in logs and "CERTIFICATE REQUEST" not in logs


# ---- (c) authorization --------------------------------------------------------------------------

def _order_status() -> tuple[int, dict]:
    status, _, body = http("GET", f"{GATEWAY}/api/orders/1", timeout=5)
    return status, json.loads(body) if body[:1] == b"{" else {}


def _wait_order(pred, limit: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        status, body = _order_status()
        if pred(status, body):
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError("the change did not take effect within the limit")


def test_policy_deny_reaches_every_sidecar_within_a_second_and_allow_restores(mesh):
    assert _order_status()[0] == 200
    version_before = get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"]
    t0 = time.monotonic()
    out = meshctl("policy", "deny", "orders", "payments").stdout
    denied_after = _wait_order(lambda s, b: s == 502 and b.get("failed") == "payments" and b.get("status") == 403)
    took = time.monotonic() - t0
    version = get_json(f"{ADMIN}/v1/status")["meshd"]["snapshot_version"]
    assert version > version_before
    acks = get_json(f"{ADMIN}/v1/acks?version={version}")["acks"]
    nodes = connected_nodes()
    assert len(acks) >= len(nodes) and max(acks.values()) < 1.0, acks
    print(f"\npolicy deny: meshctl said: {out.strip().splitlines()[0]}; slowest of {len(acks)} ACKs "
          f"{max(acks.values()) * 1000:.0f} ms; first 403 {denied_after * 1000:.0f} ms after meshctl returned, "
          f"{took * 1000:.0f} ms from the command's start")
    assert took < 1.0 + 1.5  # meshctl's own start-up (~0.5 s of Python imports) plus the 1 s budget
    assert denied_after < 1.0
    # The denial as payments' inbound gives it: 403, x-mesh-denied, counted as RBAC.
    orders = app_name("orders")
    probe = run(["docker", "exec", orders, "python3", "-c",
                 "import urllib.request as u, urllib.error as e\n"
                 "try:\n u.urlopen('http://payments:8080/healthz', timeout=5)\n"
                 "except e.HTTPError as x:\n print(x.code, x.headers.get('x-mesh-denied'), x.headers.get('x-mesh-flags'))"])
    assert probe.stdout.strip() == "403 rule deny orders -> payments RBAC", probe.stdout
    text = metrics(container_ip(app_name("payments")))
    assert 'response_flags="RBAC"' in text and 'source_workload="orders"' in text
    # Other callers are not affected: notifications -> payments still allowed.
    probe = run(["docker", "exec", app_name("notifications"), "python3", "-c",
                 "import urllib.request as u; print(u.urlopen('http://payments:8080/healthz', timeout=5).status)"])
    assert probe.stdout.strip() == "200"
    t0 = time.monotonic()
    meshctl("policy", "allow", "orders", "payments")
    allowed_after = _wait_order(lambda s, b: s == 200)
    print(f"policy allow: 200 again {allowed_after * 1000:.0f} ms after meshctl returned")
    assert allowed_after < 1.0
    meshctl("policy", "remove", "orders", "payments")
    assert "rules: none" in meshctl("policy", "list").stdout


# ---- (d) rotations under load, (e) meshd down -------------------------------------------------------

def _restart_meshd(ttl: str | None) -> float:
    recreate_meshd("MESH_CERT_TTL", ttl)
    wait_for(lambda: get_json(f"{ADMIN}/v1/certs")["cert_ttl_s"] > 0, 30, what="meshd back")
    expected = len(docker_ps("label=mesh.role=sidecar")) + 1
    wait_for(lambda: len(connected_nodes()) >= expected, 30, what="every node reconnected")
    return time.time()


def _identities() -> dict[str, dict]:
    return {i["node"]: i for i in certs()["identities"] if i.get("connected")}


def test_rotations_under_load_and_meshd_outage(mesh):
    try:
        _rotations_and_outage()
    finally:
        if get_json(f"{ADMIN}/v1/certs")["cert_ttl_s"] != 86400:
            _restart_meshd(None)


def _rotations_and_outage():
    _restart_meshd("10s")
    assert certs()["cert_ttl_s"] == 10
    meshctl("certs", "rotate")            # every node renews now: 10 s certificates from here on
    before = {n: i["renewals"] for n, i in _identities().items()}
    with Load(20.0) as load:
        time.sleep(60)
    after = _identities()
    rotated = {n: after[n]["renewals"] - before.get(n, 0) for n in after}
    print(f"\n(d) 60 s at 20 req/s with 10 s certificates: {len(load.results)} requests, "
          f"{len(load.failures)} failed; renewals per node: min {min(rotated.values())}, "
          f"max {max(rotated.values())}, total {sum(rotated.values())}")
    assert len(load.results) >= 1000
    assert load.failures == [], load.failures[:5]
    assert min(rotated.values()) >= 8, rotated    # about every 5 s

    roots_before = [r["name"] for r in certs()["roots"]]
    with Load(20.0) as load:
        time.sleep(2)
        t0 = time.monotonic()
        out = meshctl("certs", "rotate", "--root").stdout
        took = time.monotonic() - t0
        time.sleep(3)
    data = certs()
    print(f"(d) root rotation in {took:.1f}s under load: {len(load.results)} requests, {len(load.failures)} failed; "
          f"roots {roots_before} -> {[r['name'] for r in data['roots']]}\n{out}")
    assert "done" in out and load.failures == [], (out, load.failures[:5])
    assert len(data["roots"]) == 1 and data["roots"][0]["name"] not in roots_before
    assert all(i["issuer"] == data["roots"][0]["name"] for i in _identities().values())
    # Fresh handshakes and a fresh bootstrap under the new root: restart users (its sidecar is
    # recreated with a new token), then orders must reach it over new connections.
    users = app_name("users")
    run(["docker", "restart", users])
    wait_for(lambda: _order_status()[0] == 200, 60, interval=0.5, what="orders -> new users sidecar")
    node = wait_for(lambda: [n for n in connected_nodes() if n["node"] == f"{users}-mesh" and n["auth"]], 30,
                    what="the new users sidecar connected")
    ident = _identities()[f"{users}-mesh"]
    assert ident["issuer"] == data["roots"][0]["name"], ident
    print(f"(d) users restarted after the root rotation: new sidecar authenticated by {node[0]['auth']}, "
          f"issuer {ident['issuer']}")

    # (e) meshd away for 30 s: the data path lives on the certificates in hand (2 min ones here,
    # so that none expires during the outage), then every identity renews with the restarted meshd.
    _restart_meshd("2m")
    meshctl("certs", "rotate")
    run(["docker", "stop", "meshd"])
    stopped = time.time()
    with Load(20.0) as load:
        time.sleep(30)
    print(f"(e) meshd stopped 30 s: {len(load.results)} requests, {len(load.failures)} failed")
    assert load.failures == [], load.failures[:5]
    restarted = _restart_meshd(None)     # the default lifetime (24h) again
    assert restarted - stopped >= 30

    def all_renewed():
        ids = _identities()
        return ids and all(i["issued_at"] >= restarted for i in ids.values()) and ids

    ids = wait_for(all_renewed, 120, interval=1.0, what="every identity renewed after the restart")
    print(f"(e) after the restart, {len(ids)} identities renewed within "
          f"{max(i['issued_at'] for i in ids.values()) - restarted:.0f} s; meshctl certs:\n"
          + meshctl("certs").stdout)
    assert all(i["not_after"] - i["issued_at"] > 3600 for i in ids.values())   # 24 h certificates again


def test_piped_meshctl_certs_counts_every_identity(mesh):
    """`docker exec meshd meshctl certs | grep -c spiffe://`: no terminal, yet one line per identity."""
    out = run(["docker", "exec", "meshd", "sh", "-c", "meshctl certs | grep -c spiffe://"], check=False).stdout
    identities = get_json(f"{ADMIN}/v1/certs")["identities"]
    assert identities and int(out.strip() or 0) >= len(identities), (out, len(identities))
    listed = run(["docker", "exec", "meshd", "sh", "-c", "meshctl certs"]).stdout
    assert all(any(i["identity"] in line for line in listed.splitlines()) for i in identities), listed[:2000]
