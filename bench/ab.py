"""A/B of two checkouts' data paths in one run: `python -m bench.ab BASE_CHECKOUT [--rounds N]`.

Two mesh pairs, one from this checkout (B) and one from BASE_CHECKOUT (A, e.g. a `git worktree` of
an older commit, its compiled module built there with `make ext`), in front of one nginx; wrk runs
against A and B in turn, round after round, and the median pair CPU per 1000 requests of each, and
their ratio, are printed. Interleaving cancels the slow drifts of a shared VM that make figures of
separate runs incomparable (this is how a change of a few percent is seen at all). With
`--with haproxy,envoy` those reference pairs run in the same rounds, and each checkout's req/s and
CPU ratios to them are taken round by round (how "no worse against HAProxy" is judged across a
restructure: one run, one machine). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from . import env
from .datapath import SCENARIOS, Lab, Options
from .pki import write_pki


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("base", type=Path, help="the other checkout (A)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--scenario", default="c32", choices=sorted(SCENARIOS))
    p.add_argument("--pin", action="store_true",
                   help="sidecars on CPU 1, load generator and app on CPU 0 (less placement noise)")
    p.add_argument("--with", dest="refs", default="", type=lambda v: tuple(x for x in v.split(",") if x),
                   help="reference pairs run in the same rounds: haproxy, envoy (comma-separated)")
    args = p.parse_args(argv)
    unknown = set(args.refs) - {"haproxy", "envoy"}
    if unknown:
        p.error(f"--with: unknown reference pair(s) {', '.join(sorted(unknown))} (haproxy, envoy)")
    tools = env.ensure_tools(False, log=print)
    if "envoy" in args.refs:
        tools["envoy"] = env.ensure_envoy(False, log=print)
    with tempfile.TemporaryDirectory(prefix="meshd-ab-") as tmp:
        workdir = Path(tmp)
        opts = Options(paths=("mesh", *args.refs), scenarios=(args.scenario,), variant_loads=(), log=print)
        with Lab(opts, tools, workdir) as lab:
            pki = write_pki(workdir / "tls-base", ("frontend", "payments"))
            start = lab.procs.start
            base = args.base.resolve()

            def start_base(name, cmd, log_dir, tail_bytes=None, **kw):
                # Procs.start runs in this checkout and puts it first on PYTHONPATH (ahead of any .pth):
                # the base pair runs in the base checkout, first on its path, or both pairs would run
                # this checkout's code.
                kw["env"] = {**os.environ, "PYTHONPATH": f"{base}{os.pathsep}{env.ROOT}"}
                kw["cwd"] = base
                return start(name, cmd, log_dir, tail_bytes, **kw)

            lab.procs.start = start_base
            lab.start_mesh(env.venv_for(base, workdir / "base-venv"), pki, lab.ports["app"], "base", {},
                           name="sidecar-base")
            lab.procs.start = start
            for path in ("base", "mesh"):
                for role, pid in lab.pids[path].items():
                    maps = Path(f"/proc/{pid}/maps").read_text()
                    so = ", ".join(sorted({Path(ln.split()[-1]).name.split(".")[0] for ln in maps.splitlines()
                                           if "/sidecar/" in ln and ln.endswith(".so")}))   # datapath/*.so, or the older proxy.so
                    envs = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
                    exe = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
                    print(f"{'A' if path == 'base' else 'B'} {role}: data path {f'compiled ({so})' if so else 'Python source'} "
                          f"({exe}, PYTHONPATH={envs.get('PYTHONPATH')})")
            lab.check("base")
            refs = [r for r in args.refs if r in lab.ports]   # those the Lab could start
            paths = ["mesh", "base", *refs]
            sc = SCENARIOS[args.scenario]
            if args.pin:
                for pid in [pid for path in paths for pid in lab.pids[path].values()]:
                    os.sched_setaffinity(pid, {1})
                for pid in lab.app_pids:
                    os.sched_setaffinity(pid, {0})
                os.sched_setaffinity(0, {0})   # and the load generator, started from here
            for path in paths:
                lab.run(path, sc, 1.0)
            cpu: dict[str, list[float]] = {path: [] for path in paths}
            user: dict[str, list[float]] = {path: [] for path in paths}
            rps: dict[str, list[float]] = {path: [] for path in paths}
            for rd in range(args.rounds):
                for path in (paths if rd % 2 == 0 else paths[::-1]):
                    r = lab.run(path, sc, args.duration)
                    cpu[path].append(r["cpu_s_per_1000"]["pair"])
                    user[path].append(sum(us[0] for us in r["cpu_user_sys_per_1000"].values()))
                    rps[path].append(r["rps"])
                ratios = [b / a for a, b in zip(cpu["base"], cpu["mesh"])]
                refs_line = "".join(
                    f"  {side}/{ref} rps {rps[path][-1] / rps[ref][-1]:.3f} cpu {cpu[path][-1] / cpu[ref][-1]:.3f}"
                    for ref in refs for side, path in (("A", "base"), ("B", "mesh")))
                print(f"round {rd}: A {cpu['base'][-1]:.4f}  B {cpu['mesh'][-1]:.4f} CPU-s/1000  "
                      f"B/A {ratios[-1]:.3f}  user B/A {user['mesh'][-1] / user['base'][-1]:.3f}{refs_line}",
                      flush=True)
            out = {
                "a": str(args.base), "b": str(env.ROOT), "scenario": args.scenario,
                "cpu_per_1000_median": {"a": statistics.median(cpu["base"]), "b": statistics.median(cpu["mesh"])},
                "rps_median": {"a": statistics.median(rps["base"]), "b": statistics.median(rps["mesh"])},
                "cpu_ratio_b_over_a_median": statistics.median(ratios),
                "user_cpu_per_1000_median": {"a": statistics.median(user["base"]), "b": statistics.median(user["mesh"])},
                "user_ratio_b_over_a_median": statistics.median(
                    [b / a for a, b in zip(user["base"], user["mesh"])]),
            }
            for ref in refs:   # per checkout, its ratios to the reference pair of the same round
                for side, path in (("a", "base"), ("b", "mesh")):
                    out[f"{side}_over_{ref}_median"] = {
                        "rps": statistics.median([x / y for x, y in zip(rps[path], rps[ref])]),
                        "cpu": statistics.median([x / y for x, y in zip(cpu[path], cpu[ref])]),
                    }
            print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
