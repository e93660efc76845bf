"""Where a sidecar's memory goes: RSS of fresh interpreters importing, step by step, what
`sidecar run` imports (each step adds to the previous ones)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import env

STEPS = (
    ("python interpreter", ""),
    ("+ uvloop, httptools", "import uvloop, httptools"),
    # first, as in `sidecar run`: meshproc.runtime imports structlog without its console extras
    ("+ structlog (meshproc.runtime)", "import meshproc.runtime"),
    ("+ metrics (sidecar.telemetry, meshcore.metrics)", "import sidecar.telemetry"),
    ("+ proxy engine (sidecar.proxy, routing, meshcore)", "import sidecar.proxy"),
    ("+ ssl, certs.holder", "import certs.holder"),
    ("+ control channel client, admin port (sidecar.control, sidecar.admin)", "import sidecar.admin, sidecar.control"),
    ("+ mDNS responder (sidecar.announce)", "import sidecar.announce"),
    # keys, CSRs and certificate parsing run in a certs.worker child process: no cryptography here
    ("+ TLS agent (sidecar.tlsagent, sidecar.mtls, certs.store)", "import sidecar.tlsagent, sidecar.mtls"),
)

_PROBE = """
import sys
{imports}
for line in open('/proc/self/status'):
    if line.startswith('VmRSS:'):
        print(line.split()[1])
"""


def import_breakdown(workdir: Path) -> list[dict]:
    """[{step, rss_kib, delta_kib}] (median of three fresh interpreters per step), each started as
    the image starts the sidecar's (env.product_python)."""
    python = env.product_python(workdir)
    out, done, prev = [], [], 0
    for title, stmt in STEPS:
        if stmt:
            done.append(stmt)
        code = _PROBE.format(imports="\n".join(done))
        vals = []
        for _ in range(3):
            proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                                  cwd=env.ROOT, env={"PYTHONPATH": str(env.ROOT), "PATH": env.SBIN_PATH})
            if proc.returncode != 0:
                return out + [{"step": title, "error": proc.stderr.strip()[-300:]}]
            vals.append(int(proc.stdout.strip().splitlines()[-1]))
        rss = sorted(vals)[1]
        out.append({"step": title, "rss_kib": rss, "delta_kib": rss - prev if prev else rss})
        prev = rss
    return out
