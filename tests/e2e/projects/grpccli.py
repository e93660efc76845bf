"""gRPC calls for the e2e tests (tests/e2e/test_grpc.py), run with docker exec in a meshed client
container of the demo image (grpcio, and demo/recommend.py at /app for the method names and JSON
serializers). Each command prints one JSON object on stdout.

    grpccli.py unary TARGET CALLS [CONCURRENCY]   Recommend calls on one channel: answers per instance,
                                                  failures per status name
    grpccli.py watch TARGET COUNT INTERVAL_MS     the server-streaming Watch: when its first message
                                                  arrived and when the server sent its last one
    grpccli.py follow TARGET COUNT                the bidi Follow in lockstep: each message written only
                                                  after the answer to the one before arrived
Metadata for every call: env GRPC_METADATA, a JSON object (e.g. a traceparent).
"""

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, "/app")

import grpc  # noqa: E402
from recommend import CATALOG, FOLLOW, RECOMMEND, WATCH, decode, encode  # noqa: E402

METADATA = tuple(json.loads(os.environ.get("GRPC_METADATA", "{}")).items())


async def unary(channel, calls: str, concurrency: str = "10") -> dict:
    call = channel.unary_unary(RECOMMEND, request_serializer=encode, response_deserializer=decode)
    instances, failed, details = {}, {}, set()
    gate = asyncio.Semaphore(int(concurrency))

    async def one():
        async with gate:
            try:
                answer = await call({"user": "e2e", "item": "hat"}, timeout=10, metadata=METADATA)
            except grpc.aio.AioRpcError as exc:
                failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
                details.add(exc.details())
            else:
                instances[answer["instance"]] = instances.get(answer["instance"], 0) + 1
    await asyncio.gather(*(one() for _ in range(int(calls))))
    return {"calls": int(calls), "instances": instances, "failed": failed, "details": sorted(details)}


async def watch(channel, count: str, interval_ms: str) -> dict:
    stream = channel.unary_stream(WATCH, request_serializer=encode, response_deserializer=decode)
    ranks, arrived, sent = [], [], []
    async for message in stream({"count": int(count), "interval_ms": int(interval_ms)}, timeout=60,
                                metadata=METADATA):
        arrived.append(time.time())
        ranks.append(message["rank"])
        sent.append(message["sent_at"])
    return {"count": len(ranks), "in_order": ranks == list(range(1, len(ranks) + 1)),
            "first_sent": sent[0], "first_arrived": arrived[0], "last_sent": sent[-1], "last_arrived": arrived[-1]}


async def follow(channel, count: str) -> dict:
    call = channel.stream_stream(FOLLOW, request_serializer=encode, response_deserializer=decode)(
        timeout=120, metadata=METADATA)
    numbers, first_arrived, last_written = [], None, None
    for n in range(int(count)):
        last_written = time.time()
        await call.write({"user": "e2e", "item": CATALOG[n % len(CATALOG)]})
        answer = await call.read()
        if answer is grpc.aio.EOF:
            break
        numbers.append(answer["n"])
        if first_arrived is None:
            first_arrived = time.time()
    await call.done_writing()
    trailing = await call.read()
    return {"count": len(numbers), "in_order": numbers == list(range(1, len(numbers) + 1)),
            "first_arrived": first_arrived, "last_written": last_written,
            "ended_cleanly": trailing is grpc.aio.EOF, "status": (await call.code()).name}


async def main(command: str, target: str, *args: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:   # one channel for every call
        result = await {"unary": unary, "watch": watch, "follow": follow}[command](channel, *args)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
