"""Build the typed mesh config that meshd pushes to every sidecar; pure, standard library only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from .authz import DEFAULT_POLICY, Policy, PolicyError, decode_policy, encode_policy
from .labels import (
    ContainerInfo, GatewayRule, LabelDecodeError, LabelError, MeshSpec, decode_container,
    is_mesh_enabled, is_mesh_owned, spiffe_id, COMPOSE_SERVICE,
)
from .labels import MTLS_MODES, PROTOCOLS
from .policy import DEFAULT_POLICY as DEFAULT_TRAFFIC_POLICY, TrafficPolicy, decode_traffic_policy, policy_labels
from .policy_wire import PolicyWireError, decode_policy_wire, encode_policy_wire, policy_difference
from .routing_rules import ServiceRules, decode_rules, encode_rules
from .egress import EGRESS_ALLOW_ANY, EgressError, decode_egress_list, decode_egress_mode
from .telemetry_settings import SettingsError, TelemetrySettings, decode_settings, encode_settings

INBOUND_PORT = 15006  # the sidecar's inbound listener, Istio's number
SNAPSHOT_SCHEMA = 2  # 2: services' traffic policy as typed fields (1: as mesh.* label strings)


class SnapshotError(ValueError):
    """A snapshot on the wire that does not decode; the message names the field."""


@dataclass(frozen=True)
class Announcement:
    """One instance as announced over mDNS (DNS-SD TXT record fields)."""

    instance: str      # the app container id
    service: str
    version: str
    address: str
    port: int          # the instance's inbound (mesh) port
    identity: str
    protocol: str = "http"


@dataclass(frozen=True)
class Endpoint:
    """A reachable instance of a service, as sidecars use it."""

    instance: str
    address: str
    port: int
    version: str
    identity: str


@dataclass(frozen=True)
class ServiceConfig:
    """Everything callers need to know of one mesh service."""

    name: str
    namespace: str
    protocol: str
    port: int                       # the app's own port, what callers dial
    identity: str
    aliases: tuple[str, ...] = ()   # compose service names that also mean this service
    policy: TrafficPolicy = DEFAULT_TRAFFIC_POLICY  # decoded once from the labels by meshd
    rules: ServiceRules | None = None         # live rules set by meshctl (split, route, fault...)
    mtls: str = "strict"                      # mesh.mtls of the service's inbound
    allow: tuple[str, ...] | None = None      # mesh.allow: callers allowed (None: no label)
    egress: tuple[str, ...] | None = None     # mesh.egress: external host:port allowed (meshcore.egress)


@dataclass(frozen=True)
class GatewayRoute:
    """One external route of the gateway to a mesh service."""

    service: str
    path: str | None
    host: str | None
    strip_prefix: bool
    auth: str | None = None          # "jwt": the gateway requires a valid bearer JWT
    jwt_issuer: str | None = None
    jwt_audience: str | None = None


@dataclass(frozen=True)
class Workload:
    """One meshed container as meshd sees it: its spec and traffic policy, or the label error that
    keeps it out."""

    container: ContainerInfo
    spec: MeshSpec | None
    error: LabelError | None
    policy: TrafficPolicy | None = None   # decoded from its labels; None with an error


@dataclass(frozen=True)
class MeshConfig:
    """The whole mesh config without a version; equal contents compare equal."""

    services: dict[str, ServiceConfig] = field(default_factory=dict)
    endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    gateway_routes: tuple[GatewayRoute, ...] = ()
    policies: Policy = DEFAULT_POLICY    # authorization (meshcore.authz), decided by inbound sidecars
    telemetry: TelemetrySettings = TelemetrySettings()  # tracing and access logs
    egress_mode: str = EGRESS_ALLOW_ANY  # mesh-wide egress control (meshcore.egress, MESH_EGRESS)


@dataclass(frozen=True)
class Snapshot:
    """A versioned MeshConfig, the unit of push, ACK and NACK."""

    version: int
    config: MeshConfig


def build_workloads(containers: Iterable[ContainerInfo]) -> list[Workload]:
    """Decode every meshed container; bad labels degrade only their own container."""
    out = []
    for info in sorted(containers, key=lambda c: c.name):
        if is_mesh_owned(info.labels) or not is_mesh_enabled(info.labels):
            continue
        decoded = decode_container(info)
        policy = None
        if not isinstance(decoded, LabelError):
            try:
                # The one place a traffic policy is read from labels: nodes get it typed.
                policy = decode_traffic_policy(policy_labels(info.labels))
            except LabelDecodeError as exc:
                decoded = LabelError(container=info.name.lstrip("/"), label=exc.label, message=exc.message)
        if isinstance(decoded, LabelError):
            out.append(Workload(container=info, spec=None, error=decoded))
        else:
            out.append(Workload(container=info, spec=decoded, error=None, policy=policy))
    return out


def _conflict(spec: MeshSpec, first: ServiceConfig, label_container: str,
              policy: TrafficPolicy) -> LabelError | None:
    if spec.namespace != first.namespace:
        # One identity per service name: instances of two projects would fail each other's SPIFFE
        # checks. Mesh service names are host-wide until namespaces are part of the routing.
        return LabelError(label_container, "mesh.service",
                          f"{spec.service!r} is already a service of project {first.namespace!r} "
                          f"(mesh service names are host-wide): set another mesh.service")
    if spec.protocol != first.protocol:
        return LabelError(label_container, "mesh.protocol",
                          f"{spec.protocol!r} differs from {first.protocol!r} of other {spec.service} instances")
    if spec.port != first.port:
        return LabelError(label_container, "mesh.port",
                          f"{spec.port} differs from {first.port} of other {spec.service} instances")
    if spec.mtls != first.mtls:
        return LabelError(label_container, "mesh.mtls",
                          f"{spec.mtls!r} differs from {first.mtls!r} of other {spec.service} instances")
    if spec.allow != first.allow:
        return LabelError(label_container, "mesh.allow",
                          f"{','.join(spec.allow or ()) or 'none'!r} differs from "
                          f"{','.join(first.allow or ()) or 'none'!r} of other {spec.service} instances")
    if spec.egress != first.egress:
        return LabelError(label_container, "mesh.egress",
                          f"{','.join(spec.egress or ()) or 'none'!r} differs from "
                          f"{','.join(first.egress or ()) or 'none'!r} of other {spec.service} instances")
    difference = policy_difference(policy, first.policy)
    if difference is not None:
        path, label, mine, theirs = difference
        return LabelError(label_container, label,
                          f"{path} {json.dumps(mine)} differs from {json.dumps(theirs)} of other "
                          f"{spec.service} instances (traffic policy is per service)")
    return None


def build_config(workloads: Iterable[Workload], announcements: Iterable[Announcement],
                 trust_domain: str, rules: dict[str, ServiceRules] | None = None,
                 policies: Policy | None = None,
                 telemetry: TelemetrySettings | None = None,
                 egress_mode: str = EGRESS_ALLOW_ANY) -> tuple[MeshConfig, list[LabelError]]:
    """Join decoded workloads with mDNS announcements into one MeshConfig, plus the errors found."""
    errors: list[LabelError] = []
    services: dict[str, ServiceConfig] = {}
    aliases: dict[str, set[str]] = {}
    accepted: dict[str, Workload] = {}
    routes: dict[tuple, GatewayRoute] = {}
    # The oldest container first: of two claims (a service name in two projects, one gateway route),
    # the one that was there first keeps it, whatever the names of later ones.
    for wl in sorted(workloads, key=lambda wl: wl.container.created):
        if wl.error is not None:
            errors.append(wl.error)
            continue
        spec = wl.spec
        assert spec is not None
        name = wl.container.name.lstrip("/")
        policy = wl.policy if wl.policy is not None else DEFAULT_TRAFFIC_POLICY
        first = services.get(spec.service)
        if first is not None:
            problem = _conflict(spec, first, name, policy)
            if problem:
                errors.append(problem)
                continue
        else:
            services[spec.service] = ServiceConfig(
                name=spec.service, namespace=spec.namespace, protocol=spec.protocol, port=spec.port,
                identity=spiffe_id(trust_domain, spec.namespace, spec.service), policy=policy,
                rules=(rules or {}).get(spec.service), mtls=spec.mtls, allow=spec.allow, egress=spec.egress)
        compose_service = wl.container.labels.get(COMPOSE_SERVICE)
        if compose_service and compose_service != spec.service:
            aliases.setdefault(spec.service, set()).add(compose_service)
        if spec.gateway is not None:
            rule: GatewayRule = spec.gateway
            key = (rule.host, rule.path)
            existing = routes.get(key)
            if existing is not None and existing.service != spec.service:
                errors.append(LabelError(name, "mesh.gateway.path" if rule.path else "mesh.gateway.host",
                                         f"route {rule.host or '*'}{rule.path or ''} already belongs to {existing.service}"))
            else:
                routes[key] = GatewayRoute(service=spec.service, path=rule.path, host=rule.host,
                                           strip_prefix=rule.strip_prefix, auth=rule.auth,
                                           jwt_issuer=rule.jwt_issuer, jwt_audience=rule.jwt_audience)
        if wl.container.serving:
            accepted[wl.container.id] = wl
    for svc, names in aliases.items():
        services[svc] = ServiceConfig(**{**services[svc].__dict__, "aliases": tuple(sorted(names))})
    endpoints: dict[str, list[Endpoint]] = {}
    for ann in announcements:
        wl = accepted.get(ann.instance)
        # An announcement counts only for a running meshed container, for its own service and its own
        # address: a stale or spoofed mDNS record cannot put traffic on another container.
        if wl is None or wl.spec is None or ann.service != wl.spec.service:
            continue
        if ann.address not in wl.container.networks.values():
            continue
        endpoints.setdefault(ann.service, []).append(Endpoint(
            instance=ann.instance, address=ann.address, port=ann.port, version=wl.spec.version,
            identity=services[ann.service].identity))
    ordered = {svc: tuple(sorted(set(eps), key=lambda e: (e.address, e.port))) for svc, eps in sorted(endpoints.items())}
    ordered_routes = tuple(sorted(routes.values(), key=_route_order))
    return MeshConfig(services=dict(sorted(services.items())), endpoints=ordered,
                      gateway_routes=ordered_routes, policies=policies or DEFAULT_POLICY,
                      telemetry=telemetry or TelemetrySettings(), egress_mode=egress_mode), errors


def _route_order(route: GatewayRoute) -> tuple:
    # Most specific first: a host match beats none, then the longest path prefix.
    return (route.host is None, -len(route.path or ""), route.host or "", route.path or "")


def match_gateway_route(routes: Iterable[GatewayRoute], host: str, path: str) -> GatewayRoute | None:
    """The first route (most specific first) whose host and path prefix match the request."""
    host = host.split(":", 1)[0].lower()
    for route in routes:
        if route.host is not None:
            if route.host.startswith("*."):
                if not host.endswith(route.host[1:]):
                    continue
            elif route.host != host:
                continue
        if route.path is not None and route.path != "/":
            if not (path == route.path or path.startswith(route.path + "/") or path.startswith(route.path + "?")):
                continue
        return route
    return None


def rewrite_path(route: GatewayRoute, path: str) -> str:
    """The upstream path for a matched gateway route (prefix stripped when the route says so)."""
    if not route.strip_prefix or not route.path or route.path == "/":
        return path
    rest = path[len(route.path):]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


# ---- wire form -------------------------------------------------------------------------------

def encode_snapshot(snapshot: Snapshot) -> dict[str, Any]:
    """The JSON-ready form of a snapshot."""
    cfg = snapshot.config
    return {
        "schema": SNAPSHOT_SCHEMA,
        "version": snapshot.version,
        "services": {n: {"namespace": s.namespace, "protocol": s.protocol, "port": s.port,
                         "identity": s.identity, "aliases": list(s.aliases),
                         "policy": encode_policy_wire(s.policy),
                         "rules": encode_rules(s.rules) if s.rules else None,
                         "mtls": s.mtls, "allow": list(s.allow) if s.allow is not None else None,
                         "egress": list(s.egress) if s.egress is not None else None}
                     for n, s in cfg.services.items()},
        "endpoints": {n: [{"instance": e.instance, "address": e.address, "port": e.port,
                           "version": e.version, "identity": e.identity} for e in eps]
                      for n, eps in cfg.endpoints.items()},
        "gateway_routes": [{"service": r.service, "path": r.path, "host": r.host,
                            "strip_prefix": r.strip_prefix, "auth": r.auth, "jwt_issuer": r.jwt_issuer,
                            "jwt_audience": r.jwt_audience} for r in cfg.gateway_routes],
        "policies": encode_policy(cfg.policies),
        "telemetry": encode_settings(cfg.telemetry),
        "egress_mode": cfg.egress_mode,
    }


def _field(obj: Any, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise SnapshotError(f"{where}.{key}: missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SnapshotError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def decode_snapshot(data: Any) -> Snapshot:
    """Validate and decode a snapshot from its wire form; raises SnapshotError naming the field."""
    if not isinstance(data, dict):
        raise SnapshotError("snapshot: expected an object")
    schema = _field(data, "schema", int, "snapshot")
    if schema != SNAPSHOT_SCHEMA:
        raise SnapshotError(f"snapshot.schema: {schema} is not supported (want {SNAPSHOT_SCHEMA}; "
                            "meshd is of another build)")
    version = _field(data, "version", int, "snapshot")
    services = {}
    for name, raw in _field(data, "services", dict, "snapshot").items():
        where = f"services.{name}"
        protocol = _field(raw, "protocol", str, where)
        if protocol not in PROTOCOLS:
            raise SnapshotError(f"{where}.protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        aliases = _field(raw, "aliases", list, where)
        if not all(isinstance(alias, str) for alias in aliases):
            raise SnapshotError(f"{where}.aliases: expected a list of strings")
        if "policy" not in raw:
            raise SnapshotError(f"{where}.policy: missing")
        try:
            policy = decode_policy_wire(raw["policy"], f"{where}.policy")
        except PolicyWireError as exc:
            raise SnapshotError(str(exc)) from None
        raw_rules = raw.get("rules")
        try:
            rules = decode_rules(raw_rules) if raw_rules is not None else None
        except ValueError as exc:
            raise SnapshotError(f"{where}.{exc}") from None
        mtls = raw.get("mtls", "strict")
        if mtls not in MTLS_MODES:
            raise SnapshotError(f"{where}.mtls: {mtls!r} is not strict or permissive")
        allow = raw.get("allow")
        if allow is not None:
            if not isinstance(allow, list) or not all(isinstance(a, str) and a for a in allow):
                raise SnapshotError(f"{where}.allow: expected a list of service names or null")
            allow = tuple(allow)
        egress = _decode_egress(raw.get("egress"), where)
        services[name] = ServiceConfig(
            name=name, namespace=_field(raw, "namespace", str, where), protocol=protocol,
            port=_field(raw, "port", int, where), identity=_field(raw, "identity", str, where),
            aliases=tuple(aliases), policy=policy, rules=rules, mtls=mtls, allow=allow, egress=egress)
    endpoints = {}
    for name, raw_eps in _field(data, "endpoints", dict, "snapshot").items():
        if name not in services:
            raise SnapshotError(f"endpoints.{name}: no such service")
        if not isinstance(raw_eps, list):
            raise SnapshotError(f"endpoints.{name}: expected a list")
        eps = []
        for i, raw in enumerate(raw_eps):
            where = f"endpoints.{name}[{i}]"
            eps.append(Endpoint(instance=_field(raw, "instance", str, where),
                                address=_field(raw, "address", str, where),
                                port=_field(raw, "port", int, where),
                                version=_field(raw, "version", str, where),
                                identity=_field(raw, "identity", str, where)))
        endpoints[name] = tuple(eps)
    routes = []
    for i, raw in enumerate(_field(data, "gateway_routes", list, "snapshot")):
        where = f"gateway_routes[{i}]"
        service = _field(raw, "service", str, where)
        if service not in services:
            raise SnapshotError(f"{where}.service: {service!r} is not a service")
        path = raw.get("path")
        host = raw.get("host")
        if path is not None and not isinstance(path, str) or host is not None and not isinstance(host, str):
            raise SnapshotError(f"{where}: path and host must be strings or null")
        auth = raw.get("auth")
        if auth not in (None, "jwt"):
            raise SnapshotError(f"{where}.auth: {auth!r} is not null or 'jwt'")
        issuer, audience = raw.get("jwt_issuer"), raw.get("jwt_audience")
        if issuer is not None and not isinstance(issuer, str) or audience is not None and not isinstance(audience, str):
            raise SnapshotError(f"{where}: jwt_issuer and jwt_audience must be strings or null")
        routes.append(GatewayRoute(service=service, path=path, host=host,
                                   strip_prefix=bool(_field(raw, "strip_prefix", bool, where)),
                                   auth=auth, jwt_issuer=issuer, jwt_audience=audience))
    policies = DEFAULT_POLICY
    if "policies" in data:
        try:
            policies = decode_policy(data["policies"])
        except PolicyError as exc:
            raise SnapshotError(str(exc)) from None
    telemetry = TelemetrySettings()
    if "telemetry" in data:
        try:
            telemetry = decode_settings(data["telemetry"])
        except SettingsError as exc:
            raise SnapshotError(f"telemetry.{exc}") from None
    try:
        egress_mode = decode_egress_mode(data.get("egress_mode", EGRESS_ALLOW_ANY))
    except EgressError as exc:
        raise SnapshotError(f"snapshot.egress_mode: {exc}") from None
    return Snapshot(version=version, config=MeshConfig(services=services, endpoints=endpoints,
                                                       gateway_routes=tuple(routes), policies=policies,
                                                       telemetry=telemetry, egress_mode=egress_mode))


def _decode_egress(raw: Any, where: str) -> tuple[str, ...] | None:
    """A service's `egress` entries on the wire (null: no mesh.egress label), checked and canonical."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise SnapshotError(f"{where}.egress: expected a list of host:port strings or null")
    try:
        return tuple(str(rule) for rule in decode_egress_list(",".join(raw)))
    except EgressError as exc:
        raise SnapshotError(f"{where}.egress: {exc}") from None
