"""The randomized lifecycle soak, its pure part: the three projects, a seeded plan of Compose and
Docker operations over them, and the judgement of failed calls (no Docker, no I/O here).

`plan(seed, n)` walks a model of the projects' state, so that every operation it draws is valid
where it is drawn (a `start` only for a service with stopped containers, a `down` only for a project
that is up, ...). The runner (tests/e2e/test_soak.py) checks the model against Docker after each
operation, so a model that drifted from what Compose did fails as a test bug, not as a mesh bug.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Compose service -> (mesh service, role). No two projects share a mesh service name (calls are
# counted by name). aweb2 is the v2 of aweb (mesh.version v2, mesh.service aweb).
PROJECTS: dict[str, dict[str, tuple[str, str]]] = {
    "soaka": {"aweb": ("aweb", "server"), "aweb2": ("aweb", "server"), "acli": ("acli", "caller")},
    "soakb": {"bweb": ("bweb", "server"), "bapi": ("bapi", "server"), "bcli": ("bcli", "caller")},
    "soakc": {"cweb": ("cweb", "server"), "capi": ("capi", "server"), "ccli": ("ccli", "caller")},
}
# Caller mesh service -> the mesh services it calls: its own project's. (Each project has only its
# own bridge network, and Docker isolates bridges from each other: a call to another project's
# service resolves, but no endpoint of it is reachable, and the caller's sidecar answers 503.)
TARGETS: dict[str, tuple[str, ...]] = {
    "acli": ("aweb",),
    "bcli": ("bweb", "bapi"),
    "ccli": ("cweb", "capi"),
}
MAX_REPLICAS = 3
# meshd's memory is read after this many operations and at the end, both times right after a
# `reset` (every project up, one container per service, all running, none on the extra network),
# so that the two readings are of the same mesh.
MEMORY_OPS = 20
KINDS = ("up", "down", "downup", "scale", "restart", "stop", "start", "recreate",
         "netconnect", "netdisconnect", "killsidecar", "killapp", "reset")
# Relative weights of the kinds among those valid in a state: mostly operations on running
# services, a project down now and then and back up soon after.
WEIGHTS = {"up": 8, "down": 1, "downup": 2, "scale": 3, "restart": 3, "stop": 2, "start": 6, "recreate": 2,
           "netconnect": 2, "netdisconnect": 4, "killsidecar": 3, "killapp": 2}


@dataclass(frozen=True)
class Op:
    """One operation: kind, project, compose service (service kinds) and an argument (replicas for
    scale, which running container for kills and connects, 1 to hold the old subnet on downup)."""
    kind: str
    project: str
    service: str = ""
    arg: int = 0

    def __str__(self) -> str:
        if self.kind == "reset":
            return "reset"
        where = f"{self.project}/{self.service}" if self.service else self.project
        return f"{self.kind} {where}" + (f" {self.arg}" if self.kind in ("scale", "downup") else "")


@dataclass
class ServiceState:
    """A compose service in the model: containers (replicas), how many run, whether one of them
    was connected to the extra network."""
    replicas: int = 1
    running: int = 1
    connected: bool = False


@dataclass
class State:
    """The model of every project: None when it is down."""
    projects: dict[str, dict[str, ServiceState] | None] = field(default_factory=dict)

    @classmethod
    def all_up(cls) -> "State":
        return cls({p: {s: ServiceState() for s in svcs} for p, svcs in PROJECTS.items()})

    def running(self, project: str, service: str) -> int:
        svcs = self.projects.get(project)
        return svcs[service].running if svcs else 0


def role(service: str) -> str:
    """'server' or 'caller' for a compose service of the soak projects."""
    return next(svcs[service][1] for svcs in PROJECTS.values() if service in svcs)


def mesh_service(service: str) -> str:
    """The mesh service of a compose service of the soak projects."""
    return next(svcs[service][0] for svcs in PROJECTS.values() if service in svcs)


def candidates(state: State) -> list[Op]:
    """Every operation valid in this state (argument-free: arguments are drawn after the kind)."""
    ops = []
    for proj, svcs in state.projects.items():
        if svcs is None:
            ops.append(Op("up", proj))
            continue
        ops += [Op("down", proj), Op("downup", proj), Op("recreate", proj)]
        for name, s in svcs.items():
            full = s.running == s.replicas
            if full and role(name) == "server":
                ops.append(Op("scale", proj, name))
            if full:
                ops.append(Op("restart", proj, name))
            if s.running:
                ops += [Op("stop", proj, name), Op("killsidecar", proj, name), Op("killapp", proj, name)]
                if not s.connected:
                    ops.append(Op("netconnect", proj, name))
            if s.running < s.replicas:
                ops.append(Op("start", proj, name))
            if s.connected:
                ops.append(Op("netdisconnect", proj, name))
    return ops


def apply(state: State, op: Op) -> None:
    """What the operation does to the model (in place)."""
    svcs = state.projects.get(op.project)
    if op.kind == "reset":
        state.projects = State.all_up().projects
    elif op.kind in ("up", "downup"):
        state.projects[op.project] = {s: ServiceState() for s in PROJECTS[op.project]}
    elif op.kind == "down":
        state.projects[op.project] = None
    elif op.kind == "recreate":
        for s in svcs.values():
            s.running, s.connected = s.replicas, False
    elif op.kind == "scale":
        s = svcs[op.service]
        s.replicas = s.running = op.arg
        s.connected = s.connected and op.arg > 1  # a removed replica may have been the connected one
    elif op.kind == "stop":
        svcs[op.service].running = 0
    elif op.kind == "start":
        svcs[op.service].running = svcs[op.service].replicas
    elif op.kind == "killapp":
        svcs[op.service].running -= 1
    elif op.kind == "netconnect":
        svcs[op.service].connected = True
    elif op.kind == "netdisconnect":
        svcs[op.service].connected = False
    # restart and killsidecar leave the model as it was (meshd replaces the sidecar)


def plan(seed: int, n: int) -> list[Op]:
    """n operations drawn from `seed`, each valid in the state its predecessors leave (all up first);
    with n >= 2 * MEMORY_OPS, operations MEMORY_OPS - 1 and n - 1 are resets."""
    rng = random.Random(seed)
    state = State.all_up()
    ops = []
    resets = {MEMORY_OPS - 1, n - 1} if n >= 2 * MEMORY_OPS else set()
    for i in range(n):
        if i in resets:
            op = Op("reset", "")
            apply(state, op)
            ops.append(op)
            continue
        cands = candidates(state)
        op = rng.choices(cands, weights=[WEIGHTS[c.kind] for c in cands])[0]
        if op.kind == "scale":
            current = state.projects[op.project][op.service].replicas
            other = [r for r in range(1, MAX_REPLICAS + 1) if r != current]
            op = Op(op.kind, op.project, op.service, rng.choice(other))
        elif op.kind in ("killsidecar", "killapp", "netconnect"):
            op = Op(op.kind, op.project, op.service, rng.randrange(1000))
        elif op.kind == "downup":
            op = Op(op.kind, op.project, arg=rng.randrange(2))
        apply(state, op)
        ops.append(op)
    return ops


def replay_ops(n: int, i: int) -> int:
    """How many operations a replay of a run of `n` needs so that its first i + 1 are the run's:
    a run of 2 * MEMORY_OPS or more has resets at MEMORY_OPS - 1 and at its end."""
    return i + 1 if n < 2 * MEMORY_OPS else max(i + 2, 2 * MEMORY_OPS)


def states(ops: list[Op]) -> list[State]:
    """The model's state after each operation."""
    state, out = State.all_up(), []
    for op in ops:
        apply(state, op)
        out.append(State({p: None if s is None else {k: ServiceState(v.replicas, v.running, v.connected)
                                                      for k, v in s.items()} for p, s in state.projects.items()}))
    return out


