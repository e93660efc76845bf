"""A connection's `struct tcp_info` (linux/tcp.h), read through its transport: what the dead-peer
checks (sidecar.proxy) and the time limits (sidecar.guard) ask the kernel instead of timing reads."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import NamedTuple

TCP_INFO_LEN = 104
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCPI_UNACKED = 24             # u32 tcpi_unacked
_TCPI_LAST_DATA_RECV = 52      # u32 tcpi_last_data_recv: ms since the last data segment arrived
_TCPI_LAST_ACK_RECV = 56       # u32 tcpi_last_ack_recv: ms since the last ACK arrived


class TcpInfo(NamedTuple):
    """What the mesh reads of a socket's `struct tcp_info`."""

    state: int              # tcpi_state: 1 = TCP_ESTABLISHED
    unacked: int            # tcpi_unacked: segments in flight, not acknowledged by the peer's kernel
    last_ack_recv_ms: int   # tcpi_last_ack_recv: ms since the last ACK from the peer
    last_data_recv_ms: int = 0   # tcpi_last_data_recv: ms since data last arrived from the peer


def read_tcp_info(transport: asyncio.BaseTransport) -> TcpInfo | None:
    """TCP_INFO of a transport's socket (plain or TLS; uvloop's pseudo-socket too), or None."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, TCP_INFO_LEN)
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    if len(raw) < _TCPI_LAST_ACK_RECV + 4:
        return None
    return TcpInfo(raw[0], struct.unpack_from("=I", raw, _TCPI_UNACKED)[0],
                   struct.unpack_from("=I", raw, _TCPI_LAST_ACK_RECV)[0],
                   struct.unpack_from("=I", raw, _TCPI_LAST_DATA_RECV)[0])
