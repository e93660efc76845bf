"""Table tests of meshcore.limits: defaults, the variables, and errors that name them."""

from __future__ import annotations

import pytest

from meshcore.limits import (
    DEFAULT_LIMITS, KIB, LIMIT_VARIABLES, MIB, LimitError, Limits, decode_size, limits_env, limits_from_env,
)


def test_defaults_are_envoys_where_envoy_has_one():
    assert DEFAULT_LIMITS.max_header_bytes == 60 * KIB      # max_request_headers_kb
    assert DEFAULT_LIMITS.max_headers == 100                # max_headers_count
    assert limits_from_env({}) == DEFAULT_LIMITS


@pytest.mark.parametrize("var, raw, field, expected", [
    ("MESH_MAX_HEADER_BYTES", "8192", "max_header_bytes", 8192),
    ("MESH_MAX_HEADER_BYTES", "96KiB", "max_header_bytes", 96 * KIB),
    ("MESH_MAX_HEADER_BYTES", " 8k ", "max_header_bytes", 8 * KIB),
    ("MESH_MAX_HEADERS", "50", "max_headers", 50),
    ("MESH_MAX_REQUEST_LINE", "4KIB", "max_request_line", 4 * KIB),
    ("MESH_HEAD_TIMEOUT", "2s", "head_timeout", 2.0),
    ("MESH_HEAD_TIMEOUT", "500ms", "head_timeout", 0.5),
    ("MESH_HEAD_TIMEOUT", "0", "head_timeout", 0.0),          # off
    ("MESH_IDLE_TIMEOUT", "1h", "idle_timeout", 3600.0),
    ("MESH_IDLE_TIMEOUT", "90", "idle_timeout", 90.0),        # bare: seconds
    ("MESH_BODY_TIMEOUT", "1.5m", "body_timeout", 90.0),
    ("MESH_MAX_CONNECTIONS", "100", "max_connections", 100),
    ("MESH_GATEWAY_MAX_BODY", "1MiB", "gateway_max_body", MIB),
    ("MESH_GATEWAY_MAX_BODY", "0", "gateway_max_body", 0),     # off
    ("MESH_MAX_HEADERS", "", "max_headers", 100),               # empty: the default
])
def test_each_variable(var, raw, field, expected):
    limits = limits_from_env({var: raw})
    assert getattr(limits, field) == expected
    assert {f: getattr(limits, f) for f in LIMIT_VARIABLES.values() if f != field} == \
        {f: getattr(DEFAULT_LIMITS, f) for f in LIMIT_VARIABLES.values() if f != field}


@pytest.mark.parametrize("var, raw, fragment", [
    ("MESH_MAX_HEADER_BYTES", "lots", "MESH_MAX_HEADER_BYTES: 'lots' is not a size"),
    ("MESH_MAX_HEADER_BYTES", "-1", "MESH_MAX_HEADER_BYTES: '-1' is not a size"),
    ("MESH_MAX_HEADER_BYTES", "10", "MESH_MAX_HEADER_BYTES: 10 is below the minimum 1024"),
    ("MESH_MAX_HEADER_BYTES", "1GiB", "not a size"),
    ("MESH_MAX_HEADERS", "1.5", "MESH_MAX_HEADERS: '1.5' is not a whole number"),
    ("MESH_MAX_HEADERS", "3", "MESH_MAX_HEADERS: 3 is below the minimum 8"),
    ("MESH_MAX_REQUEST_LINE", "100", "below the minimum 256"),
    ("MESH_HEAD_TIMEOUT", "soon", "MESH_HEAD_TIMEOUT: 'soon' is not a duration"),
    ("MESH_IDLE_TIMEOUT", "-5s", "MESH_IDLE_TIMEOUT: '-5s' is negative"),
    ("MESH_MAX_CONNECTIONS", "0", "MESH_MAX_CONNECTIONS: 0 is below the minimum 1"),
    ("MESH_MAX_CONNECTIONS", "9" * 12, "not a whole number"),
])
def test_bad_values_name_the_variable(var, raw, fragment):
    with pytest.raises(LimitError) as excinfo:
        limits_from_env({var: raw})
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize("raw, expected", [("0", 0), ("1k", KIB), ("2 MiB", 2 * MIB), ("64KIB", 64 * KIB)])
def test_sizes(raw, expected):
    assert decode_size(raw) == expected


def test_base_and_handing_on():
    base = Limits(max_headers=20)
    assert limits_from_env({"MESH_HEAD_TIMEOUT": "3s"}, base) == Limits(max_headers=20, head_timeout=3.0)
    env = {"MESH_HEAD_TIMEOUT": "3s", "MESH_MAX_HEADERS": " ", "PATH": "/bin", "MESH_EGRESS": "registry-only"}
    assert limits_env(env) == {"MESH_HEAD_TIMEOUT": "3s"}


def test_sidecar_settings_refuse_a_bad_limit_by_name():
    from sidecar.cli import ConfigError, SidecarSettings

    env = {"MESH_CONTROL_URL": "ws://x", "MESH_NODE": "n", "MESH_CONTAINER": "c", "MESH_SERVICE": "s",
           "MESH_APP_PORT": "8080"}
    assert SidecarSettings.from_env({**env, "MESH_MAX_HEADERS": "50"}).limits.max_headers == 50
    with pytest.raises(ConfigError, match="MESH_BODY_TIMEOUT"):
        SidecarSettings.from_env({**env, "MESH_BODY_TIMEOUT": "x"})


def test_meshd_checks_and_hands_on_the_limits():
    from meshd.app import checked_limits_env

    assert checked_limits_env({"MESH_MAX_CONNECTIONS": "64", "HOME": "/"}) == {"MESH_MAX_CONNECTIONS": "64"}
    with pytest.raises(LimitError, match="MESH_MAX_CONNECTIONS"):
        checked_limits_env({"MESH_MAX_CONNECTIONS": "many"})
