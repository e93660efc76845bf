// meshd dashboard: polls meshd's admin API every 2 s and draws it. No framework, no build step.
"use strict";

(function () {
  const POLL_MS = 2000;
  const MAX_COMPARE = 8;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let lastEventId = 0;
  let events = [];

  // meshd's admin token: from the URL fragment (#token=..., printed by `meshctl dashboard`; never sent
  // to a server), kept for this tab in sessionStorage, sent as a bearer header on every JSON request.
  const TOKEN_KEY = "meshd-admin-token";
  (function takeToken() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash || "");
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);  // out of the address bar
    }
  })();

  function win() { return $("window").value; }

  async function getJSON(path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const resp = await fetch(path, { headers: headers, cache: "no-store", credentials: "omit" });
    if (resp.status === 401) throw new Error("meshd wants its admin token: open the URL `meshctl dashboard` prints");
    if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
    return resp.json();
  }

  const fmtRps = (x) => (x == null ? "-" : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
  const fmtPct = (x) => (x == null ? "-" : (x * 100).toFixed(x >= 0.9995 || x === 0 ? 0 : 1) + "%");
  const fmtMs = (x) => (x == null ? "-" : x >= 10 ? x.toFixed(0) + " ms" : x.toFixed(1) + " ms");

  function health(errorRate, requests) {
    if (!requests) return "idle";
    if (errorRate >= 0.2) return "bad";
    if (errorRate > 0.01) return "warn";
    return "good";
  }
  const COLORS = { idle: "#95a5a6", good: "#27ae60", warn: "#e67e22", bad: "#c0392b" };

  function el(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }

  function h(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  // ---- service graph (layered: callers left, callees right) ----

  function layout(nodes, edges) {
    const depth = {};
    nodes.forEach((n) => { depth[n.id] = 0; });
    const incoming = {};
    edges.forEach((e) => { if (e.source !== e.destination) (incoming[e.destination] = incoming[e.destination] || []).push(e.source); });
    for (let round = 0; round < nodes.length; round++) {      // longest path, bounded (cycles stop here)
      let changed = false;
      edges.forEach((e) => {
        if (e.source === e.destination) return;
        const d = (depth[e.source] || 0) + 1;
        if (d > (depth[e.destination] || 0) && d < nodes.length) { depth[e.destination] = d; changed = true; }
      });
      if (!changed) break;
    }
    const columns = {};
    nodes.forEach((n) => { (columns[depth[n.id]] = columns[depth[n.id]] || []).push(n.id); });
    return { depth, columns };
  }

  function drawGraph(graph) {
    const svg = $("graph");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const nodes = graph.nodes || [];
    const edges = graph.edges || [];
    if (!nodes.length) {
      svg.setAttribute("height", "60");
      svg.appendChild(el("text", { x: 20, y: 35, class: "muted" }, "no mesh traffic seen yet"));
      return;
    }
    const { columns } = layout(nodes, edges);
    const width = Math.max(svg.clientWidth || 900, 600);
    const ncols = Object.keys(columns).length;
    const colW = Math.max(170, (width - 160) / Math.max(ncols - 1, 1));
    const rowH = 90;
    const maxRows = Math.max(...Object.values(columns).map((c) => c.length));
    const height = Math.max(160, maxRows * rowH + 40);
    svg.setAttribute("height", String(height));
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    const pos = {};
    Object.keys(columns).sort((a, b) => a - b).forEach((d, ci) => {
      const ids = columns[d].sort();
      ids.forEach((id, ri) => {
        pos[id] = { x: 80 + ci * colW, y: (height / (ids.length + 1)) * (ri + 1) };
      });
    });
    const defs = el("defs");
    const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7",
                                  markerHeight: "7", orient: "auto-start-reverse" });
    marker.appendChild(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#7f8c8d" }));
    defs.appendChild(marker);
    svg.appendChild(defs);
    const byId = {};
    nodes.forEach((n) => { byId[n.id] = n; });
    edges.forEach((e) => {
      const a = pos[e.source], b = pos[e.destination];
      if (!a || !b) return;
      const g = el("g", { class: "edge", "data-source": e.source, "data-destination": e.destination,
                          "data-rps": String(e.rps), "data-error-rate": String(e.error_rate == null ? 0 : e.error_rate) });
      const x1 = a.x + 60, y1 = a.y, x2 = b.x - 60, y2 = b.y;
      const mx = (x1 + x2) / 2, my = (y1 + y2) / 2 - (e.source === e.destination ? 40 : 0);
      const color = COLORS[health(e.error_rate, e.requests)];
      const widthPx = Math.min(6, 1.5 + Math.log10(1 + (e.rps || 0)) * 1.5);
      g.appendChild(el("path", { d: "M " + x1 + " " + y1 + " Q " + mx + " " + (my - 10) + " " + x2 + " " + y2,
                                 fill: "none", stroke: color, "stroke-width": widthPx.toFixed(1), "marker-end": "url(#arrow)" }));
      const label = fmtRps(e.rps) + " rps · " + fmtPct(e.error_rate || 0) + " err";
      g.appendChild(el("text", { x: mx, y: my - 14, "text-anchor": "middle", class: "edge-label" }, label));
      const title = el("title", {}, e.source + " → " + e.destination + ": " + label + ", p99 " + fmtMs(e.p99_ms));
      g.appendChild(title);
      svg.appendChild(g);
    });
    nodes.forEach((n) => {
      const p = pos[n.id];
      const g = el("g", { class: "node", "data-id": n.id, "data-kind": n.kind, "data-rps": String(n.rps) });
      const color = COLORS[health(n.error_rate, n.requests)];
      g.appendChild(el("rect", { x: p.x - 60, y: p.y - 24, width: 120, height: 48, rx: 8, ry: 8,
                                 fill: "#ffffff", stroke: color, "stroke-width": n.adaptive && n.adaptive.mode === "tight" ? 4 : 2 }));
      g.appendChild(el("text", { x: p.x, y: p.y - 6, "text-anchor": "middle", class: "node-name" }, n.id));
      const out = edges.filter((e) => e.source === n.id).reduce((sum, e) => sum + (e.rps || 0), 0);
      const sub = n.requests ? fmtRps(n.rps) + " rps · " + fmtPct(n.success_rate)
        : out > 0 ? fmtRps(out) + " rps out" : n.kind;
      g.appendChild(el("text", { x: p.x, y: p.y + 12, "text-anchor": "middle" }, sub));
      const versions = (n.versions || []).map((v) => v.version + " " + fmtRps(v.rps) + " rps").join(", ");
      g.appendChild(el("title", {}, n.id + (versions ? " (" + versions + ")" : "")));
      svg.appendChild(g);
    });
  }

  // ---- RED table ----

  function drawStat(stat) {
    const body = $("red").querySelector("tbody");
    body.textContent = "";
    const totals = {};
    (stat.totals || []).forEach((t) => { totals[t.service] = t; });
    const rows = stat.services || [];
    if (!rows.length) {
      const tr = h("tr");
      const td = h("td", "muted", "no services yet");
      td.colSpan = 8;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    rows.forEach((r) => {
      const tr = h("tr");
      tr.dataset.service = r.service;
      tr.dataset.version = r.version;
      const cls = health(r.error_rate, r.requests);
      const adaptive = (totals[r.service] || {}).adaptive;
      [r.service, r.version, fmtRps(r.rps)].forEach((v) => tr.appendChild(h("td", null, v)));
      tr.appendChild(h("td", r.requests ? cls : "muted", fmtPct(r.success_rate)));
      [r.p50_ms, r.p90_ms, r.p99_ms].forEach((v) => tr.appendChild(h("td", null, fmtMs(v))));
      tr.appendChild(h("td", adaptive && adaptive.mode === "tight" ? "warn" : "muted",
                       adaptive && adaptive.mode === "tight" ? "tightened" : "labels"));
      body.appendChild(tr);
    });
    const t = stat.targets || {};
    $("status").textContent = "scraping " + (t.up || 0) + "/" + (t.total || 0) + " nodes · window " +
      stat.window_s + " s · " + new Date().toLocaleTimeString();
  }

  // ---- canary comparison ----

  async function drawCanary(stat) {
    const versions = {};
    (stat.services || []).forEach((r) => {
      if (r.version && r.version !== "unknown") (versions[r.service] = versions[r.service] || []).push(r);
    });
    const pairs = [];
    Object.keys(versions).sort().forEach((svc) => {
      const vs = versions[svc].slice().sort((a, b) => (a.version < b.version ? -1 : 1));
      for (let i = 1; i < vs.length && pairs.length < MAX_COMPARE; i++) pairs.push([svc, vs[0].version, vs[i].version]);
    });
    const box = $("canary");
    if (!pairs.length) {
      box.textContent = "";
      box.appendChild(h("p", "muted", "no service has two versions yet"));
      return;
    }
    const results = await Promise.all(pairs.map(([svc, a, b]) =>
      getJSON("/v1/compare?service=" + encodeURIComponent(svc) + "&a=" + encodeURIComponent(a) +
              "&b=" + encodeURIComponent(b) + "&window=" + win()).catch(() => null)));
    box.textContent = "";
    results.forEach((c) => {
      if (!c) return;
      const card = h("div", "card");
      card.dataset.service = c.service;
      card.appendChild(h("strong", null, c.service + ": " + c.a.version + " vs " + c.b.version));
      const table = h("table");
      const head = h("tr");
      ["", c.a.version, c.b.version].forEach((x) => head.appendChild(h("th", null, x)));
      table.appendChild(head);
      [["RPS", "rps", fmtRps], ["success", "success_rate", fmtPct], ["p50", "p50_ms", fmtMs],
       ["p90", "p90_ms", fmtMs], ["p99", "p99_ms", fmtMs]].forEach(([name, key, f]) => {
        const tr = h("tr");
        tr.appendChild(h("td", null, name));
        tr.appendChild(h("td", null, f(c.a[key])));
        tr.appendChild(h("td", null, f(c.b[key])));
        table.appendChild(tr);
      });
      card.appendChild(table);
      card.appendChild(h("div", "verdict " + (c.significant ? "bad" : "muted"), c.verdict));
      box.appendChild(card);
    });
  }

  // ---- events ----

  async function pollEvents() {
    const q = lastEventId ? "after_id=" + lastEventId : "since=1h";
    const data = await getJSON("/v1/events?" + q + "&limit=200");
    (data.events || []).forEach((e) => { events.push(e); lastEventId = Math.max(lastEventId, e.id); });
    events = events.slice(-100);
    const list = $("events");
    list.textContent = "";
    if (!events.length) { list.appendChild(h("li", "muted", "none")); return; }
    events.slice().reverse().forEach((e) => {
      const li = h("li");
      li.dataset.kind = e.kind;
      li.appendChild(h("span", "muted", new Date(e.ts * 1000).toLocaleTimeString() + " "));
      const bad = /spike|jump|nack|tighten|ejection|expiry/.test(e.kind);
      li.appendChild(h("span", "kind " + (bad ? "bad" : "good"), e.kind));
      li.appendChild(h("span", null, " " + e.message));
      list.appendChild(li);
    });
  }

  // ---- traces ----

  async function showTrace(id) {
    const data = await getJSON("/v1/traces/" + encodeURIComponent(id));
    const box = $("trace");
    box.textContent = "";
    box.appendChild(h("h3", null, "trace " + id + " (" + data.trace.spans + " spans, " + fmtMs(data.trace.duration_ms) + ")"));
    const t0 = Math.min(...data.spans.map((s) => s.start));
    const total = Math.max(data.trace.duration_ms, 0.001);
    data.spans.forEach((s) => {
      const row = h("div", "span" + (s.error ? " bad" : ""));
      row.style.paddingLeft = (s.depth * 1.2) + "em";
      const attrs = s.attributes || {};
      row.appendChild(h("span", null, s.service + " " + s.kind.toLowerCase() + " " + s.name + "  " +
                        (attrs["http.response.status_code"] || "-") + "  " + fmtMs(s.duration_ms) + " "));
      const bar = h("span", "bar");
      bar.style.marginLeft = (100 * (s.start - t0) * 1000 / total).toFixed(1) + "px";
      bar.style.width = Math.max(1, 100 * s.duration_ms / total).toFixed(1) + "px";
      row.appendChild(bar);
      box.appendChild(row);
    });
  }

  async function pollTraces() {
    const data = await getJSON("/v1/traces?limit=10");
    const table = $("traces");
    table.textContent = "";
    const found = data.traces || [];
    if (!found.length) {
      const tr = h("tr");
      tr.appendChild(h("td", "muted", "none sampled yet (meshctl tracing --sampling)"));
      table.appendChild(tr);
      return;
    }
    found.forEach((t) => {
      const tr = h("tr", t.errors ? "bad" : null);
      tr.dataset.trace = t.trace_id;
      [new Date(t.start * 1000).toLocaleTimeString(), t.trace_id.slice(0, 16) + "…", t.root,
       t.spans + " spans", fmtMs(t.duration_ms)].forEach((text) => tr.appendChild(h("td", null, text)));
      tr.style.cursor = "pointer";
      tr.addEventListener("click", () => showTrace(t.trace_id).catch((err) => { $("trace").textContent = err.message; }));
      table.appendChild(tr);
    });
  }

  async function tick() {
    try {
      const [graph, stat] = await Promise.all([getJSON("/v1/graph?window=" + win()),
                                               getJSON("/v1/stat?window=" + win())]);
      drawGraph(graph);
      drawStat(stat);
      // Traces are an extra: a failure there must not blank the rest of the page.
      await Promise.all([drawCanary(stat), pollEvents(),
                         pollTraces().catch((err) => { $("traces").dataset.error = err.message; })]);
      document.body.dataset.updated = String(Date.now());
    } catch (err) {
      $("status").textContent = "no data: " + err.message;
    } finally {
      setTimeout(tick, POLL_MS);
    }
  }

  tick();
})();
