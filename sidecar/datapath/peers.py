"""The data path's TLS hook and its socket probes: the context a listener serves, the identity check
of a mesh peer, and the dead-peer introspection of a connection (TCP_INFO, keepalive probes, RST)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..tcpinfo import TcpInfo, read_tcp_info   # re-exported: the engine reads them from here

if TYPE_CHECKING:
    from ..routing import Cluster
    from .engine import ProxyState

log = logging.getLogger("sidecar.proxy")

# Dead peers (see "Dead peers" in ProxyState). A peer whose network namespace vanished (`docker stop`:
# the veth goes with the app) sends neither FIN nor RST: bytes written to it are never acknowledged.
# A live peer's kernel acknowledges a request within the RTT (<< 1 ms on a Docker bridge), at worst
# after its delayed-ACK timer (40 ms, at most 200 ms: TCP_DELACK_MAX) or, when our segment was lost,
# after our first retransmission (RTO >= 200 ms) and its answer.
UNDELIVERED_AFTER_S = 0.5     # endpoint withdrawn by a snapshot: unacknowledged and no ACK this long
                              # since the write (> delayed ACK + one retransmission): not delivered
DEAD_PEER_S = 1.0             # no snapshot (meshd down): the same proof, with a wider margin, on
                              # requests written on reused pooled connections
ACK_SLACK_MS = 10             # tcpi_last_ack_recv counts jiffies (10 ms at HZ=100)
PROBE_IDLE_S = 1              # keepalive probes of a delivered request to a peer that may be gone:
PROBE_INTERVAL_S = 1          # 1 s after the last segment received, then every second; the kernel
PROBE_USER_TIMEOUT_MS = 3000  # ends the connection (ETIMEDOUT) when 3 s pass without any ACK
_LINGER_RESET = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST, drops the send queue

# ---- TLS hook -----------------------------------------------------------------------------------

class TlsProvider(Protocol):
    """What the proxy needs of a TLS holder (certs.holder.TlsHolder fits)."""

    def server_context(self) -> ssl.SSLContext: ...
    def client_context(self) -> ssl.SSLContext: ...


def server_ssl_context(tls: TlsProvider) -> ssl.SSLContext:
    """The context to give a listener once, that serves the holder's current context at every handshake.

    A context returned by `tls.server_context()` that already has an `sni_callback` (a "front"
    context that switches to the current material itself, like certs.holder.TlsHolder's) is used
    as is. Otherwise a front context is built here whose `sni_callback` (run by OpenSSL on every
    ClientHello, with or without SNI) sets `ssl_object.context = tls.server_context()`. Per-connection
    settings (verify mode and flags, protocol versions) are copied from the first context.
    """
    first = tls.server_context()
    if first.sni_callback is not None:
        return first
    front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    front.minimum_version = first.minimum_version
    front.maximum_version = first.maximum_version
    front.verify_mode = first.verify_mode
    front.verify_flags = first.verify_flags

    def pick(ssl_object: Any, _server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        try:
            ssl_object.context = tls.server_context()
        except Exception:  # noqa: BLE001 - a holder without material refuses the handshake
            log.exception("tls: no server context")
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        return None

    front.sni_callback = pick
    return front


# ---- socket introspection (dead peers) ----------------------------------------------------------

TcpInfoReader = Callable[[asyncio.BaseTransport], "TcpInfo | None"]
PeerProbe = Callable[[asyncio.BaseTransport], bool]


def probe_peer(transport: asyncio.BaseTransport) -> bool:
    """Have the kernel probe the peer of an idle-waiting connection: keepalive 1 s after the last
    segment received, then every second, and ETIMEDOUT once 3 s pass without an ACK (TCP_USER_TIMEOUT
    also bounds unacknowledged data). A live peer's kernel answers every probe, however slow its app."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, PROBE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, PROBE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), PROBE_USER_TIMEOUT_MS)
    except (OSError, AttributeError, TypeError, ValueError):
        return False
    return True


def stop_probing(transport: asyncio.BaseTransport) -> None:
    """Undo `probe_peer` once the peer answered (the connection may go back to the pool)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), 0)
    except (OSError, AttributeError, TypeError, ValueError):
        pass


def reset_connection(transport: asyncio.BaseTransport) -> None:
    """Abort with RST (SO_LINGER 0): the kernel drops the unacknowledged request instead of
    retransmitting it, so a peer that comes back never receives a request that was retried elsewhere."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (OSError, AttributeError, TypeError, ValueError):
            pass
    transport.abort()


def hop_tls(tls: Any, cluster: Cluster) -> tuple[ssl.SSLContext | None, str | None]:
    """The client TLS context and server name of a connection to `cluster`'s endpoints: mutual TLS
    with the holder's current material on a mesh hop, plaintext (None, None) otherwise."""
    if cluster.mesh and tls is not None:
        return tls.client_context(), cluster.name
    return None, None


def check_peer(tls: Any, transport: asyncio.BaseTransport, cluster: Cluster, index: int | None) -> None:
    """Optional identity check of a mesh peer: `tls.check_peer(ssl_object, endpoint) -> bool`."""
    check = getattr(tls, "check_peer", None)
    if check is None:
        return
    endpoint = cluster.endpoints[index] if index is not None else None
    if not check(transport.get_extra_info("ssl_object"), endpoint):
        transport.abort()
        raise ssl.SSLError("peer identity rejected")


async def open_upstream(state: ProxyState, cluster: Cluster, index: int | None, key: tuple[str, int],
                        factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, Any]:
    """A connection to endpoint `key` of `cluster` as the data path makes them (TLS and the peer check
    on mesh hops, the connect timeout); used by the mirror layer."""
    tls = state.tls
    ctx, hostname = hop_tls(tls, cluster)
    transport, proto = await asyncio.wait_for(
        asyncio.get_running_loop().create_connection(factory, key[0], key[1], ssl=ctx, server_hostname=hostname),
        state.connect_timeout)
    if ctx is not None:
        check_peer(tls, transport, cluster, index)
    return transport, proto
