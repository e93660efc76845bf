"""The gateway's JWT check per route and its HTTPS listener, on loopback (PyJWT, throwaway keys)."""

from __future__ import annotations

import json
import ssl
import time
from contextlib import AsyncExitStack

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from certs.ca import CertificateAuthority
from certs.keys import build_server_csr, generate_key
from gateway.jwt_auth import JwtVerifier
from gateway.server import start_gateway
from meshcore.snapshot import GatewayRoute
from sidecar.proxy import ProxyState
from sidecar.tlsagent import ServerCert
from tests.adapters.test_proxy import Mesh, port_of

ISS, AUD = "https://idp.example", "shop"


def keypair(kid: str):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return key, {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def token(key, kid: str, **claims) -> str:
    body = {"sub": "alice", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


async def _jwt(tmp_path):
    key, jwk = keypair("k1")
    other, _ = keypair("k1")     # same kid, another key: a forged signature
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(routes=[
            GatewayRoute(service="payments", path="/pay", host=None, strip_prefix=True, auth="jwt",
                         jwt_issuer=ISS, jwt_audience=AUD),
            GatewayRoute(service="payments", path="/open", host=None, strip_prefix=True)])
        gw_state = ProxyState("gateway", "v1", table=mesh.out_state.table)
        stack.callback(gw_state.close)
        gw = await start_gateway(gw_state, "127.0.0.1", 0, jwt=JwtVerifier(str(jwks)))
        stack.callback(gw.close)
        url = f"http://127.0.0.1:{port_of(gw)}"
        s = await mesh.session()
        async with s.get(f"{url}/pay/echo") as r:                      # no token
            assert r.status == 401 and r.headers["www-authenticate"] == 'Bearer realm="mesh"'
            assert r.headers["x-mesh-flags"] == "UAEX"
        cases = [
            (token(other, "k1"), "invalid"),
            (token(key, "k1", aud="other"), "audience"),
            (token(key, "k1", iss="https://evil.example"), "issuer"),
            (token(key, "k1", exp=int(time.time()) - 600), "expired"),
            (token(key, "k2"), "key is unknown"),
            (jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, "secret", algorithm="HS256",
                        headers={"kid": "k1"}), "not accepted"),
            ("not.a.jwt", "malformed"),
        ]
        for bad, fragment in cases:
            async with s.get(f"{url}/pay/echo", headers={"Authorization": f"Bearer {bad}"}) as r:
                assert r.status == 401, fragment
                challenge = r.headers["www-authenticate"]
                assert challenge.startswith('Bearer realm="mesh", error="invalid_token"') and fragment in challenge, \
                    (fragment, challenge)
        good = token(key, "k1", role="admin")
        async with s.get(f"{url}/pay/echo", headers={"Authorization": f"Bearer {good}",
                                                     "X-Jwt-Claim-Sub": "mallory"}) as r:
            assert r.status == 200
            h = (await r.json())["headers"]
        assert h["x-jwt-claim-sub"] == "alice" and h["x-jwt-claim-role"] == "admin"
        assert h["x-jwt-claim-iss"] == ISS and "authorization" not in h      # not forwarded upstream
        # A route without auth: no token needed, Authorization passes, forged claim headers removed.
        async with s.get(f"{url}/open/echo", headers={"Authorization": "Basic abc", "X-Jwt-Claim-Sub": "x"}) as r:
            assert r.status == 200
            h = (await r.json())["headers"]
        assert h["authorization"] == "Basic abc" and "x-jwt-claim-sub" not in h


def test_gateway_jwt_per_route(run, tmp_path):
    run(_jwt, tmp_path)


async def _https(tmp_path):
    ca = CertificateAuthority.create("mesh.local", time.time())
    key, key_pem = generate_key()
    issued = ca.sign_server_csr(build_server_csr(key, ("localhost", "127.0.0.1")), ("localhost", "127.0.0.1"),
                                3600, time.time())
    server = ServerCert()
    await server.aload_pem(issued.full_chain_pem, key_pem)   # read by a certs.worker subprocess
    async with AsyncExitStack() as stack:
        mesh = await Mesh(stack).start(routes=[GatewayRoute(service="payments", path="/pay", host=None,
                                                            strip_prefix=True)])
        gw_state = ProxyState("gateway", "v1", table=mesh.out_state.table)
        stack.callback(gw_state.close)
        gw = await start_gateway(gw_state, "127.0.0.1", 0, ssl_context=server.front)
        stack.callback(gw.close)
        ctx = ssl.create_default_context(cadata=ca.bundle_pem.decode())
        s = await mesh.session()
        async with s.get(f"https://localhost:{port_of(gw)}/pay/echo", ssl=ctx) as r:
            assert r.status == 200
            assert (await r.json())["headers"]["x-forwarded-proto"] == "https"


def test_gateway_https_with_a_mesh_ca_certificate(run, tmp_path):
    run(_https, tmp_path)


def test_server_csr_names_must_be_configured():
    import pytest
    from certs.ca import CsrRejected

    ca = CertificateAuthority.create("mesh.local", time.time())
    key, _ = generate_key()
    with pytest.raises(CsrRejected, match="not configured"):
        ca.sign_server_csr(build_server_csr(key, ("evil.example",)), ("localhost",), 3600, time.time())
