"""The demo's recommendation engine: a gRPC service (grpcio, no generated code), in v1 and v2.

    python3 /app/recommend.py          listens h2c (plain gRPC) on 0.0.0.0:50051 (env PORT)

Service `shop.Recommendations`, messages as JSON bytes (the serializers below, no protoc):
    Recommend (unary)            {"user", "item", "count"} -> {"items": [...], "version", "algorithm", "instance"}
    Watch (server streaming)     {"user", "item", "count", "interval_ms"} -> `count` messages
                                 {"item", "rank", "sent_at", "version", "algorithm", "instance"},
                                 one per interval (sent_at: the server's clock, epoch seconds)
    Follow (bidi streaming)      a stream of {"user", "item"} -> for each, in turn, {"n", "item", "items",
                                 "sent_at", "version", "algorithm", "instance"} (n counts from 1)
The algorithm is the version's (env VERSION: v1 popular, v2 similar-items; env ALGORITHM overrides),
so a caller sees which version answered. Faults for the mesh's retries: env FAIL_RATE (0..1) of
Recommend calls end with status FAIL_CODE (a gRPC status name, default UNAVAILABLE).
"""

import json
import os
import random
import signal
import socket
import sys
import threading
import time
import zlib
from concurrent import futures

import grpc

SERVICE = "shop.Recommendations"
RECOMMEND = f"/{SERVICE}/Recommend"
WATCH = f"/{SERVICE}/Watch"
FOLLOW = f"/{SERVICE}/Follow"
DEFAULT_PORT = 50051
CATALOG = ("hat", "mug", "shirt", "socks", "scarf", "poster", "sticker", "bag")  # most popular first
ALGORITHMS = {"v1": "popular", "v2": "similar-items"}
MAX_COUNT = 10_000          # Watch may stream this many (the mesh's streaming tests use 1,000)
MAX_INTERVAL_MS = 5_000


def encode(message: dict) -> bytes:
    """A message on the wire: compact JSON in UTF-8."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> dict:
    """A message from the wire; a body that is not a JSON object raises ValueError."""
    message = json.loads(data.decode("utf-8")) if data else {}
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


def rank(algorithm: str, user: str, item: str) -> list[str]:
    """The catalog ranked for `user` looking at `item` (the item itself left out)."""
    others = [name for name in CATALOG if name != item]
    if algorithm == "similar-items":
        # letters shared with the item first; the user's hash breaks ties, so users differ
        salt = zlib.crc32(user.encode("utf-8"))
        return sorted(others, key=lambda name: (-len(set(name) & set(item)), zlib.crc32(name.encode()) ^ salt))
    return others


class Recommender:
    """The three methods, for one version and algorithm, with the optional injected failures."""

    def __init__(self, version: str, algorithm: str, fail_rate: float = 0.0,
                 fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.version = version
        self.algorithm = algorithm
        self.fail_rate = fail_rate
        self.fail_code = fail_code
        self.instance = socket.gethostname()

    def _stamp(self, body: dict) -> dict:
        return {**body, "version": self.version, "algorithm": self.algorithm, "instance": self.instance}

    def _ranked(self, request: dict, context: grpc.ServicerContext, default_count: int) -> tuple[list[str], int]:
        user, item = request.get("user", ""), request.get("item", "")
        count = request.get("count", default_count)
        if not isinstance(user, str) or not isinstance(item, str) \
                or not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= MAX_COUNT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"want user and item as strings, count 1..{MAX_COUNT}")
        return rank(self.algorithm, user, item), count

    def recommend(self, request: dict, context: grpc.ServicerContext) -> dict:
        if self.fail_rate and random.random() < self.fail_rate:
            context.abort(self.fail_code, "injected fault")
        ranked, count = self._ranked(request, context, 3)
        return self._stamp({"items": ranked[:count]})

    def watch(self, request: dict, context: grpc.ServicerContext):
        ranked, count = self._ranked(request, context, 3)
        interval_ms = request.get("interval_ms", 200)
        if not isinstance(interval_ms, int) or isinstance(interval_ms, bool) \
                or not 0 <= interval_ms <= MAX_INTERVAL_MS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"want interval_ms 0..{MAX_INTERVAL_MS}")
        stopped = threading.Event()
        context.add_callback(stopped.set)  # the caller went away: stop early
        for n in range(count):
            if n and interval_ms and stopped.wait(interval_ms / 1000):
                return
            yield self._stamp({"item": ranked[n % len(ranked)], "rank": n + 1, "sent_at": time.time()})

    def follow(self, requests, context: grpc.ServicerContext):
        # One answer per message as it comes: a caller may wait for each before sending the next.
        for n, request in enumerate(requests, 1):
            user, item = request.get("user", ""), request.get("item", "")
            if not isinstance(user, str) or not isinstance(item, str):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "want user and item as strings")
            yield self._stamp({"n": n, "item": item, "items": rank(self.algorithm, user, item)[:3],
                               "sent_at": time.time()})

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's generic handler: method names to handlers with the JSON serializers."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Recommend": grpc.unary_unary_rpc_method_handler(
                self.recommend, request_deserializer=decode, response_serializer=encode),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch, request_deserializer=decode, response_serializer=encode),
            "Follow": grpc.stream_stream_rpc_method_handler(
                self.follow, request_deserializer=decode, response_serializer=encode),
        })


def serve(recommender: Recommender, address: str, workers: int = 16) -> tuple[grpc.Server, int]:
    """A started server for `recommender` on `address` (host:port, port 0: any free one), and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((recommender.handler(),))
    port = server.add_insecure_port(address)
    server.start()
    return server, port


def recommender_from_env(env: dict) -> Recommender:
    """The Recommender that VERSION, ALGORITHM, FAIL_RATE and FAIL_CODE ask for; ValueError names a bad one."""
    version = env.get("VERSION", "v1")
    algorithm = env.get("ALGORITHM") or ALGORITHMS.get(version, "popular")
    if algorithm not in ALGORITHMS.values():
        raise ValueError(f"ALGORITHM: {algorithm!r} is not one of {', '.join(ALGORITHMS.values())}")
    fail_rate = float(env.get("FAIL_RATE", "0"))
    if not 0 <= fail_rate <= 1:
        raise ValueError(f"FAIL_RATE: {fail_rate} is not 0..1")
    code_name = env.get("FAIL_CODE", "UNAVAILABLE").upper()
    if code_name not in grpc.StatusCode.__members__ or code_name == "OK":
        raise ValueError(f"FAIL_CODE: {code_name!r} is not a gRPC error status name")
    return Recommender(version, algorithm, fail_rate, grpc.StatusCode[code_name])


def main():
    try:
        recommender = recommender_from_env(dict(os.environ))
    except ValueError as exc:
        sys.exit(f"recommend: {exc}")
    port = int(os.environ.get("PORT", str(DEFAULT_PORT)))
    server, port = serve(recommender, f"0.0.0.0:{port}")
    print(f"recommendations {recommender.version} ({recommender.algorithm}) on {recommender.instance}, "
          f"listening on 0.0.0.0:{port} (gRPC, h2c)", flush=True)
    # PID 1 in its container: without a handler SIGTERM is ignored and `docker stop` waits 10 s.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
