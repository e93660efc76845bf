"""The data path's listeners: outbound (15001), inbound (15006) and a tcp service's inbound, on the
engine (sidecar.datapath.engine) with the stacks its builders make."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from typing import Callable

from ..routing import local_cluster
from .engine import (
    SNIFF_TIMEOUT_S, SO_ORIGINAL_DST, ProxyState, Stack, _Downstream, _Listener, build_inbound_stack,
    build_outbound_stack,
)
from .peers import TlsProvider, server_ssl_context
from .pipes import _TcpDownstream


OriginalDst = Callable[[asyncio.BaseTransport], "tuple[str, int] | None"]


def original_dst_from_socket(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """The pre-REDIRECT destination of an accepted socket (SO_ORIGINAL_DST), or None when the
    connection was not redirected (the answer is the listener's own address) or it cannot be read."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack_from("!H", raw, 2)[0]
    ip = socket.inet_ntoa(raw[4:8])
    local = transport.get_extra_info("sockname")
    if local is not None and local[0] == ip and local[1] == port:
        return None
    return ip, port


async def serve_http(state: ProxyState, host: str, port: int, stack: Stack, *,
                     original_dst: OriginalDst | None = None, sniff_timeout: float = SNIFF_TIMEOUT_S,
                     ssl_context: ssl.SSLContext | None = None) -> asyncio.Server:
    """An HTTP listener running `stack` (the shared engine of outbound, inbound and gateway)."""
    loop = asyncio.get_running_loop()
    listener = _Listener(original_dst, sniff_timeout, state.limits, stack.direction == "gateway")
    return await loop.create_server(lambda: _Downstream(state, stack, listener), host, port,
                                    ssl=ssl_context, reuse_address=True, backlog=1024)


async def start_outbound(state: ProxyState, host: str, port: int, *, mode: str = "transparent",
                         original_dst: OriginalDst | None = None,
                         sniff_timeout: float = SNIFF_TIMEOUT_S) -> asyncio.Server:
    """The outbound listener (15001).

    mode "transparent": each accepted socket's original destination comes from `original_dst`
    (default: SO_ORIGINAL_DST; tests pass a function of the transport). mode "explicit": an HTTP
    proxy (absolute-form targets, CONNECT); no original destination.
    """
    if mode == "transparent":
        hook = original_dst or original_dst_from_socket
    elif mode == "explicit":
        hook = original_dst
    else:
        raise ValueError(f"mode {mode!r} is not transparent or explicit")
    return await serve_http(state, host, port, build_outbound_stack(state), original_dst=hook,
                            sniff_timeout=sniff_timeout)


async def start_inbound(state: ProxyState, host: str, port: int, *, app_port: int,
                        tls: TlsProvider | None = None, app_host: str = "127.0.0.1",
                        protocol: str = "http") -> asyncio.Server:
    """The inbound HTTP listener (15006): every request to `app_host:app_port`, pooled.

    TLS: `tls` or else `state.tls`; None of both means a plaintext mesh hop.
    """
    tls = tls if tls is not None else state.tls
    ctx = server_ssl_context(tls) if tls is not None else None
    return await serve_http(state, host, port, build_inbound_stack(state, app_port, protocol=protocol, app_host=app_host),
                            ssl_context=ctx)


async def start_tcp_inbound(state: ProxyState, host: str, port: int, *, app_port: int,
                            tls: TlsProvider | None = None, app_host: str = "127.0.0.1") -> asyncio.Server:
    """The inbound listener of a `tcp` service: byte forwarding to `app_host:app_port`."""
    tls = tls if tls is not None else state.tls
    ctx = server_ssl_context(tls) if tls is not None else None
    stack = build_inbound_stack(state, app_port, protocol="tcp", app_host=app_host)
    cluster = local_cluster(state.service, state.version, app_port, "tcp", app_host)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _TcpDownstream(state, stack, cluster), host, port,
                                    ssl=ctx, reuse_address=True, backlog=1024)
