"""Build the typed mesh config that meshd pushes to every sidecar; pure, standard library only."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

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
    # Instances of one snapshot key share a project (the key names it, or its owner holds the bare
    # name): what must agree between them is how callers reach them.
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


class ServiceNameError(ValueError):
    """A service name that names no mesh service, or several (`choices`, also in the message)."""

    def __init__(self, message: str, choices: tuple[str, ...] = ()):
        super().__init__(message)
        self.choices = choices


def base_name(key: str) -> str:
    """The mesh service name of a snapshot key (`web` of `web` and of `web.shop`)."""
    return key.partition(".")[0]


def service_key(service: str, namespace: str, owners: Mapping[str, str]) -> str:
    """The snapshot key of a project's service: its bare name when that project holds the name
    (`owners`), else `name.project` (a name that other projects use too)."""
    return service if owners.get(service, namespace) == namespace else f"{service}.{namespace}"


def assign_owners(previous: Mapping[str, str], workloads: Iterable[Workload]) -> dict[str, str]:
    """Which project holds each mesh service name bare: the holder in `previous` while any container
    of that name is left (in any project: keys never change under a running service), else the
    project of the oldest container of that name. A name no container uses any more is dropped."""
    claims: dict[str, str] = {}
    for wl in sorted(workloads, key=lambda wl: wl.container.created):
        if wl.spec is not None:
            claims.setdefault(wl.spec.service, wl.spec.namespace)
    return {name: previous.get(name, oldest) for name, oldest in sorted(claims.items())}


def qualified_index(services: Mapping[str, ServiceConfig]) -> dict[tuple[str, str], str]:
    """(mesh service name, project) -> snapshot key, for every service of a config."""
    return {(base_name(key), svc.namespace): key for key, svc in services.items()}


def pick_service(name: str, namespace: str | None, candidates: Iterable[tuple[str, str]]) -> str | None:
    """Which of the services answering to a bare `name` ((key, project) pairs) a caller in project
    `namespace` means, as Kubernetes' search domain would have it: its own project's, else the one
    holding the name bare (keyed `name`), else the only one; None when that leaves several."""
    candidates = list(candidates)
    for key, project in candidates:
        if project == namespace:
            return key
    for key, _project in candidates:
        if key == name:
            return key
    return candidates[0][0] if len(candidates) == 1 else None


def search_names(services: Mapping[str, ServiceConfig], namespace: str | None) -> dict[str, str]:
    """Host name -> snapshot key for a caller in project `namespace` (None: outside any project):
    each service's name and aliases as `name.project`, and bare as `pick_service` resolves them.
    A service's own name wins over another service's alias (the names are filled in last)."""
    out: dict[str, str] = {}
    for pass_names in (False, True):
        bare: dict[str, list[tuple[str, str]]] = {}
        for key, svc in services.items():
            for base in ((base_name(key),) if pass_names else svc.aliases):
                base = base.lower()
                out[f"{base}.{svc.namespace}"] = key
                bare.setdefault(base, []).append((key, svc.namespace))
        for base, candidates in bare.items():
            key = pick_service(base, namespace, candidates)
            if key is not None:
                out[base] = key
    return out


def resolve_service(services: Mapping[str, ServiceConfig], name: str) -> str:
    """The snapshot key of a service named by a user (meshctl): `name` when one project has it,
    `name.project` always; raises ServiceNameError naming the choices when `name` is ambiguous."""
    index = qualified_index(services)
    service, dot, project = name.partition(".")
    if dot:
        key = index.get((service, project))
        if key is None:
            raise ServiceNameError(f"no mesh service {service!r} in project {project!r}")
        return key
    projects = sorted(ns for base, ns in index if base == name)
    if not projects:
        raise ServiceNameError(f"no mesh service named {name!r}")
    if len(projects) > 1:
        choices = tuple(f"{name}.{ns}" for ns in projects)
        raise ServiceNameError(f"{name!r} is ambiguous: projects {', '.join(projects)} each have one; "
                               f"name one of {', '.join(choices)}", choices)
    return index[(name, projects[0])]


def resolve_or_keep(resolve: Callable[[str], str], name: str) -> str:
    """`resolve(name)` (e.g. resolve_service's key), or `name` as written when it names no service now:
    rules and series of a service that is gone keep its name. An ambiguous name raises ServiceNameError."""
    try:
        return resolve(name)
    except ServiceNameError as exc:
        if exc.choices:
            raise
        return name


def build_config(workloads: Iterable[Workload], announcements: Iterable[Announcement],
                 trust_domain: str, rules: dict[str, ServiceRules] | None = None,
                 policies: Policy | None = None,
                 telemetry: TelemetrySettings | None = None,
                 egress_mode: str = EGRESS_ALLOW_ANY,
                 owners: Mapping[str, str] | None = None) -> tuple[MeshConfig, list[LabelError]]:
    """Join decoded workloads with mDNS announcements into one MeshConfig, plus the errors found.

    Services are keyed by name, a name shared by several projects `name.project` except in the
    project that holds it bare (`owners`, from `assign_owners`; None: the oldest container's)."""
    workloads = list(workloads)
    if owners is None:
        owners = assign_owners({}, workloads)
    errors: list[LabelError] = []
    services: dict[str, ServiceConfig] = {}
    aliases: dict[str, set[str]] = {}
    accepted: dict[str, tuple[Workload, str]] = {}
    routes: dict[tuple, GatewayRoute] = {}
    # The oldest container first: of two claims (one gateway route, or two instances that disagree),
    # the one that was there first keeps it, whatever the names of later ones.
    for wl in sorted(workloads, key=lambda wl: wl.container.created):
        if wl.error is not None:
            errors.append(wl.error)
            continue
        spec = wl.spec
        assert spec is not None
        name = wl.container.name.lstrip("/")
        key = service_key(spec.service, spec.namespace, owners)
        policy = wl.policy if wl.policy is not None else DEFAULT_TRAFFIC_POLICY
        first = services.get(key)
        if first is not None:
            problem = _conflict(spec, first, name, policy)
            if problem:
                errors.append(problem)
                continue
        else:
            services[key] = ServiceConfig(
                name=key, namespace=spec.namespace, protocol=spec.protocol, port=spec.port,
                identity=spiffe_id(trust_domain, spec.namespace, spec.service), policy=policy,
                rules=(rules or {}).get(key), mtls=spec.mtls, allow=spec.allow, egress=spec.egress)
        compose_service = wl.container.labels.get(COMPOSE_SERVICE)
        if compose_service and compose_service != spec.service:
            aliases.setdefault(key, set()).add(compose_service)
        if spec.gateway is not None:
            rule: GatewayRule = spec.gateway
            route_key = (rule.host, rule.path)
            existing = routes.get(route_key)
            if existing is not None and existing.service != key:
                errors.append(LabelError(name, "mesh.gateway.path" if rule.path else "mesh.gateway.host",
                                         f"route {rule.host or '*'}{rule.path or ''} already belongs to {existing.service}"))
            else:
                routes[route_key] = GatewayRoute(service=key, path=rule.path, host=rule.host,
                                                 strip_prefix=rule.strip_prefix, auth=rule.auth,
                                                 jwt_issuer=rule.jwt_issuer, jwt_audience=rule.jwt_audience)
        if wl.container.serving:
            accepted[wl.container.id] = (wl, key)
    for key, names in aliases.items():
        services[key] = dataclasses.replace(services[key], aliases=tuple(sorted(names)))
    _resolve_allow(services)
    endpoints: dict[str, list[Endpoint]] = {}
    for ann in announcements:
        wl, key = accepted.get(ann.instance, (None, ""))
        # An announcement counts only for a running meshed container, for its own service and its own
        # address: a stale or spoofed mDNS record cannot put traffic on another container.
        if wl is None or wl.spec is None or ann.service != wl.spec.service:
            continue
        if ann.address not in wl.container.networks.values():
            continue
        endpoints.setdefault(key, []).append(Endpoint(
            instance=ann.instance, address=ann.address, port=ann.port, version=wl.spec.version,
            identity=services[key].identity))
    ordered = {svc: tuple(sorted(set(eps), key=lambda e: (e.address, e.port))) for svc, eps in sorted(endpoints.items())}
    ordered_routes = tuple(sorted(routes.values(), key=_route_order))
    return MeshConfig(services=dict(sorted(services.items())), endpoints=ordered,
                      gateway_routes=ordered_routes, policies=policies or DEFAULT_POLICY,
                      telemetry=telemetry or TelemetrySettings(), egress_mode=egress_mode), errors


def _resolve_allow(services: dict[str, ServiceConfig]) -> None:
    """Each `mesh.allow` caller name as the snapshot key it means from its service's project
    (authorization compares keys); a name that resolves to nothing is kept as written."""
    names_in: dict[str, dict[str, str]] = {}
    for key, svc in services.items():
        if not svc.allow:
            continue
        names = names_in.get(svc.namespace)
        if names is None:
            names = names_in[svc.namespace] = search_names(services, svc.namespace)
        allow = tuple(sorted({names.get(caller, caller) for caller in svc.allow}))
        if allow != svc.allow:
            services[key] = dataclasses.replace(svc, allow=allow)


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
