"""The lifecycle soak's pure part (tests/e2e/soak.py): the seeded plan, its model, the compose files
it drives, and the judgement of failed calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.e2e.soak import (
    KINDS, MAX_REPLICAS, MEMORY_OPS, PROJECTS, TARGETS, Call, Op, ServiceState, State, Window, absent, apply,
    candidates, judge, parse_calls, percentile, plan, replay_ops, states, touched,
)

PROJECT_FILES = Path(__file__).resolve().parents[1] / "e2e" / "projects"
FILES = {"soaka": "soak-a.yml", "soakb": "soak-b.yml", "soakc": "soak-c.yml"}


def bare(op: Op) -> Op:
    """The operation as `candidates` lists it (arguments are drawn after the kind)."""
    return Op(op.kind, op.project, op.service)


@pytest.mark.parametrize("seed, n", [(0, 40), (1, 40), (7, 300), (12345, 39), (99, 1)])
def test_plan_is_seeded_and_of_length_n(seed, n):
    ops = plan(seed, n)
    assert len(ops) == n and ops == plan(seed, n)
    assert ops != plan(seed + 1, n) or n == 1


@pytest.mark.parametrize("seed", range(20))
def test_every_operation_is_valid_where_it_is_drawn(seed):
    state = State.all_up()
    for op in plan(seed, 300):
        if op.kind != "reset":
            assert bare(op) in candidates(state), (seed, op)
        if op.kind == "scale":
            current = state.projects[op.project][op.service].replicas
            assert 1 <= op.arg <= MAX_REPLICAS and op.arg != current
        apply(state, op)


@pytest.mark.parametrize("n, resets", [
    (40, [MEMORY_OPS - 1, 39]),
    (300, [MEMORY_OPS - 1, 299]),
    (39, []),                      # too short to compare meshd's memory: no reset
    (2 * MEMORY_OPS, [MEMORY_OPS - 1, 2 * MEMORY_OPS - 1]),
])
def test_resets_come_before_each_memory_reading(n, resets):
    assert [i for i, op in enumerate(plan(3, n)) if op.kind == "reset"] == resets
    if resets:
        assert states(plan(3, n))[resets[0]].projects == State.all_up().projects


def test_three_hundred_operations_draw_every_kind():
    drawn = {op.kind for seed in range(3) for op in plan(seed, 300)}
    assert drawn == set(KINDS)


@pytest.mark.parametrize("op, check", [
    (Op("down", "soakb"), lambda s: s.projects["soakb"] is None),
    (Op("killapp", "soaka", "aweb", 5), lambda s: s.projects["soaka"]["aweb"] == ServiceState(1, 0, False)),
    (Op("scale", "soakc", "cweb", 3), lambda s: s.projects["soakc"]["cweb"] == ServiceState(3, 3, False)),
    (Op("stop", "soaka", "acli"), lambda s: s.running("soaka", "acli") == 0),
    (Op("netconnect", "soakb", "bapi", 1), lambda s: s.projects["soakb"]["bapi"].connected),
    (Op("killsidecar", "soakb", "bweb", 2), lambda s: s.projects == State.all_up().projects),
    (Op("restart", "soakb", "bweb"), lambda s: s.projects == State.all_up().projects),
])
def test_apply(op, check):
    state = State.all_up()
    apply(state, op)
    assert check(state)


def test_model_after_a_sequence():
    ops = [Op("scale", "soaka", "aweb", 3), Op("killapp", "soaka", "aweb", 1), Op("netconnect", "soaka", "aweb", 0),
           Op("recreate", "soaka"), Op("down", "soakc"), Op("up", "soakc"), Op("scale", "soaka", "aweb", 1)]
    after = states(ops)
    assert after[1].projects["soaka"]["aweb"] == ServiceState(3, 2, False)
    assert after[2].projects["soaka"]["aweb"] == ServiceState(3, 2, True)
    assert after[3].projects["soaka"]["aweb"] == ServiceState(3, 3, False)  # recreated: all run, none connected
    assert after[4].projects["soakc"] is None
    assert after[5].projects["soakc"] == {"cweb": ServiceState(), "capi": ServiceState(), "ccli": ServiceState()}
    assert after[6].projects["soaka"]["aweb"] == ServiceState(1, 1, False)
    assert after[0].projects["soaka"]["aweb"].replicas == 3  # states are copies, not one shared object


def test_no_operation_on_a_down_project_but_up():
    state = State.all_up()
    apply(state, Op("down", "soaka"))
    assert [op for op in candidates(state) if op.project == "soaka"] == [Op("up", "soaka")]


def with_state(**changes: ServiceState | None) -> State:
    state = State.all_up()
    for key, value in changes.items():
        proj, _, svc = key.partition("__")
        if svc:
            state.projects[proj][svc] = value
        else:
            state.projects[proj] = value
    return state


@pytest.mark.parametrize("op, before, expected", [
    (Op("down", "soaka"), State.all_up(), {"aweb", "acli"}),
    (Op("up", "soakb"), with_state(soakb=None), {"bweb", "bapi", "bcli"}),
    (Op("downup", "soakc", arg=1), State.all_up(), {"cweb", "capi", "ccli"}),
    (Op("recreate", "soakc"), State.all_up(), {"cweb", "capi", "ccli"}),
    (Op("stop", "soaka", "aweb2"), State.all_up(), {"aweb"}),        # v2 is an instance of aweb
    (Op("killsidecar", "soakb", "bcli", 3), State.all_up(), {"bcli"}),
    (Op("scale", "soakc", "cweb", 3), State.all_up(), set()),         # growing removes nothing
    (Op("scale", "soakc", "cweb", 1), with_state(soakc__cweb=ServiceState(2, 2)), {"cweb"}),
    (Op("netconnect", "soaka", "aweb", 0), State.all_up(), set()),
    (Op("netdisconnect", "soaka", "aweb"), with_state(soaka__aweb=ServiceState(1, 1, True)), set()),
    (Op("reset", ""), with_state(soakb=None, soakc__cweb=ServiceState(3, 3)), {"bweb", "bapi", "bcli", "cweb"}),
    (Op("reset", ""), State.all_up(), set()),
])
def test_touched(op, before, expected):
    assert touched(op, before) == expected


@pytest.mark.parametrize("state, expected", [
    (State.all_up(), set()),
    (with_state(soaka=None), {"aweb", "acli"}),
    (with_state(soaka__aweb=ServiceState(1, 0)), set()),                          # v2 still serves aweb
    (with_state(soaka__aweb=ServiceState(1, 0), soaka__aweb2=ServiceState(2, 0)), {"aweb"}),
    (with_state(soakc__ccli=ServiceState(1, 0)), {"ccli"}),
])
def test_absent(state, expected):
    assert absent(state) == expected


def window(i, start, settled, next_start, touched=(), absent_after=()):
    return Window(i, Op("restart", "soaka", "aweb"), start, settled, next_start, frozenset(touched),
                  frozenset(absent_after))


WINDOWS = [window(0, 100, 110, 120, touched={"aweb"}),
           window(1, 120, 125, 140, touched={"bapi", "bweb", "bcli"}, absent_after={"bapi", "bweb", "bcli"}),
           window(2, 140, 150, 160, touched={"bcli"}),
           window(3, 160, 165, 200, touched=set())]


@pytest.mark.parametrize("call, why, ops", [
    (Call("acli", "aweb", 105, 106, 0, 7), "callee-absent", [0]),       # aweb restarting
    (Call("acli", "aweb", 99, 100.5, 0, 56), "callee-absent", [0]),     # in flight when the restart began
    (Call("acli", "aweb", 112, 113, 503, 0), "unexplained", [0]),       # after aweb settled
    (Call("acli", "bapi", 130, 131, 0, 6), "callee-absent", [1]),       # soakb down since op 1
    (Call("ccli", "aweb", 142, 143, 0, 7), "unexplained", [2]),         # op 2 touched bcli only
    (Call("bcli", "cweb", 145, 146, 0, 7), "caller-disrupted", [2]),    # bcli's own sidecar killed
    (Call("bcli", "cweb", 152, 153, 0, 7), "unexplained", [2]),         # after it settled
    (Call("acli", "aweb", 161, 162, 0, 7), "unexplained", [3]),
    (Call("acli", "aweb", 300, 301, 0, 7), "unexplained", []),          # after the run
])
def test_judge(call, why, ops):
    assert judge(call, WINDOWS) == (why, ops)


@pytest.mark.parametrize("values, q, expected", [
    ([], 50, 0.0), ([3.0], 99, 3.0), ([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 99, 4),
    (list(range(1, 101)), 99, 99), (list(range(100, 0, -1)), 50, 50),
])
def test_percentile(values, q, expected):
    assert percentile(values, q) == expected


def test_parse_calls():
    text = ("1733390000.123 1733390000.140 aweb 200 0\n"
            "1733390001.000 1733390004.001 bapi 000 28\n"
            "1733390002.5 1733390002.6 aweb 2")           # a line cut short while being written
    assert parse_calls(text, "acli") == [Call("acli", "aweb", 1733390000.123, 1733390000.140, 200, 0),
                                         Call("acli", "bapi", 1733390001.0, 1733390004.001, 0, 28)]
    assert [c.failed for c in parse_calls(text, "acli")] == [False, True]


@pytest.mark.parametrize("proj", sorted(PROJECTS))
def test_compose_files_match_the_model(proj):
    """The services, their mesh names and versions, and the callers' targets are those of PROJECTS
    and TARGETS, and no mesh service name is used by two projects (the soak counts calls by name)."""
    services = yaml.safe_load((PROJECT_FILES / FILES[proj]).read_text())["services"]
    assert set(services) == set(PROJECTS[proj])
    for name, (mesh, role) in PROJECTS[proj].items():
        labels = services[name]["labels"]
        assert labels["mesh.enable"] == "true" and labels.get("mesh.service", name) == mesh
        if role == "caller":
            assert services[name]["environment"]["SOAK_SELF"] == mesh
            assert tuple(services[name]["environment"]["SOAK_TARGETS"].split()) == TARGETS[mesh]
        else:
            assert services[name]["image"] == "mesh-nginx:bookworm" and labels["mesh.port"] == "80"
    meshes = [{m for m, _ in svcs.values()} for svcs in PROJECTS.values()]
    assert sum(len(m) for m in meshes) == len(set().union(*meshes))
    versions = {labels.get("mesh.version", "v1") for labels in (s["labels"] for s in services.values())}
    assert proj != "soaka" or versions == {"v1", "v2"}


def test_a_replay_with_two_more_operations_repeats_the_failed_one():
    """A replay for a failure at operation i repeats the run's first i + 1 operations: a run's last
    operation is a reset, so a replay of i + 1 would end with a reset in place of operation i."""
    seed = 1855753523
    for n in (30, 300):
        full = plan(seed, n)
        for i in (5, 25, n - 2):
            assert plan(seed, replay_ops(n, i))[: i + 1] == full[: i + 1], (n, i)
    assert plan(seed, 213)[212].kind == "reset" and plan(seed, 300)[212].kind != "reset"
