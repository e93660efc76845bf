"""Decode a container's `mesh.*` labels into typed config; pure, standard library only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LABEL_PREFIX = "mesh."
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
# Labels meshd puts on the containers it owns (sidecars, gateway); never meshed themselves.
OWNER_LABEL = "mesh.owner"
ROLE_LABEL = "mesh.role"
SIDECAR_FOR_LABEL = "mesh.sidecar.for"

# http: HTTP/1.1 (the default); http2: HTTP/2 with prior knowledge (h2c) from the app; grpc: gRPC,
# which is HTTP/2 (the data path reads grpc-status); tcp: bytes, balanced per connection.
PROTOCOLS = ("http", "tcp", "http2", "grpc")
CAPTURE_MODES = ("transparent", "explicit")
DEFAULT_VERSION = "v1"
DEFAULT_TRUST_DOMAIN = "mesh.local"
# The ports the sidecar owns in the shared network namespace (Istio's numbering, see README).
RESERVED_PORTS = frozenset({15001, 15006, 15020, 15053})

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")

KNOWN_LABELS = frozenset({
    "mesh.enable", "mesh.service", "mesh.port", "mesh.version", "mesh.protocol", "mesh.capture",
    "mesh.gateway.path", "mesh.gateway.host", "mesh.gateway.strip-prefix",
    # zero trust (docs/DESIGN.md): mTLS mode of the inbound, callers allowed, the gateway's JWT check
    "mesh.mtls", "mesh.allow", "mesh.gateway.auth", "mesh.gateway.jwt.issuer", "mesh.gateway.jwt.audience",
    # start-up ordering: the app is paused from its start until its sidecar is ready (meshd.hold)
    "mesh.hold",
    # egress control: external hosts and ports this service may call in registry-only mode (meshcore.egress)
    "mesh.egress",
})
MTLS_MODES = ("strict", "permissive")
GATEWAY_AUTH = ("none", "jwt")
# Labels the mesh writes itself, or that later features own: not errors when present.
_OWNED_PREFIXES = ("mesh.owner", "mesh.role", "mesh.sidecar.",
                   # traffic policy: decoded (and typos named) by meshcore.policy
                   "mesh.lb", "mesh.timeout", "mesh.retries.", "mesh.circuit.", "mesh.outlier.",
                   "mesh.ratelimit")


@dataclass(frozen=True)
class ContainerInfo:
    """What meshd knows of one container, read from Docker: plain data, no client objects."""

    id: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: tuple[int, ...] = ()
    networks: dict[str, str] = field(default_factory=dict)  # network name -> IPv4 address
    running: bool = True
    started_at: str = ""
    network_mode: str = ""
    image: str = ""  # image id
    health: str = ""  # Docker HEALTHCHECK status: "" (none), "starting", "healthy" or "unhealthy"
    paused: bool = False  # frozen (`docker pause`, or meshd holding it until its sidecar is ready)
    created: str = ""     # Docker's creation time (RFC 3339, UTC): which of two claims came first
    token_in_env: bool = False  # a node made by an older meshd, its bootstrap token in its environment

    @property
    def serving(self) -> bool:
        """Running, and healthy when it has a health check (an endpoint only then, as in Traefik and Consul)."""
        return self.running and self.health in ("", "healthy")


@dataclass(frozen=True)
class GatewayRule:
    """How the gateway reaches a service from outside: by path prefix and/or host name."""

    path: str | None
    host: str | None
    strip_prefix: bool
    auth: str | None = None            # "jwt": the gateway validates a bearer JWT for this route
    jwt_issuer: str | None = None
    jwt_audience: str | None = None


@dataclass(frozen=True)
class MeshSpec:
    """The typed, validated mesh config of one container."""

    service: str
    namespace: str
    port: int
    version: str
    protocol: str
    capture: str
    gateway: GatewayRule | None
    mtls: str = "strict"                    # mesh.mtls: strict | permissive (inbound)
    allow: tuple[str, ...] | None = None    # mesh.allow: callers allowed (None: label absent)
    hold: bool = True                       # mesh.hold: paused from start until the sidecar is ready
    egress: tuple[str, ...] | None = None   # mesh.egress: allowed external host:port entries (canonical)


@dataclass(frozen=True)
class LabelError:
    """A label that could not be decoded; names the container and the label."""

    container: str
    label: str
    message: str

    def __str__(self) -> str:
        return f"{self.container}: label {self.label}: {self.message}"


class LabelDecodeError(ValueError):
    """Raised inside decoding; carries the offending label."""

    def __init__(self, label: str, message: str):
        super().__init__(f"label {label}: {message}")
        self.label = label
        self.message = message


def is_mesh_enabled(labels: dict[str, str]) -> bool:
    """True when the labels ask to join the mesh (`mesh.enable` is a true value)."""
    return labels.get("mesh.enable", "").strip().lower() in ("true", "1", "yes", "on")


def is_mesh_owned(labels: dict[str, str]) -> bool:
    """True for containers meshd created itself (sidecars, gateway)."""
    return OWNER_LABEL in labels


def decode_bool(label: str, raw: str) -> bool:
    """Parse a boolean label value or raise naming the label."""
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise LabelDecodeError(label, f"{raw!r} is not a boolean (use true or false)")


def decode_port(label: str, raw: str) -> int:
    """Parse a TCP port number or raise naming the label."""
    text = raw.strip()
    # Plain ASCII digits only: int() would also take "8_080", "+80" or non-ASCII digits.
    if not re.fullmatch(r"-?[0-9]+", text):
        raise LabelDecodeError(label, f"{raw!r} is not a port number")
    port = decode_decimal(label, text, 1, 65535)
    if port in RESERVED_PORTS:
        raise LabelDecodeError(label, f"{port} is reserved for the sidecar ({sorted(RESERVED_PORTS)})")
    return port


def decode_decimal(label: str, text: str, low: int, high: int) -> int:
    """The integer of `-?[0-9]+` text in low..high, or LabelDecodeError naming the label."""
    # int() alone refuses more than 4300 digits (leading zeros too) with a ValueError of its own.
    digits = text.lstrip("-").lstrip("0") or "0"
    if len(digits) > len(str(max(-low, high))):
        raise LabelDecodeError(label, f"{text[:12]}... is outside {low}..{high}")
    value = -int(digits) if text.startswith("-") else int(digits)
    if not low <= value <= high:
        raise LabelDecodeError(label, f"{value} is outside {low}..{high}")
    return value


def decode_choice(label: str, raw: str, choices: tuple[str, ...]) -> str:
    """Parse one of a fixed set of words or raise naming the label."""
    value = raw.strip().lower()
    if value not in choices:
        raise LabelDecodeError(label, f"{raw!r} is not one of {', '.join(choices)}")
    return value


def decode_name(label: str, raw: str) -> str:
    """Parse a DNS-label style service name or raise naming the label."""
    value = raw.strip()
    if not _NAME_RE.match(value):
        raise LabelDecodeError(label, f"{raw!r} is not a valid name (lowercase letters, digits, '-', 1-63 chars)")
    return value


def _decode_gateway_auth(labels: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    auth = decode_choice("mesh.gateway.auth", labels.get("mesh.gateway.auth", "none"), GATEWAY_AUTH)
    issuer = labels.get("mesh.gateway.jwt.issuer")
    audience = labels.get("mesh.gateway.jwt.audience")
    for label, value in (("mesh.gateway.jwt.issuer", issuer), ("mesh.gateway.jwt.audience", audience)):
        if value is None:
            continue
        if auth != "jwt":
            raise LabelDecodeError(label, "needs mesh.gateway.auth=jwt")
        if not value.strip() or any(c in value for c in "\r\n\t ") or len(value) > 512:
            raise LabelDecodeError(label, f"{value!r} is not a valid value (non-empty, no spaces)")
    if auth != "jwt":
        return None, None, None
    return "jwt", issuer.strip() if issuer else None, audience.strip() if audience else None


def _decode_gateway(labels: dict[str, str]) -> GatewayRule | None:
    path = labels.get("mesh.gateway.path")
    host = labels.get("mesh.gateway.host")
    if path is None and host is None:
        if "mesh.gateway.strip-prefix" in labels:
            raise LabelDecodeError("mesh.gateway.strip-prefix", "needs mesh.gateway.path")
        for label in ("mesh.gateway.auth", "mesh.gateway.jwt.issuer", "mesh.gateway.jwt.audience"):
            if label in labels:
                raise LabelDecodeError(label, "needs mesh.gateway.path or mesh.gateway.host")
        return None
    if path is not None:
        path = path.strip()
        if not path.startswith("/") or " " in path:
            raise LabelDecodeError("mesh.gateway.path", f"{path!r} must be a path starting with '/'")
        if len(path) > 1:
            path = path.rstrip("/") or "/"
    if host is not None:
        host = host.strip().lower()
        if not _HOST_RE.match(host):
            raise LabelDecodeError("mesh.gateway.host", f"{host!r} is not a host name")
    if path is None and "mesh.gateway.strip-prefix" in labels:
        raise LabelDecodeError("mesh.gateway.strip-prefix", "needs mesh.gateway.path")
    strip = decode_bool("mesh.gateway.strip-prefix", labels.get("mesh.gateway.strip-prefix", "false"))
    auth, issuer, audience = _decode_gateway_auth(labels)
    return GatewayRule(path=path, host=host, strip_prefix=strip, auth=auth, jwt_issuer=issuer,
                       jwt_audience=audience)


def decode_labels(info: ContainerInfo) -> MeshSpec:
    """Decode a meshed container's labels into a MeshSpec; raises LabelDecodeError naming the label."""
    labels = info.labels
    for key in labels:
        if key.startswith(LABEL_PREFIX) and key not in KNOWN_LABELS and not key.startswith(_OWNED_PREFIXES):
            raise LabelDecodeError(key, "unknown mesh label")
    default_service = labels.get(COMPOSE_SERVICE) or info.name.lstrip("/")
    service = decode_name("mesh.service", labels.get("mesh.service", default_service))
    namespace = labels.get(COMPOSE_PROJECT) or "default"
    if "mesh.port" in labels:
        port = decode_port("mesh.port", labels["mesh.port"])
    elif len(info.exposed_ports) == 1:
        port = decode_port("mesh.port", str(info.exposed_ports[0]))
    else:
        found = ", ".join(str(p) for p in info.exposed_ports) or "none"
        raise LabelDecodeError("mesh.port", f"required: the container exposes {found}, name the app's port")
    version = labels.get("mesh.version", DEFAULT_VERSION).strip()
    if not _VERSION_RE.match(version):
        raise LabelDecodeError("mesh.version", f"{version!r} is not a version name")
    protocol = decode_choice("mesh.protocol", labels.get("mesh.protocol", "http"), PROTOCOLS)
    capture = decode_choice("mesh.capture", labels.get("mesh.capture", "transparent"), CAPTURE_MODES)
    gateway = _decode_gateway(labels)
    if gateway is not None and protocol != "http":
        raise LabelDecodeError("mesh.gateway.path" if gateway.path else "mesh.gateway.host",
                               f"the gateway routes HTTP/1.1 only; this service has mesh.protocol={protocol}")
    mtls = decode_choice("mesh.mtls", labels.get("mesh.mtls", "strict"), MTLS_MODES)
    allow = None
    if "mesh.allow" in labels:
        from .authz import PolicyError, decode_allow_label
        try:
            allow = decode_allow_label(labels["mesh.allow"])
        except PolicyError as exc:
            raise LabelDecodeError("mesh.allow", str(exc).removeprefix("mesh.allow: ")) from None
    hold = decode_bool("mesh.hold", labels.get("mesh.hold", "true"))
    egress = decode_egress_label(labels)
    return MeshSpec(service=service, namespace=namespace, port=port, version=version,
                    protocol=protocol, capture=capture, gateway=gateway, mtls=mtls, allow=allow, hold=hold,
                    egress=egress)


