"""Every finding of the fuzz targets, as a plain test (their inputs are kept in tests/fuzz/corpus/*/
regression-* too, replayed by each target's corpus test)."""

from __future__ import annotations

import asyncio

import pytest

from meshcore.dnsname import decode_name

from gateway.jwt_auth import claim_headers
from meshcore import labels as lb
from meshcore import policy
from meshcore.protocol import ProtocolError, decode_message
from sidecar import dns
from tests.fuzz import http1
from tests.fuzz.twins import compiled, pure


# ---- the whole-head path (sidecar/datapath/http1.py) ---------------------------------------------

# split_request_line and split_status_line did not check that the line's CR is followed by LF, and
# split_head_fields starts the fields 2 bytes later, so the byte after a bare CR was skipped where
# httptools refuses the message: the compiled and pure builds disagreed, and `\rTransfer-Encoding`
# became a header named `ransfer-Encoding` (a smuggling primitive).
@pytest.mark.parametrize("data, response", [
    (b"GET / HTTP/1.1\rXHost: a\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\rXContent-Length: 0\r\n\r\n", True),
], ids=["request", "response"])
@pytest.mark.parametrize("mod", [compiled, pure], ids=["compiled", "source"])
def test_a_start_line_ended_by_a_bare_cr_is_left_to_httptools(mod, data, response, monkeypatch):
    monkeypatch.setattr(http1, "BARE_CR_START_LINE_KNOWN", False)
    parsed, error = http1.httptools_messages(data, response)
    assert parsed == [] and "CR" in error   # httptools: "Expected CRLF after version", "Expected LF after CR"
    assert http1.whole_messages(mod, data, response) == []


# ---- fixed --------------------------------------------------------------------------------------

def test_dns_a_label_holding_a_dot_is_not_the_two_labels():
    """The single label `catalog.shop` is not the name catalog.shop: forwarded, not given its VIP."""
    query = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x0ccatalog.shop\x00" + b"\x00\x01\x00\x01"
    server = dns.DnsServer(lambda: {"catalog.shop": "240.240.0.7"})
    assert decode_name(query, 12)[0] == "catalog\\.shop."
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
    assert headers == ((b"x-jwt-claim-sub", b"u 1\tx"),)


async def _status_of_a_bare_cr_request_through_the_outbound() -> int:
    from contextlib import AsyncExitStack

    from tests.adapters.test_proxy import Mesh, raw_call

    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(mode="transparent", original_dst=lambda t: None)
        (resp,), _ = await raw_call(mesh.out_port, b"GET /echo HTTP/1.1\rXHost: payments\r\n\r\n")
        return resp["status"]


def test_the_outbound_refuses_a_request_line_ended_by_a_bare_cr():
    assert asyncio.run(_status_of_a_bare_cr_request_through_the_outbound()) == 400
