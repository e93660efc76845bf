"""Lifecycle at scale: N meshed nginx replicas and a curl client on one host, from `compose up` to
`compose down`, measured against meshd started from compose/meshd.yml.

    python -m bench.lifecycle_scale --replicas 100        (make bench-scale)

Figures: up until every sidecar is connected and ACKed, the sidecars' RSS, the idle CPU of the
sidecars plus meshd, a config change's ACK latency over every node, mDNS packets per second at
idle, meshd's CPU per Docker event, and `compose down` until no sidecar is left. They replace the
"Lifecycle at scale" section of bench/RESULTS.md. Needs root (cgroup and /proc reads, tcpdump),
the images (`make images test-images`) and the end-to-end lock: run it as
`flock /tmp/meshd-e2e.lock python -m bench.lifecycle_scale`, or it takes the lock itself.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import env
from .report import replace_section
from .startup import _compose, _ids, _inspect, _run, held_by_ancestor

PROJECT = "scale"
APP_FILE = "tests/e2e/projects/webclient.yml"   # Debian's nginx + a curl client, labels only
MESHD_FILE = "compose/meshd.yml"
ADMIN = "http://127.0.0.1:15014"
SIDECARS = ("label=mesh.owner=meshd", "label=mesh.role=sidecar")
SECTION = "## Lifecycle at scale"
NS_PER_S = 1e9


# ---- pure helpers ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def of_project(name: str) -> bool:
    """Whether a container name is the project's: Compose v1 `scale_web_1`, v2 `scale-web-1`."""
    return name.startswith((f"{PROJECT}_", f"{PROJECT}-"))


def all_acked(status: dict, expected_apps: int) -> tuple[int, int]:
    """(sidecars connected and on the current snapshot, sidecars listed) from GET /v1/status."""
    current = (status.get("meshd") or {}).get("snapshot_version")
    rows = [s for s in status.get("sidecars") or [] if of_project(s.get("app", ""))]
    done = sum(1 for s in rows if s.get("state") == "running" and s.get("connected")
               and current is not None and s.get("acked_version") == current)
    return done, max(len(rows), expected_apps)


def tcpdump_count(stderr: str) -> int | None:
    """Packets captured, from tcpdump's closing statistics."""
    match = re.search(r"(\d+) packets? captured", stderr)
    return int(match.group(1)) if match else None


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def markdown(res: dict) -> str:
    """The "Lifecycle at scale" section for bench/RESULTS.md."""
    n = res["replicas"]
    up, down, idle, ack = res.get("up", {}), res.get("down", {}), res.get("idle", {}), res.get("acks", {})
    ev, mem = res.get("events", {}), res.get("memory", {})
    rows = [
        ("`compose up` returned", _fmt(up.get("compose_s"), " s")),
        ("every sidecar connected and ACKed", _fmt(up.get("ready_s"), " s")
         + ("" if up.get("ready") else f" (not reached: {up.get('acked')}/{up.get('sidecars')})")),
        ("sidecars' RSS, total (VmRSS of their processes)", _fmt(mem.get("sidecars_rss_mib"), " MiB", 0)),
        ("sidecars' RSS, per sidecar", _fmt(mem.get("per_sidecar_mib"), " MiB")),
        ("meshd's RSS", _fmt(mem.get("meshd_rss_mib"), " MiB")),
        (f"idle CPU over {idle.get('window_s', '-')} s: sidecars", _fmt(idle.get("sidecars_pct"), " % of a core", 2)),
        ("idle CPU: meshd", _fmt(idle.get("meshd_pct"), " % of a core", 2)),
        ("idle CPU: sidecars + meshd", _fmt(idle.get("total_pct"), " % of a core", 2)),
        (f"config change ACKed by every node ({ack.get('changes', 0)} changes, {ack.get('samples', 0)} ACKs): p50",
         _fmt(ack.get("p50_ms"), " ms", 0)),
        ("config change ACK: p99", _fmt(ack.get("p99_ms"), " ms", 0)),
        ("config change: the last node's ACK, worst change", _fmt(ack.get("slowest_all_ms"), " ms", 0)),
        ("mDNS packets per second at idle (project bridge)", _fmt(res.get("mdns", {}).get("per_s"), "", 2)),
        (f"meshd CPU per Docker event ({ev.get('events', 0)} events)", _fmt(ev.get("ms_per_event"), " ms", 2)),
        ("`compose down` returned", _fmt(down.get("compose_s"), " s")
         + ("" if down.get("compose_rc") in (0, None) else f" (exit {down.get('compose_rc')})")),
        ("no sidecar left", _fmt(down.get("sidecars_gone_s"), " s")
         + ("" if down.get("sidecars_gone") else f" (not reached: {down.get('sidecars_left')} left)")),
    ]
    out = [SECTION, "",
           f"`python -m bench.lifecycle_scale --replicas {n}` ({res.get('when', '')}, {res.get('machine', '')}): "
           f"{n} replicas of Debian's nginx and one curl client (`{APP_FILE}`), each with its sidecar, "
           f"meshd from `{MESHD_FILE}` restarted first (image `{res.get('image')}`).", "",
           "| figure | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "Times run from the start of `compose up` / `compose down`. RSS counts each process's resident "
            "pages (pages shared between sidecars, such as the image's files, are counted in each). CPU is "
            "the containers' cgroup CPU time. ACK latency: from meshd publishing a version to each node's "
            "ACK of it (`GET /v1/acks`). Events: `docker kill -s HUP` of every nginx (one event each), "
            "meshd's CPU time over the burst and its rebuilds, idle rate subtracted."]
    if res.get("notes"):
        out += [""] + [f"- {note}" for note in res["notes"]]
    return "\n".join(out) + "\n"


