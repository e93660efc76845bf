"""meshcore.grpc: status codes, grpc-timeout, trailers-only local replies, retries on gRPC status and
detection, against the gRPC over HTTP/2 protocol description and RFC 9113."""

from __future__ import annotations

import pytest

from meshcore import grpc
from meshcore.grpc import GrpcStatus
from meshcore.policy import GRPC_RETRY_ON, RETRY_ON, decode_traffic_policy


# ---- status codes and retryOn names --------------------------------------------------------------

def test_the_seventeen_status_codes_of_the_spec():
    assert {s.name: s.value for s in GrpcStatus} == {
        "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
        "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
        "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
        "DATA_LOSS": 15, "UNAUTHENTICATED": 16}


def test_istio_retry_on_names_map_to_their_codes():
    assert grpc.RETRY_ON_STATUS == {"cancelled": 1, "deadline-exceeded": 4, "internal": 13,
                                    "resource-exhausted": 8, "unavailable": 14}
    assert set(GRPC_RETRY_ON) <= set(RETRY_ON)


# ---- grpc-timeout --------------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    ("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("1500u", 0.0015), ("7n", 7e-9),
    (b"100m", 0.1), ("99999999S", 99999999.0), ("00000001S", 1.0), ("0m", 0.0), (" 5S ", 5.0),
])
def test_grpc_timeout_parses_to_seconds(value, seconds):
    assert grpc.parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    None, "", "S", "100", "100s", "100ms", "1.5S", "-1S", "+1S", "1_0S", "123456789S", "\u0661S", "1 S", "1x",
    "\x1c50m", "50m\xa0",   # only SP and HTAB are whitespace around a field value (RFC 9110 5.6.3)
])
def test_malformed_grpc_timeout_is_none(value):
    assert grpc.parse_grpc_timeout(value) is None


@pytest.mark.parametrize("seconds, value", [
    (3600.0, "1H"), (120.0, "2M"), (2.0, "2S"), (0.25, "250m"), (1.1, "1100m"), (0.0015, "1500u"),
    (1e-9, "1n"), (0.0, "0n"), (-3.0, "0n"),
    (1.000000001, "1000001u"),           # not exact in 8 digits at any unit: rounded up, never down
    (10.0**11, "27777778H"),             # 27777777.8 hours, rounded up
    (10.0**15, "99999999H"),             # beyond the format: its largest value
])
def test_grpc_timeout_formats_exactly_or_rounded_up(seconds, value):
    assert grpc.format_grpc_timeout(seconds) == value
    assert len(value) - 1 <= grpc.MAX_TIMEOUT_DIGITS


@pytest.mark.parametrize("seconds", [0.001, 0.123456789, 1.5, 59.0, 3600.5, 86400.0])
def test_formatted_timeouts_parse_back_to_at_least_the_value(seconds):
    parsed = grpc.parse_grpc_timeout(grpc.format_grpc_timeout(seconds))
    assert parsed == pytest.approx(seconds, abs=1e-9) or parsed > seconds


@pytest.mark.parametrize("mesh, header, expected", [
    (None, None, (None, None)),                  # no deadline anywhere
    (None, "5S", (5.0, "5S")),                   # the caller's, as received
    (2.0, None, (2.0, "2S")),                    # the mesh's, told to the next hop
    (2.0, "500m", (0.5, "500m")),                # the caller's is smaller: kept as received
    (2.0, "2S", (2.0, "2S")),
    (2.0, b"1M", (2.0, "2S")),                   # the mesh's timeout caps the caller's
    (0.25, "3S", (0.25, "250m")),
    (2.0, "soon", (2.0, "2S")),                  # malformed: replaced by the mesh's
    (None, "soon", (None, "soon")),              # malformed and no cap: passed on unchanged
])
def test_cap_takes_the_smaller_timeout(mesh, header, expected):
    assert grpc.cap_grpc_timeout(mesh, header) == expected


# ---- local replies -------------------------------------------------------------------------------

@pytest.mark.parametrize("http_status, flags, status", [
    (403, "RBAC", GrpcStatus.PERMISSION_DENIED),       # denied by authorization
    (503, "UH", GrpcStatus.UNAVAILABLE),               # no healthy upstream
    (503, "UF", GrpcStatus.UNAVAILABLE),               # connect failure
    (503, "UF,URX", GrpcStatus.UNAVAILABLE),
    (503, "UC", GrpcStatus.UNAVAILABLE),
    (503, "UO", GrpcStatus.UNAVAILABLE),
    (429, "RL", GrpcStatus.RESOURCE_EXHAUSTED),        # rate limited (not 429's UNAVAILABLE)
    (504, "UT", GrpcStatus.DEADLINE_EXCEEDED),         # timeout (not 504's UNAVAILABLE)
    (504, "DI,UT", GrpcStatus.DEADLINE_EXCEEDED),      # a delay fault, then the timeout
    (401, "UAEX", GrpcStatus.UNAUTHENTICATED),
    (502, "EB", GrpcStatus.PERMISSION_DENIED),
    (404, "NR", GrpcStatus.UNIMPLEMENTED),
    # no flag that explains it: the HTTP status, as doc/http-grpc-status-mapping.md maps it
    (503, "FI", GrpcStatus.UNAVAILABLE),
    (400, "DPE", GrpcStatus.INTERNAL),
    (418, "FI", GrpcStatus.UNKNOWN),
    (502, "-", GrpcStatus.UNAVAILABLE),
    (500, "-", GrpcStatus.UNKNOWN),
])
def test_local_reply_status_by_flag_then_http_status(http_status, flags, status):
    assert grpc.local_reply_status(http_status, flags) == status


