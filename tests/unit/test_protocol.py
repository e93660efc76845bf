"""Table tests of meshcore.protocol: control messages both ways, decode errors, reconnect backoff."""

from __future__ import annotations

import inspect
import json

import pytest

from meshcore.protocol import (
    Ack, Hello, Nack, ProtocolError, SnapshotPush, decode_message, encode_message, reconnect_delay,
)

MESSAGES = [
    Hello(kind="sidecar", node="shop-orders-1-mesh", container="a" * 64, last_version=0),
    Hello(kind="gateway", node="gateway", container="", last_version=12),
    SnapshotPush(version=3, snapshot={"schema": 1, "version": 3, "services": {}, "endpoints": {},
                                      "gateway_routes": []}),
    SnapshotPush(version=0, snapshot={}),
    Ack(version=3),
    Ack(version=0),
    Nack(version=4, reason="endpoints.orders[0].port: expected int"),
    Nack(version=5, reason=""),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    text = encode_message(msg)
    assert isinstance(text, str)
    assert decode_message(text) == msg
    assert decode_message(text.encode()) == msg


@pytest.mark.parametrize("msg, wire_type", [
    (MESSAGES[0], "hello"), (MESSAGES[2], "snapshot"), (MESSAGES[4], "ack"), (MESSAGES[6], "nack"),
])
def test_wire_type(msg, wire_type):
    assert json.loads(encode_message(msg))["type"] == wire_type


def test_encode_refuses_other_objects():
    with pytest.raises(TypeError):
        encode_message({"type": "ack", "version": 1})  # type: ignore[arg-type]


def _hello(**changes):
    body = {"type": "hello", "kind": "sidecar", "node": "n", "container": "c", "last_version": 0}
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...})


@pytest.mark.parametrize("text, fragment", [
    ("", "not JSON"),
    ("{", "not JSON"),
    ("not json", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    ("[]", "expected a JSON object"),
    ("42", "expected a JSON object"),
    ('"ack"', "expected a JSON object"),
    ("null", "expected a JSON object"),
    ("{}", "message.type: None"),
    ('{"type": "bye"}', "message.type: 'bye'"),
    ('{"type": 1}', "message.type: 1"),
    ('{"type": "ack"}', "ack.version: missing"),
    ('{"type": "ack", "version": "1"}', "ack.version: expected int"),
    ('{"type": "ack", "version": true}', "ack.version: expected int"),
    ('{"type": "ack", "version": 1.5}', "ack.version: expected int"),
    ('{"type": "ack", "version": null}', "ack.version: expected int"),
    ('{"type": "nack", "version": 1}', "nack.reason: missing"),
    ('{"type": "nack", "version": 1, "reason": 5}', "nack.reason: expected str"),
    ('{"type": "nack", "version": false, "reason": "x"}', "nack.version: expected int"),
    ('{"type": "snapshot", "version": 1}', "snapshot.snapshot: missing"),
    ('{"type": "snapshot", "version": 1, "snapshot": []}', "snapshot.snapshot: expected dict"),
    ('{"type": "snapshot", "version": true, "snapshot": {}}', "snapshot.version: expected int"),
    (_hello(kind="proxy"), "hello.kind: 'proxy'"),
    (_hello(kind=...), "hello.kind: missing"),
    (_hello(node=...), "hello.node: missing"),
    (_hello(node=7), "hello.node: expected str"),
    (_hello(container=None), "hello.container: expected str"),
    (_hello(last_version=...), "hello.last_version: missing"),
    (_hello(last_version="0"), "hello.last_version: expected int"),
    (_hello(last_version=True), "hello.last_version: expected int"),
])
def test_decode_errors(text, fragment):
    with pytest.raises(ProtocolError) as excinfo:
        decode_message(text)
    assert fragment in str(excinfo.value)


def test_protocol_error_is_value_error():
    assert issubclass(ProtocolError, ValueError)


# ---- reconnect backoff -------------------------------------------------------------------------------

@pytest.mark.parametrize("attempt, rand, expected", [
    (0, 0.0, 0.0),
    (0, 0.5, 0.1),
    (0, 0.999, 0.1998),
    (1, 1.0, 0.4),
    (2, 0.5, 0.4),
    (3, 1.0, 1.6),
    (5, 1.0, 6.4),
    (6, 1.0, 10.0),        # 12.8 capped at 10
    (6, 0.5, 5.0),
    (20, 0.25, 2.5),
    (1000, 0.999, 9.99),   # huge attempts stay capped, no overflow
])
def test_reconnect_delay_table(attempt, rand, expected):
    assert reconnect_delay(attempt, rand, base=0.2, cap=10.0) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 100, 10**6])