# ---- measurements (root, Docker) ---------------------------------------------------------------

def _cgroup_file(controller: str, cid: str, name: str) -> Path | None:
    for path in (Path(f"/sys/fs/cgroup/{controller}/docker/{cid}/{name}"),
                 Path(f"/sys/fs/cgroup/{controller}/system.slice/docker-{cid}.scope/{name}")):
        if path.exists():
            return path
    return None


def cpu_ns(cid: str) -> int:
    """CPU time of a container's cgroup (cgroup v1 cpuacct or v2 cpu.stat), nanoseconds."""
    path = _cgroup_file("cpuacct", cid, "cpuacct.usage")
    if path is not None:
        return int(path.read_text())
    for path in (Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat"),
                 Path(f"/sys/fs/cgroup/docker/{cid}/cpu.stat")):
        if path.exists():
            usage = re.search(r"usage_usec (\d+)", path.read_text())
            return int(usage.group(1)) * 1000 if usage else 0
    return 0


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and its children, KiB (0 for a process that is gone)."""
    total = 0
    for p in [pid, *env.children_of(pid)]:
        try:
            total += env.memory_kib(p)["rss_kib"]
        except OSError:
            continue
    return total


def admin_get(path: str, token: str, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(ADMIN + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def admin_post(path: str, token: str, body: dict, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(ADMIN + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def sidecar_ids() -> list[str]:
    """The project's sidecars (by name prefix), running or not, one `docker ps` call."""
    out = _run(["docker", "ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}",
                *sum((["--filter", f] for f in SIDECARS), [])], 60).stdout
    return [line.split()[0] for line in out.splitlines() if of_project(line.split()[1])]


def start_meshd(compose: list[str], files: list[str], log) -> str:
    """meshd restarted from compose/meshd.yml; returns its admin token once the API answers."""
    _run(compose + ["-p", "meshd", *files, "down"], 300, check=False)
    _run(compose + ["-p", "meshd", *files, "up", "-d"], 300)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        token = _run(["docker", "exec", "meshd", "cat", "/var/lib/meshd/admin.token"], 30, check=False).stdout.strip()
        if token:
            try:
                admin_get("/v1/status", token, 5)
                return token
            except (OSError, urllib.error.URLError):
                pass
        time.sleep(1)
    raise RuntimeError("meshd's admin API did not answer within 60 s")


def measure_up(compose: list[str], replicas: int, token: str, timeout: float, log) -> dict:
    t0 = time.monotonic()
    _run(compose + ["-p", PROJECT, "-f", APP_FILE, "up", "-d", "--scale", f"web={replicas}"], timeout)
    res = {"compose_s": round(time.monotonic() - t0, 1), "ready": False}
    log(f"  compose up returned after {res['compose_s']} s")
    last = (0, replicas + 1)
    while time.monotonic() - t0 < timeout:
        try:
            last = all_acked(admin_get("/v1/status", token, 30), replicas + 1)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            log(f"  status: {exc}")
        if last[0] >= replicas + 1:
            res.update(ready=True, ready_s=round(time.monotonic() - t0, 1))
            break
        time.sleep(1)
    res.update(acked=last[0], sidecars=last[1])
    log(f"  up: {res}")
    return res


