"""The results: a table on stdout, bench/RESULTS.md (README-ready), bench/results.png."""

from __future__ import annotations

from pathlib import Path

PATH_TITLES = {"direct": "direct (no proxy)", "mesh": "mesh sidecar pair", "haproxy": "HAProxy pair",
               "envoy": "Envoy pair"}
PROXY_PATHS = ("mesh", "haproxy", "envoy")
MIB = 1024.0


def _f(v, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _mib(kib) -> str:
    return "-" if kib is None else f"{kib / MIB:.1f}"


def _x_reference(dp: dict, sc: str, path: str, ref: str) -> float | None:
    """req/s of `path` over the reference path `ref` (haproxy, envoy or direct) in load `sc`: the
    round-by-round median where the ratios have it, else the medians' quotient."""
    s, ratios = dp["summary"][sc], dp["ratios"].get(sc, {})
    if path == ref:
        return 1.0 if ref in s else None
    if path == "mesh" and f"rps_mesh_over_{ref}" in ratios:
        return ratios[f"rps_mesh_over_{ref}"]
    if ref == "direct" and f"rps_{path}_over_direct" in ratios:
        return ratios[f"rps_{path}_over_direct"]
    if (path, ref) == ("envoy", "haproxy") and "rps_envoy_over_haproxy" in ratios:
        return ratios["rps_envoy_over_haproxy"]
    mine, theirs = s.get(path), s.get(ref)
    return mine["rps"] / theirs["rps"] if mine and theirs and theirs["rps"] else None


def _cpu_pair(c: dict) -> str:
    return f"{c['outbound']:.4f} + {c['inbound']:.4f} = {c['pair']:.4f}" if c else "-"


def _rss_pair(rss: dict) -> str:
    return f"{_mib(rss.get('outbound'))} / {_mib(rss.get('inbound'))}" if rss else "-"


def datapath_table(dp: dict) -> list[str]:
    s = dp["summary"]
    lines = ["| load | path | req/s | x HAProxy | x Envoy | x direct | p50 / p90 / p99 ms | CPU-s per 1000 req (out + in = pair) | peak RSS out / in MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sc, title in dp["scenarios"].items():
        if sc not in s:
            continue
        for path in ("direct",) + PROXY_PATHS:
            r = s[sc].get(path)
            if r is None:
                continue
            xh, xe, xd = (_x_reference(dp, sc, path, ref) for ref in ("haproxy", "envoy", "direct"))
            lat = r["latency_ms"]
            cpu, mem = _cpu_pair(r["cpu_s_per_1000"]), _rss_pair(r["peak_rss_kib"])
            err = f" ({r['errors']} errors)" if r["errors"] else ""
            lines.append(f"| {title} | {PATH_TITLES[path]} | {r['rps']:,.0f}{err} | {_f(xh)} | {_f(xe)} | {_f(xd)} | "
                         f"{lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} | {cpu} | {mem} |")
    return lines


def mesh_vs_envoy(dp: dict) -> list[str]:
    """The mesh pair over the Envoy pair per load, each ratio taken round by round, then the median."""
    rows = []
    for sc, title in dp["scenarios"].items():
        r = dp["ratios"].get(sc, {})
        if r.get("rps_mesh_over_envoy") is None:
            continue
        rows.append(f"| {title} | {_f(r.get('rps_mesh_over_envoy'))} | {_f(r.get('cpu_mesh_over_envoy'))} | "
                    f"{_f(r.get('p50_mesh_over_envoy'))} | {_f(r.get('p99_mesh_over_envoy'))} | "
                    f"{_f(r.get('hwm_mesh_over_envoy'))} |")
    if not rows:
        return []
    return ["meshd / Envoy, per round then the median (above 1: meshd makes more req/s; below 1: meshd uses "
            "less CPU per request, less latency, less peak memory):", "",
            "| load | req/s | CPU per request (pair) | p50 | p99 | peak RSS (pair) |", "|---|---|---|---|---|---|",
            *rows, ""]


def h2_section(h2: dict) -> list[str]:
    """The HTTP/2 and gRPC data path (bench/h2path.py): table, meshd / Envoy ratios, checks, profile."""
    L = [H2_HEADING, ""]
    if h2.get("skipped"):
        return L + [f"Skipped: {h2['skipped']}.", ""]
    o = h2["options"]
    kinds = h2["kinds"]
    L += ["Load: h2load (nghttp2, one thread, closed loop, `:authority: payments`): "
          + "; ".join(f"`{k}` {t}" for k, t in h2["loads"].items())
          + ". App: nghttpd (nghttp2's server, one thread, h2c) answering from files; calls: "
          + "; ".join(f"`{k}` {v['title']}" for k, v in kinds.items())
          + " (the gRPC answer: `content-type: application/grpc`, one message, trailer `grpc-status: 0`). "
          f"{o['rounds']} interleaved rounds x {o['duration']} s after a {o['warmup']:g} s warm-up per path and "
          "load; medians, ratios per round then the median. Latency quantiles from h2load's per-request log. "
          "Each call kind has its own processes: mesh pair with payments' `mesh.protocol` "
          + " / ".join(f"`{v['protocol']}`" for v in kinds.values())
          + " in its snapshot (the outbound sniffs the client's HTTP/2 preface; the hop between the sidecars is "
          "what the product speaks for that protocol; the inbound reaches the app over pooled h2c), outbound in "
          f"{o['mode']} capture mode. HAProxy pair: `proto h2` from the client and to the app, ALPN `h2` over "
          "TLS 1.3 between the pair with client certificates verified against the mesh CA both ways. Envoy pair "
          "(`bench/envoy_pair.py`, `http2`): HTTP/2 codec on both listeners, `http2_protocol_options` upstream, "
          "ALPN `h2`, TLS 1.3 with client certificates and both SPIFFE URI SANs checked, `--concurrency 1`. "
          "Every proxy one process with one thread or event loop.", ""]
    busy = h2.get("busy_before_rounds") or []
    lavg = h2.get("loadavg") or {}
    unatt = [r.get("unattributed_cpu_share_median") for sc in h2["summary"].values() for r in sc.values()]
    unatt = [u for u in unatt if u is not None]
    if busy or lavg:
        L += ["Other load on the machine (shared with other work while this ran): load average "
              + (f"{lavg['start']} at the start, {lavg['end']} at the end; " if lavg else "")
              + (f"CPU busy before a round (share of one CPU, 0.5 s probe): median {sorted(busy)[len(busy) // 2]:.2f}, "
                 f"max {max(busy):.2f}; " if busy else "")
              + (f"CPU charged to no measured process, median per run: {sorted(unatt)[len(unatt) // 2]:.2f} "
                 f"of a CPU (max {max(unatt):.2f}); " if unatt else "")
              + f"{h2.get('waited_for_quiet_s', 0):g} s waited for quiet.", ""]
    for kind, k in kinds.items():
        for path, why in (k.get("skipped") or {}).items():
            L += [f"{kind}: {path} pair skipped: {why}.", ""]
    L += ["| call | load | path | req/s | x Envoy | x HAProxy | x direct | p50 / p99 ms | "
          "CPU-s per 1000 req (out + in = pair) | peak RSS out / in MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sc, title in h2["scenarios"].items():
        s, rt = h2["summary"].get(sc, {}), h2["ratios"].get(sc, {})
        kind, load = sc.split("-", 1)
        for path in ("direct",) + PROXY_PATHS:
            r = s.get(path)
            if r is None:
                continue
            xe = 1.0 if path == "envoy" else rt.get("rps_mesh_over_envoy") if path == "mesh" else None
            xh = 1.0 if path == "haproxy" else rt.get("rps_mesh_over_haproxy") if path == "mesh" else None
            xd = 1.0 if path == "direct" else rt.get(f"rps_{path}_over_direct")
            if path == "haproxy" and s.get("envoy", {}).get("rps"):
                xe = r["rps"] / s["envoy"]["rps"]
            if path == "envoy" and s.get("haproxy", {}).get("rps"):
                xh = r["rps"] / s["haproxy"]["rps"]
            err = f" ({r['errors']} errors)" if r["errors"] else ""
            lat = r["latency_ms"]
            L.append(f"| {kinds[kind]['title']} | {h2['loads'].get(load, load)} | {PATH_TITLES[path]} | "
                     f"{r['rps']:,.0f}{err} | {_f(xe)} | {_f(xh)} | {_f(xd)} | {lat['p50']:.3f} / {lat['p99']:.3f} | "
                     f"{_cpu_pair(r['cpu_s_per_1000'])} | {_rss_pair(r['peak_rss_kib'])} |")
    L.append("")
    rows = []
    for sc in h2["scenarios"]:
        r = h2["ratios"].get(sc, {})
        if r.get("rps_mesh_over_envoy") is None:
            continue
        kind, load = sc.split("-", 1)
        rps, cpu = r.get("rps_mesh_over_envoy"), r.get("cpu_mesh_over_envoy")
        goal = "met" if rps >= 1.0 and cpu is not None and cpu <= 1.0 else "NOT met"
        rows.append(f"| {kinds[kind]['title']}; {h2['loads'].get(load, load)} | {_f(rps)} | {_f(cpu)} | "
                    f"{_f(r.get('p50_mesh_over_envoy'))} | {_f(r.get('p99_mesh_over_envoy'))} | "
                    f"{_f(r.get('hwm_mesh_over_envoy'))} | {goal} |")
    if rows:
        L += ["meshd / Envoy, per round then the median (the goal: req/s at least 1, CPU per request at most 1):",
              "", "| call; load | req/s | CPU per request (pair) | p50 | p99 | peak RSS (pair) | goal |",
              "|---|---|---|---|---|---|---|", *rows, ""]
    for kind, k in kinds.items():
        checks = "; ".join(f"{p} {c['status']}" + (f" grpc-status {c['trailers'].get('grpc-status')}"
                                                     if "grpc-status" in c["trailers"] else "")
                           for p, c in k.get("checks", {}).items())
        ev = k.get("evidence") or {}
        seen = []
        for role, lines in sorted((ev.get("mesh") or {}).items()):
            tls = sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("mesh_tls_connections_total"))
            seen.append(f"meshd {role}: `mesh_tls_connections_total` {tls:,.0f}")
        for role, st in sorted((ev.get("envoy") or {}).items()):
            hs = sum(v for n, v in st.items() if n.endswith("ssl.handshake"))
            up = sum(v for n, v in st.items() if n.endswith("upstream_cx_http2_total"))
            seen.append(f"Envoy {role}: {hs:,} TLS handshakes, {up:,} upstream HTTP/2 connections")
        for role, st in sorted((ev.get("haproxy") or {}).items()):
            seen.append(f"HAProxy {role}: {st.get('CumSslConns', 0):,} TLS connections")
        L += [f"`{kind}` after the rounds: one call per path answered {checks}; the proxies' own counters over "
              "the whole run: " + "; ".join(seen) + ".", ""]
    for kind, prof in (h2.get("profile") or {}).items():
        if prof.get("skipped"):
            L += [f"Profile of the `{kind}` mesh pair skipped: {prof['skipped']}", ""]
            continue
        svgs = sorted(r["svg"] for r in prof.get("roles", {}).values() if r.get("svg"))
        L += [f"py-spy (--native) of the `{kind}` mesh pair under {prof.get('scenario', '')} (req/s while "
              f"profiled: {', '.join(f'{x:,.0f}' for x in prof.get('rps_while_profiled', []))}"
              + (f"; flame graphs {', '.join(f'`{x}`' for x in svgs)}" if svgs else "") + "):", ""]
        for role, r in sorted(prof.get("roles", {}).items()):
            if "categories" not in r:
                L.append(f"- {role}: {r.get('error', 'no data')}")
                continue
            L.append(f"- **{role}**, all busy samples: " + "; ".join(f"{a} {b}%" for a, b in r["categories"][:8]))
            L.append("  - Python functions (share of user space): "
                     + "; ".join(f"`{a}` {b}%" for a, b in r["top_python_self"][:10]))
        L.append("")
    return L


def _sidecar_cpu_us(dp: dict | None, sc: str = "c32") -> dict | None:
    """role -> (user, user + kernel) CPU microseconds per request of the default mesh pair."""
    us = (((dp or {}).get("summary") or {}).get(sc, {}).get("mesh") or {}).get("cpu_user_sys_per_1000")
    if not us:
        return None
    return {role: (v[0] * 1000, (v[0] + v[1]) * 1000) for role, v in us.items()}


def _share(us: float, cpu: tuple[float, float] | None) -> str:
    return "-" if not cpu else f"{us / cpu[0] * 100:.1f}% / {us / cpu[1] * 100:.1f}%"


def telemetry_cost(res: dict) -> list[str]:
    """The hot-path micro-benchmark (bench/hotpath.py) and the data path's telemetry variants."""
    hp = res.get("hotpath")
    dp = res.get("datapath")
    dp = dp if isinstance(dp, dict) and not dp.get("error") else None
    variants = dict(sorted(((dp or {}).get("variants") or {}).items(),
                           key=lambda kv: (kv[1]["telemetry"]["sampling"], kv[0])))  # least telemetry first
    if not (isinstance(hp, dict) and hp.get("pieces")) and not variants:
        return []
    L = ["## Cost of metrics and tracing", ""]
    cpu = _sidecar_cpu_us(dp)
    if isinstance(hp, dict) and hp.get("pieces"):
        pc = hp["pieces"]
        any_piece = next(iter(pc.values()))
        L += ["What sidecar/proxy.py does per request for metrics and tracing, timed in-process with the "
              "product's objects (`bench/hotpath.py`, no sockets): CPU time of the calling thread (user + "
              f"kernel) per call, median of {hp.get('repeats', any_piece['repeats'])} repeats of about "
              f"{hp.get('seconds_per_repeat', 0.2):g} s (spans: twice as many repeats of at most "
              f"{hp.get('span_batch', 2000):,} calls, within the exporter's queue), net of the timing loop's empty "
              f"call ({any_piece['empty_call_us']:.2f} us). A sampled span also costs its export: the process's "
              "CPU over all threads (queue flushed in each repeat) minus the caller's. No span leaves the process: Tracing.collector is None (meshd's receiver is set "
              "only by `sidecar run`) and no OTLP endpoint is set, so Tracing.targets() is "
              f"{hp.get('span_targets') or 'empty'}; "
              "with no target the exporter drops a batch before encoding it (sidecar/otel.py), so the export rows below are the queue's own bookkeeping; what a target adds (the OTLP JSON encoding, before the POST) is timed on its own in the last row. Access log: configured by "
              "meshproc.runtime.configure_logging (the line written by its EventLine, past structlog's processor chain), its stream /dev/null (a write per line, "
              f"{hp.get('access_log_line_bytes', '?')} bytes)."]
        if cpu:
            L[-1] += (f" For scale, the share of the sidecar's own CPU per request in this run's data path "
                      f"(32 connections, default settings): outbound {cpu['outbound'][0]:.1f} us user, "
                      f"{cpu['outbound'][1]:.1f} us user + kernel; inbound {cpu['inbound'][0]:.1f} / "
                      f"{cpu['inbound'][1]:.1f} us.")
        L += ["", "| once per request | sidecar | us per call | share of that sidecar's CPU per request: user / user + kernel |",
              "|---|---|---|---|"]

        def row(title: str, role: str, us: float) -> None:
            roles = ("outbound", "inbound") if role == "both" else (role,)
            shares = "; ".join((f"{r} " if role == "both" else "") + _share(us, (cpu or {}).get(r)) for r in roles)
            L.append(f"| {title} | {'each' if role == 'both' else role} | {us:.2f} | {shares} |")

        for key in ("metrics_source", "metrics_destination", "trace_new", "trace_parent", "access_log",
                    "span_outbound", "span_inbound", "span_encode"):
            r = pc.get(key)
            if r is None:
                continue
            row(r["title"], r["sidecar"], r["us"])
            if "us_other_threads" in r:
                row("&nbsp;&nbsp;+ its export with no target (the exporter thread taking it from the queue)",
                    r["sidecar"], r["us_other_threads"])
        L.append("")
        get = lambda k, f="us": (pc.get(k) or {}).get(f, 0.0)  # noqa: E731
        every = get("metrics_source") + get("metrics_destination") + get("trace_new") + get("trace_parent")
        span_all = (get("span_outbound", "us_all_threads") + get("span_inbound", "us_all_threads"))
        logs = 2 * get("access_log")
        pair_user = (cpu["outbound"][0] + cpu["inbound"][0]) if cpu else None
        pair_all = (cpu["outbound"][1] + cpu["inbound"][1]) if cpu else None
        pct = (lambda us: f" ({us / pair_user * 100:.0f}% of the pair's {pair_user:.1f} us user CPU, "
               f"{us / pair_all * 100:.0f}% of its {pair_all:.1f} us user + kernel)") if cpu else (lambda us: "")
        L += [f"- Every request, production defaults (sampling 1%, access log `errors`), through the pair: "
              f"metrics and trace context {every:.1f} us{pct(every)}; the 1% sampled are also spanned and "
              f"logged at both hops: {0.01 * (span_all + logs):.2f} us per request on average.",
              f"- Sampling 100% and access log `full` add two spans ({span_all:.1f} us with their export) and two "
              f"log lines ({logs:.1f} us) per request: {span_all + logs:.1f} us{pct(span_all + logs)} by this "
              "count; measured end to end below.", ""]
    if variants:
        loads = next(iter(variants.values())).get("scenarios", [])
        o = dp["options"]
        L += ["The data path with other telemetry settings: more mesh pairs, the same as the default one but "
              "for their snapshot's telemetry settings, in the same "
              f"{o['rounds']} interleaved rounds x {o['duration']:g} s as the rows above (at 0% every request "
              "still gets its trace context and `traceparent`). Spans are recorded "
              "and batched, then dropped unencoded (no OTLP endpoint, and meshd's receiver is not set in the "
              "bench; Tracing.targets() as the sidecars reported it: " + "; ".join(
                  f"{v} {role} {', '.join(info.get('span_targets') or []) or 'none'}"
                  for v, var in variants.items() for role, info in sorted(var.get("sidecars", {}).items()))
              + "): the cost of recording them, not of encoding them (timed above) or of the POST to meshd's "
              "store that a deployed sidecar also makes. Sidecar output goes through a pipe to the harness, as to `docker logs`.", "",
              "| load | mesh sidecar pair | req/s | p50 / p99 ms | CPU us per request: out + in = pair | "
              "user + kernel, pair | log bytes per request out / in |", "|---|---|---|---|---|---|---|"]

        def title(v: str) -> str:
            t = variants[v]["telemetry"]
            return f"sampling {t['sampling']:g}%, access log `{t['access_log']}`"

        for sc in loads:
            s = dp["summary"].get(sc, {})
            rt = dp["ratios"].get(sc, {})
            name = dp["scenarios"].get(sc, sc)

            def vrow(label: str, r: dict) -> None:
                c = r["cpu_s_per_1000"]
                us = r["cpu_user_sys_per_1000"]
                user = sum(v[0] for v in us.values()) * 1000
                kern = sum(v[1] for v in us.values()) * 1000
                lb = r.get("log_bytes_per_request") or {}
                L.append(f"| {name} | {label} | {r['rps']:,.0f} | {r['latency_ms']['p50']:.3f} / "
                         f"{r['latency_ms']['p99']:.3f} | {c['outbound'] * 1000:.1f} + {c['inbound'] * 1000:.1f} = "
                         f"{c['pair'] * 1000:.1f} | {user:.1f} + {kern:.1f} | "
                         f"{_f(lb.get('outbound'), '{:.0f}')} / {_f(lb.get('inbound'), '{:.0f}')} |")

            rows = [(v, s.get(v)) for v in variants if s.get(v)]
            order = [r for r in rows if variants[r[0]]["telemetry"]["sampling"] < 1.0]
            order += [("mesh", s.get("mesh"))] + [r for r in rows if r not in order]
            for v, r in order:
                if r is None:
                    continue
                vrow("production defaults (sampling 1%, access log `errors`)" if v == "mesh" else title(v), r)
            for v, _r in rows:
                add = rt.get(f"cpu_us_added_{v}")
                user = rt.get(f"user_us_added_{v}")
                L.append(f"| | {v} / defaults, per round | {_f(rt.get(f'rps_{v}_over_mesh'))}x | "
                         f"{_f(rt.get(f'p50_{v}_over_mesh'))}x / {_f(rt.get(f'p99_{v}_over_mesh'))}x | "
                         f"{_f(add, '{:+.1f}')} us ({_f(rt.get(f'cpu_{v}_over_mesh'))}x) | "
                         f"user {_f(user, '{:+.1f}')} us | |")
        L.append("")
        counted = []
        for v, var in variants.items():
            for role, c in sorted((var.get("counts") or {}).items()):
                if var["telemetry"]["sampling"] > 0:
                    counted.append(f"{v} {role} {c.get('bench_spans_encoded_total', 0):,.0f} of "
                                   f"{c.get('istio_requests_total', 0):,.0f} requests")
        if counted:
            L += ["Spans handed to the exporter (`bench_spans_encoded_total`, all runs of the pair): "
                  + "; ".join(counted) + " (fewer: spans dropped by the exporter's full queue, or still queued).", ""]
    return L


def targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue's targets."""
    out = []
    dp = res.get("datapath") or {}
    r = dp.get("ratios", {})
    cp = res.get("controlplane") or {}
    st = res.get("startup") or {}

    def check(name: str, value, op: str, limit: float, fmt: str = "{:.2f}", unit: str = "") -> None:
        if value is None:
            out.append((name, "not measured", "n/a"))
            return
        ok = value >= limit if op == ">=" else value <= limit
        out.append((name, fmt.format(value) + unit, "met" if ok else "NOT met"))

    c32, c1 = r.get("c32", {}), r.get("c1", {})
    check("req/s at 32 connections >= 0.8x HAProxy", c32.get("rps_mesh_over_haproxy"), ">=", 0.8, unit="x")
    check("p99 <= 1.5x HAProxy (32 connections)", c32.get("p99_mesh_over_haproxy"), "<=", 1.5, unit="x")
    check("p99 <= 1.5x HAProxy (1 connection)", c1.get("p99_mesh_over_haproxy"), "<=", 1.5, unit="x")
    check("p99 <= 1.5x HAProxy (new connection per request)", r.get("close", {}).get("p99_mesh_over_haproxy"),
          "<=", 1.5, unit="x")
    check("proxy CPU per request <= 1.3x HAProxy (32 connections, pair)", c32.get("cpu_mesh_over_haproxy"),
          "<=", 1.3, unit="x")
    # the data-path issue's bar against the proxy Istio users run
    check("req/s at 32 connections >= 2.3x Envoy's", c32.get("rps_mesh_over_envoy"), ">=", 2.3, unit="x")
    check("proxy CPU per request <= 0.5x Envoy's (32 connections, pair)", c32.get("cpu_mesh_over_envoy"),
          "<=", 0.5, unit="x")
    added = c1.get("added_p50_mesh_over_haproxy")
    if added is not None:
        check(f"added p50 over direct at 1 connection <= 2x HAProxy's (mesh +{c1['added_p50_ms_mesh'] * 1000:.0f} us,"
              f" HAProxy +{c1['added_p50_ms_haproxy'] * 1000:.0f} us)", added, "<=", 2.0, unit="x")
    else:
        check("added p50 over direct at 1 connection <= 2x HAProxy's", None, "<=", 2.0)
    mem = dp.get("memory", {})
    idle = [v["rss_kib"] / MIB for k, v in mem.get("idle_kib", {}).items() if k.startswith("mesh/")]
    for sc, title in (("c32", "32 connections"), ("close", "new connection per request"), ("c1", "1 connection")):
        peak = ((dp.get("summary") or {}).get(sc, {}).get("mesh") or {}).get("peak_rss_kib")
        if peak or sc == "c32":
            check(f"RSS per sidecar under load <= 35 MiB ({title}: peak, larger of the two)",
                  max(peak.values()) / MIB if peak else None, "<=", 35, "{:.1f}", " MiB")
    check("RSS per sidecar idle <= 30 MiB (larger of the two)", max(idle) if idle else None, "<=", 30, "{:.1f}", " MiB")
    real = [v / MIB for k, v in (st.get("node_rss_kib") or {}).items() if "gateway" not in k]
    check("RSS per sidecar idle <= 30 MiB (the demo's real sidecar containers, largest)",
          max(real) if real else None, "<=", 30, "{:.1f}", " MiB")
    p100 = (cp.get("push") or {}).get("100")
    check("config change ACKed by 100 sidecars within 200 ms p99",
          p100["change_to_all_acked_ms"]["p99"] if p100 else None, "<=", 200, "{:.0f}", " ms")
    check(">= 500 CSRs signed per second", (cp.get("csr") or {}).get("per_second"), ">=", 500, "{:,.0f}", "/s")
    check("demo sidecars ready within 10 s of `compose up`", st.get("all_ready_s"), "<=", 10, "{:.1f}", " s")
    h2 = res.get("h2") or {}
    for sc, title in (h2.get("scenarios") or {}).items():
        r = (h2.get("ratios") or {}).get(sc, {})
        check(f"{title}: req/s >= Envoy's", r.get("rps_mesh_over_envoy"), ">=", 1.0, unit="x")
        check(f"{title}: CPU per request <= Envoy's (pair)", r.get("cpu_mesh_over_envoy"), "<=", 1.0, unit="x")
    return out


def text_report(res: dict) -> list[str]:
    m = res["machine"]
    L = []
    if res.get("quick"):
        L += ["> **Quick run** (short runs): a harness check, not figures to quote.", ""]
    L += ["## Machine", "",
          f"{m['date']}; {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}; "
          f"Python {m['python']} (sidecars on {m.get('node_python') or m['python']}, data path "
          f"{m.get('data_path', 'Python source')}), uvloop {m['uvloop']}, httptools {m['httptools']}, {m['openssl']}; "
          + "; ".join(m[k] for k in ("haproxy", "envoy", "nginx", "wrk", "h2load") if m.get(k))
          + f". Code: {res.get('code', '?')}.", ""]
    if res.get("merged_from", {}).get("parts"):
        mf = res["merged_from"]
        L += [f"({', '.join(mf['parts'])}: from the run of {mf['date']}"
              + (f"; code: {mf['code']}" if mf.get("code") else "") + ".)", ""]
    for key, title in (("datapath", "Data path"), ("h2", "HTTP/2 and gRPC"), ("hotpath", "Cost of metrics and tracing"),
                       ("controlplane", "Control plane"), ("startup", "Start-up"), ("memory_breakdown", "Memory")):
        part = res.get(key)
        if isinstance(part, dict) and part.get("error"):
            L += [f"## {title}", "", f"**Failed:** {part['error']}", ""]
    dp = res.get("datapath")
    if dp and dp.get("error"):
        dp = None
    if dp:
        o = dp["options"]
        L += ["## Data path", "",
              f"Load: {dp['load_tool']} (one thread, closed loop, keep-alive unless noted), `Host: payments`; app: "
              f"{dp['app']} returning a fixed 100-byte body; {o['rounds']} interleaved rounds x {o['duration']:g} s "
              f"after a {o['warmup']:g} s warm-up per path; medians. Ratios are taken round by round "
              f"(mesh vs the HAProxy, Envoy and direct runs of the same round), then the median. CPU from "
              f"/proc/<pid>/stat (utime + stime) of each proxy process; peak RSS is VmHWM, reset when each load starts "
              f"(the same processes serve the loads in turn, c1, c32, close: each peak starts from the RSS the "
              f"earlier loads left). Outbound sidecar in "
              f"{o['mode']} capture mode (routing by Host header). The sidecars start as in the image "
              f"(`bench/env.py` product_python: a venv of the image's interpreter, Debian's python3.11 when the "
              f"host has it, whose only .pth lists the checkout and the package directories, so no foreign "
              f".pth hook of this machine runs in them).", ""]
        mesh = dp.get("mesh") or {}
        out_info, in_info = mesh.get("outbound", {}), mesh.get("inbound", {})
        if out_info:
            ver = mesh.get("verified", {})
            seen = [ln.split("{")[0] + "{" + ln.split("{")[1].split("}")[0] + "}" for role in ver.values()
                    for ln in role if ln.startswith("mesh_tls_connections_total")]
            L += [f"Mesh pair: each sidecar its own process (`bench/sidecar_runner.py`: the product's "
                  f"ProxyState, route table from a snapshot pushed through ControlClient.handle_push, metrics "
                  f"and admin port on; assembly `{out_info.get('assembly')}`: TLS hook "
                  f"`{out_info.get('tls')}`, inbound listener `{in_info.get('inbound')}`). "
                  f"Certificates: EC P-256 leaves for spiffe://mesh.local/ns/bench/sa/frontend and .../payments "
                  f"signed by a fresh certs.CertificateAuthority; TLS 1.3, client certificate required. "
                  + (f"The sidecars' own metrics after the check request: {', '.join(f'`{x}`' for x in seen)}. "
                     if seen else "")
                  + "HAProxy pair: one process each, `nbthread 1`, `http-reuse always`, `verify required` "
                  "with the mesh CA both ways, TLS 1.3 (HAProxy cannot check a SPIFFE URI SAN)."
                  + (" Envoy pair (`bench/envoy_pair.py`): one process each, `--concurrency 1`, HTTP connection "
                     "manager + router on both listeners, TLS 1.3 only, client certificate required and both "
                     "peers' SPIFFE URI SAN checked, Envoy's stats on (admin port), no access log, keep-alive "
                     "upstream pools (idle timeout 1 h), circuit-breaker thresholds at 2^32-1 as Istio sets them; "
                     "no Istio telemetry filter (not in upstream Envoy)." if "envoy" in dp.get("paths", []) else ""),
                  ""]
        if dp.get("envoy_skipped"):
            L += [f"Envoy pair skipped: {dp['envoy_skipped']}.", ""]
        L += datapath_table(dp)
        L.append("")
        L += mesh_vs_envoy(dp)
        split = []
        for sc, title in dp["scenarios"].items():
            for path in PROXY_PATHS:
                us = dp["summary"].get(sc, {}).get(path, {}).get("cpu_user_sys_per_1000")
                if us:
                    split.append(f"{title}, {PATH_TITLES[path]}: " + ", ".join(
                        f"{role} {v[0] * 1000:.1f} + {v[1] * 1000:.1f}" for role, v in sorted(us.items())))
        if split:
            L += ["CPU per request split into user space + kernel (utime + stime, microseconds per request "
                  "per proxy process):", ""] + [f"- {x}" for x in split] + [""]
        sysc = dp.get("syscalls") or {}
        rows = []
        for sc, d in sysc.items():
            if not isinstance(d, dict) or d.get("skipped"):
                continue
            for path in ("mesh", "haproxy"):
                if path in d:
                    for role in ("outbound", "inbound"):
                        r = d[path].get(role)
                        if r:
                            calls = ", ".join(f"{k} {v:g}" for k, v in list(r["by_call"].items())[:6])
                            rows.append(f"| {dp['scenarios'].get(sc, sc)} | {PATH_TITLES[path]} | {role} | "
                                        f"{r['per_request']} | {calls} |")
        dso = dp.get("perf_dso") or {}
        drows = []
        groups = ("kernel", "Python interpreter", "haproxy", "OpenSSL", "uvloop", "httptools", "libc", "other")
        for sc, d in dso.items():
            if not isinstance(d, dict) or d.get("skipped"):
                continue
            for path in ("mesh", "haproxy"):
                for role in ("outbound", "inbound"):
                    r = (d.get(path) or {}).get(role)
                    if r:
                        drows.append(f"| {dp['scenarios'].get(sc, sc)} | {PATH_TITLES[path]} | {role} | "
                                     f"{_f(r['cpu_us_per_request'], '{:.1f}')} | "
                                     + " | ".join(_f(r["shares"].get(g), "{:.1f}") for g in groups) + " |")
        if drows:
            L += ["Where each proxy process's CPU goes, by binary (`perf record -e cpu-clock`, a separate run; "
                  "% of the process's samples; kernel includes the loopback TCP work done in its context):", "",
                  "| load | path | process | CPU us / request | " + " | ".join(groups) + " |",
                  "|---|---|---|---|" + "---|" * len(groups)] + drows + [""]
        if rows:
            L += ["System calls per request (`perf trace -s` on the proxy processes during a separate run):", "",
                  "| load | path | process | syscalls / request | most frequent |", "|---|---|---|---|---|"] + rows + [""]
        idle = dp["memory"]["idle_kib"]
        after = dp["memory"]["after_kib"]
        L += ["Memory per proxy process (MiB): " + "; ".join(
            f"{k} idle {_mib(idle.get(k, {}).get('rss_kib'))}, after load {_mib(after[k]['rss_kib'])}, "
            f"peak {_mib(after[k]['hwm_kib'])}" for k in sorted(after)) + ".", ""]
    mem = res.get("memory_breakdown")
    if isinstance(mem, list):
        L += ["Sidecar memory by import (fresh interpreters, cumulative):", "",
              "| step | RSS MiB | + MiB |", "|---|---|---|"]
        L += [f"| {r['step']} | {_mib(r.get('rss_kib'))} | {_mib(r.get('delta_kib'))} |" for r in mem]
        L.append("")
    h2 = res.get("h2")
    if isinstance(h2, dict) and not h2.get("error"):
        L += h2_section(h2)
    L += telemetry_cost(res)
    profiles = (dp or {}).get("profile") or {}
    if profiles:
        L += ["## Profile of the sidecars (py-spy --native)", "",
              "Flame graphs (32 connections): `profile-outbound.svg`, `profile-inbound.svg`. py-spy's native "
              "samples put more time in system calls than the processes' stime and perf say (above): the "
              "user-space shares below are the ones to read for where the Python time goes.", ""]
    for sc, prof in profiles.items():
        if prof.get("skipped"):
            L += [f"Profile skipped: {prof['skipped']}", ""]
            continue
        L += [f"**{dp['scenarios'].get(sc, sc)}** (req/s while profiled: "
              f"{', '.join(f'{x:,.0f}' for x in prof['rps_while_profiled'])}):", ""]
        for role, r in sorted(prof["roles"].items()):
            if "categories" not in r:
                L.append(f"- {role}: {r.get('error', 'no data')}")
                continue
            L.append(f"- **{role}**, user space: " + "; ".join(f"{k} {v}%" for k, v in r.get("user_categories", [])))
            L.append("  - Python functions (share of user space): "
                     + "; ".join(f"`{k}` {v}%" for k, v in r["top_python_self"][:10]))
            L.append("  - on the stack (inclusive, share of all busy samples): "
                     + "; ".join(f"`{k}` {v}%" for k, v in r["top_python_inclusive"][:8]))
        L.append("")
    cp = res.get("controlplane")
    if cp and not cp.get("error"):
        L += ["## Control plane", "",
              "meshd's Hub and rules API in one process, N real ControlClient instances (25 per process) "
              "applying each snapshot to a ProxyState; a push = `meshctl split` (POST /v1/rules/svc-0/split), "
              "timed on the hub's clock to the last ACK.", "",
              "| sidecars | rules change -> all ACKed p50 / p99 ms | publish -> all ACKed p50 / p99 ms | "
              "per-node ACK p50 ms | pushes | hub RSS MiB (idle -> N connected) |", "|---|---|---|---|---|---|"]
        for n, p in cp["push"].items():
            L.append(f"| {n} | {p['change_to_all_acked_ms']['p50']:.1f} / {p['change_to_all_acked_ms']['p99']:.1f} | "
                     f"{p['all_acked_ms']['p50']:.1f} / {p['all_acked_ms']['p99']:.1f} | {p['node_ack_p50_ms']:.1f} | "
                     f"{p['pushes']} | {_mib(p['hub_idle_memory_kib']['rss_kib'])} -> {_mib(p['hub_memory_kib']['rss_kib'])} |")
        c = cp["csr"]
        L += ["", f"CSR signing (CertificateAuthority.sign_csr, one thread): **{c['per_second']:,.0f}/s** "
              f"({c['cpu_ms_per_csr']:.2f} ms CPU each); with the node's key generation and CSR: "
              f"{c['issue_with_keygen_per_second']:,.0f}/s.", ""]
        if cp.get("apply"):
            a = cp["apply"]
            L += [f"One node's cost of a push with {a['nodes']} endpoints ({a['bytes']:,} bytes): "
                  f"decode {a['decode_ms']:.2f} ms + apply {a['apply_ms']:.2f} ms.", ""]
    st = res.get("startup")
    if st is not None and not st.get("error"):
        L += ["## Start-up", ""]
        if st.get("skipped"):
            L += [f"Skipped: {st['skipped']}.", ""]
        else:
            L += [f"`docker-compose -p shop -f compose/demo.yml up -d` (meshd already up"
                  f"{', started by the harness from compose/meshd.yml' if st.get('started_meshd') else ''}) to every sidecar's "
                  f"`/healthz/ready` 200: **{_f(st['all_ready_s'], '{:.1f}')} s** for {st['apps']} apps "
                  f"(compose itself returned after {st['compose_up_s']:.1f} s; first sidecar ready at "
                  f"{_f(st['first_ready_s'], '{:.1f}')} s)." + (f" Not ready: {', '.join(st['not_ready'])}." if st.get("not_ready") else ""),
                  ""]
            if st.get("node_rss_kib"):
                vals = sorted(st["node_rss_kib"].values())
                L += [f"Real `sidecar run` processes, idle after start: RSS {_mib(vals[0])}-{_mib(vals[-1])} MiB "
                      f"({len(vals)} nodes incl. the gateway); meshd: {_mib(st.get('meshd_rss_kib'))} MiB.", ""]
    L += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    L += [f"| {a} | {b} | {c} |" for a, b, c in targets(res)]
    L.append("")
    L += ["## Reading these figures", "",
          "- Loopback on a 2 vCPU VM: the load generator, the app and both proxies share two CPUs, so at 32 "
          "connections req/s measures CPU cost per request more than anything else, and 1-connection latency "
          "depends on which CPU each process runs on. Compare paths within one run, not with other machines.",
          "- The anchor figures (docs/PERFORMANCE.md, \"Reference figures\": HAProxy pair 47k req/s at 32 "
          "connections, p99 1.26 ms) come from a like machine; this run's HAProxy and Envoy rows are the like-for-like references.",
          "- Each run records the CPU that /proc/stat charged to tasks other than the measured ones "
          "(`unattributed` in `raw/`): kernel threads handling loopback packets, and any other load on "
          "the machine (a test suite next door). Rounds start only once the machine is quiet (within a "
          "waiting budget); ratios are per round, so slow drifts cancel out.",
          "- CPU per request is utime + stime of the proxy processes only; loopback packet work done in "
          "softirq context is not in it, for either proxy.", ""]
    return L


def replace_section(text: str, heading: str, body: str, before: tuple[str, ...] = ()) -> str:
    """`text` with the section under `heading` (to the next `## ` heading) replaced by `body`; when
    there is no such section, `body` goes before the first of the `before` headings found, else at the end."""
    lines = text.splitlines()
    new = body.rstrip("\n").splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new + ([""] if end < len(lines) else [])
        return "\n".join(lines).rstrip("\n") + "\n"
    at = next((lines.index(h) for h in before if h in lines), None)
    if at is not None:
        lines[at:at] = new + [""]
        return "\n".join(lines).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"


H2_HEADING = "## HTTP/2 and gRPC"


def write_h2_section(res: dict, path: Path) -> None:
    """The HTTP/2 and gRPC section of an existing RESULTS.md replaced by this run's (`--h2-only`):
    the other sections keep the figures of the run that wrote them."""
    m = res["machine"]
    body = h2_section(res["h2"])
    body[2:2] = [f"Measured on its own (`python -m bench --h2-only`{', quick' if res.get('quick') else ''}) "
                 f"on {m['date']}, {res.get('code', '?')}; {m['nproc']} CPUs ({m['cpu']}), sidecars on "
                 f"{m.get('node_python') or m['python']}, data path {m.get('data_path')}; "
                 + "; ".join(m[k] for k in ("haproxy", "envoy", "h2load") if m.get(k)) + ".", ""]
    text = path.read_text() if path.exists() else ""
    path.write_text(replace_section(text, H2_HEADING, "\n".join(body),
                                    before=("## Cost of metrics and tracing", "## Targets")))


def write_markdown(res: dict, path: Path) -> None:
    head = ["# meshd benchmarks", "",
            "`make bench` (or `python -m bench`; `--quick` for 1 s runs, `--help` for the options) measures the",
            "data path against HAProxy, Envoy and no proxy (HTTP/1.1, and HTTP/2 and gRPC), the cost of metrics and",
            "tracing per request, the control plane and the demo's start-up, on loopback only.",
            "Raw JSON per run: `bench/raw/` (not committed). Chart: `results.png`.", ""]
    path.write_text("\n".join(head + text_report(res)) + "\n")


def chart(res: dict, path: Path) -> str | None:
    """req/s and p99 of direct / mesh / HAProxy / Envoy per load; None when matplotlib is missing."""
    dp = res.get("datapath")
    if not dp:
        return "no data path results"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the `bench` extra)"
    s = dp["summary"]
    scs = [sc for sc in dp["scenarios"] if sc in s]
    paths = [p for p in ("direct",) + PROXY_PATHS if any(p in s[sc] for sc in scs)]
    colors = {"direct": "#9e9e9e", "mesh": "#1f77b4", "haproxy": "#ff7f0e", "envoy": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(paths))
    for ax, metric, title in ((axes[0], "rps", "requests per second"), (axes[1], "p99", "p99 latency (ms)")):
        for i, p in enumerate(paths):
            xs, ys = [], []
            for j, sc in enumerate(scs):
                r = s[sc].get(p)
                if r is None:
                    continue
                xs.append(j + (i - (len(paths) - 1) / 2) * width)
                ys.append(r["rps"] if metric == "rps" else r["latency_ms"]["p99"])
            bars = ax.bar(xs, ys, width, label=PATH_TITLES[p], color=colors[p])
            ax.bar_label(bars, labels=[f"{y:,.0f}" if metric == "rps" else f"{y:.2f}" for y in ys], fontsize=7)
        ax.set_xticks(range(len(scs)))
        ax.set_xticklabels([dp["scenarios"][sc].replace(" (", "\n(").replace(", ", ",\n", 1) for sc in scs], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"meshd data path vs HAProxy vs Envoy vs direct ({m['nproc']} vCPU, {m['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
