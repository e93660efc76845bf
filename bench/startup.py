"""Start-up benchmark: `docker-compose -p shop -f compose/demo.yml up -d` until every meshed app's
sidecar answers `/healthz/ready` 200 on the app container's IP:15020.

Runs only when a Docker engine answers, the images exist, the demo is not already up, and no other
end-to-end session holds /tmp/meshd-e2e.lock (taken with flock LOCK_EX|LOCK_NB, like tests/e2e).
A lock held by one of this process's ancestors is ours: `flock /tmp/meshd-e2e.lock make bench`
serializes the whole benchmark with the end-to-end tests, and this part then runs under it.
meshd is started from compose/meshd.yml when it is not running; whatever this part started it
takes down again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

from . import env

PROJECT = "shop"
DEMO = "compose/demo.yml"
MESHD = "compose/meshd.yml"
ADMIN = "http://127.0.0.1:15014/v1/status"
IMAGES = ("meshd:latest", "mesh-demo:latest")


def _compose() -> list[str]:
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


def _run(cmd: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=env.ROOT)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc


def _ids(*filters: str, all_: bool = False) -> list[str]:
    cmd = ["docker", "ps", "-q", "--no-trunc"] + (["-a"] if all_ else [])
    for f in filters:
        cmd += ["--filter", f]
    return _run(cmd, 30).stdout.split()


def _inspect(ids: list[str]) -> list[dict]:
    return json.loads(_run(["docker", "inspect", *ids], 30).stdout) if ids else []


def _ready(ip: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{ip}:15020/healthz/ready", timeout=0.5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _process_rss(pid: int, needle: str) -> int | None:
    """VmRSS (KiB) of the process of a container whose command line holds `needle` (pid or a child)."""
    for p in [pid, *env.children_of(pid)]:
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            return env.memory_kib(p)["rss_kib"]
    return None


def _skip(reason: str, log) -> dict:
    log(f"  start-up: skipped: {reason}")
    return {"skipped": reason}


def _ancestors() -> set[int]:
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
            pid = int(data[data.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def held_by_ancestor(path: str) -> bool:
    """Whether an exclusive flock on `path` is held by one of this process's ancestors (/proc/locks
    names the process that took it, e.g. flock(1) running `make bench`)."""
    try:
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            holders = {int(fl[4]) for fl in (line.split() for line in f)
                       if len(fl) > 5 and fl[1] == "FLOCK" and fl[3] == "WRITE" and fl[5] == key}
    except (OSError, ValueError):
        return False
    return bool(holders & _ancestors())


def run_startup(log=print, timeout: float = 120.0) -> dict:
    if shutil.which("docker") is None:
        return _skip("no docker client", log)
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
            return _skip("no Docker engine answers", log)
    except subprocess.TimeoutExpired:
        return _skip("the Docker engine does not answer within 20 s", log)
    lock_path = os.environ.get("MESH_E2E_LOCK", "/tmp/meshd-e2e.lock")
    fh = open(lock_path, "a")
    try:
        ours = False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ours = True
        except BlockingIOError:
            if not held_by_ancestor(lock_path):
                return _skip(f"another end-to-end session holds {lock_path}", log)
            log(f"  start-up: under {lock_path}, held by the caller")
        try:
            return _measure(log, timeout)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            log(f"  start-up: failed: {exc}")
            return {"error": str(exc)}
        finally:
            if ours:
                fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def _measure(log, timeout: float) -> dict:
    for image in IMAGES:
        if _run(["docker", "image", "inspect", image], 30, check=False).returncode != 0:
            return _skip(f"image {image} is missing (make images)", log)
    if _ids(f"label=com.docker.compose.project={PROJECT}", all_=True):
        return _skip(f"the demo (compose project {PROJECT}) is already up: not taking it down to time it", log)
    compose = _compose()
    started_meshd = not _ids("name=^meshd$", "status=running")
    meshd_volume_existed = _run(["docker", "volume", "inspect", "meshd_meshd-state"], 30, check=False).returncode == 0
    started_demo = False
    try:
        if started_meshd:
            log("  start-up: starting meshd (compose/meshd.yml)")
            _run(compose + ["-p", "meshd", "-f", MESHD, "up", "-d"], 180)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(ADMIN, timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers (an admin token may be required): meshd is up
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("meshd's admin API (127.0.0.1:15014) does not answer after 60 s")
            time.sleep(0.2)
        time.sleep(1.0)  # let meshd settle (its first rebuild) before the clock starts
        t0 = time.monotonic()
        started_demo = True
        _run(compose + ["-p", PROJECT, "-f", DEMO, "up", "-d"], 300)
        compose_s = time.monotonic() - t0
        apps = _inspect(_ids(f"label=com.docker.compose.project={PROJECT}", "label=mesh.enable=true"))
        targets = {}
        for app in apps:
            ips = [n.get("IPAddress") for n in app["NetworkSettings"]["Networks"].values() if n.get("IPAddress")]
            if ips:
                targets[app["Name"].lstrip("/")] = ips[0]
        ready_at: dict[str, float] = {}
        end = t0 + timeout
        while len(ready_at) < len(targets) and time.monotonic() < end:
            for name, ip in targets.items():
                if name not in ready_at and _ready(ip):
                    ready_at[name] = round(time.monotonic() - t0, 2)
            time.sleep(0.05)
        result = {"apps": len(targets), "ready": len(ready_at), "compose_up_s": round(compose_s, 2),
                  "all_ready_s": max(ready_at.values()) if len(ready_at) == len(targets) and targets else None,
                  "first_ready_s": min(ready_at.values()) if ready_at else None,
                  "per_app_s": ready_at, "started_meshd": started_meshd}
        if len(ready_at) < len(targets):
            result["not_ready"] = sorted(set(targets) - set(ready_at))
        # memory of the real processes, now idle: meshd with the demo's nodes, and each sidecar
        meshd = _inspect(_ids("name=^meshd$"))
        if meshd:
            result["meshd_rss_kib"] = _process_rss(meshd[0]["State"]["Pid"], "meshd")
        sidecars = _inspect(_ids("label=mesh.owner=meshd", "status=running"))
        rss = {}
        for sc in sidecars:
            name = sc["Name"].lstrip("/")
            value = _process_rss(sc["State"]["Pid"], "sidecar" if "gateway" not in name else "gateway")
            if value:
                rss[name] = value
        result["node_rss_kib"] = rss
        if result["all_ready_s"] is not None:
            log(f"  start-up: compose up {compose_s:.1f} s, all {len(targets)} sidecars ready after "
                f"{result['all_ready_s']:.1f} s")
        else:
            log(f"  start-up: only {len(ready_at)}/{len(targets)} sidecars ready after {timeout:.0f} s")
        return result
    finally:
        if started_demo:
            _run(compose + ["-p", PROJECT, "-f", DEMO, "down", "-v", "--remove-orphans"], 180, check=False)
        if started_meshd:
            _run(compose + ["-p", "meshd", "-f", MESHD, "down"] + ([] if meshd_volume_existed else ["-v"]),
                 180, check=False)
            owned = _ids("label=mesh.owner=meshd", all_=True)
            if owned:
                _run(["docker", "rm", "-f", *owned], 120, check=False)
