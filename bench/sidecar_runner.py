"""One listener of the benchmark's mesh pair, in its own process, running the product's code.

    python -m bench.sidecar_runner --role outbound --port P --dest-port Q --tls-dir D --ready-file F
    python -m bench.sidecar_runner --role inbound  --port Q --app-port A --tls-dir D --ready-file F

What `sidecar run` does, minus what needs meshd and Docker: the same modules imported, uvloop through
meshproc.runtime, structlog JSON logging, a ProxyState with a certs.holder.TlsHolder (material loaded
with certs.store.load_material from files the harness issued through certs.CertificateAuthority), the
snapshot applied through ControlClient.handle_push (decode + route table, as a push from meshd would),
metrics on (sidecar.telemetry, served with readiness on the admin port), and start_outbound /
start_inbound. Not done: iptables capture, the control websocket, mDNS (nothing leaves loopback).

Tracing and access logs as the snapshot's telemetry settings say (`--sampling`, `--access-log`,
`--otlp-endpoint`; default: the product's, 1% and `sampled`). meshd's trace receiver is not set
(Tracing.collector stays None: `sidecar run` sets it from the control URL), so with no OTLP endpoint
Tracing.targets() is empty: sampled spans are recorded and batched by the exporter, then dropped
unencoded (what encoding adds is timed by bench.hotpath). `--count-spans` counts the spans the exporter gets (`bench_spans_encoded_total` on
the admin port's /metrics), to tell recorded spans from ones the exporter's full queue dropped.

TLS and authorization as `sidecar run` assembles them in mTLS mode when this checkout has
sidecar.tlsagent and sidecar.mtls (CertAgent + MeshTls: the outbound checks the inbound's SPIFFE ID,
the inbound identifies the caller; an Authorizer; start_mesh_inbound). Otherwise a TlsHolder whose
`check_peer` compares the peer certificate's URI SAN with the endpoint's identity, and start_inbound.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

from certs.holder import TlsHolder, peer_uris
from certs.store import load_material
from meshcore.identity import match_identity
from meshcore.labels import DEFAULT_TRUST_DOMAIN, spiffe_id
from meshcore.protocol import Ack, SnapshotPush
from meshcore.snapshot import Endpoint, MeshConfig, ServiceConfig, Snapshot, encode_snapshot
from meshcore.telemetry_settings import (
    ACCESS_LOG_MODES, DEFAULT_ACCESS_LOG, DEFAULT_SAMPLING, TelemetrySettings, decode_otlp_endpoint,
    decode_sampling, encode_settings,
)
from meshproc.runtime import configure_logging, run_forever
import sidecar.announce  # noqa: F401 - imported by `sidecar run`; counted in the process's memory
from sidecar.admin import build_admin_app, start_admin
from sidecar.control import ControlClient
from sidecar.proxy import ProxyState, start_inbound, start_outbound
from sidecar.telemetry import render_metrics

NAMESPACE = "bench"
CLIENT_SERVICE = "frontend"   # the outbound sidecar's own service
SERVER_SERVICE = "payments"   # the service behind the inbound sidecar; wrk sends `Host: payments`
SERVICE_PORT = 8080           # the port callers dial (Host header `payments:8080` also routes)
APP_PROTOCOLS = ("http", "http2", "grpc")   # the mesh.protocol values of an HTTP app


def identity(service: str) -> str:
    return spiffe_id(DEFAULT_TRUST_DOMAIN, NAMESPACE, service)


class MeshTls(TlsHolder):
    """The node's TLS holder plus the peer identity check the proxy calls after each handshake."""

    def check_peer(self, ssl_object, endpoint) -> bool:
        if endpoint is None or not endpoint.identity:
            return False
        return match_identity(peer_uris(ssl_object), (endpoint.identity,)) is not None


def bench_snapshot(inbound_port: int, version: int = 1, telemetry: TelemetrySettings | None = None,
                   protocol: str = "http") -> Snapshot:
    """Two services; `payments` has one endpoint: the inbound sidecar on 127.0.0.1:inbound_port.
    `telemetry`: the mesh-wide tracing and access log settings (default: the product's); `protocol`:
    payments' mesh.protocol (http, or http2 / grpc for an app that speaks h2c)."""
    services = {
        name: ServiceConfig(name=name, namespace=NAMESPACE, protocol=protocol if name == SERVER_SERVICE else "http",
                            port=SERVICE_PORT, identity=identity(name))
        for name in (CLIENT_SERVICE, SERVER_SERVICE)
    }
    endpoints = {SERVER_SERVICE: (Endpoint(instance="bench-payments-1", address="127.0.0.1",
                                           port=inbound_port, version="v1",
                                           identity=identity(SERVER_SERVICE)),)}
    return Snapshot(version=version, config=MeshConfig(services=services, endpoints=endpoints,
                                                       telemetry=telemetry or TelemetrySettings()))


