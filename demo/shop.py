"""The demo shop: one small aiohttp program, one role per container.

    python3 /app/shop.py ROLE      ROLE: orders payments inventory users notifications catalog

Every role listens on 0.0.0.0:8080 (env PORT) and serves:
    GET  /healthz              liveness
    GET  /call?url=URL         GET URL from this container; answers its status, headers and body
    GET  /echo...              the request as received (method, path, headers, peer)
    GET  /admin/stats          requests counted by role (total, failed)
    POST /admin/faults         {"fail_rate": 0..1, "status": int, "latency_ms": int} -> new values
Faults (env FAIL_RATE, FAIL_STATUS, LATENCY_MS; defaults 0, 503, 0) apply to the role's own API.
The demo uses them on payments, but any role has them.

Role APIs:
    orders         GET /api/orders/{id} (also /orders/{id}, /{id}): calls inventory, users,
                   payments, notifications in turn; 200 with their answers, or 502 naming the
                   first that failed and its status
                   GET /api/orders/live (also /orders/live, /live): a WebSocket of this instance's
                   order status events, one JSON text message each (newline-ended): first
                   {"event": "subscribed"}, then per
                   order {"event": "order", "order", "status"} with status placed, paid, completed,
                   or failed (with "failed": the downstream that failed)
    payments       POST /pay
    inventory      GET /stock/{id}
    users          GET /users/{id}
    notifications  POST /notify
    catalog        GET / and GET /api/catalog... (any path);
                   GET /recommendations (also /api/catalog/recommendations) ?user=&item=&count=:
                   calls the gRPC service `recommendations` (demo/recommend.py) over one long-lived
                   channel; answers its items and which version and algorithm answered;
                   GET /recommendations/watch ?count=&interval_ms=: the server-streaming Watch,
                   its messages in the order they came;
                   GET /recommendations/tally ?calls=N (default 100, at most 5000): N calls on the
                   channel, 32 at a time; how many each version answered (a split shows here)

Every JSON answer carries service, version (env VERSION, default v1) and instance (hostname).
Outbound calls are plain aiohttp: in transparent mode the sidecar captures them; in explicit
mode HTTP_PROXY is honoured (trust_env=True). The gRPC channel (grpc.aio, on the same event loop)
goes to env RECOMMENDATIONS_TARGET (default recommendations:50051) with a deadline of
RECOMMEND_DEADLINE_S (default 2) seconds per call.
"""

import asyncio
import json
import logging
import os
import random
import socket
import sys

import grpc
from aiohttp import ClientError, ClientSession, ClientTimeout, WSCloseCode, web

from recommend import RECOMMEND, WATCH, decode, encode

