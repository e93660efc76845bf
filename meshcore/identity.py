"""Workload identities (SPIFFE IDs) and the certificate rotation schedule; pure, standard library only.

A SPIFFE ID is `spiffe://<trust domain>/<path>` (SPIFFE ID spec, section 2):
- trust domain: lowercase letters, digits, `.`, `-`, `_`; no port, no user info; at most 255 chars.
- path: `/`-separated segments of letters, digits, `.`, `-`, `_`; no empty, `.` or `..` segment,
  no trailing `/`; may be empty (the trust domain's own ID).
- no query, no fragment, no percent-encoding; whole ID at most 2048 bytes.

The mesh's workload IDs use Istio's layout `spiffe://<td>/ns/<namespace>/sa/<service>`
(`meshcore.labels.spiffe_id`).

Nothing here reads a clock or a random source: `now` and `rand` are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


@dataclass(frozen=True)
class SpiffeId:
    """A validated SPIFFE ID; `str()` gives back the canonical text."""

    trust_domain: str
    path: str  # "" or "/seg/seg..."

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        """The path segments (empty for a trust-domain ID)."""
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """The namespace of a mesh workload ID (`/ns/<ns>/sa/<sa>`), else None."""
        seg = self.segments
        return seg[1] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

    @property
    def service(self) -> str | None:
        """The service (service account) of a mesh workload ID (`/ns/<ns>/sa/<sa>`), else None."""
        seg = self.segments
        return seg[3] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None


def _check_trust_domain(td: str) -> None:
    if not td:
        raise ValueError("SPIFFE ID has an empty trust domain")
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        raise ValueError(f"SPIFFE trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if ":" in td:
        raise ValueError(f"SPIFFE trust domain {td!r} must not contain a port")
    if "@" in td:
        raise ValueError(f"SPIFFE trust domain {td!r} must not contain user info")
    bad = sorted(set(td) - _TD_CHARS)
    if bad:
        raise ValueError(f"SPIFFE trust domain {td!r} has invalid characters {''.join(bad)!r} "
                         "(lowercase letters, digits, '.', '-', '_' only)")


def parse_trust_domain(s: str) -> str:
    """Validate a bare trust domain name (e.g. `mesh.local`); returns it or raises ValueError."""
    if not isinstance(s, str):
        raise ValueError("trust domain must be a string")
    _check_trust_domain(s)
    return s


def parse_spiffe_id(s: str) -> SpiffeId:
    """Parse and validate a SPIFFE ID; raises ValueError naming the problem."""
    if not isinstance(s, str):
        raise ValueError("SPIFFE ID must be a string")
    if not s:
        raise ValueError("SPIFFE ID is empty")
    if len(s.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
        raise ValueError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
    if not s.startswith(SCHEME):
        if s[:len(SCHEME)].lower() == SCHEME:
            raise ValueError("SPIFFE ID scheme must be lowercase 'spiffe://'")
        raise ValueError(f"SPIFFE ID must start with {SCHEME!r}")
    rest = s[len(SCHEME):]
    if "?" in rest:
        raise ValueError("SPIFFE ID must not have a query")
    if "#" in rest:
        raise ValueError("SPIFFE ID must not have a fragment")
    if "%" in rest:
        raise ValueError("SPIFFE ID must not contain percent-encoding")
    td, sep, path = rest.partition("/")
    _check_trust_domain(td)
    if not sep:
        return SpiffeId(td, "")
    path = "/" + path
    if path == "/":
        raise ValueError("SPIFFE ID path must not end with '/'")
    for seg in path.split("/")[1:]:
        if seg == "":
            raise ValueError("SPIFFE ID path has an empty segment ('//' or trailing '/')")
        if seg in (".", ".."):
            raise ValueError(f"SPIFFE ID path must not contain a {seg!r} segment")
        bad = sorted(set(seg) - _PATH_CHARS)
        if bad:
            raise ValueError(f"SPIFFE ID path segment {seg!r} has invalid characters {''.join(bad)!r} "
                             "(letters, digits, '.', '-', '_' only)")
    return SpiffeId(td, path)


def is_spiffe_id(s: str) -> bool:
    """True when `s` is a valid SPIFFE ID."""
    try:
        parse_spiffe_id(s)
    except ValueError:
        return False
    return True


def _allowed(candidate: str, allowed: Collection[str]) -> bool:
    if candidate in allowed:
        return True
    # Segment-prefix patterns: "spiffe://td/ns/shop/*" allows every ID under /ns/shop/.
    # The part before "/*" must itself be a valid SPIFFE ID, so "spiffe://*" matches nothing.
    for pattern in allowed:
        if (isinstance(pattern, str) and pattern.endswith("/*") and candidate.startswith(pattern[:-1])
                and is_spiffe_id(pattern[:-2])):
            return True
    return False


def match_identity(peer_uris: Sequence[str], allowed: Collection[str]) -> str | None:
    """The peer's SPIFFE ID when it is allowed, else None.

    `peer_uris` are the URI SANs of the peer's (already chain-verified) certificate. An X.509-SVID
    carries exactly one SPIFFE ID: a certificate with zero, several, or an invalid SPIFFE URI is
    refused (None) rather than guessed at. Other URI schemes are ignored. `allowed` holds exact IDs
    and optionally segment-prefix patterns ending in `/*` (`spiffe://mesh.local/ns/shop/*`).
    Comparison is exact and case-sensitive, as the SPIFFE spec requires.
    """
    candidates = [u for u in peer_uris if isinstance(u, str) and u[:len(SCHEME)].lower() == SCHEME]
    if len(candidates) != 1:
        return None
    candidate = candidates[0]
    if not is_spiffe_id(candidate):
        return None
    return candidate if _allowed(candidate, allowed) else None


def renew_at(not_before: float, not_after: float, rand: float,
             share: float = 0.5, jitter: float = 0.1) -> float:
    """When to renew a certificate valid over [not_before, not_after] (epoch seconds).

    Renewal lands at `share` of the lifetime, moved by up to +/- `jitter` of the lifetime:
    `not_before + lifetime * (share + jitter * (2 * rand - 1))`, with `rand` uniform in [0, 1].
    The jitter spreads a fleet's renewals so that they do not hit the CA at once. The result is
    clamped into [not_before, not_after]: never before the certificate starts, never after it expires.
    """
    for name, value in (("not_before", not_before), ("not_after", not_after), ("rand", rand),
                        ("share", share), ("jitter", jitter)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not_after <= not_before:
        raise ValueError(f"not_after ({not_after}) must be later than not_before ({not_before})")
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1], got {rand}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if jitter < 0.0:
        raise ValueError(f"jitter must not be negative, got {jitter}")
    lifetime = not_after - not_before
    at = not_before + lifetime * (share + jitter * (2.0 * rand - 1.0))
    return min(max(at, not_before), not_after)


def should_renew(now: float, not_before: float, not_after: float, rand: float,
                 share: float = 0.5, jitter: float = 0.1) -> bool:
    """True when a certificate valid over [not_before, not_after] is due for renewal at `now`.

    Also true once it has expired. Pass the same `rand` for the life of one certificate (draw it
    when the certificate is installed) so the decision does not flap between calls.
    """
    return now >= renew_at(not_before, not_after, rand, share, jitter)
