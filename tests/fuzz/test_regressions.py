"""Every finding of the fuzz targets, as a plain test (their inputs are kept in tests/fuzz/corpus/*/
regression-* too, replayed by each target's corpus test)."""

from __future__ import annotations

import pytest

from gateway.jwt_auth import claim_headers
from meshcore import labels as lb
from meshcore import policy
from meshcore.protocol import ProtocolError, decode_message
from sidecar import dns


# ---- fixed --------------------------------------------------------------------------------------

def test_dns_a_label_holding_a_dot_is_not_the_two_labels():
    """The single label `catalog.shop` is not the name catalog.shop: forwarded, not given its VIP."""
    query = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x0ccatalog.shop\x00" + b"\x00\x01\x00\x01"
    server = dns.DnsServer(lambda: {"catalog.shop": "240.240.0.7"})
    assert dns.read_name(query, 12)[0] == "catalog\\.shop"
    assert server.answer(query) is None
    two_labels = query[:12] + b"\x07catalog\x04shop\x00" + b"\x00\x01\x00\x01"
    assert server.answer(two_labels) is not None


@pytest.mark.parametrize("labels, label", [
    ({"mesh.port": "1" * 5000}, "mesh.port"),                   # int() refuses > 4300 digits (ValueError)
    ({"mesh.port": "0" * 5000 + "80"}, None),                   # leading zeros are still a port
])
def test_labels_a_port_of_thousands_of_digits_is_a_label_error(labels, label):
    spec = lb.decode_container(lb.ContainerInfo(id="c", name="/app", labels={"mesh.enable": "true", **labels}))
    if label is None:
        assert isinstance(spec, lb.MeshSpec) and spec.port == 80
    else:
        assert isinstance(spec, lb.LabelError) and spec.label == label and "outside 1..65535" in spec.message


@pytest.mark.parametrize("labels, label", [
    ({"mesh.circuit.max-connections": "1" * 5000}, "mesh.circuit.max-connections"),   # was ValueError
    ({"mesh.retries.attempts": "-" + "1" * 5000}, "mesh.retries.attempts"),
    ({"mesh.timeout": "9" * 400 + "s"}, "mesh.timeout"),                              # was inf seconds
    ({"mesh.outlier.interval": "9" * 400 + "ms"}, "mesh.outlier.interval"),
    ({"mesh.ratelimit": "9" * 400 + "/s"}, "mesh.ratelimit"),                         # was inf per second
])
def test_policy_numbers_too_large_are_label_errors(labels, label):
    with pytest.raises(lb.LabelDecodeError) as err:
        policy.decode_traffic_policy(labels)
    assert err.value.label == label


def test_policy_large_but_fitting_numbers_still_decode():
    assert policy.decode_traffic_policy({"mesh.circuit.max-connections": "000" + str(policy.UNLIMITED)}).circuit \
        .max_connections == policy.UNLIMITED
    assert policy.decode_traffic_policy({"mesh.timeout": "1" * 300 + "s"}).timeout == float("1" * 300)


def test_control_deeply_nested_json_is_a_protocol_error():
    """json recurses per level: a peer's 5000 '[' raised RecursionError past decode_message."""
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode_message(b"[" * 5000)


def test_jwt_claims_with_control_characters_are_not_forwarded():
    """A claim value with a control character made a header line the upstream's parser refuses."""
    headers = claim_headers({"role": "a\x01b", "del": "a\x7f", "sub": "u 1\tx", "nul": "a\x00"})
    assert headers == b"x-jwt-claim-sub: u 1\tx\r\n"
