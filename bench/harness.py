"""`python -m bench`: run the benchmark parts, print the table, write RESULTS.md, raw JSON, chart."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import env
from .hotpath import PIECES
from .report import chart, targets, text_report, write_h2_section, write_markdown

PARTS = ("datapath", "h2", "hotpath", "control", "startup", "memory")
PART_KEYS = {"datapath": "datapath", "h2": "h2", "hotpath": "hotpath", "control": "controlplane", "startup": "startup",
             "memory": "memory_breakdown"}
KEEP = tuple(PART_KEYS.values())


def _code_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=env.ROOT, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=env.ROOT, timeout=10).stdout.split("\n")
        files = [ln[3:] for ln in dirty if ln.strip() and not ln[3:].startswith("bench/")]
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"git {head or '?'}" + (f" + uncommitted changes in {', '.join(files)}" if files else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="1 s runs, 3 rounds, fewer pushes, no start-up part and no profile (a harness check)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--duration", type=float, help="seconds per measured data path run (default 8)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per path and load (default 2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per load (default 5)")
    p.add_argument("--scenarios", default="c1,c32,close", help="data path loads: c1, c32, close")
    p.add_argument("--paths", default="direct,mesh,haproxy,envoy", help="data paths: direct, mesh, haproxy, envoy")
    p.add_argument("--mode", choices=("transparent", "explicit"), default="transparent",
                   help="the outbound sidecar's capture mode (routing by Host header either way)")
    p.add_argument("--variant-loads", default="c32",
                   help="data path loads whose rounds also run the --variants mesh pairs (default c32; '' for none)")
    p.add_argument("--variants", default="untraced,traced",
                   help="mesh pairs differing from the default one in their telemetry settings only: untraced "
                        "(sampling 0%%, access log off), traced (--traced-sampling, --traced-access-log)")
    p.add_argument("--traced-sampling", type=float, default=100.0,
                   help="the traced pair's sampling percent (default 100)")
    p.add_argument("--traced-access-log", choices=("off", "errors", "sampled", "full"), default="full",
                   help="the traced pair's access log mode (default full)")
    p.add_argument("--h2-only", action="store_true",
                   help="only the HTTP/2 and gRPC data path (--parts h2; with --merge the other parts' results stay)")
    p.add_argument("--h2-kinds", default="http2,grpc", help="HTTP/2 part: kinds of call, http2 (GET) and grpc (unary)")
    p.add_argument("--h2-loads", default="c1m32,c32m1",
                   help="HTTP/2 part: loads, c1m32 (1 connection, 32 streams) and c32m1 (32 connections, "
                        "1 stream each)")
    p.add_argument("--h2-paths", default="direct,mesh,haproxy,envoy", help="HTTP/2 part: paths")
    p.add_argument("--h2-duration", type=float, help="HTTP/2 part: seconds per measured run (default 5; quick 1)")
    p.add_argument("--h2-rounds", type=int, help="HTTP/2 part: interleaved rounds per load (default 3; quick 2)")
    p.add_argument("--hotpath-seconds", type=float,
                   help="hot-path micro-benchmark: seconds per repeat (default 0.2; quick 0.05)")
    p.add_argument("--python-tools", action="store_true",
                   help="use the pure-Python app and load generator instead of nginx and wrk (no HAProxy or Envoy "
                        "path, no HTTP/2 part)")
    p.add_argument("--nodes", default="10,50,100", help="control clients per push benchmark")
    p.add_argument("--pushes", type=int, help="measured pushes per node count (default 20)")
    p.add_argument("--csr-seconds", type=float, help="seconds of CSR signing (default 2)")
    p.add_argument("--profile-seconds", type=float, help="py-spy seconds per pass (default 10; 0: no profile)")
    p.add_argument("--quiet-budget", type=float,
                   help="seconds the data path rounds may wait in total for other load to stop (default 90)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                   help="where RESULTS.md, results.png, profiles and raw/ go (default: bench/)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other parts' results of the last run (raw/results.json) and redo only --parts")
    p.add_argument("--no-install", action="store_true", help="never apt-get/pip install missing tools")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"duration": 1.0 if q else 8.0, "warmup": 1.0 if q else 2.0, "rounds": 3 if q else 5,
                "pushes": 5 if q else 20, "h2_duration": 1.0 if q else 5.0, "h2_rounds": 2 if q else 3,
                "quiet_budget": 10.0 if q else 90.0, "csr_seconds": 0.5 if q else 2.0, "profile_seconds": 0.0 if q else 10.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.h2_only:
        args.parts = "h2"
    if args.parts is None:
        args.parts = "datapath,h2,hotpath,control,memory" if q else ",".join(PARTS)
    args.parts = tuple(x for x in args.parts.split(",") if x)
    bad = set(args.parts) - set(PARTS)
    if bad:
        p.error(f"unknown parts: {', '.join(sorted(bad))}")
    from .h2path import KINDS, LOADS, PATHS as H2_PATHS
    for name, known in (("h2_kinds", KINDS), ("h2_loads", LOADS), ("h2_paths", H2_PATHS)):
        values = tuple(x for x in getattr(args, name).split(",") if x)
        if set(values) - set(known):
            p.error(f"unknown --{name.replace('_', '-')}: {', '.join(sorted(set(values) - set(known)))}")
        setattr(args, name, values)
    args.variants = tuple(x for x in args.variants.split(",") if x)
    if set(args.variants) - {"untraced", "traced"}:
        p.error(f"unknown variants: {', '.join(sorted(set(args.variants) - {'untraced', 'traced'}))}")
    return args


def run(args: argparse.Namespace, log=print) -> dict:
    """Run the parts; returns everything that was measured (also written under args.out)."""
    from .controlplane import run_controlplane
    from .datapath import Options, Quiet, run_datapath
    from .memory import import_breakdown
    from .startup import run_startup

    started = time.monotonic()
    out: Path = args.out
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    previous: dict = {}
    if args.merge and (raw / "results.json").is_file():
        previous = json.loads((raw / "results.json").read_text())
    else:
        for old in list(raw.glob("*.json")) + list(raw.glob("profile-*.txt")):
            old.unlink()
    work = raw / "work"
    install = not args.no_install
    measures = {"datapath", "h2"} & set(args.parts)
    tools = env.ensure_tools(install and bool(measures) and not args.python_tools, log)
    if (("datapath" in args.parts and "envoy" in args.paths.split(","))
            or ("h2" in args.parts and "envoy" in args.h2_paths)):
        tools["envoy"] = env.ensure_envoy(install and not args.python_tools, log)
    if measures and args.profile_seconds > 0:
        env.ensure_pip_tools(install, log)
    elif install:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            env.ensure_pip_tools(install, log)
    res: dict = {k: v for k, v in previous.items() if k in KEEP}
    res.update({"machine": env.machine_info(tools), "code": _code_state(), "quick": args.quick,
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    if previous:
        res["merged_from"] = {"date": previous.get("machine", {}).get("date"), "code": previous.get("code"),
                              "parts": sorted(
            set(KEEP) & set(previous) - {PART_KEYS[p] for p in args.parts})}
    log(f"meshd bench on {res['machine']['nproc']} CPUs ({res['machine']['cpu']}), {res['code']}")
    def part(name: str, key: str, fn) -> None:
        if name not in args.parts:
            return
        try:
            res[key] = fn()
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            res[key] = {"error": f"{type(exc).__name__}: {exc}"}
            res.setdefault("errors", []).append(name)

    def datapath() -> dict:
        from .datapath import VARIANTS
        variants = {v: dict(VARIANTS[v]) for v in args.variants}
        if "traced" in variants:
            variants["traced"] = {"sampling": args.traced_sampling, "access_log": args.traced_access_log}
        opts = Options(duration=args.duration, warmup=args.warmup, rounds=args.rounds,
                       scenarios=tuple(args.scenarios.split(",")), paths=tuple(args.paths.split(",")),
                       python_tools=args.python_tools, mode=args.mode, profile_seconds=args.profile_seconds,
                       quiet_budget=args.quiet_budget,
                       variant_loads=tuple(x for x in args.variant_loads.split(",") if x), variants=variants,
                       log=log)
        return run_datapath(opts, tools, work / "datapath", raw)

    def h2() -> dict:
        from .h2path import H2Options, run_h2
        if args.python_tools:
            log("HTTP/2 and gRPC part skipped: pure-Python tools forced")
            return {"skipped": "pure-Python tools forced (h2load and nghttpd have no pure-Python stand-in)"}
        opts = H2Options(duration=args.h2_duration, warmup=args.warmup, rounds=args.h2_rounds, kinds=args.h2_kinds,
                         loads=args.h2_loads, paths=args.h2_paths, mode=args.mode, quiet_budget=args.quiet_budget,
                         profile_seconds=args.profile_seconds, log=log)
        return run_h2(opts, tools, work / "h2", raw)

    def hotpath() -> dict:
        log("hot path (metrics and tracing, in-process):")
        Quiet(budget_s=min(args.quiet_budget, 30.0)).wait()
        # the interpreter the sidecars run on (env.product_python), so the pieces compare with their CPU
        python = env.product_python(work / "hotpath")
        cmd = [python, "-m", "bench.hotpath", "--json"] + (["--quick"] if args.quick else [])
        if args.hotpath_seconds is not None:
            cmd += ["--seconds", str(args.hotpath_seconds)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=env.ROOT, timeout=600)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("HOTPATHJSON ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"bench.hotpath failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        out = json.loads(line[len("HOTPATHJSON "):])
        for key in [k for k in PIECES if k in out["pieces"]]:
            r = out["pieces"][key]
            log(f"  {key:20} {r['us']:7.2f} us" + (f" + {r['us_other_threads']:.2f} us export"
                                                   if "us_other_threads" in r else ""))
        env.dump_json(raw / "hotpath.json", out)
        return out

    def control() -> dict:
        log("control plane:")
        nodes = tuple(int(x) for x in args.nodes.split(",") if x)
        return run_controlplane(nodes, args.pushes, args.csr_seconds, work / "control", raw, log)

    def startup() -> dict:
        log("start-up:")
        return run_startup(log)

    part("datapath", "datapath", datapath)
    part("h2", "h2", h2)
    part("hotpath", "hotpath", hotpath)
    part("memory", "memory_breakdown", lambda: import_breakdown(work))
    part("control", "controlplane", control)
    part("startup", "startup", startup)
    res["seconds"] = round(time.monotonic() - started, 1)
    env.dump_json(raw / "results.json", res)
    if args.parts == ("h2",) and not previous and (out / "RESULTS.md").is_file():
        write_h2_section(res, out / "RESULTS.md")   # alone: the other sections stay as they are
    else:
        write_markdown(res, out / "RESULTS.md")
    problem = chart(res, out / "results.png")
    if problem:
        log(f"no chart: {problem}")
    return res


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    res = run(args)
    print()
    print("\n".join(text_report(res)))
    print(f"({res['seconds']:.0f} s; {args.out / 'RESULTS.md'} written)")
    # Targets are reported, not enforced: a run succeeds when every part measured.
    if res.get("errors"):
        sys.exit(f"parts that failed: {', '.join(res['errors'])} (see above; the others are written)")


if __name__ == "__main__":
    main(sys.argv[1:])
