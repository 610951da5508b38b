/* Frugal dashboard (docs/dashboard.md): vanilla JavaScript, inline SVG charts, no external resources.
 *
 * The page talks to the admin API of the gateway that served it, with the admin key typed in at sign-in
 * (kept in sessionStorage, sent as `Authorization: Bearer`). Each view has a fixed skeleton (forms keep their
 * input) and a `refresh()` that re-reads its data; the visible view refreshes every 10 s while the tab is
 * visible (`?refresh=N` on the page's address sets another period, in seconds).
 */
"use strict";

(() => {
  const KEY_STORE = "frugal.adminKey";
  const WINDOW_STORE = "frugal.window";
  const ROUTE_STORE = "frugal.route";
  const ACTOR = "dashboard";
  const WINDOWS = {
    "24h": { hours: 24, granularity: "hour", label: "last 24 hours" },
    "7d": { hours: 24 * 7, granularity: "hour", label: "last 7 days" },
    "30d": { hours: 24 * 30, granularity: "day", label: "last 30 days" },
  };
  const REFRESH_MS = (() => {
    const asked = Number(new URLSearchParams(location.search).get("refresh"));
    return Number.isFinite(asked) && asked >= 1 ? asked * 1000 : 10000;
  })();
  // The SVG namespace: a name, never fetched.
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    key: sessionStorage.getItem(KEY_STORE),
    window: sessionStorage.getItem(WINDOW_STORE) || "24h",
    route: sessionStorage.getItem(ROUTE_STORE),
    routes: [], // cascade routes, as GET /admin/routes describes them
    view: null, // { name, arg, impl }
    busy: false,
    lastRefresh: 0,
  };
  if (!WINDOWS[state.window]) state.window = "24h";

  const $ = (selector, root = document) => root.querySelector(selector);

  // -- DOM helpers ------------------------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    return build(el, attrs, children);
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    return build(el, attrs, children);
  }

  function build(el, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.setAttribute("class", value);
      else if (name === "text") el.textContent = value;
      else if (name === "style") Object.assign(el.style, value);
      else if (name === "dataset") Object.assign(el.dataset, value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "value" && "value" in el && !(el instanceof SVGElement)) el.value = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function fill(el, ...children) {
    el.replaceChildren();
    build(el, null, children);
    return el;
  }

  const empty = (text) => h("div", { class: "empty", text });

  // -- formatting -------------------------------------------------------------------------------------------
  const intFormat = new Intl.NumberFormat("en-US");
  const fmtInt = (v) => (v === null || v === undefined ? "—" : intFormat.format(Math.round(v)));

  function fmtUSD(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    const a = Math.abs(v);
    const sign = v < 0 ? "−" : "";
    if (a === 0) return "$0";
    if (a >= 1000) return `${sign}$${intFormat.format(Math.round(a))}`;
    if (a >= 1) return `${sign}$${a.toFixed(2)}`;
    if (a >= 0.01) return `${sign}$${a.toFixed(3)}`;
    return `${sign}$${a.toPrecision(2).replace(/e-(\d+)$/, (_, d) => `e-${d}`)}`;
  }

  function fmtPct(v, digits = 1) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "—";
    return `${(v * 100).toFixed(digits)}%`;
  }

  function fmtMs(v) {
    if (v === null || v === undefined) return "—";
    if (v >= 10000) return `${(v / 1000).toFixed(1)} s`;
    if (v >= 1000) return `${(v / 1000).toFixed(2)} s`;
    return `${v >= 10 ? Math.round(v) : v.toFixed(1)} ms`;
  }

  const pad = (n) => String(n).padStart(2, "0");
  function fmtTime(iso, withSeconds = true) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const day = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    return `${day} ${pad(d.getHours())}:${pad(d.getMinutes())}${withSeconds ? ":" + pad(d.getSeconds()) : ""}`;
  }

  const ratio = (a, b) => (b ? a / b : null);

  // -- the admin API ----------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, { method = "GET", body, query } = {}) {
    const url = new URL(path, location.origin);
    for (const [name, value] of Object.entries(query || {})) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
    }
    const headers = { authorization: `Bearer ${state.key}`, accept: "application/json" };
    if (method !== "GET") {
      headers["x-frugal-actor"] = ACTOR;
      headers["content-type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(url, { method, headers, cache: "no-store", credentials: "omit",
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (exc) {
      throw new ApiError(0, `The gateway did not answer (${exc.message}).`, "unreachable");
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(response.status, error.message || `${response.status} ${response.statusText}`, error.code);
    }
    return data;
  }

  function windowQuery() {
    const until = new Date();
    const since = new Date(until.getTime() - WINDOWS[state.window].hours * 3600 * 1000);
    return { since: since.toISOString(), until: until.toISOString() };
  }

  // -- sign-in ----------------------------------------------------------------------------------------------
  function showLogin(message) {
    $("#app").hidden = true;
    $("#login").hidden = false;
    const error = $("#login-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("#login-key").value = "";
    $("#login-key").focus();
  }

  async function signIn(key) {
    state.key = key;
    try {
      await loadRoutes();
    } catch (exc) {
      state.key = null;
      sessionStorage.removeItem(KEY_STORE);
      showLogin(exc.message);
      return;
    }
    sessionStorage.setItem(KEY_STORE, key);
    $("#login").hidden = true;
    $("#app").hidden = false;
    navigate();
  }

  function signOut(message) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORE);
    $("#view").replaceChildren();
    state.view = null;
    showLogin(message);
  }

  async function loadRoutes() {
    const body = await api("/admin/routes");
    state.routes = body.data || [];
    const names = state.routes.map((r) => r.route);
    if (!names.includes(state.route)) state.route = names[0] || null;
    const select = $("#route-select");
    const current = [...select.options].map((o) => o.value).join("\n");
    if (current !== names.join("\n")) {
      fill(select, names.map((n) => h("option", { value: n, text: n })));
    }
    if (state.route) select.value = state.route;
  }

  const routeInfo = (name) => state.routes.find((r) => r.route === name) || null;

  // -- refresh loop -----------------------------------------------------------------------------------------
  function banner(message) {
    const el = $("#banner");
    el.hidden = !message;
    el.textContent = message || "";
  }

  async function refresh(force = false) {
    if (!state.view || !state.key || (state.busy && !force)) return;
    const view = state.view;
    state.busy = true;
    try {
      await view.impl.refresh();
      if (state.view !== view) return;
      state.lastRefresh = Date.now();
      banner(null);
      $("#updated").textContent = `updated ${fmtTime(new Date().toISOString()).slice(11)}`;
    } catch (exc) {
      if (exc instanceof ApiError && (exc.status === 401 || exc.status === 403)) {
        signOut(exc.message);
      } else if (exc instanceof ApiError) {
        banner(exc.message);
      } else {
        banner(`The dashboard failed: ${exc.message}`);
        console.error(exc);
      }
    } finally {
      state.busy = false;
    }
  }

  setInterval(() => {
    if (!document.hidden && Date.now() - state.lastRefresh >= REFRESH_MS - 200) refresh();
  }, Math.min(REFRESH_MS, 1000));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && Date.now() - state.lastRefresh >= REFRESH_MS) refresh();
  });

  // -- navigation -------------------------------------------------------------------------------------------
  function navigate() {
    if (!state.key) return;
    const [name, ...rest] = (location.hash.replace(/^#/, "") || "overview").split("/");
    const arg = rest.length ? decodeURIComponent(rest.join("/")) : null;
    const View = VIEWS[name] || VIEWS.overview;
    const viewName = VIEWS[name] ? name : "overview";
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("on", a.dataset.view === viewName);
    $("#route-select").closest("label").hidden = !View.usesRoute;
    if (state.view && state.view.name === viewName && state.view.impl.open) {
      state.view.arg = arg;
      state.view.impl.open(arg);
    } else {
      const root = $("#view");
      root.replaceChildren();
      state.view = { name: viewName, arg, impl: View.mount(root, arg) };
      document.title = `${View.title} · Frugal dashboard`;
    }
    state.lastRefresh = 0;
    refresh(true);
  }

  // -- charts -----------------------------------------------------------------------------------------------
  /** A round top for an axis of 4 steps; `whole`: counts, whose ticks must be whole numbers. */
  function niceMax(v, whole = false) {
    if (whole) return Math.max(4, Math.ceil(niceMax(v) / 4) * 4);
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  /** Every bucket of the window (the API leaves out empty ones), oldest first: [{t, row|null}]. */
  function buckets(series, query, granularity) {
    const step = (granularity === "day" ? 24 : 1) * 3600 * 1000;
    const since = Date.parse(query.since);
    const until = Date.parse(query.until);
    const byTime = new Map(series.map((row) => [Date.parse(row.bucket), row]));
    const out = [];
    for (let t = Math.floor(since / step) * step; t < until; t += step) out.push({ t, row: byTime.get(t) || null });
    return out;
  }

  function timeLabel(t, granularity, first) {
    const d = new Date(t);
    if (granularity === "day" || (d.getHours() === 0 && !first)) return `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    return `${pad(d.getHours())}:00`;
  }

  /** A time chart: stacked bars (`stack`) and/or lines (`lines`) per bucket. */
  function timeChart(points, { stack = [], lines = [], format = fmtInt, granularity = "hour", height = 190 }) {
    const W = 640, H = height, L = 52, R = 10, T = 10, B = 22;
    const values = points.map((p) => {
      const row = p.row || {};
      const stacked = stack.reduce((sum, part) => sum + (row[part.key] || 0), 0);
      const lined = Math.max(0, ...lines.map((line) => row[line.key] || 0));
      return Math.max(stacked, lined);
    });
    const top = niceMax(Math.max(0, ...values), format === fmtInt);
    const x = (i) => L + (i * (W - L - R)) / Math.max(1, points.length);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const width = Math.max(1, (W - L - R) / Math.max(1, points.length) - (points.length > 60 ? 0.5 : 2));
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img" });
    for (let k = 0; k <= 4; k++) {
      const v = (top * k) / 4;
      svg.append(s("line", { class: k ? "grid-line" : "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
        s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", text: format(v) }));
    }
    const every = Math.max(1, Math.ceil(points.length / 8));
    points.forEach((p, i) => {
      if (i % every === 0) {
        svg.append(s("text", { x: x(i) + width / 2, y: H - 6, "text-anchor": "middle",
          text: timeLabel(p.t, granularity, i === 0) }));
      }
      if (!p.row) return;
      let base = 0;
      for (const part of stack) {
        const v = p.row[part.key] || 0;
        if (v <= 0) continue;
        svg.append(s("rect", { x: x(i) + 1, y: y(base + v), width, height: Math.max(0.5, y(base) - y(base + v)),
          fill: part.color }, s("title", { text: `${fmtTime(new Date(p.t).toISOString(), false)}  ${part.label}: ${format(v)}` })));
        base += v;
      }
    });
    for (const line of lines) {
      const coords = points.map((p, i) => (p.row && p.row[line.key] !== null && p.row[line.key] !== undefined
        ? `${x(i) + width / 2 + 1},${y(p.row[line.key])}` : null));
      let path = "";
      let pen = false;
      for (const c of coords) {
        if (c === null) { pen = false; continue; }
        path += `${pen ? "L" : "M"}${c} `;
        pen = true;
      }
      if (path) svg.append(s("path", { d: path, fill: "none", stroke: line.color, "stroke-width": 2 }));
      coords.forEach((c, i) => {
        if (c === null) return;
        const [cx, cy] = c.split(",");
        svg.append(s("circle", { cx, cy, r: 2.5, fill: line.color },
          s("title", { text: `${fmtTime(new Date(points[i].t).toISOString(), false)}  ${line.label}: ${format(points[i].row[line.key])}` })));
      });
    }
    return svg;
  }

  const legend = (...items) => h("div", { class: "legend" }, items.map(([cls, text]) => h("span", null, h("i", { class: cls }), text)));
  const COLORS = { requests: "#2563eb", cache: "#0ea5e9", error: "#dc2626", spend: "#6366f1", saved: "#16a34a",
    accept: "#16a34a", escalate: "#f59e0b", p50: "#0f766e", p95: "#b45309", frontier: "#9aa5b1",
    current: "#dc2626", proposal: "#2563eb", skipped: "#cbd2d9" };

  // -- Overview ---------------------------------------------------------------------------------------------
  function kpi(name, label, value, sub, cls) {
    return h("div", { class: `card kpi ${cls || ""}`, dataset: { kpi: name } },
      h("div", { class: "label", text: label }), h("div", { class: "value", text: value }),
      h("div", { class: "sub", text: sub || "\u00a0", title: sub || "" }));
  }

  function overviewView(root) {
    let routeFilter = "";
    const routeSelect = h("select", { "aria-label": "Overview route", onchange: (e) => { routeFilter = e.target.value; refresh(true); } },
      h("option", { value: "", text: "All routes" }));
    const caption = h("span", { class: "muted" });
    const kpis = h("div", { class: "kpis", id: "kpis" });
    const charts = h("div", { class: "grid two" });
    root.append(h("div", { class: "view-head" }, h("h1", { text: "Overview" }), caption,
      h("label", { class: "inline" }, "Route", routeSelect)), kpis, charts);

    return {
      async refresh() {
        const query = { ...windowQuery(), granularity: WINDOWS[state.window].granularity, route: routeFilter };
        const data = await api("/admin/analytics/overview", { query });
        const t = data.totals;
        caption.textContent = `${WINDOWS[state.window].label}, by ${query.granularity}${routeFilter ? ` · ${routeFilter}` : ""}`;
        const known = [...routeSelect.options].map((o) => o.value).filter(Boolean);
        for (const name of data.routes || []) {
          if (!known.includes(name)) routeSelect.append(h("option", { value: name, text: name }));
        }
        const wouldHave = t.spend_usd + t.saved_usd;
        fill(kpis,
          kpi("requests", "Requests", fmtInt(t.requests), data.audits && data.audits.requests
            ? `+ ${fmtInt(data.audits.requests)} audits (${fmtUSD(data.audits.spend_usd)})` : "client requests"),
          kpi("spend", "Spend", fmtUSD(t.spend_usd), t.requests ? `${fmtUSD(t.spend_usd / t.requests)} per request` : ""),
          kpi("saved", "Saved vs top model", fmtUSD(t.saved_usd),
            wouldHave > 0 ? `${fmtPct(t.saved_usd / wouldHave)} of ${fmtUSD(wouldHave)}` : "vs always the top model", "hero"),
          kpi("cache", "Cache hits", fmtInt(t.cache_hits),
            t.requests ? `${fmtPct(t.cache_hits / t.requests)} · saved ${fmtUSD(t.cache_saved_usd)}` : ""),
          kpi("compression", "Compression saved", fmtUSD(t.compression_saved_usd), "prompt tokens removed"),
          kpi("latency", "Latency p50 / p95", `${fmtMs(t.p50_ms)}`, `p95 ${fmtMs(t.p95_ms)}`),
          kpi("errors", "Errors", fmtInt(t.errors), t.requests ? `${fmtPct(t.errors / t.requests)} of requests` : "",
            t.errors ? "bad" : ""));
        if (!t.requests && !(data.series || []).length) {
          fill(charts, h("div", { class: "card", style: { gridColumn: "1 / -1" } },
            empty(`No requests in the ${WINDOWS[state.window].label}. Send traffic through the gateway and it shows up here.`)));
          return;
        }
        const points = buckets(data.series || [], query, query.granularity);
        for (const p of points) {
          if (!p.row) continue;
          p.row.answered = Math.max(0, p.row.requests - p.row.cache_hits - p.row.errors);
        }
        const g = query.granularity;
        fill(charts,
          h("div", { class: "card" }, h("h2", { text: `Requests per ${g}` }),
            legend(["sw-requests", "answered by a model"], ["sw-cache", "cache hits"], ["sw-error", "errors"]),
            timeChart(points, { granularity: g, stack: [
              { key: "answered", color: COLORS.requests, label: "answered" },
              { key: "cache_hits", color: COLORS.cache, label: "cache hits" },
              { key: "errors", color: COLORS.error, label: "errors" }] })),
          h("div", { class: "card" }, h("h2", { text: `Spend and savings per ${g}` }),
            legend(["sw-spend", "spend"], ["sw-saved", "saved vs the top model (bar = the top model's cost)"]),
            timeChart(points, { granularity: g, format: fmtUSD, stack: [
              { key: "spend_usd", color: COLORS.spend, label: "spend" },
              { key: "saved_usd", color: COLORS.saved, label: "saved" }] })),
          h("div", { class: "card" }, h("h2", { text: `Latency per ${g}` }),
            legend(["sw-p50", "p50"], ["sw-p95", "p95"]),
            timeChart(points, { granularity: g, format: fmtMs, lines: [
              { key: "p50_ms", color: COLORS.p50, label: "p50" }, { key: "p95_ms", color: COLORS.p95, label: "p95" }] })),
          h("div", { class: "card" }, h("h2", { text: "Where the saving comes from" }),
            savingsTable(t)));
      },
    };
  }

  function savingsTable(t) {
    const routing = Math.max(0, t.saved_usd - t.cache_saved_usd);
    const rows = [["Routing: cheaper models answered", routing], ["Cache hits", t.cache_saved_usd],
      ["Prompt compression (estimate)", t.compression_saved_usd]];
    const total = rows.reduce((sum, [, v]) => sum + v, 0);
    return h("table", null,
      h("thead", null, h("tr", null, h("th", { text: "Source" }), h("th", { class: "num", text: "Saved" }),
        h("th", { text: "Share" }))),
      h("tbody", null, rows.map(([name, v]) => h("tr", null, h("td", { text: name }), h("td", { class: "num", text: fmtUSD(v) }),
        h("td", null, bar([[total ? v / total : 0, "accept"]], 10))))),
      h("tfoot", null, h("tr", null, h("td", null, h("strong", { text: "Spent" })),
        h("td", { class: "num", text: fmtUSD(t.spend_usd) }), h("td", { class: "muted small",
          text: "routing and cache make up the saving vs the top model; compression's estimate is counted apart" }))));
  }

  /** A horizontal bar of segments [[fraction, class, title]]. */
  function bar(segments, height) {
    return h("div", { class: "bar-track", style: height ? { height: `${height}px` } : null },
      segments.filter(([f]) => f > 0).map(([f, cls, title]) =>
        h("div", { class: `bar-seg ${cls}`, style: { width: `${Math.min(100, f * 100)}%` }, title: title || null })));
  }

  // -- Funnel -----------------------------------------------------------------------------------------------
  function noRoutes(root) {
    fill(root, h("div", { class: "card" }, empty("This gateway has no cascade routes: the funnel, judge and what-if views "
      + "describe cascades (routes of kind \"cascade\" in the configuration).")));
  }

  function reasonChips(escalated) {
    return Object.entries(escalated || {}).filter(([, n]) => n > 0)
      .map(([reason, n]) => h("span", { class: `chip ${reason === "score" ? "score" : "error"}`, text: `${reason} ${fmtInt(n)}` }));
  }

  function funnelView(root) {
    const head = h("div", { class: "view-head" }, h("h1", { text: "Routing funnel" }));
    const caption = h("span", { class: "muted" });
    head.append(caption);
    const story = h("p", { class: "story" });
    const kpis = h("div", { class: "kpis" });
    const body = h("div", { class: "card", id: "funnel" });
    root.append(head, kpis, story, body);

    return {
      async refresh() {
        await loadRoutes();
        if (!state.route) return noRoutes(body);
        const query = { route: state.route, ...windowQuery() };
        const [f, o] = await Promise.all([api("/admin/analytics/funnel", { query }),
          api("/admin/analytics/overview", { query: { ...query, granularity: WINDOWS[state.window].granularity } })]);
        const info = routeInfo(state.route);
        caption.textContent = `${state.route}${info ? ` · serving ${info.version}` : ""} · ${WINDOWS[state.window].label}`;
        const t = o.totals;
        fill(kpis, kpi("requests", "Requests", fmtInt(f.requests), "on this route"),
          kpi("cache", "Cache hits", fmtInt(f.cache_hits), f.requests ? fmtPct(f.cache_hits / f.requests) : ""),
          kpi("spend", "Spend", fmtUSD(t.spend_usd), t.requests ? `${fmtUSD(t.spend_usd / t.requests)} per request` : ""),
          kpi("saved", "Saved vs top model", fmtUSD(t.saved_usd),
            t.spend_usd + t.saved_usd > 0 ? `${fmtPct(t.saved_usd / (t.spend_usd + t.saved_usd))} of the top model's cost` : "", "hero"),
          kpi("tier1", "Accepted at tier 1", fmtPct(ratio(sumTier(f, 1, "accepted"), sumTier(f, 1, "reached"))),
            `${fmtInt(sumTier(f, 1, "accepted"))} of ${fmtInt(sumTier(f, 1, "reached"))} reaching it`),
          kpi("unanswered", "Unanswered", fmtInt(f.unanswered), f.unaccepted ? `${fmtInt(f.unaccepted)} fallback answers` : "",
            f.unanswered ? "bad" : ""),
          kpi("p95", "Latency p50 / p95", fmtMs(t.p50_ms), `p95 ${fmtMs(t.p95_ms)}`));
        if (!f.requests) {
          story.textContent = "";
          fill(body, empty(`No requests on ${state.route} in the ${WINDOWS[state.window].label}.`));
          return;
        }
        const parts = [`Of ${fmtInt(f.requests)} requests, ${fmtInt(f.cache_hits)} were answered from the cache`];
        const byTier = groupTiers(f.tiers);
        for (const [tier, rows] of byTier) {
          const accepted = rows.reduce((a, r) => a + r.accepted + (r.fallback_accepted || 0), 0);
          parts.push(`${fmtInt(accepted)} by tier ${tier} (${rows.map((r) => r.model).join(", ")})`);
        }
        story.textContent = `${parts.join(", ")}${f.unanswered ? `, and ${fmtInt(f.unanswered)} got no answer` : ""}.`;
        const max = Math.max(1, f.requests);
        const steps = [step("Requests", "into the route", [[f.requests / max, "requests"]],
          [h("div", { text: `${fmtInt(f.requests)} requests` })], "requests")];
        steps.push(step("Cache", "answered without a model", [[f.cache_hits / max, "cache"]],
          [h("div", { text: `${fmtInt(f.cache_hits)} hits · ${fmtPct(ratio(f.cache_hits, f.requests))}` })], "cache"));
        const thresholds = new Map((info ? info.tiers : []).map((tier) => [tier.model, tier.threshold]));
        for (const [tier, rows] of byTier) {
          for (const r of rows) {
            const escalated = Object.values(r.escalated || {}).reduce((a, b) => a + b, 0);
            const threshold = thresholds.get(r.model);
            steps.push(h("div", { class: "arrow", text: tier === byTier[0][0] ? "↓ cache misses go to the first tier" : "↓ escalated requests move on" }));
            steps.push(step(`Tier ${tier} · ${r.model}`, threshold === null || threshold === undefined
              ? (thresholds.has(r.model) ? "last tier: always accepted" : "") : `threshold ${threshold.toFixed(3)}`,
            [[r.accepted / max, "accept", `accepted ${r.accepted}`],
              [(r.fallback_accepted || 0) / max, "accept", `fallback ${r.fallback_accepted}`],
              [escalated / max, "escalate", `escalated ${escalated}`]],
            [h("div", { text: `reached ${fmtInt(r.reached)} · accepted ${fmtInt(r.accepted)} (${fmtPct(ratio(r.accepted, r.reached))})` }),
              h("div", { class: "chips" }, escalated ? h("span", { class: "chip", text: `escalated ${fmtInt(escalated)}:` }) : null,
                reasonChips(r.escalated), r.fallback_accepted ? h("span", { class: "chip info", text: `fallback ${r.fallback_accepted}` }) : null)],
            `tier-${tier}`));
          }
        }
        if (f.unanswered) {
          steps.push(step("Unanswered", "every tier failed", [[f.unanswered / max, "error"]],
            [h("div", { text: `${fmtInt(f.unanswered)} requests` })], "unanswered"));
        }
        fill(body, h("div", { class: "legend" }, h("span", null, h("i", { class: "sw-accept" }), "accepted"),
          h("span", null, h("i", { class: "sw-escalate" }), "escalated to the next tier"),
          h("span", null, h("i", { class: "sw-cache" }), "cache"), h("span", { text: "bar length: share of the route's requests" })), steps);
      },
    };
  }

  function step(name, sub, segments, figures, id) {
    return h("div", { class: "funnel-step", dataset: { step: id } },
      h("div", { class: "name" }, name, h("span", { class: "muted", text: sub || "" })),
      bar(segments), h("div", { class: "figures" }, figures));
  }

  function groupTiers(tiers) {
    const groups = new Map();
    for (const t of tiers || []) {
      if (!groups.has(t.tier)) groups.set(t.tier, []);
      groups.get(t.tier).push(t);
    }
    return [...groups.entries()].sort((a, b) => a[0] - b[0]);
  }

  const sumTier = (f, tier, field) => (f.tiers || []).filter((t) => t.tier === tier).reduce((a, t) => a + (t[field] || 0), 0);

  // -- Judge ------------------------------------------------------------------------------------------------
  function histogram(tier) {
    const W = 560, H = 206, L = 40, R = 14, T = 14, B = 36;
    const bins = tier.bins || [];
    const top = niceMax(Math.max(1, ...bins.map((b) => b.accepted + b.escalated)), true);
    const x = (v) => L + v * (W - L - R);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img" });
    for (let k = 0; k <= 4; k++) {
      const v = (top * k) / 4;
      svg.append(s("line", { class: k ? "grid-line" : "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
        s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", text: fmtInt(v) }));
    }
    for (let k = 0; k <= 10; k += 2) svg.append(s("text", { x: x(k / 10), y: H - 20, "text-anchor": "middle", text: (k / 10).toFixed(1) }));
    svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", text: "judge score" }));
    for (const b of bins) {
      const w = x(b.hi) - x(b.lo) - 1.5;
      if (b.accepted) {
        svg.append(s("rect", { x: x(b.lo) + 0.75, y: y(b.accepted), width: w, height: y(0) - y(b.accepted), fill: COLORS.accept },
          s("title", { text: `${b.lo.toFixed(2)}–${b.hi.toFixed(2)}: ${b.accepted} accepted` })));
      }
      if (b.escalated) {
        svg.append(s("rect", { x: x(b.lo) + 0.75, y: y(b.accepted + b.escalated), width: w, height: y(b.accepted) - y(b.accepted + b.escalated),
          fill: COLORS.escalate }, s("title", { text: `${b.lo.toFixed(2)}–${b.hi.toFixed(2)}: ${b.escalated} escalated` })));
      }
    }
    const threshold = tier.threshold ?? tier.threshold_seen;
    if (threshold !== null && threshold !== undefined) {
      svg.append(s("line", { class: "threshold", x1: x(threshold), x2: x(threshold), y1: T - 4, y2: y(0) }),
        s("text", { class: "strong", x: x(threshold) + (threshold > 0.8 ? -4 : 4), y: T + 6,
          "text-anchor": threshold > 0.8 ? "end" : "start", text: `threshold ${threshold.toFixed(3)}` }));
    }
    return svg;
  }

  function learningFacts(estimate) {
    if (!estimate) return h("p", { class: "muted small", text: "No labels for this tier in the window (audits and client feedback label answers: docs/learning.md)." });
    const fa = estimate.false_accept_rate;
    return h("dl", { class: "facts" },
      h("dt", { text: "False-accept rate" }),
      h("dd", { text: fa ? `${fmtPct(fa.estimate)} (95%: ${fmtPct(fa.low)} – ${fmtPct(fa.high)})` : "— (no audited answers)" }),
      h("dt", { text: "Audited answers" }), h("dd", { text: `${fmtInt(estimate.audited)} (${fmtInt(estimate.audited_bad)} wrong)` }),
      h("dt", { text: "Label coverage" }), h("dd", { text: fmtPct(estimate.label_coverage) }),
      h("dt", { text: "Escalation rate" }), h("dd", { text: fmtPct(estimate.escalation_rate) }),
      h("dt", { text: "Client labels" }), h("dd", { text: estimate.client_labels
        ? `${fmtInt(estimate.client_labels.good)} good · ${fmtInt(estimate.client_labels.bad)} bad` : "—" }),
      h("dt", { text: "Audit cost" }), h("dd", { text: fmtUSD(estimate.audit_cost_usd) }));
  }

  function judgeView(root) {
    const caption = h("span", { class: "muted" });
    const body = h("div", { class: "grid two", id: "judge" });
    root.append(h("div", { class: "view-head" }, h("h1", { text: "Judge scores" }), caption), body);
    return {
      async refresh() {
        await loadRoutes();
        if (!state.route) return noRoutes(body);
        const j = await api("/admin/analytics/judge", { query: { route: state.route, learning: "true", ...windowQuery() } });
        caption.textContent = `${state.route} · ${WINDOWS[state.window].label} · answers scored at or above the threshold are accepted`;
        if (!(j.tiers || []).length) {
          fill(body, h("div", { class: "card", style: { gridColumn: "1 / -1" } },
            empty(`No judged answers on ${state.route} in the ${WINDOWS[state.window].label}.`)));
          return;
        }
        const learning = j.learning && j.learning.tiers ? j.learning.tiers : null;
        fill(body, j.tiers.map((tier) => {
          const accepted = tier.bins.reduce((a, b) => a + b.accepted, 0);
          const escalated = tier.bins.reduce((a, b) => a + b.escalated, 0);
          return h("div", { class: "card", dataset: { tier: tier.tier } },
            h("h2", { text: `Tier ${tier.tier} · ${tier.model}` }),
            h("div", { class: "muted small", text: `${fmtInt(accepted)} accepted · ${fmtInt(escalated)} escalated on score`
              + (tier.threshold_seen !== null && tier.threshold_seen !== undefined && tier.threshold !== null
                && Math.abs(tier.threshold_seen - tier.threshold) > 1e-9 ? ` · threshold in the window: ${tier.threshold_seen.toFixed(3)}` : "") }),
            legend(["sw-accept", "accepted"], ["sw-escalate", "escalated"]),
            histogram(tier),
            h("h3", { text: "Learning estimate" }),
            learning ? learningFacts(learning[tier.model]) : h("p", { class: "muted small", text: "No estimate (the ledger has none for this window)." }));
        }));
      },
    };
  }

  // -- What-if ----------------------------------------------------------------------------------------------
  function frontierChart(data, proposal) {
    const W = 640, H = 340, L = 56, R = 36, T = 14, B = 38;
    const points = (data.frontier || []).filter((p) => Number.isFinite(p.cost_usd) && Number.isFinite(p.accuracy));
    const all = [...points, data.current].filter((p) => p && Number.isFinite(p.cost_usd) && Number.isFinite(p.accuracy));
    const costs = all.map((p) => p.cost_usd).filter((c) => c > 0);
    const lo = Math.min(...costs), hi = Math.max(...costs);
    const log = costs.length > 1 && hi / lo > 20;
    const cx = log ? (c) => Math.log10(Math.max(c, lo)) : (c) => c;
    const x0 = log ? Math.log10(lo) : 0, x1 = log ? Math.log10(hi) : hi * 1.05 || 1;
    const accs = all.map((p) => p.accuracy);
    const y0 = Math.max(0, Math.floor((Math.min(...accs) - 0.02) * 20) / 20), y1 = Math.min(1, Math.ceil((Math.max(...accs) + 0.01) * 20) / 20);
    const x = (c) => L + ((cx(c) - x0) / ((x1 - x0) || 1)) * (W - L - R);
    const y = (a) => T + (1 - (a - y0) / ((y1 - y0) || 1)) * (H - T - B);
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", id: "frontier-chart" });
    const yStep = y1 - y0 > 0.5 ? 0.1 : y1 - y0 > 0.2 ? 0.05 : 0.02;
    for (let k = 0; Math.ceil(y0 / yStep - 1e-9) * yStep + k * yStep <= y1 + 1e-9; k++) {
      const a = Math.ceil(y0 / yStep - 1e-9) * yStep + k * yStep;
      svg.append(s("line", { class: "grid-line", x1: L, x2: W - R, y1: y(a), y2: y(a) }),
        s("text", { x: L - 6, y: y(a) + 4, "text-anchor": "end", text: fmtPct(a, 0) }));
    }
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: y(y0), y2: y(y0) }));
    for (let k = 0; k <= 4; k++) {
      const v = x0 + ((x1 - x0) * k) / 4;
      const c = log ? 10 ** v : v;
      svg.append(s("text", { x: x(c), y: H - 20, "text-anchor": "middle", text: fmtUSD(c) }));
    }
    svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", text: `cost per query (USD${log ? ", log scale" : ""})` }),
      s("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle", text: "accuracy" }));
    const sorted = [...points].sort((a, b) => a.cost_usd - b.cost_usd);
    if (sorted.length > 1) {
      svg.append(s("path", { d: sorted.map((p, i) => `${i ? "L" : "M"}${x(p.cost_usd)},${y(p.accuracy)}`).join(" "),
        fill: "none", stroke: COLORS.frontier, "stroke-width": 1.5 }));
    }
    const describe = (p) => p.tiers.map((t) => `${t.model}${t.threshold === null || t.threshold === undefined ? "" : ` ≥ ${t.threshold.toFixed(3)}`}`).join(" → ");
    for (const p of sorted) {
      svg.append(s("circle", { cx: x(p.cost_usd), cy: y(p.accuracy), r: 4, fill: "#fff", stroke: COLORS.frontier, "stroke-width": 1.5 },
        s("title", { text: `${fmtPct(p.accuracy)} at ${fmtUSD(p.cost_usd)}: ${describe(p)}` })));
    }
    if (data.budget_usd !== null && data.budget_usd !== undefined && data.budget_usd > 0) {
      const bx = x(Math.min(Math.max(data.budget_usd, log ? lo : 0), hi));
      svg.append(s("line", { class: "threshold", x1: bx, x2: bx, y1: T, y2: H - B }),
        s("text", { class: "strong", x: bx + 4, y: H - B - 6, text: `budget ${fmtUSD(data.budget_usd)}` }));
    }
    if (proposal) {
      svg.append(s("circle", { cx: x(proposal.cost_usd), cy: y(proposal.accuracy), r: 8, fill: "none", stroke: COLORS.proposal,
        "stroke-width": 3, id: "proposal-point" }, s("title", { text: `proposal: ${describe(proposal)}` })));
    }
    const cur = data.current;
    if (cur && Number.isFinite(cur.cost_usd) && Number.isFinite(cur.accuracy)) {
      svg.append(s("circle", { cx: x(cur.cost_usd), cy: y(cur.accuracy), r: 6, fill: COLORS.current, id: "current-point" },
        s("title", { text: `serving now: ${describe(cur)}` })),
      s("text", { class: "strong", x: x(cur.cost_usd) + 9, y: y(cur.accuracy) - 8, text: "now" }));
    }
    return svg;
  }

  function tiersTable(tiers, compare) {
    return h("table", null, h("thead", null, h("tr", null, h("th", { text: "Tier" }), h("th", { text: "Model" }),
      h("th", { class: "num", text: "Threshold" }), compare ? h("th", { class: "num", text: "Now" }) : null)),
    h("tbody", null, tiers.map((t, i) => {
      const now = compare ? compare.find((c) => c.model === t.model) : null;
      const fmt = (v) => (v === null || v === undefined ? "always" : v.toFixed(3));
      return h("tr", null, h("td", { text: String(i + 1) }), h("td", { class: "mono", text: t.model }),
        h("td", { class: "num", text: fmt(t.threshold) }), compare ? h("td", { class: "num muted", text: now ? fmt(now.threshold) : "—" }) : null);
    })));
  }

  function whatifView(root) {
    const caption = h("span", { class: "muted" });
    const chart = h("div", { class: "card" });
    const side = h("div", { class: "card whatif-side stack" });
    const layout = h("div", { class: "grid", style: { gridTemplateColumns: "minmax(0, 1.7fr) minmax(0, 1fr)" } }, chart, side);
    root.append(h("div", { class: "view-head" }, h("h1", { text: "What-if" }), caption), layout);
    let budget = null;
    let scale = null; // slider position -> USD
    let shownRoute = null;
    let confirming = false;
    let result = null;
    let data = null;
    const slider = h("input", { type: "range", min: 0, max: 1000, step: 1, value: 1000, id: "budget-slider", "aria-label": "Budget per query" });
    const budgetLabel = h("strong", { id: "budget-value" });
    const proposalBox = h("div", { id: "proposal" });
    let timer = null;
    slider.addEventListener("input", () => {
      budget = scale ? scale(Number(slider.value)) : null;
      budgetLabel.textContent = budget === null ? "—" : fmtUSD(budget);
      confirming = false;
      clearTimeout(timer);
      timer = setTimeout(() => refresh(true), 250);
    });

    async function apply(proposal) {
      try {
        const done = await api("/admin/whatif/apply", { method: "POST", body: { route: state.route, tiers: proposal.tiers } });
        result = { ok: true, text: `Applied: ${state.route} now serves version ${done.applied ?? done.version}.`, tiers: done.tiers };
      } catch (exc) {
        if (exc instanceof ApiError && (exc.status === 401)) throw exc;
        result = { ok: false, text: exc.message };
      }
      confirming = false;
      await refresh(true);
    }

    function renderSide() {
      const cur = data.current || { tiers: [] };
      const proposal = data.proposal;
      const same = proposal && JSON.stringify(proposal.tiers) === JSON.stringify(cur.tiers);
      fill(proposalBox,
        proposal ? [h("h3", { text: "Proposal within the budget" }),
          h("dl", { class: "facts" }, h("dt", { text: "Accuracy" }), h("dd", { text: `${fmtPct(proposal.accuracy)}${cur.accuracy !== null && cur.accuracy !== undefined ? ` (now ${fmtPct(cur.accuracy)})` : ""}` }),
            h("dt", { text: "Cost per query" }), h("dd", { text: `${fmtUSD(proposal.cost_usd)}${cur.cost_usd !== null && cur.cost_usd !== undefined ? ` (now ${fmtUSD(cur.cost_usd)})` : ""}` })),
          tiersTable(proposal.tiers, cur.tiers),
          same ? h("p", { class: "muted", text: "The route serves these thresholds already." })
            : !confirming ? h("button", { class: "primary", id: "apply", onclick: () => { confirming = true; renderSide(); } }, "Apply thresholds…")
              : h("div", { class: "confirm", id: "confirm" },
                h("p", { text: `Serve these tiers on ${state.route} from now on? A new version is written and swapped in; roll back from the admin API (POST /admin/routes/rollback).` }),
                h("div", { class: "row" }, h("button", { class: "danger", id: "confirm-apply", onclick: (e) => { e.target.disabled = true; apply(proposal); } }, "Confirm: apply"),
                  h("button", { onclick: () => { confirming = false; renderSide(); } }, "Cancel")))]
          : h("p", { class: "muted", text: budget === null ? "Move the slider to choose a budget per query." : "No point of the frontier fits this budget." }),
        result ? h("div", { class: result.ok ? "result" : "confirm error", id: "apply-result", text: result.text }) : null);
    }

    return {
      async refresh() {
        await loadRoutes();
        if (!state.route) { noRoutes(layout); return; }
        if (shownRoute !== state.route) { budget = null; scale = null; result = null; confirming = false; }
        data = await api("/admin/whatif", { query: { route: state.route, budget_usd: budget === null ? null : budget.toPrecision(6) } });
        shownRoute = state.route;
        caption.textContent = `${state.route} · frontier from the ${data.source}${data.fitted_from ? ` (${data.fitted_from})` : ""}`;
        const costs = (data.frontier || []).map((p) => p.cost_usd).filter((c) => Number.isFinite(c) && c > 0);
        if (!costs.length) {
          fill(chart, empty(`No cost/accuracy frontier for ${state.route}: it comes from the cascade file that \`frugal cascade fit\` writes (source: ${data.source}).`));
          fill(side, h("h2", { text: "Serving now" }), tiersTable((data.current || { tiers: [] }).tiers));
          return;
        }
        const lo = Math.min(...costs), hi = Math.max(...costs);
        const fresh = scale === null;
        scale = hi / lo > 20 ? (v) => 10 ** (Math.log10(lo) + (v / 1000) * (Math.log10(hi) - Math.log10(lo))) : (v) => lo + (v / 1000) * (hi - lo);
        fill(chart, h("h2", { text: "Cost and accuracy of every cascade on the frontier" }),
          legend(["sw-frontier", "frontier (fitted offline)"], ["sw-current", "serving now"], ["sw-proposal", "best within the budget"]),
          frontierChart(data, data.proposal));
        const cur = data.current || { tiers: [] };
        if (!side.contains(slider)) {
          fill(side, h("h2", { text: "Serving now" }), h("div", { id: "current" }),
            h("h3", { text: "Budget per query" }), h("div", { class: "row" }, budgetLabel, h("span", { class: "muted small", text: `${fmtUSD(lo)} – ${fmtUSD(hi)}` })),
            slider, proposalBox);
        }
        fill($("#current", side), h("dl", { class: "facts" }, h("dt", { text: "Accuracy" }), h("dd", { text: fmtPct(cur.accuracy) }),
          h("dt", { text: "Cost per query" }), h("dd", { text: fmtUSD(cur.cost_usd) })),
        cur.accuracy === null || cur.accuracy === undefined ? h("p", { class: "muted small", text: "The live thresholds are not a point of the frontier." }) : null,
        tiersTable(cur.tiers));
        if (fresh && budget === null && Number.isFinite(cur.cost_usd)) {  // start the slider at the live point's cost
          let best = 1000;
          for (let v = 0; v <= 1000; v++) if (Math.abs(scale(v) - cur.cost_usd) < Math.abs(scale(best) - cur.cost_usd)) best = v;
          slider.value = best;
        }
        budgetLabel.textContent = budget === null ? "— (move the slider)" : fmtUSD(budget);
        renderSide();
      },
    };
  }

  // -- Traces -----------------------------------------------------------------------------------------------
  const OUTCOME_COLORS = { accepted: COLORS.accept, fallback_accepted: "#65a30d", rejected: COLORS.escalate, failed: COLORS.error,
    skipped: COLORS.skipped, ok: COLORS.accept };

  function tierChips(tiers) {
    return (tiers || []).map((t, i) => h("span", { class: `chip ${t.outcome === "accepted" || t.outcome === "fallback_accepted" ? "ok" : t.outcome === "rejected" ? "score" : "error"}`,
      text: `T${i + 1} ${t.outcome}${t.score !== null && t.score !== undefined ? ` ${t.score.toFixed(2)}` : ""}`, title: `${t.model}${t.reason ? ` · ${t.reason}` : ""}` }));
  }

  function timeline(trace) {
    const items = (trace.tiers && trace.tiers.length ? trace.tiers : (trace.attempts || [])).map((t, i) => ({ ...t, n: i + 1 }));
    if (!items.length) return empty(trace.cache ? "Answered from the cache: no model was called." : "No model was called.");
    const W = 900, rowH = 34, L = 200, R = 330, T = 22;
    const H = T + items.length * rowH + 8;
    const total = Math.max(1e-6, items.reduce((a, t) => a + (t.latency_s || 0), 0));
    const x = (v) => L + (v / total) * (W - L - R);
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", id: "timeline" });
    svg.append(s("text", { x: L, y: 12, text: "0 s" }), s("text", { x: W - R, y: 12, "text-anchor": "end", text: `${total.toFixed(3)} s` }),
      s("line", { class: "axis", x1: L, x2: W - R, y1: 16, y2: 16 }));
    let at = 0;
    items.forEach((t, i) => {
      const y = T + i * rowH;
      const w = Math.max(2, x(at + (t.latency_s || 0)) - x(at));
      const color = OUTCOME_COLORS[t.outcome] || (String(t.outcome).startsWith("skipped") ? COLORS.skipped : COLORS.error);
      const scored = t.score !== null && t.score !== undefined;
      const verdict = scored ? `score ${t.score.toFixed(3)} ${t.threshold === null || t.threshold === undefined ? "" : t.score >= t.threshold ? `≥ ${t.threshold.toFixed(3)}` : `< ${t.threshold.toFixed(3)}`}` : "";
      svg.append(
        s("text", { class: "strong", x: L - 8, y: y + 15, "text-anchor": "end", text: `${trace.tiers && trace.tiers.length ? "T" : "#"}${t.n} ${t.model}` }),
        s("text", { x: L - 8, y: y + 28, "text-anchor": "end", text: t.outcome }),
        s("rect", { x: x(at), y: y + 4, width: w, height: rowH - 12, rx: 3, fill: color }, s("title", { text: `${t.model}: ${t.outcome}, ${((t.latency_s || 0) * 1000).toFixed(0)} ms` })),
        s("text", { x: x(at) + w + 6, y: y + 15, class: "strong", text: [verdict, fmtUSD(t.cost_usd || 0), fmtMs((t.latency_s || 0) * 1000)].filter(Boolean).join(" · ") }),
        s("text", { x: x(at) + w + 6, y: y + 28, text: t.reason ? `escalated: ${t.reason}` : (t.message || "") }));
      at += t.latency_s || 0;
    });
    return svg;
  }

  function tracesView(root, arg) {
    const form = h("form", { class: "card row", id: "trace-search" },
      h("div", null, h("label", { for: "q-request", text: "Request id" }), h("input", { id: "q-request", name: "request_id", size: 30, placeholder: "x-request-id of a response" })),
      h("div", null, h("label", { for: "q-key", text: "Key id" }), h("input", { id: "q-key", name: "key_id", size: 18 })),
      h("div", null, h("label", { for: "q-route", text: "Route or model" }), h("input", { id: "q-route", name: "route", size: 16 })),
      h("div", null, h("label", { for: "q-since", text: "From (local time)" }), h("input", { id: "q-since", name: "since", type: "datetime-local" })),
      h("div", null, h("label", { for: "q-until", text: "To" }), h("input", { id: "q-until", name: "until", type: "datetime-local" })),
      h("button", { class: "primary", type: "submit" }, "Search"),
      h("button", { type: "button", onclick: () => { form.reset(); more = null; refresh(true); } }, "Clear"));
    const caption = h("span", { class: "muted" });
    const list = h("div", { class: "card", id: "trace-list" });
    const detail = h("div", { class: "card", id: "trace-detail", hidden: true });
    root.append(h("div", { class: "view-head" }, h("h1", { text: "Traces" }), caption), form, h("div", { class: "stack" }, detail, list));
    let rows = [];
    let more = null; // true once the operator paged on: then the auto-refresh leaves the list alone
    let selected = arg;

    form.addEventListener("submit", (e) => { e.preventDefault(); more = null; refresh(true); });

    function query() {
      const q = {};
      for (const name of ["request_id", "key_id", "route"]) q[name] = form.elements[name].value.trim();
      const w = windowQuery();
      const since = form.elements.since.value, until = form.elements.until.value;
      q.since = since ? new Date(since).toISOString() : w.since;
      q.until = until ? new Date(until).toISOString() : w.until;
      if (q.request_id) { q.since = new Date(Date.now() - 90 * 86400e3 + 60e3).toISOString(); q.until = new Date(Date.now() + 60e3).toISOString(); }
      return q;
    }

    function renderList(hasMore, next) {
      if (!rows.length) { fill(list, empty("No requests match in this window.")); return; }
      fill(list, h("table", null,
        h("thead", null, h("tr", null, ["Time", "Request", "Key", "Route", "Model", "Status", "Cost", "Latency", "Cache", "Tiers"]
          .map((t) => h("th", { text: t, class: ["Cost", "Latency"].includes(t) ? "num" : null })))),
        h("tbody", null, rows.map((r) => h("tr", { class: `clickable${r.id === selected ? " selected" : ""}`, dataset: { id: r.id },
          onclick: () => { location.hash = `#traces/${encodeURIComponent(r.id)}`; } },
        h("td", { class: "nowrap", text: fmtTime(r.created_at).slice(5), title: fmtTime(r.created_at) }),
        h("td", { class: "mono ellipsis", text: r.id, title: r.id }),
        h("td", { class: "mono", text: r.key_id || "—" }),
        h("td", null, r.route || "—", r.purpose && r.purpose !== "client" ? h("span", { class: "chip info", style: { marginLeft: "0.3rem" }, text: r.purpose, title: "the operator's shadow audit, not a client request" }) : null),
        h("td", { class: "mono", text: r.model || "—" }),
        h("td", { class: r.status < 400 ? "status-ok" : "status-bad", text: `${r.status}${r.error_code ? ` ${r.error_code}` : ""}` }),
        h("td", { class: "num", text: fmtUSD(r.cost_usd) }), h("td", { class: "num", text: fmtMs(r.latency_ms) }),
        h("td", { text: r.cache || "" }), h("td", null, h("div", { class: "chips" }, tierChips(r.tiers))))))),
      hasMore ? h("div", { class: "row", style: { marginTop: "0.6rem" } }, h("button", { onclick: async () => {
        const page = await api("/admin/traces", { query: { ...query(), after: next, limit: 50 } });
        rows = rows.concat(page.data);
        more = true;
        renderList(page.has_more, page.next);
      } }, "Load more")) : null);
    }

    async function showDetail() {
      if (!selected) { detail.hidden = true; return; }
      let t;
      try {
        t = await api(`/admin/traces/${encodeURIComponent(selected)}`);
      } catch (exc) {
        if (!(exc instanceof ApiError) || exc.status !== 404) throw exc;
        detail.hidden = false;
        fill(detail, h("p", { class: "error", text: exc.message }));
        return;
      }
      const trace = t.trace || {};
      const scalars = Object.entries(t).filter(([k, v]) => !["trace", "prompt", "response"].includes(k) && (v === null || typeof v !== "object"));
      detail.hidden = false;
      fill(detail, h("div", { class: "row", style: { justifyContent: "space-between", alignItems: "baseline" } },
        h("h2", { class: "mono", text: t.id }), h("a", { href: "#traces", text: "close" })),
      h("div", { class: "grid", style: { gridTemplateColumns: "minmax(0, 1fr) minmax(0, 2.4fr)" } },
        h("dl", { class: "facts", id: "trace-facts" }, scalars.flatMap(([k, v]) => [h("dt", { text: k }),
          h("dd", { class: k === "id" ? "mono" : null, text: k === "created_at" ? fmtTime(v) : k.endsWith("_usd") ? fmtUSD(v) : k.endsWith("_ms") ? fmtMs(v) : v === null ? "—" : String(v) })])),
        h("div", null, h("h3", { text: trace.tiers && trace.tiers.length ? `Cascade${trace.version ? ` (version ${trace.version})` : ""}: ${trace.accepted ? `accepted at tier ${trace.accepted_tier}` : "no tier accepted"}${trace.saved_usd !== null && trace.saved_usd !== undefined ? ` · saved ${fmtUSD(trace.saved_usd)}` : ""}` : "Attempts" }),
          legend(["sw-accept", "accepted"], ["sw-escalate", "rejected by the judge"], ["sw-error", "failed"]),
          timeline(trace),
          trace.cache ? h("p", null, h("span", { class: "chip info", text: `cache ${trace.cache.result || ""}` }), ` ${JSON.stringify(trace.cache)}`) : null,
          (trace.compression || []).length ? h("p", { class: "small", text: `Compression: ${trace.compression.map((c) => `${c.model} ${c.outcome} ${c.tokens_before}→${c.tokens_after} tokens, saved ${fmtUSD(c.saved_usd)}`).join("; ")}` }) : null,
          h("details", null, h("summary", { text: "Raw trace" }), h("pre", { class: "json", text: JSON.stringify(trace, null, 2) })),
          t.prompt !== undefined && t.prompt !== null ? h("details", null, h("summary", { text: "Prompt and response" }),
            h("pre", { class: "json", text: typeof t.prompt === "string" ? t.prompt : JSON.stringify(t.prompt, null, 2) }),
            h("pre", { class: "json", text: typeof t.response === "string" ? t.response : JSON.stringify(t.response, null, 2) })) : null)));
    }

    return {
      open(newArg) { selected = newArg; for (const tr of list.querySelectorAll("tr[data-id]")) tr.classList.toggle("selected", tr.dataset.id === selected); },
      async refresh() {
        const q = query();
        caption.textContent = form.elements.since.value || form.elements.until.value || q.request_id ? "search" : WINDOWS[state.window].label;
        const detailDone = showDetail();
        if (more === null) {
          const page = await api("/admin/traces", { query: { ...q, limit: 50 } });
          rows = page.data;
          renderList(page.has_more, page.next);
        }
        await detailDone;
      },
    };
  }

  // -- Keys & budgets ---------------------------------------------------------------------------------------
  /** A budget against its limit. `exhausted` (from the API): spent to the limit, or refusing — the gateway
   * reserves a request's maximum, so what is left can be too little for one more request. */
  function budgetBar(b, big) {
    const exhausted = Boolean(b.exhausted);
    const refusing = exhausted && b.last_refused_at && b.spent_usd < (b.limit_usd || 0);
    const limit = b.limit_usd || 0;
    const spent = limit ? b.spent_usd / limit : (b.spent_usd > 0 ? 1 : 0);
    const reserved = limit ? b.reserved_usd / limit : 0;
    return h("div", { class: `budget${big ? " big-budget" : ""}`, dataset: { period: b.period, exhausted: String(exhausted) } },
      h("div", { class: "caption" }, h("span", null, h("strong", { text: b.period }), ` ${fmtUSD(b.spent_usd)} of ${fmtUSD(limit)}`,
        b.reserved_usd ? ` (+${fmtUSD(b.reserved_usd)} held)` : ""),
      exhausted ? h("span", { class: "badge exhausted", text: "exhausted" }) : h("span", { text: b.resets_at ? `resets ${fmtTime(b.resets_at, false)}` : "never resets" })),
      bar([[Math.min(1, spent), exhausted ? "over" : spent >= 0.9 ? "escalate" : "spent", `spent ${fmtUSD(b.spent_usd)}`],
        [Math.min(reserved, Math.max(0, 1 - spent)), "reserved", "held for requests in flight"]]),
      refusing ? h("div", { class: "caption" }, h("span", { class: "error",
        text: `refusing requests: ${fmtUSD(b.remaining_usd ?? Math.max(0, limit - b.spent_usd))} left is less than a request may cost · last refused ${fmtTime(b.last_refused_at)}` })) : null);
  }

  function keyStatus(k) {
    if (k.revoked_at) return h("span", { class: "badge revoked", text: "revoked" });
    if (k.expires_at && Date.parse(k.expires_at) <= Date.now()) return h("span", { class: "badge expired", text: "expired" });
    if ([...(k.budgets || []), ...(k.team_budgets || [])].some((b) => b.exhausted)) return h("span", { class: "badge exhausted", text: "budget exhausted" });
    if ((k.budgets || []).some((b) => b.limit_usd && b.spent_usd >= 0.95 * b.limit_usd)) {
      return h("span", { class: "badge expired", text: "budget 95% spent" });
    }
    return h("span", { class: "badge active", text: "active" });
  }

  function budgetFields(prefix) {
    return [h("div", null, h("label", { for: `${prefix}-period`, text: "Budget" }),
      h("select", { id: `${prefix}-period`, name: "period" }, h("option", { value: "", text: "none" }),
        ["day", "month", "total"].map((p) => h("option", { value: p, text: p })))),
    h("div", null, h("label", { for: `${prefix}-limit`, text: "Limit (USD)" }),
      h("input", { id: `${prefix}-limit`, name: "limit_usd", type: "number", min: 0, step: "any", size: 8, placeholder: "10.00" }))];
  }

  function budgetsOf(form) {
    const period = form.elements.period.value;
    const limit = form.elements.limit_usd.value;
    if (!period) return undefined;
    if (limit === "") throw new ApiError(400, "Give the budget's limit in USD.");
    return [{ period, limit_usd: Number(limit) }];
  }

  async function revokeKey(k, after) {
    if (!window.confirm(`Revoke key "${k.name}" (${k.prefix}…)? Requests with it are refused from now on.`)) return;
    try {
      await api(`/admin/keys/${encodeURIComponent(k.id)}/revoke`, { method: "POST" });
      after(null);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) throw exc;
      after(exc.message);
    }
  }

  function keysView(root, arg) {
    let teams = [];
    const includeRevoked = h("input", { type: "checkbox", id: "include-revoked", onchange: () => refresh(true) });
    const message = h("p", { class: "error", role: "alert", hidden: true });
    const secretBox = h("div", { class: "card secret", id: "new-key", hidden: true });
    const teamSelect = h("select", { id: "k-team", name: "team_id" });
    const createForm = h("form", { class: "card", id: "create-key", autocomplete: "off" }, h("h2", { text: "New key" }),
      h("div", { class: "row" },
        h("div", null, h("label", { for: "k-name", text: "Name" }), h("input", { id: "k-name", name: "name", required: true, size: 16 })),
        h("div", null, h("label", { for: "k-team", text: "Team" }), teamSelect)),
      h("div", { class: "row" }, budgetFields("k")),
      h("label", { for: "k-models", text: "Models and routes it may call (comma-separated; empty: all)" }),
      h("input", { id: "k-models", name: "models", style: { width: "100%" } }),
      h("label", { for: "k-expires", text: "Expires (optional, local time)" }),
      h("input", { id: "k-expires", name: "expires_at", type: "datetime-local" }),
      h("div", { class: "row", style: { marginTop: "0.8rem" } }, h("button", { class: "primary", type: "submit", id: "create-key-button" }, "Create key")));
    const teamForm = h("form", { class: "card", id: "create-team", autocomplete: "off" }, h("h2", { text: "New team" }),
      h("div", { class: "row" }, h("div", null, h("label", { for: "t-name", text: "Name" }), h("input", { id: "t-name", name: "name", required: true, size: 14 })),
        budgetFields("t")),
      h("div", { class: "row", style: { marginTop: "0.8rem" } }, h("button", { class: "primary", type: "submit" }, "Create team")));
    const keyList = h("div", { id: "key-list" });
    const teamList = h("div", { id: "team-list" });
    const keyDetail = h("div", { class: "card", id: "key-detail", hidden: true });
    let selected = arg;

    root.append(h("div", { class: "view-head" }, h("h1", { text: "Keys & budgets" }),
      h("label", { class: "inline" }, includeRevoked, "show revoked keys")), message, h("div", { class: "stack gap" }, secretBox, keyDetail),
    h("div", { class: "grid", style: { gridTemplateColumns: "minmax(0, 2.2fr) minmax(0, 1fr)" } },
      h("div", { class: "card" }, h("h2", { text: "Keys" }), keyList),
      h("div", { class: "stack" }, createForm, teamForm, h("div", { class: "card" }, h("h2", { text: "Teams" }), teamList))));

    const fail = (text) => { message.hidden = !text; message.textContent = text || ""; };

    createForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      fail(null);
      const f = createForm.elements;
      try {
        const body = { name: f.name.value.trim() };
        if (f.team_id.value) body.team_id = f.team_id.value;
        const models = f.models.value.split(",").map((m) => m.trim()).filter(Boolean);
        if (models.length) body.models = models;
        if (f.expires_at.value) body.expires_at = new Date(f.expires_at.value).toISOString();
        const budgets = budgetsOf(createForm);
        if (budgets) body.budgets = budgets;
        const made = await api("/admin/keys", { method: "POST", body });
        showSecret(made);
        createForm.reset();
        await refresh(true);
      } catch (exc) {
        if (exc instanceof ApiError && exc.status === 401) { signOut(exc.message); return; }
        fail(exc.message);
      }
    });

    teamForm.addEventListener("submit", async (e) => {
      e.preventDefault();
      fail(null);
      try {
        const body = { name: teamForm.elements.name.value.trim() };
        const budgets = budgetsOf(teamForm);
        if (budgets) body.budgets = budgets;
        await api("/admin/teams", { method: "POST", body });
        teamForm.reset();
        await refresh(true);
      } catch (exc) {
        if (exc instanceof ApiError && exc.status === 401) { signOut(exc.message); return; }
        fail(exc.message);
      }
    });

    function showSecret(made) {
      const input = h("input", { readonly: true, value: made.key, id: "new-key-secret", "aria-label": "The new key" });
      const copied = h("span", { class: "muted small" });
      secretBox.hidden = false;
      fill(secretBox, h("h2", { text: `Key "${made.name}" created` }),
        h("p", { class: "warn", text: "Copy the key now: it is shown this once and cannot be read again (the gateway keeps only its hash)." }),
        h("div", { class: "row" }, input, h("button", { type: "button", id: "copy-key", onclick: async () => {
          input.select();
          try { await navigator.clipboard.writeText(made.key); copied.textContent = "copied"; } catch { document.execCommand("copy"); copied.textContent = "copied"; }
        } }, "Copy"), copied, h("button", { type: "button", onclick: () => { secretBox.hidden = true; secretBox.replaceChildren(); } }, "Done")),
        h("p", { class: "muted small", text: `id ${made.id} · prefix ${made.prefix}` }));
    }

    async function renderDetail() {
      if (!selected) { keyDetail.hidden = true; return; }
      const want = selected;
      let k;
      try {
        k = await api(`/admin/keys/${encodeURIComponent(want)}`);
      } catch (exc) {
        if (selected !== want) return;
        if (!(exc instanceof ApiError) || exc.status !== 404) throw exc;
        keyDetail.hidden = false;
        fill(keyDetail, h("p", { class: "error", text: exc.message }));
        return;
      }
      if (selected !== want) return;  // another key was opened meanwhile: its own render shows it
      // Its team's budgets refuse its requests too: a key is refused when any of them is exhausted.
      const teamBudgets = k.team_budgets || [];
      const byTeam = teamBudgets.some((b) => b.exhausted);
      keyDetail.hidden = false;
      fill(keyDetail, h("div", { class: "row", style: { justifyContent: "space-between", alignItems: "baseline" } },
        h("h2", null, `${k.name} `, keyStatus(k)), h("a", { href: "#keys", text: "close" })),
      byTeam ? h("p", { class: "error", text: `Refusing requests for its team's budget (team ${k.team_id}).` }) : null,
      h("div", { class: "grid two" },
        h("dl", { class: "facts" },
          ...[["Id", k.id], ["Prefix", `${k.prefix}…`], ["Team", k.team_id || "—"], ["Scope", k.models ? k.models.join(", ") : "every model and route"],
            ["Created", fmtTime(k.created_at)], ["Expires", k.expires_at ? fmtTime(k.expires_at) : "never"], ["Revoked", k.revoked_at ? fmtTime(k.revoked_at) : "—"],
            ["Rate limits", `${k.requests_per_minute ?? "default"} req/min · ${k.tokens_per_minute ?? "default"} tokens/min`],
            ["Metadata", k.metadata && Object.keys(k.metadata).length ? JSON.stringify(k.metadata) : "—"]]
            .flatMap(([a, b]) => [h("dt", { text: a }), h("dd", { text: b })])),
        h("div", { id: "key-budgets" }, h("h3", { text: "Budgets" }),
          (k.budgets || []).length ? k.budgets.map((b) => budgetBar(b, true)) : h("p", { class: "muted", text: teamBudgets.length ? "No budget of its own." : "No budget: this key may spend without limit." }),
          teamBudgets.length ? h("h3", { text: `Its team's budgets (${k.team_id})` }) : null,
          ...teamBudgets.map((b) => budgetBar(b, true)),
          h("p", { class: "small" }, h("a", { href: `#traces`, onclick: (e) => { e.preventDefault(); location.hash = "#traces"; setTimeout(() => { const f = $("#trace-search"); if (f) { f.elements.key_id.value = k.id; f.requestSubmit(); } }, 50); } }, "Traces of this key")),
          k.revoked_at ? null : h("button", { class: "danger", onclick: () => revokeKey(k, (err) => { fail(err); refresh(true); }) }, "Revoke key"))));
    }

    return {
      open(newArg) { selected = newArg; },
      async refresh() {
        const want = selected;
        const [keys, teamPage] = await Promise.all([
          api("/admin/keys", { query: { limit: 100, include_revoked: includeRevoked.checked ? "true" : null } }),
          api("/admin/teams", { query: { limit: 100 } })]);
        if (selected !== want) return;  // a refresh for the key opened since is under way: it renders
        teams = teamPage.data || [];
        const chosen = teamSelect.value;
        fill(teamSelect, h("option", { value: "", text: "none" }), teams.map((t) => h("option", { value: t.id, text: t.name })));
        teamSelect.value = teams.some((t) => t.id === chosen) ? chosen : "";
        const teamName = (id) => (teams.find((t) => t.id === id) || {}).name || id;
        if (!keys.data.length) {
          fill(keyList, empty("No virtual keys yet. Create one on the right; keys of the configuration file are not listed here."));
        } else {
          fill(keyList, h("table", null, h("thead", null, h("tr", null, ["Name", "Team", "Budgets", "Status", "Created", ""].map((t) => h("th", { text: t })))),
            h("tbody", null, keys.data.map((k) => h("tr", { class: `clickable${k.id === selected ? " selected" : ""}`, dataset: { key: k.id },
              onclick: (e) => { if (e.target.tagName !== "BUTTON") location.hash = `#keys/${encodeURIComponent(k.id)}`; } },
            h("td", null, h("strong", { text: k.name }), h("div", { class: "muted small mono", text: `${k.id} · ${k.prefix}…` })),
            h("td", { text: k.team_id ? teamName(k.team_id) : "—" }),
            h("td", null, (k.budgets || []).length ? k.budgets.map((b) => budgetBar(b))
              : h("span", { class: "muted", text: (k.team_budgets || []).length ? "its team's budgets" : "no limit" })),
            h("td", null, keyStatus(k)), h("td", { class: "small nowrap", text: fmtTime(k.created_at, false).slice(0, 10) }),
            h("td", null, k.revoked_at ? null : h("button", { onclick: () => revokeKey(k, (err) => { fail(err); refresh(true); }) }, "Revoke")))))),
          keys.has_more ? h("p", { class: "muted small", text: "Showing the newest 100 keys." }) : null);
        }
        fill(teamList, teams.length ? h("table", null, h("tbody", null, teams.map((t) => h("tr", null,
          h("td", null, h("strong", { text: t.name }), h("div", { class: "muted small mono", text: t.id })),
          h("td", null, (t.budgets || []).length ? t.budgets.map((b) => budgetBar(b)) : h("span", { class: "muted", text: "no limit" }))))))
          : empty("No teams yet."));
        await renderDetail();
      },
    };
  }

  // -- Audit log --------------------------------------------------------------------------------------------
  function auditView(root) {
    const list = h("div", { class: "card", id: "audit-list" });
    root.append(h("div", { class: "view-head" }, h("h1", { text: "Audit log" }),
      h("span", { class: "muted", text: "every change made through the admin API, newest first" })), list);
    let entries = [];
    let paged = false;
    function render(hasMore, next) {
      if (!entries.length) { fill(list, empty("No changes yet.")); return; }
      fill(list, h("table", null, h("thead", null, h("tr", null, ["When", "Actor", "Action", "Target", "Change"].map((t) => h("th", { text: t })))),
        h("tbody", null, entries.map((e) => h("tr", null, h("td", { class: "small", text: fmtTime(e.at) }), h("td", { text: e.actor }),
          h("td", null, h("span", { class: "chip info", text: e.action })), h("td", { class: "mono", text: e.target }),
          h("td", null, h("details", null, h("summary", { text: e.before ? "before / after" : "after" }),
            e.before ? h("pre", { class: "json", text: JSON.stringify(e.before, null, 2) }) : null,
            h("pre", { class: "json", text: JSON.stringify(e.after, null, 2) }))))))),
      hasMore ? h("button", { style: { marginTop: "0.6rem" }, onclick: async () => {
        const page = await api("/admin/audit", { query: { limit: 50, after: next } });
        entries = entries.concat(page.data);
        paged = true;
        render(page.has_more, page.next);
      } }, "Load more") : null);
    }
    return {
      async refresh() {
        if (paged) return;
        const page = await api("/admin/audit", { query: { limit: 50 } });
        entries = page.data;
        render(page.has_more, page.next);
      },
    };
  }

  const VIEWS = {
    overview: { title: "Overview", usesRoute: false, mount: overviewView },
    funnel: { title: "Funnel", usesRoute: true, mount: funnelView },
    judge: { title: "Judge", usesRoute: true, mount: judgeView },
    whatif: { title: "What-if", usesRoute: true, mount: whatifView },
    traces: { title: "Traces", usesRoute: false, mount: tracesView },
    keys: { title: "Keys & budgets", usesRoute: false, mount: keysView },
    audit: { title: "Audit log", usesRoute: false, mount: auditView },
  };

  // -- wiring -----------------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("#login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("#login-key").value.trim();
      if (key) signIn(key);
    });
    $("#sign-out").addEventListener("click", () => signOut(null));
    $("#refresh").addEventListener("click", () => refresh(true));
    $("#route-select").addEventListener("change", (e) => {
      state.route = e.target.value;
      sessionStorage.setItem(ROUTE_STORE, state.route);
      if (state.view) { $("#view").replaceChildren(); state.view = null; navigate(); }
    });
    for (const button of document.querySelectorAll("#window button")) {
      button.classList.toggle("on", button.dataset.window === state.window);
      button.addEventListener("click", () => {
        state.window = button.dataset.window;
        sessionStorage.setItem(WINDOW_STORE, state.window);
        for (const b of document.querySelectorAll("#window button")) b.classList.toggle("on", b === button);
        refresh(true);
      });
    }
    window.addEventListener("hashchange", navigate);
    if (state.key) signIn(state.key);
    else showLogin(null);
  });
})();