@pytest.mark.parametrize("rand", [0.0, 0.3, 0.999999])
def test_reconnect_delay_bounds_with_defaults(attempt, rand):
    cap = inspect.signature(reconnect_delay).parameters["cap"].default
    delay = reconnect_delay(attempt, rand)
    assert 0.0 <= delay <= cap


def test_reconnect_delay_grows_until_cap():
    delays = [reconnect_delay(a, 1.0, base=0.2, cap=10.0) for a in range(10)]
    assert delays == sorted(delays)
    assert delays[-1] == 10.0


# ---- certificate messages (zero trust) ----------------------------------------------------------

from meshcore.protocol import Bundle, BundleAck, Certs, CsrRequest, Renew  # noqa: E402

CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

CERT_MESSAGES = [
    Hello(kind="sidecar", node="n", container="c", last_version=0, token="t" * 43, csr=CSR),
    Certs(cert_chain=CERT, bundle=CERT + CERT, not_after=1700000000.0, renew_at=1699990000.5),
    Certs(cert_chain=CERT, bundle=CERT, not_after=1700000000.0, purpose="gateway-server"),
    CsrRequest(csr=CSR),
    CsrRequest(csr=CSR, purpose="gateway-server"),
    Renew(reason="root rotation"),
    Renew(),
    Bundle(version=3, bundle=CERT),
    BundleAck(version=3),
]


@pytest.mark.parametrize("msg", CERT_MESSAGES, ids=lambda m: type(m).__name__)
def test_certificate_messages_round_trip(msg):
    assert decode_message(encode_message(msg)) == msg


def test_secrets_are_not_in_repr():
    assert "tttt" not in repr(CERT_MESSAGES[0]) and "BEGIN" not in repr(CERT_MESSAGES[0])
    assert "BEGIN" not in repr(CsrRequest(csr=CSR))


def test_plain_hello_has_no_token_fields_on_the_wire():
    body = json.loads(encode_message(Hello(kind="sidecar", node="n", container="c", last_version=1)))
    assert "token" not in body and "csr" not in body


@pytest.mark.parametrize("body, fragment", [
    ({"type": "hello", "kind": "sidecar", "node": "n", "container": "c", "last_version": 0, "token": "t"},
     "token and csr come together"),
    ({"type": "hello", "kind": "sidecar", "node": "n", "container": "c", "last_version": 0, "csr": CSR},
     "token and csr come together"),
    ({"type": "hello", "kind": "sidecar", "node": "n", "container": "c", "last_version": 0, "token": 5, "csr": CSR},
     "hello.token: expected str"),
    ({"type": "hello", "kind": "sidecar", "node": "n", "container": "c", "last_version": 0, "token": "t",
      "csr": "not pem"}, "hello.csr: expected PEM"),
    ({"type": "hello", "kind": "sidecar", "node": "n", "container": "c", "last_version": 0, "token": "t" * 300,
      "csr": CSR}, "longer than 256"),
    ({"type": "certs", "bundle": CERT, "not_after": 1.0}, "certs.cert_chain: missing"),
    ({"type": "certs", "cert_chain": CERT, "bundle": CERT, "not_after": "soon"}, "certs.not_after: expected a finite"),
    ({"type": "certs", "cert_chain": CERT, "bundle": CERT, "not_after": True}, "certs.not_after: expected a finite"),
    ({"type": "certs", "cert_chain": CSR, "bundle": CERT, "not_after": 1.0}, "certs.cert_chain: expected PEM"),
    ({"type": "certs", "cert_chain": CERT, "bundle": CERT, "not_after": 1.0, "purpose": "x"}, "certs.purpose"),
    ({"type": "csr"}, "csr.csr: missing"),
    ({"type": "csr", "csr": ""}, "csr.csr: empty"),
    ({"type": "csr", "csr": CSR + "x" * 70000}, "longer than"),
    ({"type": "bundle", "version": "1", "bundle": CERT}, "bundle.version: expected int"),
    ({"type": "bundle_ack"}, "bundle_ack.version: missing"),
    ({"type": "renew", "reason": 3}, "renew.reason: expected str"),
])
def test_certificate_messages_decode_strictly(body, fragment):
    with pytest.raises(ProtocolError) as exc:
        decode_message(json.dumps(body))
    assert fragment in str(exc.value)
