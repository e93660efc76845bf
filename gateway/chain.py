"""The gateway's layer chain beside the sidecar's, as they run: `python -m gateway.chain`."""

from __future__ import annotations

from gateway.server import build_gateway_stack
from sidecar.datapath.chain import describe, sidecar_chains
from sidecar.proxy import ProxyState


def main() -> None:
    state = ProxyState("gateway")
    try:
        print("\n\n".join([*sidecar_chains(state), describe("gateway", build_gateway_stack(state))]))
    finally:
        state.close()


if __name__ == "__main__":
    main()