def count_spans(registry) -> None:
    """`bench_spans_encoded_total`: spans handed to sidecar.otel's exporter (recorded and not
    dropped by its full queue). Wraps the exporter class's export (the bench's instrument, in
    this process only); imports sidecar.otel now rather than at the first sampled span."""
    from meshcore.metrics import Counter
    from sidecar import otel

    counter = Counter("bench_spans_encoded", "Spans handed to the OTLP exporter (bench instrument)",
                      registry=registry)
    export = otel.SpanExporter.export

    def counted(self, spans):
        counter.inc(len(spans))
        return export(self, spans)

    otel.SpanExporter.export = counted


def _product_tls(state: ProxyState, tls_dir: Path):
    """`sidecar run`'s secure assembly (sidecar.tlsagent + sidecar.mtls), when this checkout has it:
    (CertAgent restoring the material from tls_dir, its MeshTls hook, an Authorizer) or None."""
    try:
        from sidecar.mtls import Authorizer, start_mesh_inbound
        from sidecar.tlsagent import CertAgent, MeshTls as ProductTls
    except ImportError:
        return None
    material = load_material(tls_dir)
    agent = CertAgent(material.identity, material.bundle_pem, "", tls_dir=str(tls_dir),
                      registry=state.telemetry.registry)
    if not agent.has_valid_cert():
        return None
    return ProductTls(agent), Authorizer(state.service), start_mesh_inbound


