"""The inbound authorization layer (`Authorize`) and its decision (`authorized`): 403 RBAC, else XFCC for the app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..wire import FLAG_RBAC, HELD, NEXT, Reply
from .base import Layer

if TYPE_CHECKING:
    from ..downstream import _Downstream
    from ..exchange import Exchange


class Authorize(Layer):
    """authorize (inbound): `state.authz` on the verified caller, 403 RBAC; the app gets the XFCC header."""

    def __init__(self):
        Layer.__init__(self, "authorize")

    def on_request(self, down: _Downstream, ex: Exchange) -> int:
        try:
            denied = authorized(down, ex)
        except Exception:  # noqa: BLE001
            return self.failed(down, ex)
        if denied is None:
            return NEXT
        down._answer(ex, denied)
        return HELD


def authorized(down: _Downstream, ex: Exchange) -> Reply | None:
    """Inbound authorization: `state.authz` decides on the verified caller; a denial is 403 `RBAC`
    with `x-mesh-denied: <reason>`. An allowed mTLS request gets `x-forwarded-client-cert` for the app."""
    authz = down.state.authz
    if authz is not None and (down.peer_identity, ex.method, ex.target) not in authz.allowed:
        decision = authz.check_request(down.peer_identity, ex.method, ex.target)   # decides, remembers, counts
        if not decision.allowed:
            reason = decision.reason.encode("latin-1", "replace")
            return Reply(403, FLAG_RBAC, b"RBAC: access denied: %b\n" % reason,
                         headers=((b"x-mesh-denied", reason),))
    if down.peer_fields is not None:
        ex.add_fields(down.peer_fields)
    return None