def measure_memory(sidecars: list[dict], meshd: dict) -> dict:
    rss = [tree_rss_kib(c["State"]["Pid"]) for c in sidecars if c["State"].get("Pid")]
    total = sum(rss) / 1024
    return {"sidecars": len(rss), "sidecars_rss_mib": round(total, 1),
            "per_sidecar_mib": round(total / len(rss), 1) if rss else None,
            "meshd_rss_mib": round(tree_rss_kib(meshd["State"]["Pid"]) / 1024, 1)}


def measure_idle(sidecar_cids: list[str], meshd_cid: str, window: float) -> dict:
    before = {c: cpu_ns(c) for c in sidecar_cids + [meshd_cid]}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    after = {c: cpu_ns(c) for c in before}
    side = sum(after[c] - before[c] for c in sidecar_cids) / NS_PER_S
    mesh = (after[meshd_cid] - before[meshd_cid]) / NS_PER_S
    return {"window_s": round(elapsed), "sidecars_pct": round(100 * side / elapsed, 2),
            "meshd_pct": round(100 * mesh / elapsed, 2), "total_pct": round(100 * (side + mesh) / elapsed, 2),
            "meshd_cpu_per_s": mesh / elapsed}


def measure_acks(token: str, nodes: int, changes: int, log) -> dict:
    """Alternate a split and its removal on `web`; every node's ACK latency of each version."""
    samples, slowest = [], []
    for i in range(changes):
        kind, body = ("split", {"weights": {"v1": 100}}) if i % 2 == 0 else ("split-clear", {})
        version = admin_post(f"/v1/rules/web/{kind}", token, body)["version"]
        deadline = time.monotonic() + 60
        acks = {}
        while time.monotonic() < deadline:
            acks = admin_get(f"/v1/acks?version={version}", token)["acks"]
            if len(acks) >= nodes:
                break
            time.sleep(0.5)
        samples += [v * 1000 for v in acks.values()]
        if acks:
            slowest.append(max(acks.values()) * 1000)
        log(f"  change {i + 1}: version {version}, {len(acks)}/{nodes} ACKs, last after "
            f"{_fmt(max(acks.values()) * 1000 if acks else None, ' ms', 0)}")
    return {"changes": changes, "samples": len(samples), "nodes": nodes,
            "p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
            "slowest_all_ms": max(slowest) if slowest else None}


