"""The downstream's request path (`_Dispatcher`): the stack's layers run in order, then the upstream
tries: balance, connect (pooled or new), send the head and body, and the retry decisions on a try's
answer or failure (backoff, budget, per-try timeout)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from meshcore.grpc import is_retriable_grpc_status, parse_grpc_status
from meshcore.lb import connect_tries
from meshcore.resilience import backoff_delay, should_retry

from ..egress import http_egress_blocked   # egress control
from ..mirror import shadow_host
from ..routing import PASSTHROUGH, Cluster, passthrough_cluster
from ..traffic import balance_subset
from .h2bridge import H2_PROTOCOLS
from .http1 import put_fields
from .peers import check_peer, hop_tls
from .respond import _Responder
from .speedups import join, monotonic
from .upstream import _Upstream
from .wire import (
    FLAG_CONNECT_FAILURE, FLAG_DOWNSTREAM_PROTOCOL_ERROR, FLAG_FAULT_ABORT, FLAG_NO_HEALTHY_UPSTREAM, FLAG_OVERFLOW,
    FLAG_RETRY_LIMIT, FLAG_UPSTREAM_TIMEOUT, HELD, NEXT, P_PENDING, P_UPSTREAM, TEXT, _PEER_UNREACHABLE, Reply,
    _dec, _join_flags, _send, _write, log,
)

if TYPE_CHECKING:
    from .exchange import Exchange


class _Dispatcher(_Responder):
    """Runs an exchange's layers (`_proceed`) and its tries upstream; `_Downstream` (downstream.py)
    parses the requests it dispatches."""

    # -- the layers

    def _dispatch(self, ex: Exchange) -> None:
        ex.dispatched = True
        if ex.bad:
            # content_type given: a C call into another module cannot skip an optional argument
            self._reply(ex, 400, FLAG_DOWNSTREAM_PROTOCOL_ERROR, b"bad request\n", TEXT, close=True)
            return
        ex.at = 0
        self._proceed(ex)

    def _proceed(self, ex: Exchange) -> None:
        """Run the stack's layers from `ex.at` until one answers or holds the request."""
        chain = self.stack.chain
        n = len(chain)
        while ex.at < n:
            layer = chain[ex.at]
            ex.at += 1
            if layer.on_request(self, ex) != NEXT:
                return

    def _routed(self, ex: Exchange, target: Any) -> int:
        """The route layer's decision: a Reply is answered; a cluster is the exchange's (or, for the
        first request to an unknown destination, a byte tunnel's)."""
        if target.__class__ is Reply:
            self._answer(ex, target)
            return HELD
        cluster: Cluster = target
        ex.cluster = cluster
        if cluster.name == PASSTHROUGH and http_egress_blocked(self, ex, cluster):   # egress control: 502 EB
            return HELD
        if self.raw is not None:
            raw = bytes(self.raw)
            self.raw = None
            if cluster.name == PASSTHROUGH and self.orig_dst is not None:
                # First request to a destination the mesh does not know: forward the bytes unchanged.
                self.queue.clear()
                self._to_tunnel(passthrough_cluster(*self.orig_dst), raw)
                return HELD
        if not cluster.endpoints:
            self._reply(ex, 503, FLAG_NO_HEALTHY_UPSTREAM, b"no healthy upstream\n")
            return HELD
        return NEXT

    def _fault_delayed(self, ex: Exchange) -> None:
        ex.wait = None
        if ex.dead or ex.resp_done:
            return
        if ex.fault_abort:
            self._reply(ex, ex.fault_abort, FLAG_FAULT_ABORT, b"fault filter abort\n")
            return
        self._proceed(ex)

    def _send_mirror(self, ex: Exchange) -> None:
        sub = ex.mirror
        ex.mirror = None
        held = ex.held
        if ex.body and held is None:
            return  # the body outgrew what is held: no copy (Envoy mirrors only what it buffers)
        cluster = sub.cluster
        state = self.state
        idx = balance_subset(state, sub, (), None)
        if idx is None:
            return
        head = self._head(ex, cluster, shadow_host(ex.host if ex.host is not None else cluster.name.encode()))
        state.mirrors.send(cluster.keys[idx], [head, *held] if held else [head], head_only=ex.is_head,
                           tag=(cluster, idx, self.stack.source_name))

    def _timed_out(self, ex: Exchange) -> None:
        ex.timer = None
        if not (ex.dead or ex.resp_done):
            self._reply(ex, 504, FLAG_UPSTREAM_TIMEOUT, b"upstream request timeout\n")

    # -- retries

    def _end_try(self, ex: Exchange) -> None:
        if ex.try_timer is not None:
            ex.try_timer.cancel()
            ex.try_timer = None
        if ex.in_retry:
            ex.in_retry = False
            ex.traffic.budget.finish_retry()

    def _response_head(self, ex: Exchange, up: _Upstream, status: int) -> bool:
        """A try's response head arrived: record it; True when the retry layer takes it (the
        response is then read and dropped, and the request sent again after a backoff)."""
        if self.stack.outlier and ex.key is not None:
            # Every answer counts (a success resets the endpoint's run); only errors need the clock. A
            # success on an endpoint with no run (OutlierDetector.clean) would change nothing.
            outlier = ex.lane.outlier
            if status >= 500 or ex.key not in outlier.clean:
                outlier.record(ex.key, status, monotonic() if status >= 500 else 0.0)
        if ex.try_timer is not None or ex.in_retry:
            self._end_try(ex)
        retry_on = ex.retry_on
        if retry_on is None:
            return False
        if up.grpc_status is not None and up.grpc_status != b"0":
            # A trailers-only gRPC answer (no message yet): retried when mesh.retries.on names its
            # status (Istio's retryOn: cancelled, deadline-exceeded, internal, resource-exhausted,
            # unavailable), whatever the method: every gRPC call is a POST (gRPC's retry design).
            if is_retriable_grpc_status(parse_grpc_status(up.grpc_status), ex.traffic.policy.retries.on):
                if ex.attempt >= ex.traffic.policy.retries.attempts:
                    ex.flags = _join_flags(ex.flags, FLAG_RETRY_LIMIT)
                    return False
                return self._start_retry(ex)
        if status not in retry_on:
            return False
        if status == 503 and up.peer_flags in _PEER_UNREACHABLE:
            # The peer's inbound could not reach its app: the request reached no app, any method may retry.
            return self._decide_retry(ex, None, "connect-failure", False)
        return self._decide_retry(ex, status, None, True)

    def _try_failed(self, ex: Exchange, failure: str | None, sent: bool) -> bool:
        """A try ended without a response (reset, per-try timeout): True when it is retried."""
        tr = ex.traffic
        key = ex.key
        if self.stack.outlier and key is not None:
            tr.outlier.record(key, failure or "reset", monotonic())
        self._end_try(ex)
        if not self._decide_retry(ex, None, failure, sent):
            return False
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        self._backoff(ex)
        return True

    def _decide_retry(self, ex: Exchange, status: int | None, failure: str | None, sent: bool) -> bool:
        if ex.retry_on is None:
            return False
        tr = ex.traffic
        policy = tr.policy.retries
        method = ex.method.decode("latin-1")
        if not should_retry(policy, ex.attempt, method, status, failure, sent):
            if ex.attempt and should_retry(policy, 0, method, status, failure, sent):
                ex.flags = _join_flags(ex.flags, FLAG_RETRY_LIMIT)  # retriable, but no attempts left
            return False
        return self._start_retry(ex)

    def _start_retry(self, ex: Exchange) -> bool:
        """A retry is wanted: True when the request can be sent again (whole in memory, budget)."""
        tr = ex.traffic
        if not ex.req_done or (ex.body and ex.held is None):
            return False  # the whole request is not in memory: it cannot be sent again
        budget = tr.budget
        if not budget.can_retry(0.0):
            tr.retry_overflows += 1
            return False
        budget.start_retry()
        ex.in_retry = True
        ex.attempt += 1
        tr.retries_total += 1
        return True

    def _backoff(self, ex: Exchange) -> None:
        policy = ex.traffic.policy.retries
        delay = backoff_delay(ex.attempt - 1, policy.backoff_base, policy.backoff_max, self.state.random())
        ex.wait = self.loop.call_later(delay, self._retry_now, ex)

    def _retry_now(self, ex: Exchange) -> None:
        ex.wait = None
        if ex.dead or ex.resp_done:
            return
        sub = ex.subset
        if sub is not None:
            tr = sub.traffic
            cur = tr.all if sub.version is None else tr.subsets.get(sub.version)
            if cur is not sub and cur is not None and cur.cluster.keys:
                # A snapshot came since the last try: retry among the endpoints the mesh has now
                # (still excluding the endpoints tried, by address).
                keys = sub.cluster.keys
                tried = {keys[i] for i in ex.excluded} if ex.excluded else set()
                last = keys[ex.index] if ex.index is not None else None
                new_keys = cur.cluster.keys
                ex.subset = cur
                ex.cluster = cur.cluster
                ex.index = new_keys.index(last) if last in new_keys else None
                ex.excluded = {i for i, k in enumerate(new_keys) if k in tried} or None
        cluster = ex.cluster
        n = len(cluster.keys)
        excluded = ex.excluded
        if excluded is None:
            excluded = ex.excluded = set()
        if ex.index is not None:
            excluded.add(ex.index)
        if len(excluded) >= n:  # every endpoint tried: any but the last one
            excluded.clear()
            if n > 1 and ex.index is not None:
                excluded.add(ex.index)
        ex.resend = True
        ex.fresh_retry = False
        ex.tries_left = connect_tries(n, self.stack.max_tries)
        self._pick(ex)

    def _skipped(self, ex: Exchange, up: _Upstream, reusable: bool) -> None:
        """The answer the retry layer took is read (or the connection given up): back off, then retry."""
        ex.up = None
        if up.write_paused:
            self._resume(P_UPSTREAM)
        key = ex.key
        if key is not None:
            ex.key = None
            _dec(self.state.in_flight, key)
        if reusable and ex.pending is None:
            self.stack.pool.release(up)
        else:
            up.close()
        if not (ex.dead or ex.resp_done):
            self._backoff(ex)

    def _try_timed_out(self, ex: Exchange) -> None:
        ex.try_timer = None
        if ex.dead or ex.resp_done or ex.resp_started:
            return
        if not self._try_failed(ex, "timeout", self._drop_upstream(ex)):
            self._reply(ex, 504, FLAG_UPSTREAM_TIMEOUT, b"upstream request timeout\n")

    # -- balance, connect, send

    def _pick(self, ex: Exchange) -> None:
        cluster = ex.cluster
        idx = self.stack.balance.pick(self.state, cluster, ex.excluded or (), ex)
        if idx is None:
            lane = ex.lane
            if lane is not None and lane.outlier.ejections_total:
                now = monotonic()
                if lane.outlier.any_ejected(now) and not lane.outlier.healthy(cluster.keys, now):
                    # every endpoint ejected by outlier detection: answer at once, call no one
                    self._reply(ex, 503, FLAG_NO_HEALTHY_UPSTREAM, b"no healthy upstream\n")
                    return
            self._reply(ex, 503, FLAG_CONNECT_FAILURE, b"upstream connect error\n")
            return
        key = cluster.keys[idx]
        ex.index = idx
        ex.key = key
        counts = self.state.in_flight
        counts[key] = counts.get(key, 0) + 1
        lane = ex.lane
        if lane is not None and ex.try_timer is None and lane.per_try_timeout is not None and ex.retry_on is not None:
            ex.try_timer = self.loop.call_later(lane.per_try_timeout, self._try_timed_out, ex)
        up = self.stack.pool.acquire(key)
        if up is not None:
            ex.reused = True
            self._attach(ex, up)
        else:
            ex.reused = False
            self.loop.create_task(self._connect(ex, key, cluster))

    async def _connect(self, ex: Exchange, key: tuple[str, int], cluster: Cluster) -> None:
        state = self.state
        stack = self.stack
        if ex.dead or ex.resp_done:
            return
        attempt = ex.attempt  # once it changes, a retry owns the exchange: this connect is stale
        tr = ex.traffic
        breaker = tr.breaker if tr is not None and stack.breaker else None
        made: list[_Upstream] = []
        if breaker is not None:
            # 4. circuit breaker: requests waiting for a connection, and connections, are limited too
            if not breaker.try_acquire_pending():
                self._reply(ex, 503, FLAG_OVERFLOW, b"upstream overflow\n")
                return
            if not breaker.try_acquire_connection():
                breaker.release_pending()
                self._reply(ex, 503, FLAG_OVERFLOW, b"upstream overflow\n")
                return

        def factory() -> _Upstream:
            up = _Upstream(stack.pool, key, breaker)  # releases the breaker's connection when lost
            made.append(up)
            return up

        try:
            tls = state.tls
            ctx, hostname = hop_tls(tls, cluster)
            connect = stack.connect
            if connect is None and ctx is not None and cluster.protocol in H2_PROTOCOLS:
                connect = stack.connect_h2   # an HTTP/2 service: streams on an h2 hop (ALPN), if the peer offers it
            if connect is None:
                made_connection = self.loop.create_connection(factory, key[0], key[1], ssl=ctx,
                                                              server_hostname=hostname)
            else:   # the connector checks the peer of each connection it opens
                index = ex.index
                made_connection = connect(self.loop, factory, key[0], key[1], ctx, hostname,
                                          lambda transport: check_peer(tls, transport, cluster, index))
            _, up = await asyncio.wait_for(made_connection, stack.connect_timeout)
            if ctx is not None and connect is None:
                check_peer(tls, up.transport, cluster, ex.index)
        except asyncio.CancelledError:
            if breaker is not None:
                breaker.release_pending()
                if not made or made[0].transport is None:
                    breaker.release_connection()
            raise
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, timeout, TLS: try elsewhere
            state.connect_failed(key)
            log.debug("connect to %s:%s failed: %r", key[0], key[1], exc)
            if breaker is not None:
                breaker.release_pending()
                if not made or made[0].transport is None:
                    breaker.release_connection()
            if tr is not None and stack.outlier:
                tr.outlier.record(key, "connect-failure", monotonic())
            if ex.attempt != attempt:
                return
            if ex.key is not None:
                ex.key = None
                _dec(state.in_flight, key)
            if ex.dead or ex.resp_done:
                return
            if ex.excluded is None:
                ex.excluded = set()
            ex.excluded.add(ex.index)
            ex.tries_left -= 1
            if ex.tries_left > 0:
                self._pick(ex)
            else:
                self._reply(ex, 503, FLAG_CONNECT_FAILURE, b"upstream connect error\n")
            return
        if breaker is not None:
            breaker.release_pending()
        state.connect_succeeded(key)
        if ex.dead or ex.resp_done or ex.attempt != attempt:
            stack.pool.release(up)
            return
        self._attach(ex, up)

    def _head(self, ex: Exchange, cluster: Cluster, host: bytes | None) -> bytes:
        """The request head sent to an endpoint of `cluster` (mesh headers on mesh hops)."""
        parts = [ex.method, b" ", ex.target, b" HTTP/1.1\r\n"]
        if host is not None:
            parts += (b"host: ", host, b"\r\n")
        elif cluster.mesh:
            parts += (b"host: ", cluster.name.encode(), b"\r\n")
        parts += ex.lines
        if ex.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif ex.upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", ex.upgrade, b"\r\n")
        if ex.grpc_timeout is not None:
            parts += (b"grpc-timeout: ", ex.grpc_timeout, b"\r\n")
        if cluster.mesh:
            parts.append(self.stack.mesh_headers)
        if ex.added is not None:
            put_fields(parts, ex.added)
        if ex.traceparent is not None:   # a field as put_fields writes one, kept apart: on every request
            parts.append(b"traceparent: ")
            parts.append(ex.traceparent)
            parts.append(b"\r\n")
        if ex.trace_fields is not None:
            put_fields(parts, ex.trace_fields)
        parts.append(b"\r\n")
        return join(parts)

    def _attach(self, ex: Exchange, up: _Upstream) -> None:
        up.attach(ex)
        ex.up = up
        if ex.reused and ex.traffic is not None:
            self.state.watch(up)  # dead-peer safety net (ProxyState): pooled mesh connections only
        body = ex.held if ex.fresh_retry or ex.resend else ex.pending
        if not ex.reused and not ex.keep_held:
            ex.held = None  # a fresh connection is not retried (unless the retry layer holds the body)
        head = self._head(ex, ex.cluster, ex.host)
        if self.write_paused:
            up.pause_reading()
        if self.feeding and ex is self.cur and not ex.fresh_retry:
            # Still parsing this request: body bytes of the same read join the head in one write.
            ex.pending = [head, *body] if body else [head]
            self.cork = ex
            return
        if body:
            _send(self.writes, up.transport, [head, *body])
        else:
            _write(self.writes, up.transport, head)
        ex.pending = None
        ex.pending_bytes = 0
        if self.paused & P_PENDING:
            self._resume(P_PENDING)

    def _uncork(self, ex: Exchange) -> None:
        pending = ex.pending
        ex.pending = None
        ex.pending_bytes = 0
        up = ex.up
        if up is not None and pending:
            _send(self.writes, up.transport, pending)
        if self.paused & P_PENDING:
            self._resume(P_PENDING)