async def serve(args: SimpleNamespace) -> None:
    service = CLIENT_SERVICE if args.role == "outbound" else SERVER_SERVICE
    state = ProxyState(service, "v1")
    product = _product_tls(state, args.tls_dir) if args.assembly in ("auto", "product") else None
    if product is None and args.assembly == "product":
        raise SystemExit("this checkout has no sidecar.tlsagent/sidecar.mtls assembly")
    apply = state.apply_snapshot
    if product is not None:
        state.tls, state.authz, start_mesh_inbound = product

        def apply(snapshot, _apply=state.apply_snapshot, _authz=state.authz):
            _apply(snapshot)
            _authz.update(snapshot)
    else:
        state.tls = MeshTls(load_material(args.tls_dir))
    control = ControlClient(f"ws://127.0.0.1:{args.admin_port}/unused", "sidecar", f"bench-{args.role}",
                            f"bench-{service}", apply=apply)
    if args.count_spans:
        count_spans(state.telemetry.registry)
    telemetry = TelemetrySettings(sampling=args.sampling, otlp_endpoint=args.otlp_endpoint,
                                  access_log=args.access_log)
    snap = bench_snapshot(args.dest_port or args.port, telemetry=telemetry, protocol=args.protocol)
    reply = control.handle_push(SnapshotPush(version=snap.version, snapshot=encode_snapshot(snap)))
    if not isinstance(reply, Ack):
        raise SystemExit(f"snapshot refused: {reply}")
    if args.role == "outbound":
        server = await start_outbound(state, "127.0.0.1", args.port, mode=args.mode)
    elif product is not None:
        server = await start_mesh_inbound(state, "127.0.0.1", args.port, app_port=args.app_port,
                                          protocol=args.protocol)
    else:
        server = await start_inbound(state, "127.0.0.1", args.port, app_port=args.app_port, protocol=args.protocol)
    admin = await start_admin(build_admin_app(control, lambda: render_metrics(state.telemetry),
                                              server.is_serving), "127.0.0.1", args.admin_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = {"pid": os.getpid(), "role": args.role, "port": args.port, "admin_port": args.admin_port,
             "table_version": state.table.version, "loop": type(loop).__module__,
             "assembly": "product" if product is not None else "bench",
             "tls": f"{type(state.tls).__module__}.{type(state.tls).__name__}",
             "inbound": type(server).__name__, "protocol": args.protocol,
             "telemetry": encode_settings(state.tracing.settings),
             "span_targets": [t[1] for t in state.tracing.targets()]}
    tmp = Path(str(args.ready_file) + ".tmp")
    tmp.write_text(json.dumps(ready) + "\n")
    tmp.replace(args.ready_file)
    await stop.wait()
    server.close()
    await admin.cleanup()
    state.close()


def _argparser():
    """The options, with help and error messages (loaded only for --help or bad options: argparse
    and gettext cost a process about 0.6 MiB, which `sidecar run` does not carry either)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.sidecar_runner")
    p.add_argument("--role", choices=("outbound", "inbound"), required=True)
    p.add_argument("--port", type=int, required=True, help="listen port on 127.0.0.1")
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--dest-port", type=int, default=0, help="outbound: the inbound sidecar's port")
    p.add_argument("--app-port", type=int, default=0, help="inbound: the app's port")
    p.add_argument("--mode", choices=("transparent", "explicit"), default="transparent")
    p.add_argument("--protocol", choices=APP_PROTOCOLS, default="http",
                   help="payments' mesh.protocol in the snapshot, and how the inbound speaks to the app "
                        "(http2, grpc: h2c)")
    p.add_argument("--tls-dir", type=Path, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--assembly", choices=("auto", "product", "bench"), default="auto",
                   help="product: sidecar.tlsagent's MeshTls, Authorizer and sidecar.mtls.start_mesh_inbound "
                        "as `sidecar run` assembles them in mTLS mode; bench: a TlsHolder with a SPIFFE check "
                        "and start_inbound (checkouts without them); auto: product when present")
    p.add_argument("--sampling", type=decode_sampling, default=DEFAULT_SAMPLING,
                   help=f"percent of new traces sampled, in the pushed snapshot (default {DEFAULT_SAMPLING:g})")
    p.add_argument("--access-log", choices=ACCESS_LOG_MODES, default=DEFAULT_ACCESS_LOG,
                   help=f"access log mode in the pushed snapshot (default {DEFAULT_ACCESS_LOG})")
    p.add_argument("--otlp-endpoint", type=decode_otlp_endpoint, default=None,
                   help="external OTLP/HTTP collector in the pushed snapshot (default none: spans go nowhere)")
    p.add_argument("--count-spans", action="store_true",
                   help="count the spans handed to the exporter (bench_spans_encoded_total on /metrics)")
    return p


# option -> (conversion, default; REQUIRED: no default); flags in FLAGS. Must match _argparser.
REQUIRED = object()
OPTIONS = {
    "--role": (("outbound", "inbound"), REQUIRED), "--port": (int, REQUIRED), "--admin-port": (int, REQUIRED),
    "--dest-port": (int, 0), "--app-port": (int, 0), "--mode": (("transparent", "explicit"), "transparent"),
    "--protocol": (APP_PROTOCOLS, "http"),
    "--tls-dir": (Path, REQUIRED), "--ready-file": (Path, REQUIRED),
    "--assembly": (("auto", "product", "bench"), "auto"), "--sampling": (decode_sampling, DEFAULT_SAMPLING),
    "--access-log": (ACCESS_LOG_MODES, DEFAULT_ACCESS_LOG), "--otlp-endpoint": (decode_otlp_endpoint, None),
}
FLAGS = ("--count-spans",)


def parse_options(argv: list[str]) -> SimpleNamespace | None:
    """`--name value` pairs and flags as _argparser would read them; None for anything else
    (help, an unknown option, a missing or bad value): the caller lets argparse say why."""
    values = {name: default for name, (_conv, default) in OPTIONS.items()} | dict.fromkeys(FLAGS, False)
    i = 0
    while i < len(argv):
        name, _eq, inline = argv[i].partition("=")
        if name in FLAGS and not _eq:
            values[name] = True
            i += 1
            continue
        if name not in OPTIONS:
            return None
        if _eq:
            raw, i = inline, i + 1
        elif i + 1 < len(argv):
            raw, i = argv[i + 1], i + 2
        else:
            return None
        conv = OPTIONS[name][0]
        try:
            values[name] = (raw if raw in conv else None) if isinstance(conv, tuple) else conv(raw)
        except (TypeError, ValueError):
            return None
        if values[name] is None and name != "--otlp-endpoint":
            return None
    if any(v is REQUIRED for v in values.values()):
        return None
    return SimpleNamespace(**{name[2:].replace("-", "_"): v for name, v in values.items()})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_options(argv) or _argparser().parse_args(argv)
    configure_logging("sidecar")
    run_forever(lambda: serve(args))


if __name__ == "__main__":
    main()