def test_trailers_only_reply_of_a_denied_call():
    assert grpc.local_reply_headers(403, "RBAC", "RBAC: access denied", [(b"x-mesh-flags", b"RBAC")]) == [
        (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"7"),
        (b"grpc-message", b"RBAC: access denied"), (b"x-mesh-flags", b"RBAC")]


def test_trailers_only_reply_without_message_has_no_grpc_message():
    assert grpc.trailers_only_headers(GrpcStatus.UNAVAILABLE) == [
        (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14")]


@pytest.mark.parametrize("message, encoded", [
    ("no healthy upstream", b"no healthy upstream"),
    ("100% down", b"100%25 down"),                   # % itself is encoded
    ("line\nbreak\ttab", b"line%0Abreak%09tab"),
    ("caf\u00e9 \u2713", b"caf%C3%A9 %E2%9C%93"),      # UTF-8, byte by byte
    ("~!$&'()*+,;=:@[]{}|\\^`\"<>#?/", b"~!$&'()*+,;=:@[]{}|\\^`\"<>#?/"),  # printable ASCII stays
    ("\x7f", b"%7F"),
])
def test_grpc_message_is_percent_encoded_and_decodes_back(message, encoded):
    assert grpc.percent_encode_message(message) == encoded
    assert grpc.percent_decode_message(encoded) == message


@pytest.mark.parametrize("value, text", [
    (b"50%", "50%"), (b"%zz ok", "%zz ok"), (b"%4", "%4"), (b"%41%42", "AB"), (b"%c3%a9", "\u00e9"),
])
def test_malformed_percent_sequences_are_kept(value, text):
    assert grpc.percent_decode_message(value) == text


# ---- retries on gRPC status ----------------------------------------------------------------------

@pytest.mark.parametrize("status, on, retriable", [
    (14, {"unavailable"}, True),
    (14, {"5xx", "reset", "gateway-error"}, False),          # HTTP words never cover gRPC statuses
    (4, {"deadline-exceeded", "unavailable"}, True),
    (8, {"resource-exhausted"}, True),
    (13, {"internal"}, True),
    (1, {"cancelled"}, True),
    (2, set(GRPC_RETRY_ON), False),                          # UNKNOWN is no retryOn name
    (0, set(GRPC_RETRY_ON), False),                          # OK
    (None, set(GRPC_RETRY_ON), False),                       # no grpc-status (not trailers-only)
    (14, set(), False),
])
def test_retriable_grpc_status(status, on, retriable):
    assert grpc.is_retriable_grpc_status(status, on) is retriable


def test_retry_decision_from_a_decoded_policy_and_a_trailers_only_response():
    on = decode_traffic_policy({"mesh.retries.on": "unavailable,connect-failure"}).retries.on
    unavailable = grpc.trailers_only_headers(GrpcStatus.UNAVAILABLE, "down")
    assert grpc.is_retriable_grpc_status(grpc.response_grpc_status(unavailable), on)
    denied = grpc.trailers_only_headers(GrpcStatus.PERMISSION_DENIED)
    assert not grpc.is_retriable_grpc_status(grpc.response_grpc_status(denied), on)


@pytest.mark.parametrize("headers, status", [
    ([(b":status", b"200"), (b"Grpc-Status", b"14")], 14),
    ([(":status", "200"), ("grpc-status", "0")], 0),
    ([(b":status", b"200"), (b"content-type", b"application/grpc")], None),
    ([(b"grpc-status", b"fourteen")], None),
    ([(b"grpc-status", b"-1")], None),
    ([(b"grpc-status", b"")], None),
    ([(b"grpc-status", b"\x1c14")], None),
    ([(b"grpc-status", b" 14\t")], 14),
])
def test_response_grpc_status(headers, status):
    assert grpc.response_grpc_status(headers) == status


# ---- detection -----------------------------------------------------------------------------------

def test_preface_is_rfc_9113s_24_octets():
    assert grpc.H2_PREFACE == bytes.fromhex("505249202a20485454502f322e300d0a0d0a534d0d0a0d0a")
    assert len(grpc.H2_PREFACE) == 24


@pytest.mark.parametrize("data, verdict", [
    (grpc.H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", True),   # preface, then SETTINGS
    (grpc.H2_PREFACE, True),
    (b"PRI * HTTP/2", None),                                           # read more
    (b"", None),
    (b"GET / HTTP/1.1\r\n", False),
    (b"PRI * HTTP/1.1\r\n", False),
    (b"POST /shop.Recommendations/Recommend HTTP/1.1\r\n", False),
])
def test_sniff_h2_preface(data, verdict):
    assert grpc.sniff_h2_preface(data) is verdict


@pytest.mark.parametrize("value, is_grpc", [
    (b"application/grpc", True), ("application/grpc+proto", True), (b"application/grpc+json", True),
    (b"Application/GRPC", True), (b"application/grpc; charset=utf-8", True),
    (b"application/grpc-web", False), (b"application/grpc-web+proto", False),
    (b"application/json", False), (b"", False), (b"application/grpcx", False), (b" application/grpc", True),
    (b"\x0bapplication/grpc", False),
])
def test_grpc_content_types(value, is_grpc):
    assert grpc.is_grpc_content_type(value) is is_grpc


@pytest.mark.parametrize("headers, is_grpc", [
    ([(b":method", b"POST"), (b"content-type", b"application/grpc"), (b"te", b"trailers")], True),
    ([(":method", "POST"), ("Content-Type", "application/grpc+proto")], True),
    ([(b":method", b"GET"), (b"content-type", b"application/json")], False),
    ([(b":method", b"GET")], False),
])
def test_is_grpc_request(headers, is_grpc):
    assert grpc.is_grpc_request(headers) is is_grpc
