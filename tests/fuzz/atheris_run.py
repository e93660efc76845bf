"""One target under atheris (libFuzzer, coverage-guided), as a process of its own: libFuzzer exits
the process when it is done. `python3 -m tests.fuzz.atheris_run NAME SECONDS SCRATCH_DIR`: new
inputs go to SCRATCH_DIR (the repo's corpus is read, never written), a crash to SCRATCH_DIR/crash-*."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import atheris

from tests.fuzz.engine import CORPUS, NASTY
from tests.fuzz.targets import load


def _dict_line(token: bytes) -> str:
    return '"' + "".join(f"\\x{b:02x}" for b in token) + '"'


def _instrument(packages: tuple[str, ...]) -> None:
    """Coverage of the functions of `packages` (the proxy's source twin included; compiled code has
    none): atheris.instrument_all would also take hypothesis and the standard library, a minute."""
    done = set()
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(packages):
            continue
        for obj in list(vars(module).values()):
            members = vars(obj).values() if isinstance(obj, type) and obj.__module__ == name else (obj,)
            for fn in members:
                fn = getattr(fn, "__func__", fn)
                if isinstance(fn, types.FunctionType) and fn.__module__ == name and id(fn) not in done:
                    done.add(id(fn))
                    atheris.instrument_func(fn)


def main(name: str, seconds: str, scratch: str) -> None:
    target = load(name)
    _instrument(("meshcore", "sidecar", "gateway", "tests.fuzz"))
    out = Path(scratch)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    tokens = sorted(set(NASTY + target.dictionary))
    (out / "dict").write_text("".join(_dict_line(t) + "\n" for t in tokens))
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-artifact_prefix={out}/", f"-dict={out / 'dict'}",
                   "-print_final_stats=1", str(out / "corpus"), str(CORPUS / name)],
                  target.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(*sys.argv[1:4])