def touched(op: Op, before: State) -> set[str]:
    """Mesh services whose instances the operation stops, removes, replaces or cuts off (their sidecar
    killed), given the state before it; an `up` counts its project's services, absent until it ends."""
    if op.kind == "reset":
        canonical = ServiceState()
        return {mesh_service(name) for proj, svcs in before.projects.items() for name in PROJECTS[proj]
                if svcs is None or svcs[name] != canonical}
    if op.kind in ("up", "down", "downup", "recreate"):
        return {mesh for mesh, _ in PROJECTS[op.project].values()}
    if op.kind == "scale":
        shrinks = op.arg < before.projects[op.project][op.service].replicas
        return {mesh_service(op.service)} if shrinks else set()
    if op.kind in ("restart", "stop", "start", "killsidecar", "killapp"):
        return {mesh_service(op.service)}
    return set()  # network connect/disconnect: the container keeps its address on its own network


def absent(state: State) -> set[str]:
    """Mesh services with no running container in this state."""
    present = {mesh for proj, svcs in state.projects.items() if svcs
               for name, s in svcs.items() if s.running for mesh in [mesh_service(name)]}
    every = {mesh for svcs in PROJECTS.values() for mesh, _ in svcs.values()}
    return every - present


@dataclass(frozen=True)
class Window:
    """When an operation ran, from its first command to its settled check, and when the next began."""
    index: int
    op: Op
    start: float
    settled: float
    next_start: float
    touched: frozenset[str]
    absent_after: frozenset[str]


@dataclass(frozen=True)
class Call:
    """One call of the steady load: caller and callee mesh services, start and end times, HTTP
    status (0: none) and curl's exit code."""
    caller: str
    callee: str
    start: float
    end: float
    status: int
    exit_code: int

    @property
    def failed(self) -> bool:
        return self.status != 200


def judge(call: Call, windows: list[Window]) -> tuple[str, list[int]]:
    """Why a failed call may fail: 'callee-absent' (an operation in flight touched the callee, or the
    callee had no running container after the last one), 'caller-disrupted' (an operation in flight
    touched the caller itself, e.g. killed its sidecar) or 'unexplained'; with the indexes of the
    operations whose windows the call overlaps."""
    overlapping = [w for w in windows if call.start <= w.next_start and call.end >= w.start]
    for w in overlapping:
        in_flight = call.start <= w.settled and call.end >= w.start
        if (in_flight and call.callee in w.touched) or call.callee in w.absent_after:
            return "callee-absent", [w.index for w in overlapping]
    for w in overlapping:
        if call.start <= w.settled and call.end >= w.start and call.caller in w.touched:
            return "caller-disrupted", [w.index for w in overlapping]
    return "unexplained", [w.index for w in overlapping]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def parse_calls(text: str, caller: str) -> list[Call]:
    """Calls from a caller's log: lines `start end callee status exit_code` (partial lines skipped)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        try:
            out.append(Call(caller, parts[2], float(parts[0]), float(parts[1]), int(parts[3]), int(parts[4])))
        except ValueError:
            continue
    return out
