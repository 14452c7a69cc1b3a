//! The status page at `GET /` on the metrics listener: one self-contained HTML document (inline
//! CSS and JS, no external assets, no build step) that shows each route's rates, duplicate
//! ratio, in-flight count, rejections by reason, takeovers, conflicts and store errors, and the state of
//! upstream, downstream and store, refreshing itself every 2 s.
//!
//! # Why the browser computes it from `/metrics`
//!
//! The page's script fetches `/metrics` (relative, so it also works behind a reverse proxy
//! that serves dedupd under a sub-path), parses the Prometheus text, and computes rates from
//! two successive samples. The alternative, rendering on the server, would have to parse that
//! same text too (the recorder's handle only renders it) and keep the previous sample per
//! viewer to compute rates. Computing in the browser instead means:
//!
//! - the page shows exactly what a scraper sees, from one source of truth, and the test checks
//!   the rendered page against `/metrics` itself;
//! - the server holds no state for viewers and serves a constant string;
//! - rates are over the viewer's own refresh interval, and a page left open keeps working
//!   across a restart of dedupd (a counter that went down is treated as a reset).
//!
//! The metric names are not spelled in the page: [`page`] fills them in from the constants of
//! the parent module once, so the page and the exporter cannot disagree.
//!
//! The response carries a Content-Security-Policy that allows only inline script and style and
//! requests to this origin, so a browser enforces "no external assets" too.

use std::sync::LazyLock;

use super::{
    reason, BUILD_INFO, CONFLICTS, CONSUMED, DUPLICATES, FORWARDED, INFLIGHT, REJECTED,
    ROUTE_FAILURES, STORE_ERRORS, STORE_KEYS, STORE_MEMORY, TAKEOVERS, UP,
};

/// The Content-Security-Policy of the page.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Replaced by a JSON object of the metric names the script reads.
const NAMES_PLACEHOLDER: &str = "/*METRIC_NAMES*/";

/// The page, metric names filled in.
pub fn page() -> &'static str {
    static PAGE: LazyLock<String> = LazyLock::new(|| {
        let names = serde_json::json!({
            "consumed": CONSUMED,
            "forwarded": FORWARDED,
            "duplicates": DUPLICATES,
            "rejected": REJECTED,
            "takeovers": TAKEOVERS,
            "conflicts": CONFLICTS,
            "storeErrors": STORE_ERRORS,
            "inflight": INFLIGHT,
            "up": UP,
            "buildInfo": BUILD_INFO,
            "routeFailures": ROUTE_FAILURES,
            "storeKeys": STORE_KEYS,
            "storeMemory": STORE_MEMORY,
            "notRejections": [reason::USER_ID_STRIPPED],
        });
        TEMPLATE.replacen(NAMES_PLACEHOLDER, &names.to_string(), 1)
    });
    &PAGE
}

