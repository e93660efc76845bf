"""Service-to-service authorization decisions; pure, standard library only.

The INBOUND sidecar of the destination decides, on the caller's verified identity (the SPIFFE ID of
its TLS client certificate, reduced to its service's snapshot key: `web`, or `web.b` for a name several
Compose projects use; the gateway is `gateway`). A plaintext
caller (a `mesh.mtls=permissive` inbound) is unauthenticated: `source` is None.

Evaluation, like Istio's AuthorizationPolicy (CUSTOM aside: DENY, then ALLOW, then the default):
1. an explicit `deny` rule that matches -> DENY (deny always wins);
2. an explicit `allow` rule that matches -> ALLOW;
3. the destination has a `mesh.allow` label -> ALLOW when the caller is listed, else DENY
   (like an Istio ALLOW policy on the workload: once one applies, whatever it does not match is denied);
4. the mesh-wide default (`allow` unless `meshctl policy default deny`).

A rule matches when its source, destination, method and path all match:
- source: a service's snapshot key (only an authenticated caller of that service matches) or `*` (any
  caller, authenticated or not);
- destination: a service's snapshot key or `*`;
- method: None (any) or an HTTP method, case-insensitive;
- path: None (any) or a prefix of the request path (segment-unaware, like Istio's `prefix*`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

ACTIONS = ("allow", "deny")
DEFAULTS = ("allow", "deny")
ANY = "*"
GATEWAY_SOURCE = "gateway"
# A service name, or `name.project` (a Compose project name: lowercase letters, digits, '-', '_').
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9][a-z0-9_-]*)?$")
_METHOD_RE = re.compile(r"^[A-Z]{1,20}$")


class PolicyError(ValueError):
    """A rule or policy that does not decode; the message names the field."""


@dataclass(frozen=True)
class Rule:
    """One explicit rule of `meshctl policy allow|deny SRC DST [--path P] [--method M]`."""

    action: str
    source: str
    destination: str
    path: str | None = None
    method: str | None = None

    def matches(self, source: str | None, destination: str, method: str, path: str) -> bool:
        if self.source != ANY and (source is None or self.source != source):
            return False
        if self.destination != ANY and self.destination != destination:
            return False
        if self.method is not None and self.method != method.upper():
            return False
        if self.path is not None and not path.startswith(self.path):
            return False
        return True

    def describe(self) -> str:
        out = f"{self.action} {self.source} -> {self.destination}"
        if self.method:
            out += f" {self.method}"
        if self.path:
            out += f" {self.path}*"
        return out


@dataclass(frozen=True)
class Policy:
    """The mesh-wide authorization policy: ordered rules and the default."""

    default: str = "allow"
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The outcome and why (`reason` goes into `x-mesh-denied` of a 403)."""

    allowed: bool
    reason: str


DEFAULT_POLICY = Policy()


def decide(policy: Policy, source: str | None, destination: str, method: str, path: str,
           allow_label: tuple[str, ...] | None = None) -> Decision:
    """Decide one request (see the module docstring for the order)."""
    for rule in policy.rules:
        if rule.action == "deny" and rule.matches(source, destination, method, path):
            return Decision(False, f"rule {rule.describe()}")
    for rule in policy.rules:
        if rule.action == "allow" and rule.matches(source, destination, method, path):
            return Decision(True, f"rule {rule.describe()}")
    if allow_label is not None:
        if source is not None and (source in allow_label or ANY in allow_label):
            return Decision(True, f"mesh.allow of {destination}")
        who = source if source is not None else "unauthenticated caller"
        return Decision(False, f"{who} not in mesh.allow of {destination}")
    if policy.default == "allow":
        return Decision(True, "default allow")
    return Decision(False, "default deny")


# ---- validation and wire form ------------------------------------------------------------------

def check_name(what: str, value: Any, wildcard: bool = True) -> str:
    """A service name (or `*`); raises PolicyError naming `what`."""
    if not isinstance(value, str):
        raise PolicyError(f"{what}: expected a string")
    value = value.strip()
    if wildcard and value == ANY:
        return value
    if not _NAME_RE.match(value):
        raise PolicyError(f"{what}: {value!r} is not a service name (lowercase letters, digits, '-'; "
                          "`name.project` for a name several projects use)"
                          + (" or '*'" if wildcard else ""))
    return value


