"""Fuzz target: the gateway's JWT handling (gateway.jwt_auth): verify() on a bearer token from any
client, then the claim headers it forwards. JwtError is the one documented failure (a 401); anything
else is a finding. A token verify() accepts must carry our key's valid signature, an accepted
algorithm, a current `exp` and the route's issuer and audience; the claim headers must be header
lines an HTTP/1 parser (httptools, as the sidecars use) takes, each an x-jwt-claim-* field, its www-
authenticate challenge too.

Input bytes: the token as the gateway reads it from the Authorization header (latin-1)."""

from __future__ import annotations

import base64
import json
import re
import time

import httptools
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from gateway import jwt_auth
from sidecar.datapath.http1 import put_fields
from tests.fuzz.engine import Target, corpus_test, fuzz_test

PRIVATE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))   # fixed: the same tokens every run
JWK = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(PRIVATE.public_key()))
VERIFIER = jwt_auth.JwtVerifier()
VERIFIER.load_jwks({"keys": [{**JWK, "kid": "k1", "alg": "EdDSA", "use": "sig"}]})
ISSUER, AUDIENCE = "https://idp.example", "shop"
CLAIM_LINE = re.compile(rb"x-jwt-claim-[a-z0-9_.-]{1,64}: [^\r\n\x00]*\r\n")


def _wire(fields) -> bytes:
    """The header lines the HTTP/1.1 codec writes for `fields`."""
    parts: list = []
    put_fields(parts, fields)
    return b"".join(parts)


def _headers_parse(block: bytes) -> None:
    seen = []

    class Callbacks:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append(name)

    httptools.HttpRequestParser(Callbacks()).feed_data(b"GET / HTTP/1.1\r\nhost: a\r\n" + block + b"\r\n")
    assert len(seen) == 1 + block.count(b"\r\n"), block


def check(data: bytes) -> None:
    token = data.decode("latin-1")
    for issuer, audience in ((None, None), (ISSUER, AUDIENCE)):
        try:
            claims = VERIFIER.verify(token, issuer, audience)
        except jwt_auth.JwtError as exc:
            _headers_parse(_wire((jwt_auth.www_authenticate(exc),)))
            continue
        # Accepted: our signature, an accepted algorithm, unexpired, the route's issuer and audience.
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        jwt.decode(token, PRIVATE.public_key(), algorithms=["EdDSA"], options={"verify_signature": True,
                   "verify_exp": False, "verify_aud": False})
        assert isinstance(claims.get("exp"), (int, float)) and claims["exp"] > time.time() - jwt_auth.LEEWAY_S - 5
        if issuer:
            assert claims.get("iss") == issuer
            aud = claims.get("aud")
            assert aud == audience or isinstance(aud, list) and audience in aud
        block = _wire(jwt_auth.claim_headers(claims))
        assert all(CLAIM_LINE.fullmatch(line + b"\r\n") for line in block.split(b"\r\n")[:-1]), block
        _headers_parse(block)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _token(header: dict, claims: dict, sign: bool, tail: str) -> bytes:
    if sign:
        try:
            extra = {k: v for k, v in header.items() if k not in ("alg", "typ")}
            return (jwt.encode(claims, PRIVATE, algorithm="EdDSA", headers=extra) + tail).encode("latin-1", "replace")
        except (TypeError, ValueError, jwt.PyJWTError):   # a header PyJWT will not sign: sent unsigned
            pass
    body = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return (body + "." + _b64(b"sig") + tail).encode("latin-1", "replace")


NOW = 1_900_000_000   # a fixed far future (2030): tokens stay valid for these tests' lifetime
text = st.one_of(st.text(max_size=8),
                 st.sampled_from(("a\x01b", "a\r\nx-injected: 1", "a\x00", "a\x7fb", "é", "x" * 1100)))
claim_value = st.one_of(st.integers(-2**63, 2**63), st.floats(), st.booleans(), st.none(), text,
                        st.lists(text, max_size=3), st.dictionaries(text, text, max_size=2))
base_claims = st.fixed_dictionaries(
    {}, optional={"exp": st.one_of(st.just(NOW), st.just(1), st.floats(), st.text(max_size=3), st.integers()),
                  "nbf": st.one_of(st.just(1), st.just(NOW * 2), st.text(max_size=3)),
                  "iat": st.one_of(st.just(1), st.floats()), "iss": st.sampled_from((ISSUER, "evil", 1)),
                  "aud": st.sampled_from((AUDIENCE, [AUDIENCE, "x"], "x", 3, [3])), "sub": text})
extra_claims = st.dictionaries(st.one_of(st.sampled_from(("role", "Name.X", "a" * 65, "bad name", "x-y")),
                                         st.text(max_size=5)), claim_value, max_size=4)
claims = st.builds(lambda extra, base: {**extra, **base}, extra_claims, base_claims)
header = st.fixed_dictionaries({"alg": st.sampled_from(("EdDSA", "none", "HS256", "RS256", "ES256", None, 1,
                                                        ["EdDSA"]))},
                               optional={"kid": st.sampled_from(("k1", "k2", None, 1, ["k1"], {"a": 1})),
                                         "typ": st.sampled_from(("JWT", 1)), "crit": st.just(["exp"])})
token = st.builds(_token, header, claims, st.booleans(), st.sampled_from(("", "", ".", "x", " ")))

TARGET = Target("jwt", check, st.one_of(token, st.binary(max_size=40)), (b".", b"eyJ", b"=", b"-", b"_"))
test_fuzz_jwt = fuzz_test(TARGET, examples=1000)
test_corpus_jwt = corpus_test(TARGET)