ROLES = ("orders", "payments", "inventory", "users", "notifications", "catalog")
VERSION = os.environ.get("VERSION", "v1")
INSTANCE = socket.gethostname()
TIMEOUT = ClientTimeout(total=float(os.environ.get("DOWNSTREAM_TIMEOUT_S", "5")))
RECOMMENDATIONS_TARGET = os.environ.get("RECOMMENDATIONS_TARGET", "recommendations:50051")
RECOMMEND_DEADLINE_S = float(os.environ.get("RECOMMEND_DEADLINE_S", "2"))
TALLY_MAX_CALLS = 5000
TALLY_CONCURRENCY = 32     # calls in flight at once on the one channel (HTTP/2 streams)
# Request headers passed on to downstream calls (request ids, trace context, user for routing).
PROPAGATE = ("x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
             "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "x-user")

ROLE = ""  # set in main()


def reply(body=None, status=200):
    return web.json_response({"service": ROLE, "version": VERSION, "instance": INSTANCE, **(body or {})},
                             status=status)


# ---- faults and counters, for every role's own API ---------------------------------------------

def faults_from_env():
    return {"fail_rate": float(os.environ.get("FAIL_RATE", "0")),
            "status": int(os.environ.get("FAIL_STATUS", "503")),
            "latency_ms": int(os.environ.get("LATENCY_MS", "0"))}


@web.middleware
async def faults(request, handler):
    if request.path in ("/healthz", "/call") or request.path.startswith(("/admin/", "/echo")):
        return await handler(request)
    app, f = request.app, request.app["faults"]
    app["stats"]["requests"] += 1
    if f["latency_ms"]:
        await asyncio.sleep(f["latency_ms"] / 1000)
    if f["fail_rate"] and random.random() < f["fail_rate"]:
        app["stats"]["failed"] += 1
        return reply({"error": "injected fault"}, status=f["status"])
    return await handler(request)


async def set_faults(request):
    try:
        new = await request.json()
    except ValueError:
        return reply({"error": "body must be JSON"}, status=400)
    f = dict(request.app["faults"])
    if "fail_rate" in new:
        f["fail_rate"] = float(new["fail_rate"])
    if "status" in new:
        f["status"] = int(new["status"])
    if "latency_ms" in new:
        f["latency_ms"] = int(new["latency_ms"])
    if not 0 <= f["fail_rate"] <= 1 or not 100 <= f["status"] <= 599 or f["latency_ms"] < 0:
        return reply({"error": "want 0<=fail_rate<=1, 100<=status<=599, latency_ms>=0"}, status=400)
    request.app["faults"].update(f)  # mutate: app state is frozen once started
    return reply({"faults": f})


async def stats(request):
    return reply({**request.app["stats"], "faults": request.app["faults"]})


# ---- routes every role has ---------------------------------------------------------------------

async def healthz(request):
    return reply({"status": "ok"})


async def call(request):
    url = request.query.get("url")
    if not url:
        return reply({"error": "missing ?url="}, status=400)
    try:
        async with request.app["client"].get(url, headers=propagated(request)) as resp:
            body = await resp.text()
            return reply({"url": url, "status": resp.status, "headers": dict(resp.headers), "body": body})
    except (ClientError, asyncio.TimeoutError, OSError) as exc:
        return reply({"url": url, "status": None, "error": describe(exc)}, status=502)


async def echo(request):
    return reply({"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
                  "peer": request.remote, "body": await request.text()})


def describe(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def propagated(request):
    return {h: request.headers[h] for h in PROPAGATE if h in request.headers}


# ---- role APIs ---------------------------------------------------------------------------------

async def live_orders(request):
    """A WebSocket of order status events: subscribed once registered, so a client that waits for that
    message sees every order placed afterwards."""
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    subscribers = request.app["live"]
    subscribers.add(ws)
    try:
        await send_event(ws, {"event": "subscribed", "service": ROLE, "instance": INSTANCE})
        async for _ in ws:   # nothing to read: wait for the client to close
            pass
    finally:
        subscribers.discard(ws)
    return ws


def send_event(ws, event):
    # one JSON text per message, newline-ended: a raw `curl --no-buffer` of the feed reads a line each
    return ws.send_str(json.dumps(event) + "\n")


async def publish(app, oid, status, **extra):
    """An order's status event to every live subscriber (one that cannot take it is left to close)."""
    event = {"event": "order", "order": oid, "status": status, "instance": INSTANCE, **extra}
    await asyncio.gather(*(send_event(ws, event) for ws in list(app["live"]) if not ws.closed),
                         return_exceptions=True)


async def close_live(app):
    for ws in list(app["live"]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutting down")


async def order(request):
    oid = request.match_info["id"]
    await publish(request.app, oid, "placed")
    calls = [
        ("inventory", "GET", f"http://inventory:8080/stock/{oid}", None),
        ("users", "GET", f"http://users:8080/users/{oid}", None),
        ("payments", "POST", "http://payments:8080/pay", {"order": oid, "amount": 42}),
        ("notifications", "POST", "http://notifications:8080/notify", {"order": oid, "event": "paid"}),
    ]
    results = {}
    for name, method, url, payload in calls:
        try:
            async with request.app["client"].request(method, url, json=payload,
                                                     headers=propagated(request)) as resp:
                text = await resp.text()
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = text
                status = resp.status
        except (ClientError, asyncio.TimeoutError, OSError) as exc:
            await publish(request.app, oid, "failed", failed=name)
            return reply({"order": oid, "failed": name, "status": None,
                          "error": describe(exc), "results": results}, status=502)
        if status >= 400:
            await publish(request.app, oid, "failed", failed=name)
            return reply({"order": oid, "failed": name, "status": status, "body": body,
                          "results": results}, status=502)
        results[name] = body
        if name == "payments":
            await publish(request.app, oid, "paid")
    await publish(request.app, oid, "completed")
    return reply({"order": oid, "results": results})


async def pay(request):
    body = await request.json() if request.can_read_body else {}
    return reply({"paid": True, "order": body.get("order"), "amount": body.get("amount")})


async def stock(request):
    item = request.match_info["id"]
    return reply({"item": item, "in_stock": True, "quantity": sum(map(ord, item)) % 50 + 1})


async def user(request):
    uid = request.match_info["id"]
    return reply({"user": uid, "name": f"user-{uid}"})


async def notify(request):
    body = await request.json() if request.can_read_body else {}
    return reply({"notified": True, "order": body.get("order")})


async def catalog(request):
    return reply({"path": request.path, "items": ["hat", "mug", "shirt"]})


def recommend_query(request, **extra):
    """The request message for the recommendations service from the query string (ValueError: bad count)."""
    query = {"user": request.query.get("user", "guest"), "item": request.query.get("item", "hat"),
             "count": int(request.query.get("count", "3"))}
    for name, default in extra.items():
        query[name] = int(request.query.get(name, default))
    return query


def call_options(request, timeout=None):
    """A gRPC call's options: its deadline (sent as grpc-timeout; default RECOMMEND_DEADLINE_S) and the
    request's propagated headers as metadata (trace context, x-user for header routes)."""
    return {"timeout": RECOMMEND_DEADLINE_S if timeout is None else timeout,
            "metadata": tuple(propagated(request).items())}


def grpc_failure(exc):
    return reply({"error": "recommendations failed", "grpc_status": exc.code().name,
                  "details": exc.details()}, status=502)


def answered_by(message):
    return {key: message.get(key) for key in ("version", "algorithm", "instance")}


async def recommendations(request):
    try:
        query = recommend_query(request)
    except ValueError:
        return reply({"error": "count must be an integer"}, status=400)
    try:
        answer = await request.app["recommend"](query, **call_options(request))
    except grpc.aio.AioRpcError as exc:
        return grpc_failure(exc)
    return reply({"user": query["user"], "item": query["item"], "recommendations": answer["items"],
                  "answered_by": answered_by(answer)})


async def watch_recommendations(request):
    try:
        query = recommend_query(request, interval_ms="100")
    except ValueError:
        return reply({"error": "count and interval_ms must be integers"}, status=400)
    options = call_options(request, RECOMMEND_DEADLINE_S + query["count"] * query["interval_ms"] / 1000)
    try:
        messages = [m async for m in request.app["watch"](query, **options)]
    except grpc.aio.AioRpcError as exc:
        return grpc_failure(exc)
    return reply({"user": query["user"], "item": query["item"],
                  "stream": [{"item": m["item"], "rank": m["rank"], "answered_by": answered_by(m)}
                             for m in messages]})


async def tally_recommendations(request):
    """`calls` Recommend calls on the one channel, TALLY_CONCURRENCY at a time: how many calls each
    version answered and how many failed with which gRPC status (a split is per call, so it shows here)."""
    try:
        calls = int(request.query.get("calls", "100"))
        query = recommend_query(request)
    except ValueError:
        return reply({"error": "calls and count must be integers"}, status=400)
    if not 1 <= calls <= TALLY_MAX_CALLS:
        return reply({"error": f"calls must be 1..{TALLY_MAX_CALLS}"}, status=400)
    versions, failed = {}, {}
    gate = asyncio.Semaphore(TALLY_CONCURRENCY)
    options = call_options(request)

    async def one():
        async with gate:
            try:
                answer = await request.app["recommend"](query, **options)
            except grpc.aio.AioRpcError as exc:
                failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
            else:
                versions[answer["version"]] = versions.get(answer["version"], 0) + 1
    await asyncio.gather(*(one() for _ in range(calls)))
    return reply({"calls": calls, "answered_by_version": dict(sorted(versions.items())),
                  "share": {v: round(n / calls, 3) for v, n in sorted(versions.items())}, "failed": failed})


def role_routes(role):
    if role == "orders":
        return [*(web.get(p, live_orders) for p in ("/api/orders/live", "/orders/live", "/live")),
                *(web.get(p, order) for p in ("/api/orders/{id}", "/orders/{id}", "/{id}"))]
    if role == "payments":
        return [web.post("/pay", pay)]
    if role == "inventory":
        return [web.get("/stock/{id}", stock)]
    if role == "users":
        return [web.get("/users/{id}", user)]
    if role == "notifications":
        return [web.post("/notify", notify)]
    return [*(web.get(prefix + "/recommendations", recommendations) for prefix in ("", "/api/catalog")),
            *(web.get(prefix + "/recommendations/watch", watch_recommendations) for prefix in ("", "/api/catalog")),
            *(web.get(prefix + "/recommendations/tally", tally_recommendations) for prefix in ("", "/api/catalog")),
            web.get("/{tail:.*}", catalog)]  # catalog: /, /api/catalog..., any path


# ---- app ---------------------------------------------------------------------------------------

async def client_ctx(app):
    # trust_env: honour HTTP_PROXY/NO_PROXY (explicit capture); without them, plain connections.
    async with ClientSession(timeout=TIMEOUT, trust_env=True) as session:
        app["client"] = session
        yield


async def recommendations_ctx(app):
    # One long-lived channel for every call: gRPC multiplexes its calls on one HTTP/2 connection, so
    # a split between versions must be applied per call (the mesh's job), not per connection.
    async with grpc.aio.insecure_channel(RECOMMENDATIONS_TARGET) as channel:
        app["recommend"] = channel.unary_unary(RECOMMEND, request_serializer=encode, response_deserializer=decode)
        app["watch"] = channel.unary_stream(WATCH, request_serializer=encode, response_deserializer=decode)
        yield


def make_app(role):
    app = web.Application(middlewares=[faults])
    app["faults"] = faults_from_env()
    app["stats"] = {"requests": 0, "failed": 0}
    app["live"] = set()     # the live order feed's open WebSockets
    app.on_shutdown.append(close_live)
    app.cleanup_ctx.append(client_ctx)
    if role == "catalog":
        app.cleanup_ctx.append(recommendations_ctx)
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/call", call),
        web.route("*", "/echo{tail:.*}", echo),
        web.get("/admin/stats", stats),
        web.post("/admin/faults", set_faults),
        *role_routes(role),
    ])
    return app


def main():
    global ROLE
    if len(sys.argv) != 2 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: shop.py {{{'|'.join(ROLES)}}}")
    ROLE = sys.argv[1]
    port = int(os.environ.get("PORT", "8080"))
    print(f"shop {ROLE} {VERSION} on {INSTANCE}, listening on 0.0.0.0:{port}", flush=True)
    access_log = os.environ.get("ACCESS_LOG", "0") not in ("", "0")
    if access_log:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    web.run_app(make_app(ROLE), host="0.0.0.0", port=port, print=None, shutdown_timeout=1,
                access_log=logging.getLogger("aiohttp.access") if access_log else None)


if __name__ == "__main__":
    main()
