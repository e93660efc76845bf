"""`python3 -m tests.fuzz --seconds N [--target NAME] [--engine both|hypothesis|atheris]`: fuzz each
target for N seconds (`make fuzz`), and print per target its executions, corpus inputs and findings.
With both engines (the default when atheris is installed) hypothesis (structured inputs) has the
first half of the time and atheris (coverage-guided mutation of the corpus) the second. Findings are
written to build/fuzz/<target>/; the exit status is 1 when there is one."""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz.engine import run_hypothesis
from tests.fuzz.targets import NAMES, load

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "fuzz"


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_atheris(name: str, seconds: int) -> tuple[int, list[bytes]]:
    """(executions, crash inputs) of one atheris run in a child process."""
    scratch = OUT / name / "atheris"
    for old in scratch.glob("crash-*"):
        old.unlink()
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.atheris_run", name, str(seconds), str(scratch)],
                          cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=seconds + 120)
    log = proc.stdout + proc.stderr
    (OUT / name / "atheris.log").write_text(log)
    done = re.findall(r"stat::number_of_executed_units: (\d+)", log) or re.findall(r"^#(\d+)", log, re.M)
    runs = int(done[-1]) if done else 0
    crashes = [p.read_bytes() for p in sorted(scratch.glob("crash-*"))]
    if proc.returncode != 0 and not crashes:
        raise RuntimeError(f"atheris on {name} exited {proc.returncode}:\n{log[-2000:]}")
    return runs, crashes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    ap.add_argument("--target", choices=NAMES, action="append", help="this target only (repeatable)")
    ap.add_argument("--engine", choices=("both", "hypothesis", "atheris"), default=None)
    args = ap.parse_args(argv)
    engine = args.engine or ("both" if _has_atheris() else "hypothesis")
    if engine != "hypothesis" and not _has_atheris():
        ap.error("atheris is not installed (pip install atheris)")
    print(f"{'target':<14} {'engine':<11} {'seconds':>7} {'executions':>11} {'exec/s':>7} {'corpus':>6} "
          f"{'findings':>8}")
    total = 0
    for name in args.target or NAMES:
        target = load(name)
        runs_by = []
        if engine in ("both", "hypothesis"):
            seconds = args.seconds / 2 if engine == "both" else args.seconds
            start = time.monotonic()
            runs, found = run_hypothesis(target, seconds, first_seed=int(time.time()))
            runs_by.append(("hypothesis", time.monotonic() - start, runs, found))
        if engine in ("both", "atheris"):
            seconds = max(1, args.seconds - args.seconds // 2) if engine == "both" else args.seconds
            start = time.monotonic()
            runs, found = run_atheris(name, seconds)
            runs_by.append(("atheris", time.monotonic() - start, runs, found))
        for kind, took, runs, found in runs_by:
            print(f"{name:<14} {kind:<11} {took:>7.0f} {runs:>11} {runs / max(took, 1e-9):>7.0f} "
                  f"{len(target.seeds()):>6} {len(found):>8}", flush=True)
            for data in found:
                path = OUT / name / f"finding-{hashlib.sha1(data).hexdigest()[:12]}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                print(f"    finding {path.relative_to(ROOT)}: {data[:120]!r}")
            total += len(found)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
