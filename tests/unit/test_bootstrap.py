"""Bootstrap token and placement checks (meshcore.bootstrap) with a fake clock."""

from __future__ import annotations

import pytest

from meshcore.bootstrap import (
    TOKEN_TTL_S, Placement, TokenRecord, check_placement, check_token, hash_token,
)

T0 = 1_700_000_000.0
APP = "a" * 64
REC = TokenRecord(node="shop-orders-1-mesh", kind="sidecar", container=APP, token_hash=hash_token("tok"),
                  created_at=T0)


@pytest.mark.parametrize("record, kind, node, container, token, now, fragment", [
    (REC, "sidecar", "shop-orders-1-mesh", APP, "tok", T0 + 1, None),
    (None, "sidecar", "shop-orders-1-mesh", APP, "tok", T0, "no bootstrap token was issued"),
    (REC, "sidecar", "shop-orders-1-mesh", APP, "tok2", T0, "wrong bootstrap token"),
    (REC, "gateway", "shop-orders-1-mesh", APP, "tok", T0, "not for gateway"),
    (REC, "sidecar", "shop-users-1-mesh", APP, "tok", T0, "not for sidecar 'shop-users-1-mesh'"),
    (TokenRecord(**{**REC.to_dict(), "used_at": T0 + 2}), "sidecar", "shop-orders-1-mesh", APP, "tok", T0 + 3,
     "already used"),
    (REC, "sidecar", "shop-orders-1-mesh", APP, "tok", T0 + TOKEN_TTL_S + 1, "expired"),
    (REC, "sidecar", "shop-orders-1-mesh", "b" * 64, "tok", T0, "belongs to another container"),
])
def test_check_token(record, kind, node, container, token, now, fragment):
    reason = check_token(record, kind, node, container, token, now)
    if fragment is None:
        assert reason is None
    else:
        assert fragment in reason and "tok" not in reason.replace("token", "")


def test_record_round_trip_and_hash():
    assert TokenRecord.from_dict(REC.to_dict()) == REC
    assert hash_token("tok") != "tok" and len(hash_token("tok")) == 64


SIDECAR = {"mesh.owner": "meshd", "mesh.role": "sidecar", "mesh.sidecar.for": APP}


@pytest.mark.parametrize("placement, fragment", [
    (Placement("sidecar", SIDECAR, f"container:{APP}", True, APP, ("172.20.0.5",), "172.20.0.5"), None),
    (Placement("sidecar", SIDECAR, f"container:{APP}", False, APP, ("172.20.0.5",), "172.20.0.5"), "not running"),
    (Placement("sidecar", {}, f"container:{APP}", True, APP, ("172.20.0.5",), "172.20.0.5"), "not created by meshd"),
    (Placement("sidecar", {**SIDECAR, "mesh.sidecar.for": "x"}, f"container:{APP}", True, APP, ("172.20.0.5",),
               "172.20.0.5"), "not the sidecar of that app"),
    (Placement("sidecar", SIDECAR, "bridge", True, APP, ("172.20.0.5",), "172.20.0.5"), "network namespace"),
    (Placement("sidecar", SIDECAR, f"container:{APP}", True, APP, ("172.20.0.5",), "172.20.0.9"),
     "comes from 172.20.0.9"),
    (Placement("gateway", {"mesh.owner": "meshd", "mesh.role": "gateway"}, "host", True, "", (), "127.0.0.1"), None),
    (Placement("gateway", {"mesh.owner": "meshd", "mesh.role": "gateway"}, "host", True, "", (), "172.20.0.9"),
     "not from loopback"),
    (Placement("gateway", {"mesh.owner": "meshd", "mesh.role": "gateway"}, "bridge", True, "", (), "127.0.0.1"),
     "host network namespace"),
])
def test_check_placement(placement, fragment):
    reason = check_placement(placement)
    assert reason is None if fragment is None else fragment in reason


def test_token_archive_holds_one_private_file_for_the_node_uid():
    import io
    import tarfile

    from meshcore.bootstrap import NODE_UID, TOKEN_DIR_PARENT, TOKEN_FILE, token_archive

    with tarfile.open(fileobj=io.BytesIO(token_archive("s3cret-token")), mode="r") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["mesh", "mesh/bootstrap-token"]
        folder, entry = members["mesh"], members["mesh/bootstrap-token"]
        assert folder.isdir() and folder.mode == 0o700 and (folder.uid, folder.gid) == (NODE_UID, NODE_UID)
        assert entry.isfile() and entry.mode == 0o400 and (entry.uid, entry.gid) == (NODE_UID, NODE_UID)
        assert tar.extractfile(entry).read() == b"s3cret-token"
    assert TOKEN_FILE == f"{TOKEN_DIR_PARENT}/mesh/bootstrap-token"
    assert token_archive("a") == token_archive("a")       # no clock in it: the same token, the same bytes
