"""JWT validation at the gateway, per route (`mesh.gateway.auth=jwt` on the service).

Keys come from a JWKS (RFC 7517) file (`MESH_JWKS_FILE`, re-read when it changes) or URL
(`MESH_JWKS_URL`, fetched in the background every 5 minutes). Only asymmetric algorithms are
accepted (RS*, PS*, ES*, EdDSA); `none` and HMAC are refused, and the algorithm must match the key.
`exp` is required; `nbf`/`iat` are checked when present, with 30 s leeway. The route's labels
`mesh.gateway.jwt.issuer` and `mesh.gateway.jwt.audience` are checked when set.

A request without a bearer token, or with one that fails, is answered 401 with
`WWW-Authenticate: Bearer realm="mesh"` (RFC 6750 section 3: with `error="invalid_token"` when a token
was sent). A valid token's scalar claims are forwarded as `x-jwt-claim-<name>` headers (incoming
`x-jwt-claim-*` headers are always removed, so a client cannot forge them), and the `Authorization`
header is NOT forwarded upstream: the bearer token is a credential for the mesh's edge, and the
services get the verified claims instead (Istio's `forwardOriginalToken: false` default).

PyJWT is imported on first use: it loads `cryptography` (~8 MiB of resident memory), which a gateway
without a JWKS never needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

import structlog

log = structlog.get_logger("gateway.jwt")

ALLOWED_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LEEWAY_S = 30
REFRESH_S = 300.0
MAX_TOKEN = 16 * 1024
_CLAIM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class JwtError(Exception):
    """A missing or invalid token; `missing` is True when no token was sent."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class JwtVerifier:
    """Validates bearer JWTs against a JWKS."""

    def __init__(self, jwks_file: str = "", jwks_url: str = ""):
        self.jwks_file = jwks_file
        self.jwks_url = jwks_url
        self.keys: dict[str | None, Any] = {}
        self._mtime = 0.0
        self._task: asyncio.Task | None = None
        if jwks_file:
            self._load_file()

    def load_jwks(self, data: dict) -> None:
        import jwt

        keyset = jwt.PyJWKSet.from_dict(data)
        keys = {}
        for k in keyset.keys:
            if k.key_type == "oct":
                continue  # symmetric keys are never accepted
            keys[k.key_id] = k
        self.keys = keys
        log.info("jwks_loaded", keys=len(keys))

    def _load_file(self) -> None:
        import jwt

        try:
            mtime = os.stat(self.jwks_file).st_mtime
            if mtime == self._mtime:
                return
            with open(self.jwks_file, encoding="utf-8") as f:
                self.load_jwks(json.load(f))
            self._mtime = mtime
        except (OSError, ValueError, jwt.PyJWKError) as exc:
            log.warning("jwks_unusable", source=self.jwks_file, error=str(exc))

    def start(self) -> None:
        if self.jwks_url and self._task is None:
            self._task = asyncio.ensure_future(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while True:
                try:
                    async with session.get(self.jwks_url) as resp:
                        self.load_jwks(await resp.json(content_type=None))
                except Exception as exc:  # noqa: BLE001 - keep the last keys
                    log.warning("jwks_fetch_failed", url=self.jwks_url, error=str(exc))
                await asyncio.sleep(REFRESH_S if self.keys else 5.0)

    def verify(self, token: str | None, issuer: str | None, audience: str | None) -> dict:
        """The verified claims, or JwtError."""
        if not token:
            raise JwtError("a bearer token is required", missing=True)
        if len(token) > MAX_TOKEN:
            raise JwtError("the token is too large")
        if self.jwks_file:
            self._load_file()
        if not self.keys:
            raise JwtError("no signing keys are configured")
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise JwtError("the token is malformed") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGS:
            raise JwtError(f"algorithm {str(alg)[:20]!r} is not accepted")
        kid = header.get("kid")
        key = self.keys.get(kid)
        if key is None and kid is None and len(self.keys) == 1:
            key = next(iter(self.keys.values()))
        if key is None:
            raise JwtError("the token's key is unknown")
        if key.algorithm_name and key.algorithm_name != alg and getattr(key, "_jwk_data", {}).get("alg"):
            raise JwtError("the token's algorithm does not match its key")
        try:
            return jwt.decode(token, key.key, algorithms=[alg], audience=audience, issuer=issuer,
                              leeway=LEEWAY_S,
                              options={"require": ["exp"], "verify_aud": audience is not None,
                                       "verify_iss": issuer is not None})
        except jwt.ExpiredSignatureError:
            raise JwtError("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise JwtError("the token's audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise JwtError("the token's issuer is not accepted") from None
        except jwt.PyJWTError as exc:
            raise JwtError(f"the token is invalid ({type(exc).__name__})") from None


def claim_headers(claims: dict) -> tuple:
    """`x-jwt-claim-<name>` header fields, (name, value) pairs, for the scalar claims (strings,
    numbers, booleans)."""
    out = []
    for name, value in claims.items():
        if not isinstance(name, str) or not _CLAIM_NAME.match(name):
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            text = str(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            text = ",".join(value)
        else:
            continue
        # RFC 9110 5.5: no control character but HTAB in a field value (a CR or LF would inject a
        # header; the others make the upstream's parser refuse the request).
        if len(text) > 1024 or any(c < " " and c != "\t" or c == "\x7f" for c in text):
            continue
        out.append((b"x-jwt-claim-" + name.lower().encode("ascii"), text.encode("utf-8")))
    return tuple(out)


def www_authenticate(error: JwtError) -> tuple:
    """The RFC 6750 section 3 challenge: a (name, value) header field."""
    if error.missing:
        return (b"www-authenticate", b'Bearer realm="mesh"')
    desc = str(error).replace('"', "'")
    return (b"www-authenticate", b'Bearer realm="mesh", error="invalid_token", error_description="%b"' % (
        desc.encode("ascii", "replace")))
