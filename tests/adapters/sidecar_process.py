"""A plaintext inbound sidecar in a process of its own, for RSS figures under attack.

    python -m tests.adapters.sidecar_process APP_PORT READY_FILE

What `sidecar run` does for the inbound data path, minus meshd, TLS and capture: a ProxyState with
its limits from the MESH_* environment (meshcore.limits), start_inbound to 127.0.0.1:APP_PORT, uvloop
through meshproc.runtime. READY_FILE gets {"pid", "port"} once it listens; it runs until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from meshcore.limits import limits_from_env
from meshproc.runtime import run_forever
from sidecar.proxy import ProxyState, start_inbound


async def serve(app_port: int, ready_file: Path) -> None:
    state = ProxyState("payments", "v1")
    state.limits = limits_from_env(os.environ)
    server = await start_inbound(state, "127.0.0.1", 0, app_port=app_port)
    ready = {"pid": os.getpid(), "port": server.sockets[0].getsockname()[1]}
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(ready))
    tmp.replace(ready_file)
    await asyncio.Event().wait()


if __name__ == "__main__":
    run_forever(lambda: serve(int(sys.argv[1]), Path(sys.argv[2])))