def make_rule(action: Any, source: Any, destination: Any, path: Any = None, method: Any = None) -> Rule:
    """A validated Rule; raises PolicyError naming the field."""
    if action not in ACTIONS:
        raise PolicyError(f"action: {action!r} is not allow or deny")
    src = check_name("source", source)
    dst = check_name("destination", destination)
    if path is not None:
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n\t?#"):
            raise PolicyError(f"path: {path!r} must be a path prefix starting with '/'")
    if method is not None:
        if not isinstance(method, str) or not _METHOD_RE.match(method.upper()):
            raise PolicyError(f"method: {method!r} is not an HTTP method")
        method = method.upper()
    return Rule(action=action, source=src, destination=dst, path=path or None, method=method or None)


def decode_allow_label(raw: str) -> tuple[str, ...]:
    """`mesh.allow` value: comma-separated caller service names (`gateway` for the gateway, `*` any)."""
    names = [part.strip() for part in raw.split(",") if part.strip()]
    if not names:
        raise PolicyError("expected comma-separated caller service names")
    return tuple(sorted({check_name("mesh.allow", name) for name in names}))


def encode_rule(rule: Rule) -> dict[str, Any]:
    return {"action": rule.action, "source": rule.source, "destination": rule.destination,
            "path": rule.path, "method": rule.method}


def encode_policy(policy: Policy) -> dict[str, Any]:
    """The JSON-ready form (snapshot `policies`, meshd's store, the admin API)."""
    return {"default": policy.default, "rules": [encode_rule(r) for r in policy.rules]}


def decode_policy(data: Any) -> Policy:
    """Strictly decode the wire form; raises PolicyError naming the field."""
    if not isinstance(data, dict):
        raise PolicyError("policies: expected an object")
    extra = set(data) - {"default", "rules"}
    if extra:
        raise PolicyError(f"policies: unknown field {sorted(extra)[0]!r}")
    default = data.get("default")
    if default not in DEFAULTS:
        raise PolicyError(f"policies.default: {default!r} is not allow or deny")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list):
        raise PolicyError("policies.rules: expected a list")
    rules = []
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, dict):
            raise PolicyError(f"policies.rules[{i}]: expected an object")
        extra = set(raw) - {"action", "source", "destination", "path", "method"}
        if extra:
            raise PolicyError(f"policies.rules[{i}]: unknown field {sorted(extra)[0]!r}")
        try:
            rules.append(make_rule(raw.get("action"), raw.get("source"), raw.get("destination"),
                                   raw.get("path"), raw.get("method")))
        except PolicyError as exc:
            raise PolicyError(f"policies.rules[{i}].{exc}") from None
    return Policy(default=default, rules=tuple(rules))


def add_rule(policy: Policy, rule: Rule) -> Policy:
    """The policy with `rule` appended (an equal rule is not added twice; the opposite action on the
    same source/destination/path/method is replaced, so `allow` after `deny` restores access)."""
    same = [r for r in policy.rules if (r.source, r.destination, r.path, r.method)
            == (rule.source, rule.destination, rule.path, rule.method)]
    rules = [r for r in policy.rules if r not in same]
    rules.append(rule)
    return Policy(default=policy.default, rules=tuple(rules))


def remove_rules(policy: Policy, source: str, destination: str, path: str | None = None,
                 method: str | None = None, action: str | None = None) -> tuple[Policy, int]:
    """The policy without the rules of that source/destination/path/method (and action, if given)."""
    method = method.upper() if method else None

    def hit(r: Rule) -> bool:
        return ((r.source, r.destination, r.path, r.method) == (source, destination, path, method)
                and (action is None or r.action == action))

    kept = tuple(r for r in policy.rules if not hit(r))
    return Policy(default=policy.default, rules=kept), len(policy.rules) - len(kept)


def source_name(identity: str | None, gateway_identity_suffix: str = "/ns/mesh-system/sa/gateway") -> str | None:
    """The caller name authorization uses for a verified SPIFFE ID: `gateway` for the gateway,
    else the service of `spiffe://td/ns/<ns>/sa/<service>`; None for anything else."""
    if not identity or not identity.startswith("spiffe://"):
        return None
    rest = identity[len("spiffe://"):]
    _td, sep, path = rest.partition("/")
    if not sep:
        return None
    if ("/" + path) == gateway_identity_suffix:
        return GATEWAY_SOURCE
    seg = path.split("/")
    if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" and seg[3]:
        return seg[3]
    return None


def rules_for(policy: Policy, names: Iterable[str]) -> list[Rule]:
    """Rules that mention any of `names` as source or destination (for display)."""
    wanted = set(names)
    return [r for r in policy.rules if r.source in wanted or r.destination in wanted]
