"""The data path's layer chains as they run, one layer a line: `python -m sidecar.datapath.chain`
(the gateway's too: `python -m gateway.chain`)."""

from __future__ import annotations

from sidecar.proxy import ProxyState, Stack, build_inbound_stack, build_outbound_stack


def describe(title: str, stack: Stack) -> str:
    """`title`, then the stack's layers in the order its loop runs them, numbered, each with the module
    that defines it (a column)."""
    labels = [f"  {i}. {layer.name}{'  [on_end]' if layer.ends else ''}" for i, layer in enumerate(stack.chain, 1)]
    width = max(map(len, labels))
    lines = [f"{title} ({stack.direction}):"]
    lines += [f"{label:<{width}}  {type(layer).__module__}" for label, layer in zip(labels, stack.chain)]
    return "\n".join(lines)


def sidecar_chains(state: ProxyState) -> list[str]:
    """The outbound and inbound chains of a sidecar of `state`."""
    return [describe("outbound", build_outbound_stack(state)),
            describe("inbound", build_inbound_stack(state, 8080))]


def main() -> None:
    state = ProxyState("example")
    try:
        print("\n\n".join(sidecar_chains(state)))
    finally:
        state.close()


if __name__ == "__main__":
    main()