/// The page. Everything is built with DOM calls and `textContent` (never `innerHTML`), so no
/// label value can inject markup. Cells carry `data-field` and `data-value` (the raw number) for
/// tests and scripts; the text is the same number formatted for people.
const TEMPLATE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dedupd status</title>
<style>
:root { --ok: #1a7f37; --bad: #cf222e; --muted: #656d76; --line: #d0d7de; --head: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1f2328; background: #fff; }
header { display: flex; align-items: baseline; gap: 16px; padding: 12px 24px;
         background: #24292f; color: #fff; }
header h1 { margin: 0; font-size: 18px; font-weight: 600; }
header .meta { color: #afb8c1; font-size: 12px; }
header .meta b { color: #fff; font-weight: 500; }
#banner { display: none; padding: 8px 24px; background: #fff8c5; border-bottom: 1px solid #d4a72c; }
#banner.show { display: block; }
main { padding: 12px 24px 20px; }
h2 { margin: 18px 0 8px; font-size: 13px; font-weight: 600; text-transform: uppercase;
     letter-spacing: .05em; color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { min-width: 190px; padding: 10px 14px; border: 1px solid var(--line); border-radius: 6px; }
.card .name { font-size: 12px; color: var(--muted); }
.card .detail { font-size: 12px; color: var(--muted); }
.state { font-size: 17px; font-weight: 600; }
.state::before { content: "\25CF\00A0"; }
.state[data-state="up"] { color: var(--ok); }
.state[data-state="down"] { color: var(--bad); }
.state[data-state="unknown"] { color: var(--muted); }
.state[data-state="unknown"]::before { content: "\25CB\00A0"; }
table { width: 100%; border-collapse: collapse; }
th, td { padding: 7px 12px; border-bottom: 1px solid var(--line); text-align: right;
         white-space: nowrap; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child { text-align: left; }
thead th { background: var(--head); font-size: 12px; font-weight: 600; vertical-align: bottom; }
td > span { display: block; }
td > span.second { font-size: 12px; color: var(--muted); }
td > span.second.warn { color: var(--bad); }
.scroll { overflow-x: auto; }
thead th small { display: block; font-weight: 400; color: var(--muted); }
td.route { font-weight: 600; }
td.none { color: var(--muted); text-align: center; padding: 20px; }
.pending { color: var(--muted); }
.warn { color: var(--bad); font-weight: 600; }
.reasons { font-size: 12px; color: var(--muted); }
footer { padding: 0 24px 16px; font-size: 12px; color: var(--muted); }
</style>
</head>
<body>
<header>
  <h1>dedupd</h1>
  <span class="meta">version <b id="version">…</b></span>
  <span class="meta">updated <b id="updated">never</b></span>
</header>
<div id="banner" role="alert"></div>
<main>
  <h2>Components</h2>
  <div class="cards">
    <div class="card"><div class="name">upstream</div>
      <div class="state" id="c-upstream" data-state="unknown">no data yet</div>
      <div class="detail">every route's consumer</div></div>
    <div class="card"><div class="name">downstream</div>
      <div class="state" id="c-downstream" data-state="unknown">no data yet</div>
      <div class="detail">every route's publisher</div></div>
    <div class="card"><div class="name">store</div>
      <div class="state" id="c-store" data-state="unknown">no data yet</div>
      <div class="detail" id="store-size">size not sampled yet</div></div>
  </div>
  <h2>Routes</h2>
  <div class="scroll"><table>
    <thead><tr>
      <th>route</th>
      <th>consumed<small>per second<br>total</small></th>
      <th>forwarded<small>per second<br>total</small></th>
      <th>duplicates<small>per second<br>total</small></th>
      <th>duplicate ratio<small>last 2 s<br>since start</small></th>
      <th>in flight</th>
      <th>rejected<small>total, by reason</small></th>
      <th>takeovers<small>possible duplicates</small></th>
      <th>conflicts<small>same key, other body</small></th>
      <th>store errors</th>
      <th>keys in store<small>sampled</small></th>
    </tr></thead>
    <tbody id="routes"><tr><td class="none" colspan="11">no data yet: waiting for /metrics</td></tr></tbody>
  </table></div>
</main>
<footer>Rates are computed in this page from successive samples of <a href="metrics">/metrics</a>,
every 2 s. Totals count since dedupd started.</footer>
<script>
"use strict";
const NAMES = /*METRIC_NAMES*/;
const REFRESH_MS = 2000;
let previous = null;

// Prometheus text format: `name{label="value",...} value`, comments start with '#'.
function parseMetrics(text) {
  const series = new Map();
  for (const line of text.split("\n")) {
    if (line === "" || line[0] === "#") continue;
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    const re = /([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    let l;
    while (m[2] !== undefined && (l = re.exec(m[2])) !== null) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    if (!series.has(m[1])) series.set(m[1], []);
    series.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return series;
}

// Sum of `name` per value of label `by` (other labels summed over).
function byLabel(series, name, by) {
  const out = new Map();
  for (const s of series.get(name) || []) {
    const key = s.labels[by];
    if (key === undefined) continue;
    out.set(key, (out.get(key) || 0) + s.value);
  }
  return out;
}

function rejections(series) {
  const out = new Map();
  for (const s of series.get(NAMES.rejected) || []) {
    const route = s.labels.route, why = s.labels.reason;
    if (route === undefined || NAMES.notRejections.includes(why)) continue;
    if (!out.has(route)) out.set(route, new Map());
    const reasons = out.get(route);
    reasons.set(why, (reasons.get(why) || 0) + s.value);
  }
  return out;
}

const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
function fmtRate(r) {
  if (r === null) return "…";
  return (r < 100 ? r.toFixed(1) : fmtInt(r)) + "/s";
}
const fmtPct = (x) => (x === null ? "–" : (100 * x).toFixed(1) + "%");
function fmtBytes(b) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return (i === 0 ? b.toFixed(0) : b.toFixed(1)) + " " + units[i];
}

// An element showing one number: `data-field` names it, `data-value` holds it unformatted.
function shown(tag, field, value, text, cls) {
  const el = document.createElement(tag);
  el.dataset.field = field;
  el.dataset.value = value === null ? "" : String(value);
  el.textContent = text;
  if (cls) el.className = cls;
  return el;
}
const cell = (field, value, text, cls) => shown("td", field, value, text, cls);

// A cell of two numbers, one above the other (a rate above its total, say).
function stacked(first, second) {
  const td = document.createElement("td");
  second.classList.add("second");
  td.append(first, second);
  return td;
}

// Counter increase per second since the previous sample; null without one, or after a reset.
function rate(now, before, dt) {
  if (before === undefined || dt <= 0 || now < before) return null;
  return (now - before) / dt;
}

function render(series, t) {
  const counters = {};
  for (const k of ["consumed", "forwarded", "duplicates", "takeovers", "conflicts", "storeErrors", "routeFailures"]) {
    counters[k] = byLabel(series, NAMES[k], "route");
  }
  const inflight = byLabel(series, NAMES.inflight, "route");
  const keys = byLabel(series, NAMES.storeKeys, "route");
  const rejected = rejections(series);
  const routes = new Set();
  for (const m of [counters.consumed, counters.forwarded, counters.duplicates, inflight]) {
    for (const r of m.keys()) routes.add(r);
  }
  const dt = previous ? (t - previous.t) / 1000 : 0;

  const rows = [];
  for (const route of [...routes].sort()) {
    const get = (k) => counters[k].get(route) || 0;
    const was = (k) => (previous ? previous.counters[k].get(route) : undefined);
    const rates = {};
    for (const k of ["consumed", "forwarded", "duplicates"]) rates[k] = rate(get(k), was(k), dt);
    const tr = document.createElement("tr");
    tr.dataset.route = route;
    const name = cell("route", route, route, "route");
    if (get("routeFailures") > 0) {
      const w = document.createElement("span");
      w.className = "warn";
      w.textContent = " (task failed: restart or reload)";
      name.appendChild(w);
    }
    tr.appendChild(name);
    for (const k of ["consumed", "forwarded", "duplicates"]) {
      const r = rates[k];
      tr.appendChild(stacked(
        shown("span", k + "_rate", r, fmtRate(r), r === null ? "pending" : ""),
        shown("span", k, get(k), fmtInt(get(k)))));
    }
    const recent = rates.consumed ? rates.duplicates / rates.consumed : null;
    const overall = get("consumed") > 0 ? get("duplicates") / get("consumed") : null;
    tr.appendChild(stacked(
      shown("span", "duplicate_ratio_recent", recent, fmtPct(recent), recent === null ? "pending" : ""),
      shown("span", "duplicate_ratio", overall, fmtPct(overall))));
    const inf = inflight.get(route);
    tr.appendChild(cell("inflight", inf === undefined ? null : inf, inf === undefined ? "–" : fmtInt(inf)));
    const reasons = rejected.get(route) || new Map();
    let total = 0;
    const parts = [];
    for (const [why, n] of [...reasons.entries()].sort()) {
      total += n;
      if (n > 0) parts.push(why + " " + fmtInt(n));
    }
    const rej = cell("rejected", total, fmtInt(total));
    for (const [why, n] of reasons) {
      if (/^[a-z0-9_]+$/.test(why)) rej.dataset["reason_" + why] = String(n);
    }
    if (parts.length > 0) {
      const d = document.createElement("div");
      d.className = "reasons";
      d.textContent = parts.join(", ");
      rej.appendChild(d);
    }
    tr.appendChild(rej);
    tr.appendChild(cell("takeovers", get("takeovers"), fmtInt(get("takeovers")), get("takeovers") > 0 ? "warn" : ""));
    tr.appendChild(cell("conflicts", get("conflicts"), fmtInt(get("conflicts")), get("conflicts") > 0 ? "warn" : ""));
    tr.appendChild(cell("store_errors", get("storeErrors"), fmtInt(get("storeErrors")), get("storeErrors") > 0 ? "warn" : ""));
    const k = keys.get(route);
    tr.appendChild(cell("store_keys", k === undefined ? null : k, k === undefined ? "not sampled yet" : fmtInt(k), k === undefined ? "pending" : ""));
    rows.push(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.className = "none";
    td.colSpan = 10;
    td.textContent = "no data yet: no route has reported (none configured, or still starting)";
    tr.appendChild(td);
    rows.push(tr);
  }
  document.getElementById("routes").replaceChildren(...rows);

  const up = byLabel(series, NAMES.up, "component");
  for (const c of ["upstream", "downstream", "store"]) {
    const el = document.getElementById("c-" + c);
    const v = up.get(c);
    const state = v === undefined ? "unknown" : v > 0 ? "up" : "down";
    el.dataset.state = state;
    el.textContent = state === "unknown" ? "no data yet" : state;
  }
  const memory = (series.get(NAMES.storeMemory) || [])[0];
  let total = 0;
  for (const n of keys.values()) total += n;
  document.getElementById("store-size").textContent = memory === undefined
    ? "size not sampled yet"
    : fmtInt(total) + " keys (sampled) · " + fmtBytes(memory.value);
  const build = (series.get(NAMES.buildInfo) || [])[0];
  document.getElementById("version").textContent = build ? build.labels.version : "unknown";
  document.getElementById("updated").textContent = new Date().toLocaleTimeString("en-GB");
  previous = { t, counters };
}

async function refresh() {
  const banner = document.getElementById("banner");
  try {
    const response = await fetch("metrics", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const text = await response.text();
    render(parseMetrics(text), performance.now());
    banner.className = "";
  } catch (e) {
    banner.textContent = "Cannot read /metrics (" + e.message + "): showing the last data, from "
      + document.getElementById("updated").textContent + ".";
    banner.className = "show";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_fills_in_every_metric_name_and_loads_nothing_external() {
        let page = page();
        assert!(!page.contains(NAMES_PLACEHOLDER));
        for name in [
            CONSUMED,
            FORWARDED,
            DUPLICATES,
            REJECTED,
            TAKEOVERS,
            CONFLICTS,
            STORE_ERRORS,
            INFLIGHT,
            UP,
            BUILD_INFO,
            ROUTE_FAILURES,
            STORE_KEYS,
            STORE_MEMORY,
        ] {
            assert!(page.contains(&format!("\"{name}\"")), "{name} missing");
        }
        for external in ["http://", "https://", "src=", "<link", "@import", "url("] {
            assert!(!page.contains(external), "page refers to {external}");
        }
    }
}