def decode_egress_label(labels: dict[str, str]) -> tuple[str, ...] | None:
    """The canonical entries of `mesh.egress` (None: no label); LabelDecodeError names the bad item."""
    if "mesh.egress" not in labels:
        return None
    from .egress import EgressError, decode_egress_list
    try:
        return tuple(str(rule) for rule in decode_egress_list(labels["mesh.egress"]))
    except EgressError as exc:
        raise LabelDecodeError("mesh.egress", str(exc)) from None


def wants_hold(labels: dict[str, str]) -> bool:
    """From a start event's labels alone: a meshed app whose start is held until its sidecar is ready
    (`mesh.hold`, default true; a bad value holds nothing and is reported by the full decode)."""
    if not is_mesh_enabled(labels) or is_mesh_owned(labels):
        return False
    try:
        return decode_bool("mesh.hold", labels.get("mesh.hold", "true"))
    except LabelDecodeError:
        return False


def decode_container(info: ContainerInfo) -> MeshSpec | LabelError:
    """Decode one container; a bad label yields a LabelError for that container only."""
    try:
        return decode_labels(info)
    except LabelDecodeError as exc:
        return LabelError(container=info.name.lstrip("/"), label=exc.label, message=exc.message)


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    """The SPIFFE identity of a mesh service (Istio's layout: ns/<project>/sa/<service>)."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"
