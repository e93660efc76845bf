"""Control plane benchmark: config push to N sidecars' control clients, CSR signing, meshd memory.

    python -m bench.controlplane hub --port P --nodes N --state-dir D        (meshd's Hub + rules API)
    python -m bench.controlplane clients --url ws://127.0.0.1:P/v1/stream --count K --prefix X

The hub process runs meshd's own pieces: meshd.control.Hub on the control websocket path, the rules
API of meshd.rules_api (what `meshctl split` posts to) over a RulesBook in a meshd.store.Store, and
a republish that does what Meshd.republish does: build_workloads + build_config from N meshed
containers and their mDNS announcements, the config digest, the store writes, Hub.publish. Docker
and mDNS are replaced by the list of containers the hub makes up.

The client processes run real sidecar.control.ControlClient instances (several per process), each
applying snapshots to its own sidecar.proxy.ProxyState (decode + route table), as a sidecar does.

A push is timed on the hub's clock: from the rules change arriving (`changed`) or from Hub.publish
(`published`) to the last of the N ACKs arriving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import env

TRUST_DOMAIN = "mesh.local"
NAMESPACE = "bench"
PER_PROCESS = 25  # control clients per client process


def _apps(nodes: int, services: int):
    """N meshed containers over `services` services (two versions each), and their announcements."""
    from meshcore.labels import ContainerInfo, spiffe_id
    from meshcore.snapshot import Announcement

    apps, anns = [], []
    for i in range(nodes):
        svc = f"svc-{i % services}"
        version = "v1" if (i // services) % 2 == 0 else "v2"
        cid = f"{i:012x}" + "b" * 52
        ip = f"172.30.{i // 250}.{i % 250 + 2}"
        labels = {"mesh.enable": "true", "mesh.port": "8080", "mesh.service": svc, "mesh.version": version,
                  "com.docker.compose.project": NAMESPACE, "com.docker.compose.service": f"{svc}-{version}"}
        if i == 0:
            labels["mesh.gateway.path"] = "/api"
        apps.append(ContainerInfo(id=cid, name=f"/{NAMESPACE}-{svc}-{i}", labels=labels,
                                  networks={f"{NAMESPACE}_default": ip}, running=True))
        anns.append(Announcement(instance=cid, service=svc, version=version, address=ip, port=15006,
                                 identity=spiffe_id(TRUST_DOMAIN, NAMESPACE, svc)))
    return apps, anns


# ---- the hub process ----------------------------------------------------------------------------

async def _hub(args: argparse.Namespace) -> None:
    from aiohttp import web

    import meshd.app  # noqa: F401 - meshd's module set (docker SDK, zeroconf...), for its memory
    from meshcore.protocol import CONTROL_PATH
    from meshcore.snapshot import Snapshot, build_config, build_workloads
    from meshd.app import config_digest
    from meshd.control import Hub, dumps
    from meshd.rules_api import RulesBook, add_routes
    from meshd.store import Store

    apps, anns = _apps(args.nodes, args.services)
    store = Store(os.path.join(args.state_dir, "state.db"))
    book = RulesBook(store)
    hub = Hub()
    state = {"version": 0, "digest": "", "changed_at": {}}

    def versions_of(service: str):
        found = {wl.spec.version for wl in build_workloads(apps) if wl.spec and wl.spec.service == service}
        return found or None

    async def republish() -> int:
        changed = time.time()
        config, _errors = build_config(build_workloads(apps), anns, TRUST_DOMAIN, rules=book.rules)
        digest = config_digest(config)
        if digest != state["digest"] or hub.latest is None:
            state["version"] += 1
            state["digest"] = digest
            store.put("snapshot_version", state["version"])
            store.put("snapshot_digest", digest)
            state["changed_at"][state["version"]] = changed
            hub.publish(Snapshot(version=state["version"], config=config))
        return state["version"]

    async def acks(req: web.Request) -> web.Response:
        version = int(req.query["version"])
        return web.json_response({"version": version, "published_at": hub.published_at.get(version),
                                  "changed_at": state["changed_at"].get(version),
                                  "acks": hub.ack_latency(version)}, dumps=dumps)

    async def status(_req: web.Request) -> web.Response:
        nodes = hub.status()
        return web.json_response({"connected": sum(1 for n in nodes if n["connected"]),
                                  "version": state["version"],
                                  "acked_latest": sum(1 for n in nodes if n["acked_version"] == state["version"])})

    app = web.Application()
    app.router.add_get(CONTROL_PATH, hub.handle)
    app.router.add_get("/v1/acks", acks)
    app.router.add_get("/v1/status", status)
    add_routes(app, book, versions_of, republish)
    await republish()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    store.close()


# ---- the client processes -----------------------------------------------------------------------

async def _clients(args: argparse.Namespace) -> None:
    from sidecar.control import ControlClient
    from sidecar.proxy import ProxyState

    tasks = []
    for i in range(args.count):
        state = ProxyState(f"svc-{i % args.services}", "v1")
        client = ControlClient(args.url, "sidecar", f"{args.prefix}-{i}", f"container-{args.prefix}-{i}",
                               apply=state.apply_snapshot)
        tasks.append(asyncio.ensure_future(client.run()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---- the harness side ---------------------------------------------------------------------------

def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url} -> {exc.code}: {exc.read()[:300]!r}") from None


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def push_bench(nodes: int, pushes: int, workdir: Path, log, services: int = 10, warmup: int = 2) -> dict:
    """Start a hub and N control clients; time `pushes` config changes (meshctl split) to N ACKs."""
    procs = env.Procs()
    workdir.mkdir(parents=True, exist_ok=True)
    port = env.free_port()
    base = f"http://127.0.0.1:{port}"
    services = max(1, min(services, nodes // 2))  # every service has a v1 and a v2 instance
    try:
        state_dir = workdir / f"hub-{nodes}"
        state_dir.mkdir(exist_ok=True)
        # the hub is meshd's: it starts as in the image (its RSS is reported)
        hub = procs.start(f"hub-{nodes}", [env.product_python(workdir), "-m", "bench.controlplane", "hub",
                                           "--port", str(port), "--nodes", str(nodes), "--services", str(services),
                                           "--state-dir", str(state_dir)], workdir)
        env.wait_port(port, 30, hub, "hub")
        idle_hub = env.memory_kib(hub.pid)
        client_pids = []
        for k in range(math.ceil(nodes / PER_PROCESS)):
            count = min(PER_PROCESS, nodes - k * PER_PROCESS)
            p = procs.start(f"clients-{nodes}-{k}", [sys.executable, "-m", "bench.controlplane", "clients",
                                                     "--url", f"ws://127.0.0.1:{port}/v1/stream",
                                                     "--count", str(count), "--prefix", f"n{k}",
                                                     "--services", str(services)], workdir)
            client_pids.append(p.pid)
        deadline = time.monotonic() + 60
        while True:
            st = _get(f"{base}/v1/status")
            if st["connected"] == nodes and st["acked_latest"] == nodes:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {st['connected']}/{nodes} control clients connected and "
                                   f"{st['acked_latest']} ACKed after 60 s")
            time.sleep(0.05)
        samples = []
        for i in range(warmup + pushes):
            weights = {"v1": 90, "v2": 10} if i % 2 == 0 else {"v1": 80, "v2": 20}
            t0 = time.monotonic()
            reply = _post(f"{base}/v1/rules/svc-0/split", {"weights": weights})
            version = reply["version"]
            end = time.monotonic() + 10
            while True:
                body = _get(f"{base}/v1/acks?version={version}")
                if len(body["acks"]) >= nodes:
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"push {version}: {len(body['acks'])}/{nodes} ACKs after 10 s")
                time.sleep(0.002)
            wall = time.monotonic() - t0
            lat = list(body["acks"].values())
            if i >= warmup:
                samples.append({"version": version, "all_acked_ms": max(lat) * 1000,
                                "from_change_ms": (max(lat) + body["published_at"] - body["changed_at"]) * 1000,
                                "node_p50_ms": _pct(lat, 50) * 1000, "harness_wall_ms": wall * 1000})
            time.sleep(0.05)
        hub_mem = env.memory_kib(hub.pid)
        clients_mem = [env.memory_kib(pid) for pid in client_pids]
    finally:
        procs.stop_all()
    acked = [s["all_acked_ms"] for s in samples]
    changed = [s["from_change_ms"] for s in samples]
    out = {"nodes": nodes, "services": services, "pushes": len(samples), "client_processes": len(client_pids),
           "all_acked_ms": {"p50": _pct(acked, 50), "p99": _pct(acked, 99), "max": max(acked)},
           "change_to_all_acked_ms": {"p50": _pct(changed, 50), "p99": _pct(changed, 99), "max": max(changed)},
           "node_ack_p50_ms": statistics.median(s["node_p50_ms"] for s in samples),
           "hub_memory_kib": hub_mem, "hub_idle_memory_kib": idle_hub,
           "client_process_rss_kib": [m["rss_kib"] for m in clients_mem], "samples": samples}
    log(f"  push to {nodes:3} nodes: publish->all ACKed p50 {out['all_acked_ms']['p50']:.1f} ms, "
        f"p99 {out['all_acked_ms']['p99']:.1f} ms (rules change->all ACKed p99 "
        f"{out['change_to_all_acked_ms']['p99']:.1f} ms); hub RSS {hub_mem['rss_kib'] / 1024:.1f} MiB")
    return out


def csr_rate(seconds: float = 2.0, batch: int = 64) -> dict:
    """CSRs signed per second by CertificateAuthority.sign_csr (one thread), and the full issue rate
    (key generation + CSR on the node side + signing)."""
    from certs.ca import CertificateAuthority
    from certs.keys import build_csr, generate_key
    from meshcore.labels import spiffe_id

    ca = CertificateAuthority.create(TRUST_DOMAIN, time.time())
    items = []
    for i in range(batch):
        sid = spiffe_id(TRUST_DOMAIN, NAMESPACE, f"svc-{i}")
        key, _ = generate_key()
        items.append((build_csr(key, sid), sid))
    n = 0
    start = time.perf_counter()
    cpu0 = time.process_time()
    while True:
        csr, sid = items[n % batch]
        ca.sign_csr(csr, sid, 86400.0, time.time())
        n += 1
        if n % 16 == 0 and time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    m = 0
    start2 = time.perf_counter()
    while m < max(8, n // 8):
        sid = spiffe_id(TRUST_DOMAIN, NAMESPACE, f"svc-{m}")
        key, _ = generate_key()
        ca.sign_csr(build_csr(key, sid), sid, 86400.0, time.time())
        m += 1
    full = m / (time.perf_counter() - start2)
    return {"signed": n, "seconds": round(elapsed, 3), "per_second": round(n / elapsed, 1),
            "cpu_ms_per_csr": round(cpu / n * 1000, 3), "issue_with_keygen_per_second": round(full, 1)}


def apply_cost(nodes: int = 100, services: int = 10, repeat: int = 30) -> dict:
    """One node's share of a push: decode the control message, then ControlClient.handle_push
    (decode_snapshot + the route table of ProxyState.apply_snapshot), for an N-node snapshot."""
    from meshcore.protocol import SnapshotPush, decode_message, encode_message
    from meshcore.snapshot import Snapshot, build_config, build_workloads, encode_snapshot
    from sidecar.control import ControlClient
    from sidecar.proxy import ProxyState

    apps, anns = _apps(nodes, services)
    config, _ = build_config(build_workloads(apps), anns, TRUST_DOMAIN)
    text = encode_message(SnapshotPush(version=1, snapshot=encode_snapshot(Snapshot(version=1, config=config))))
    state = ProxyState("svc-0", "v1")
    client = ControlClient("ws://127.0.0.1:1/unused", "sidecar", "n", "c", apply=state.apply_snapshot)
    t0 = time.perf_counter()
    for _ in range(repeat):
        push = decode_message(text)
    t1 = time.perf_counter()
    for _ in range(repeat):
        client.handle_push(push)
    t2 = time.perf_counter()
    return {"nodes": nodes, "bytes": len(text), "decode_ms": (t1 - t0) / repeat * 1000,
            "apply_ms": (t2 - t1) / repeat * 1000}


def run_controlplane(node_counts: tuple[int, ...], pushes: int, csr_seconds: float, workdir: Path,
                     raw_dir: Path, log=print) -> dict:
    started = time.monotonic()
    res: dict = {"push": {}}
    for n in node_counts:
        res["push"][str(n)] = push_bench(n, pushes, workdir, log)
    res["apply"] = apply_cost(max(node_counts))
    res["csr"] = csr_rate(csr_seconds)
    log(f"  CSR signing: {res['csr']['per_second']:.0f}/s ({res['csr']['cpu_ms_per_csr']:.2f} ms CPU each); "
        f"with node key generation + CSR: {res['csr']['issue_with_keygen_per_second']:.0f}/s")
    res["seconds"] = round(time.monotonic() - started, 1)
    env.dump_json(raw_dir / "controlplane.json", res)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.controlplane")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hub")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--nodes", type=int, required=True)
    h.add_argument("--services", type=int, default=10)
    h.add_argument("--state-dir", required=True)
    c = sub.add_parser("clients")
    c.add_argument("--url", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--prefix", required=True)
    c.add_argument("--services", type=int, default=10)
    args = p.parse_args(argv)
    from meshproc.runtime import configure_logging, run_forever
    configure_logging("meshd" if args.cmd == "hub" else "sidecar")
    run_forever(lambda: _hub(args) if args.cmd == "hub" else _clients(args))


if __name__ == "__main__":
    main()
