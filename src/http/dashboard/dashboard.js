// Strata admin dashboard: polls /admin/status (relative to /admin/), renders it, and keeps a
// few minutes of samples in memory to chart request rate, cache hit ratio and replication
// lag. Rates are computed here from the counters in the status document, so the server
// keeps no history. No external assets, no build step.
//
// Every element that shows a value from the status document carries data-k="<path>" (for
// example "components.storage.last_lsn") and data-v="<the raw JSON value>", so tests and
// curious operators can match what is shown against /admin/status.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const POLL_MS = Math.min(60000, Math.max(250, Number(params.get("interval")) || 2000));
  const WINDOW_MS = 5 * 60 * 1000;
  const FETCH_TIMEOUT_MS = 5000;
  const TOKEN_KEY = "strata.admin.token";

  const $ = (sel, root = document) => root.querySelector(sel);
  const state = { token: null, paused: false, timer: null, samples: [], prev: null, waitingForToken: false };

  // ---- token handling -------------------------------------------------------------------

  function storeToken(t) {
    state.token = t || null;
    try {
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) { /* storage disabled: keep it in memory only */ }
    $("#signout").hidden = !state.token;
  }

  function initToken() {
    // "#token=..." lets a script or the CLI open the page signed in; the fragment never
    // reaches the server and is removed from the address bar at once.
    const m = location.hash.match(/^#token=(.+)$/);
    if (m) {
      storeToken(decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
      return;
    }
    let t = null;
    try { t = sessionStorage.getItem(TOKEN_KEY); } catch (_) { /* ignore */ }
    storeToken(t);
  }

  function showLogin(why) {
    state.waitingForToken = true;
    $("#login").hidden = false;
    $("#login-why").textContent = state.token
      ? `The token was refused${why ? `: ${why}` : ""}. Enter an admin-scoped token.`
      : "This node's admin endpoints need a bearer token with the admin scope. It is kept in this tab only (sessionStorage).";
    $("#overview").hidden = true;
    setBadge(null);
    $("#token").focus();
  }

  // ---- polling ------------------------------------------------------------------------------

  function schedule() {
    clearTimeout(state.timer);
    if (!state.paused && !state.waitingForToken) state.timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    const ctl = new AbortController();
    const timeout = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const headers = { Accept: "application/json" };
      if (state.token) headers.Authorization = `Bearer ${state.token}`;
      const resp = await fetch("status", { headers, cache: "no-store", signal: ctl.signal });
      if (resp.status === 401 || resp.status === 403) {
        const problem = await resp.json().catch(() => null);
        showLogin(problem && problem.detail);
        return;
      }
      if (!resp.ok) throw new Error(`/admin/status answered HTTP ${resp.status}`);
      const status = await resp.json();
      problem(null);
      $("#login").hidden = true;
      try {
        render(status, Date.now());
      } catch (e) {
        // A status document this page does not understand (say, from a newer node).
        console.error(e);
        problem(null, `cannot show this status document: ${e.message || e}`);
      }
    } catch (e) {
      problem(e.name === "AbortError" ? `no answer from /admin/status within ${FETCH_TIMEOUT_MS / 1000}s` : String(e.message || e));
      setBadge(null);
    } finally {
      clearTimeout(timeout);
      schedule();
    }
  }

  function problem(unreachable, other) {
    const el = $("#problem");
    el.hidden = !unreachable && !other;
    el.textContent = unreachable ? `Cannot reach the node: ${unreachable}. Retrying every ${POLL_MS / 1000}s.` : other || "";
  }

  // ---- formatting -----------------------------------------------------------------------

  const nf = new Intl.NumberFormat("en-US");
  function fmtNum(v) {
    if (typeof v !== "number") return v == null ? "–" : String(v);
    return Number.isInteger(v) ? nf.format(v) : v.toFixed(Math.abs(v) >= 100 ? 0 : 2);
  }
  function fmtBytes(v) {
    if (typeof v !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let x = v;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return i === 0 ? `${v} B` : `${x.toFixed(x >= 100 ? 0 : 1)} ${units[i]}`;
  }
  function fmtDuration(s) {
    if (typeof s !== "number") return "–";
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, sec = Math.floor(s % 60);
    return d ? `${d}d ${h}h ${m}m` : h ? `${h}h ${m}m ${sec}s` : m ? `${m}m ${sec}s` : `${sec}s`;
  }
  function fmtPct(r) { return typeof r === "number" ? `${(r * 100).toFixed(1)}%` : "–"; }
  function fmtRate(r) { return typeof r === "number" ? `${r >= 100 ? r.toFixed(0) : r.toFixed(1)}/s` : "–"; }
  function fmtSecs(s) { return typeof s === "number" ? (s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(0)} s`) : "–"; }

  // Sets an element's text and its data-k/data-v (the path and raw value shown).
  function show(el, path, value, text) {
    el.dataset.k = path;
    el.dataset.v = JSON.stringify(value === undefined ? null : value);
    el.textContent = text !== undefined ? text : fmtNum(value);
    return el;
  }

  function get(obj, path) {
    return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }

  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") el.className = v;
      else el.setAttribute(k, v);
    }
    for (const c of children) el.append(c);
    return el;
  }

  function setBadge(ready, reasons) {
    const b = $("#ready");
    if (ready === null) {
      b.className = "badge";
      b.textContent = "unknown";
      return;
    }
    b.className = `badge ${ready ? "ok" : "bad"}`;
    show(b, "ready", ready, ready ? "ready" : "not ready");
    b.title = ready ? "every role can serve" : reasons.join("; ");
  }

  // ---- samples and rates ------------------------------------------------------------------

  // Counters whose growth is the request rate of each role.
  function requestCounters(s) {
    const c = s.components || {};
    const out = {};
    if (c.edge) out.edge = (c.edge.hits || 0) + (c.edge.misses || 0) + (c.edge.passes || 0);
    if (c.balancer && Array.isArray(c.balancer.backends)) {
      out.balancer = c.balancer.backends.reduce((n, b) => n + (b.requests || 0), 0);
    }
    if (c.app && s.requests && s.requests.app) out.app = s.requests.app.total;
    return out;
  }

  // Every cache in the document: a component with hits/misses, or one with a `cache` object.
  function caches(s) {
    const out = [];
    for (const [name, comp] of Object.entries(s.components || {})) {
      if (!comp || typeof comp !== "object") continue;
      if (typeof comp.hits === "number" && typeof comp.misses === "number") out.push({ name, path: `components.${name}`, c: comp });
      if (comp.cache && typeof comp.cache.hits === "number" && typeof comp.cache.misses === "number") {
        out.push({ name: `${name} cache`, path: `components.${name}.cache`, c: comp.cache });
      }
    }
    return out;
  }

  // Replication lag in seconds: this replica's own, or each replica's on a primary.
  function lags(s) {
    const r = get(s, "components.storage.replication");
    if (!r) return null;
    if (r.role === "replica") return { "this replica": r.lag_seconds };
    const out = {};
    for (const rep of r.replicas || []) out[rep.node || rep.addr] = rep.lag_seconds;
    return out;
  }

  function sample(s, now) {
    const counters = requestCounters(s);
    const hitCounts = Object.fromEntries(caches(s).map((x) => [x.name, [x.c.hits, x.c.misses]]));
    const smp = { t: now, rates: {}, hits: {}, lag: lags(s) || {} };
    const prev = state.prev;
    // A counter that went down means the node restarted: start the series afresh.
    if (prev && now > prev.t && (s.uptime_seconds || 0) >= (prev.uptime || 0)) {
      const dt = (now - prev.t) / 1000;
      for (const [role, n] of Object.entries(counters)) {
        if (typeof prev.counters[role] === "number" && n >= prev.counters[role]) smp.rates[role] = (n - prev.counters[role]) / dt;
      }
      for (const [name, [hits, misses]] of Object.entries(hitCounts)) {
        const p = prev.hitCounts[name];
        if (!p) continue;
        const dh = hits - p[0], dm = misses - p[1];
        smp.hits[name] = dh + dm > 0 ? dh / (dh + dm) : null;
      }
    }
    state.prev = { t: now, counters, hitCounts, uptime: s.uptime_seconds || 0 };
    state.samples.push(smp);
    while (state.samples.length && state.samples[0].t < now - WINDOW_MS) state.samples.shift();
  }

  // ---- charts -------------------------------------------------------------------------------

  const W = 300, H = 90, PAD = 4;

  // Draws one line per series over the last WINDOW_MS; gaps (null) break the line.
  function chart(id, field, { max, fmt, empty }) {
    const svg = $(`#chart-${id}`);
    const legend = $(`#legend-${id}`);
    const names = [...new Set(state.samples.flatMap((s) => Object.keys(s[field])))].sort();
    const now = state.samples.length ? state.samples[state.samples.length - 1].t : 0;
    let top = max;
    if (top === undefined) {
      top = 0;
      for (const s of state.samples) for (const v of Object.values(s[field])) if (typeof v === "number") top = Math.max(top, v);
      top = niceCeil(top);
    }
    const maxLabel = document.querySelector(`[data-chart-max="${id}"]`);
    if (maxLabel) maxLabel.textContent = fmt(top);
    // The x axis spans the samples held, up to WINDOW_MS, so a fresh page fills its width.
    const start = state.samples.length ? Math.max(now - WINDOW_MS, state.samples[0].t) : now;
    const span = Math.max(now - start, POLL_MS);
    const x = (t) => ((t - (now - span)) / span) * W;
    const y = (v) => H - PAD - (Math.min(v, top) / (top || 1)) * (H - 2 * PAD);
    const ns = "http://www.w3.org/2000/svg";
    svg.replaceChildren();
    for (const f of [0.5]) {
      const line = document.createElementNS(ns, "line");
      line.setAttribute("class", "grid-line");
      line.setAttribute("x1", 0); line.setAttribute("x2", W);
      line.setAttribute("y1", y(top * f)); line.setAttribute("y2", y(top * f));
      svg.append(line);
    }
    legend.replaceChildren();
    const latest = [];
    names.forEach((name, i) => {
      let pts = [];
      const flush = () => {
        if (pts.length) {
          const pl = document.createElementNS(ns, "polyline");
          pl.setAttribute("class", `s${i % 4}`);
          // A lone point is drawn as a short dash so it is visible.
          if (pts.length === 1) pts.push([pts[0][0] + 2, pts[0][1]]);
          pl.setAttribute("points", pts.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" "));
          svg.append(pl);
        }
        pts = [];
      };
      let last = null;
      for (const s of state.samples) {
        const v = s[field][name];
        if (typeof v === "number") { pts.push([x(s.t), y(v)]); last = v; } else flush();
      }
      flush();
      legend.append(h("li", { class: `s${i % 4}` }, `${name} `, h("span", {}, fmt(last))));
      latest.push(`${name} ${fmt(last)}`);
    });
    svg.setAttribute("aria-label", latest.length ? `${svg.getAttribute("aria-label").split(":")[0]}: ${latest.join(", ")}` : `${svg.getAttribute("aria-label").split(":")[0]}: ${empty}`);
    if (!names.length) legend.append(h("li", { class: "none" }, empty));
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // ---- rendering ------------------------------------------------------------------------------

  function kv(container, items) {
    container.replaceChildren();
    for (const [label, path, value, text] of items) {
      if (value === undefined) continue;
      const v = show(h("span", { class: "v" }), path, value, text);
      container.append(h("div", {}, h("span", { class: "k" }, label), v));
    }
  }

  function row(tbody, cells) {
    const tr = h("tr");
    for (const cell of cells) tr.append(cell);
    tbody.append(tr);
  }

  function td(path, value, text, cls) {
    return show(h("td", cls ? { class: cls } : {}), path, value, text);
  }

  function stateCell(path, value, healthy) {
    const cell = td(path, value, String(value));
    cell.className = `state ${healthy ? "ok" : value === "ejected" || value === "unknown" ? "warn" : "bad"}`;
    return cell;
  }

  function render(s, now) {
    sample(s, now);
    $("#overview").hidden = false;
    show($("#node"), "node", s.node, s.node);
    document.title = `${s.node} · Strata admin`;
    setBadge(!!s.ready, s.not_ready || []);
    const roles = $("#roles");
    roles.replaceChildren(...(s.roles || []).map((r, i) => show(h("li"), `roles.${i}`, r, r)));
    show($("#updated"), "updated", new Date(now).toISOString(), new Date(now).toLocaleTimeString());

    show($("#uptime"), "uptime_seconds", s.uptime_seconds, fmtDuration(s.uptime_seconds));
    const cfg = s.config || {};
    show($("#cfg-version"), "config.version", cfg.version, cfg.version);
    show($("#cfg-source"), "config.source", cfg.source, cfg.source);
    const lr = cfg.last_reload;
    const lrEl = $("#last-reload");
    show(lrEl, "config.last_reload", lr, lr ? `${lr.applied ? "applied" : "refused"} at ${lr.at}: ${lr.message}` : "none since start");
    lrEl.className = lr && !lr.applied ? "state bad" : "";
    const reasons = $("#not-ready");
    reasons.replaceChildren(...(s.not_ready || []).map((r, i) => show(h("li"), `not_ready.${i}`, r, r)));

    renderStorage(s);
    renderCaches(s);
    renderBalancer(s);
    renderUpstreams(s);

    // Charts.
    const rates = state.samples.length ? state.samples[state.samples.length - 1].rates : {};
    const total = Object.values(rates).reduce((a, b) => a + b, 0);
    $("#rate-now").textContent = Object.keys(rates).length ? fmtRate(total) : "–";
    const http = Object.keys(requestCounters(s)).length > 0;
    if (!http) $("#rate-now").textContent = "no HTTP roles on this node";
    chart("rate", "rates", { fmt: fmtRate, empty: http ? "waiting for a second sample" : "no HTTP roles on this node" });
    const hitNow = caches(s)[0];
    $("#hits-now").textContent = hitNow ? `${fmtPct(hitNow.c.hit_ratio ?? hitNow.c.hits / Math.max(1, hitNow.c.hits + hitNow.c.misses))} overall` : "no cache on this node";
    chart("hits", "hits", { max: 1, fmt: fmtPct, empty: hitNow ? "no lookups in the last interval" : "no cache on this node" });
    const l = lags(s);
    const lagValues = l ? Object.values(l) : [];
    $("#lag-now").textContent = !l ? "no replication on this node" : lagValues.length ? fmtSecs(Math.max(...lagValues)) : "no replicas connected";
    chart("lag", "lag", { fmt: fmtSecs, empty: l ? "no replicas connected" : "no replication on this node" });

    $("#raw").textContent = JSON.stringify(s, null, 2);
  }

  function renderStorage(s) {
    const c = s.components || {};
    let base = null;
    if (c.storage) base = "components.storage";
    else if (c.app && c.app.storage) base = "components.app.storage";
    $("#storage").hidden = !base;
    if (!base) return;
    const st = get(s, base);
    const r = st.replication || {};
    const rb = `${base}.replication`;
    const link = r.link || null;
    kv($("#storage-kv"), [
      st.mode !== undefined ? ["Mode", `${base}.mode`, st.mode, st.mode] : ["Storage", `${base}.kind`, st.kind, st.kind],
      ["Last LSN", `${base}.last_lsn`, st.last_lsn],
      ["Durable LSN", `${base}.durable_lsn`, st.durable_lsn],
      ["Records", `${base}.records`, st.records],
      ["Disk", `${base}.disk_bytes`, st.disk_bytes, fmtBytes(st.disk_bytes)],
      ["Epoch", `${base}.epoch`, st.epoch],
      ["First log LSN", `${base}.first_log_lsn`, st.first_log_lsn],
      ["Connections", `${base}.connections`, st.connections],
      ["Replication", `${rb}.role`, r.role, r.role],
      ["Applied LSN", `${rb}.applied_lsn`, r.role === "replica" ? r.applied_lsn : undefined],
      ["Primary LSN", `${rb}.primary_lsn`, r.role === "replica" ? r.primary_lsn : undefined],
      ["Lag (entries)", `${rb}.lag_entries`, r.role === "replica" ? r.lag_entries : undefined],
      ["Lag", `${rb}.lag_seconds`, r.role === "replica" ? r.lag_seconds : undefined, fmtSecs(r.lag_seconds)],
      ["Following", `${rb}.follow`, r.follow || undefined, r.follow],
      ["Link", `${rb}.link.phase`, r.role === "replica" && link ? link.phase : undefined, link && `${link.phase}${link.connected ? "" : " (disconnected)"}`],
      ["Sync replicas", `${rb}.sync_replicas`, r.role === "primary" ? r.sync_replicas : undefined],
    ]);
    const reps = r.replicas || [];
    const table = $("#replicas");
    table.hidden = r.role !== "primary" || !reps.length;
    const tbody = $("tbody", table);
    tbody.replaceChildren();
    reps.forEach((rep, i) => {
      const p = `${rb}.replicas.${i}`;
      row(tbody, [td(`${p}.node`, rep.node, rep.node || "–"), td(`${p}.addr`, rep.addr, rep.addr), td(`${p}.phase`, rep.phase, String(rep.phase)),
        td(`${p}.applied_lsn`, rep.applied_lsn, undefined, "num"), td(`${p}.lag_entries`, rep.lag_entries, undefined, "num"),
        td(`${p}.lag_seconds`, rep.lag_seconds, fmtSecs(rep.lag_seconds), "num")]);
    });
  }

  function renderCaches(s) {
    const list = caches(s);
    $("#caches").hidden = !list.length;
    const body = $("#caches-body");
    body.replaceChildren();
    for (const { name, path, c } of list) {
      const grid = h("div", { class: "kv" });
      const ratio = c.hit_ratio ?? (c.hits + c.misses ? c.hits / (c.hits + c.misses) : 0);
      kv(grid, [
        ["Hit ratio", `${path}.hit_ratio`, ratio, fmtPct(ratio)],
        ["Hits", `${path}.hits`, c.hits],
        ["Misses", `${path}.misses`, c.misses],
        ["Entries", `${path}.entries`, c.entries],
        ["Size", `${path}.bytes`, c.bytes, c.capacity_bytes ? `${fmtBytes(c.bytes)} of ${fmtBytes(c.capacity_bytes)}` : fmtBytes(c.bytes)],
        ["Evictions", `${path}.evictions`, c.evictions],
        ["Stale served", `${path}.stale_served`, c.stale_served],
        ["Revalidations", `${path}.revalidations`, c.revalidations],
        ["Coalesced waits", `${path}.coalesced_waits`, c.coalesced_waits],
        ["Passed through", `${path}.passes`, c.passes],
        ["Upstream errors", `${path}.upstream_errors`, c.upstream_errors],
        ["Served from cache", `${path}.bytes_from_cache`, c.bytes_from_cache, fmtBytes(c.bytes_from_cache)],
      ]);
      body.append(h("div", { class: "cache" }, h("h3", {}, name), grid));
    }
  }

  function renderBalancer(s) {
    const b = get(s, "components.balancer");
    $("#balancer").hidden = !b;
    if (!b) return;
    const backends = b.backends || [];
    $("#balancer-summary").replaceChildren(show(h("strong"), "components.balancer.healthy", b.healthy),
      ` of ${backends.length} healthy · ${b.algorithm} · listening on ${b.listen}${b.tls ? " (TLS)" : ""}`);
    const tbody = $("#backends tbody");
    tbody.replaceChildren();
    backends.forEach((be, i) => {
      const p = `components.balancer.backends.${i}`;
      row(tbody, [td(`${p}.address`, be.address, be.address), stateCell(`${p}.state`, be.state, be.healthy),
        td(`${p}.weight`, be.weight, undefined, "num"), td(`${p}.requests`, be.requests, undefined, "num"),
        td(`${p}.errors`, be.errors, undefined, "num"), td(`${p}.in_flight`, be.in_flight, undefined, "num"),
        td(`${p}.open_connections`, be.open_connections, undefined, "num"), td(`${p}.ejections`, be.ejections, undefined, "num")]);
    });
  }

  function renderUpstreams(s) {
    const ups = get(s, "components.edge.upstreams");
    const sec = $("#edge-upstreams");
    sec.hidden = !Array.isArray(ups);
    if (!Array.isArray(ups)) return;
    const tbody = $("tbody", sec);
    tbody.replaceChildren();
    ups.forEach((u, i) => {
      const p = `components.edge.upstreams.${i}`;
      row(tbody, [td(`${p}.upstream`, u.upstream, u.upstream), stateCell(`${p}.healthy`, u.healthy, u.healthy),
        td(`${p}.failures`, u.failures, undefined, "num")]);
    });
    for (const cell of tbody.querySelectorAll(".state")) cell.textContent = cell.dataset.v === "true" ? "healthy" : "down";
  }

  // ---- wiring -------------------------------------------------------------------------------

  $("#login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("#token").value.trim();
    if (!t) return;
    storeToken(t);
    $("#token").value = "";
    state.waitingForToken = false;
    $("#login").hidden = true;
    poll();
  });
  $("#signout").addEventListener("click", () => {
    storeToken(null);
    clearTimeout(state.timer);
    showLogin();
  });
  $("#pause").addEventListener("click", (ev) => {
    state.paused = !state.paused;
    ev.target.textContent = state.paused ? "Resume" : "Pause";
    ev.target.setAttribute("aria-pressed", String(state.paused));
    if (state.paused) clearTimeout(state.timer);
    else poll();
  });

  initToken();
  poll();
})();