def measure_mdns(window: float, log) -> dict:
    net = json.loads(_run(["docker", "network", "inspect", f"{PROJECT}_default"], 30).stdout)[0]
    iface = (net.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{net['Id'][:12]}"
    tcpdump = env.which("tcpdump")
    if tcpdump is None:
        return {"skipped": "no tcpdump (apt-get install tcpdump)"}
    proc = subprocess.run(["timeout", "-s", "INT", str(window), tcpdump, "-i", iface, "-nn", "-q",
                           "-w", "/dev/null", "udp", "port", "5353"], capture_output=True, text=True,
                          timeout=window + 30)
    count = tcpdump_count(proc.stderr)
    log(f"  mDNS on {iface}: {count} packets in {window:g} s")
    return {"interface": iface, "packets": count, "window_s": window,
            "per_s": round(count / window, 2) if count is not None else None}


def measure_events(web_cids: list[str], meshd_cid: str, idle_cpu_per_s: float, settle: float) -> dict:
    """`docker kill -s HUP` of every nginx (nginx reloads; one event each): meshd's CPU beyond idle."""
    before, t0 = cpu_ns(meshd_cid), time.monotonic()
    _run(["docker", "kill", "-s", "HUP", *web_cids], 300)
    time.sleep(settle)
    elapsed, spent = time.monotonic() - t0, (cpu_ns(meshd_cid) - before) / NS_PER_S
    extra = max(0.0, spent - idle_cpu_per_s * elapsed)
    return {"events": len(web_cids), "window_s": round(elapsed, 1), "meshd_cpu_s": round(spent, 3),
            "ms_per_event": round(1000 * extra / len(web_cids), 2) if web_cids else None}


def measure_down(compose: list[str], timeout: float, log) -> dict:
    t0 = time.monotonic()
    proc = _run(compose + ["-p", PROJECT, "-f", APP_FILE, "down", "--timeout", "10"], timeout, check=False)
    res = {"compose_s": round(time.monotonic() - t0, 1), "compose_rc": proc.returncode, "sidecars_gone": False}
    if proc.returncode:
        log(f"  compose down exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    left: list[str] = []
    while time.monotonic() - t0 < timeout:
        left = sidecar_ids()
        if not left:
            res.update(sidecars_gone=True, sidecars_gone_s=round(time.monotonic() - t0, 1))
            break
        time.sleep(1)
    res["sidecars_left"] = len(left)
    log(f"  down: {res}")
    return res


def cleanup(compose: list[str], meshd_files: list[str], log) -> None:
    """Everything this run started: the project, meshd's sidecars and gateway, meshd."""
    _run(compose + ["-p", PROJECT, "-f", APP_FILE, "down", "--timeout", "5"], 900, check=False)
    owned = _ids("label=mesh.owner=meshd", all_=True)
    if owned:
        _run(["docker", "rm", "-f", *owned], 900, check=False)
    _run(compose + ["-p", "meshd", *meshd_files, "down"], 300, check=False)
    log("  cleaned up")


def run(args, log=print) -> dict:
    compose = _compose()
    files = ["-f", MESHD_FILE]
    override = None
    if args.image != "meshd:latest":
        override = tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False)
        override.write(f"services:\n  meshd:\n    image: {args.image}\n    environment:\n"
                       f"      MESH_IMAGE: {args.image}\n")
        override.close()
        files += ["-f", override.name]
    res: dict = {"replicas": args.replicas, "image": args.image, "notes": [],
                 "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB"}
    try:
        if _ids(f"label=com.docker.compose.project={PROJECT}", all_=True):
            raise RuntimeError(f"project {PROJECT!r} already has containers: `docker-compose -p {PROJECT} down` first")
        log(f"meshd ({args.image}) restarted")
        token = start_meshd(compose, files, log)
        log(f"up: {args.replicas} x web + client")
        res["up"] = measure_up(compose, args.replicas, token, args.timeout, log)
        time.sleep(args.settle)
        sidecars = _inspect(sidecar_ids())
        meshd = _inspect(["meshd"])[0]
        res["memory"] = measure_memory(sidecars, meshd)
        log(f"  memory: {res['memory']}")
        idle = measure_idle([c["Id"] for c in sidecars], meshd["Id"], args.idle_window)
        res["idle"] = idle
        log(f"  idle: {idle}")
        res["mdns"] = measure_mdns(args.mdns_window, log)
        status = admin_get("/v1/status", token, 30)
        nodes = sum(1 for n in status.get("nodes") or [] if n.get("connected", True))
        res["acks"] = measure_acks(token, nodes, args.changes, log)
        log(f"  acks: {res['acks']}")
        time.sleep(args.settle)
        web = _ids(f"label=com.docker.compose.project={PROJECT}", "label=com.docker.compose.service=web")
        res["events"] = measure_events(web, meshd["Id"], idle["meshd_cpu_per_s"], args.event_settle)
        log(f"  events: {res['events']}")
        res["down"] = measure_down(compose, args.timeout, log)
    finally:
        cleanup(compose, files, log)
        if override is not None:
            os.unlink(override.name)
    return res


def main(argv: list[str] | None = None) -> int:
    global PROJECT  # --project: every helper above names the project's containers by it
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--project", default=PROJECT, help="compose project name of the replicas")
    parser.add_argument("--image", default="meshd:latest", help="meshd's image and its sidecars' (MESH_IMAGE)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for up, and for down, at most")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after up before the idle figures")
    parser.add_argument("--idle-window", type=float, default=30.0)
    parser.add_argument("--mdns-window", type=float, default=20.0)
    parser.add_argument("--event-settle", type=float, default=20.0, help="seconds measured after the event burst")
    parser.add_argument("--changes", type=int, default=6, help="config changes for the ACK latency")
    parser.add_argument("--results", default=str(env.ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    PROJECT = args.project
    lock_path = os.environ.get("MESH_E2E_LOCK", "/tmp/meshd-e2e.lock")
    with open(lock_path, "a") as fh:
        if not held_by_ancestor(lock_path):
            print(f"waiting for {lock_path} ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        res = run(args, log=lambda msg: print(msg, flush=True))
    raw = env.ROOT / "bench" / "raw"
    raw.mkdir(exist_ok=True)
    env.dump_json(raw / f"lifecycle_scale_{args.replicas}.json", res)
    section = markdown(res)
    print(section)
    if not args.no_write:
        path = Path(args.results)
        path.write_text(replace_section(path.read_text() if path.exists() else "", SECTION, section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
