"""The dashboard's one page: HTML, CSS and JavaScript inline (served on loopback, no CDN, nothing fetched but the
page's own JSON), and the Content-Security-Policy that allows exactly this script and style and nothing else.

The script renders every value with `textContent` (never `innerHTML`): student ids and names come from rosters
and errors from clouds, and must show as text even when they look like markup. The few values the server puts in
the HTML itself (lab, course, poll interval) are HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html

STYLE = """
:root { color-scheme: light; font-family: system-ui, sans-serif; font-size: 14px; }
body { margin: 0; padding: 1rem 1.5rem; background: #f6f7f9; color: #1d2330; }
h1 { font-size: 1.3rem; margin: 0 0 .2rem; } h2 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
#conn { font-size: .85rem; } #conn.ok { color: #2b7a3d; } #conn.bad { color: #b3261e; font-weight: 600; }
.summary { display: flex; flex-wrap: wrap; gap: .5rem; margin: .6rem 0; }
.pill { padding: .25rem .6rem; border-radius: 1rem; background: #e3e6eb; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(9.5rem, 1fr)); gap: .4rem;
  align-items: start; }
.tile { border-radius: .4rem; padding: .4rem .5rem; color: #111; overflow: hidden; border: 1px solid #0002; }
.tile .sid { font-weight: 600; overflow-wrap: anywhere; } .tile .meta { font-size: .78rem; opacity: .85; }
.st-planned { background: #d9dde3; } .st-applying { background: #9cc5f5; } .st-up { background: #8fd19e; }
.st-failed { background: #f2a19b; } .st-destroying { background: #f6c97a; } .st-other { background: #c9b8e8; }
table { border-collapse: collapse; background: #fff; } td, th { padding: .25rem .6rem; border: 1px solid #dde1e7;
  text-align: left; vertical-align: top; } td.err { color: #b3261e; max-width: 60rem; overflow-wrap: anywhere; }
.timeline { background: #fff; border: 1px solid #dde1e7; padding: .4rem; max-width: 60rem; }
.tl-row { display: flex; align-items: center; gap: .5rem; font-size: .8rem; margin: .1rem 0; }
.tl-id { width: 10rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tl-track { flex: 1; background: #eef0f3; height: .7rem; border-radius: .35rem; position: relative; }
.tl-bar { position: absolute; left: 0; top: 0; bottom: 0; background: #4a7fd4; border-radius: .35rem; }
.tl-end { width: 12rem; } .tl-past .tl-end { color: #b3261e; }
.muted { color: #5b6473; }
"""

SCRIPT = """
"use strict";
(function () {
  const poll = Number(document.body.dataset.pollMs) || 2000;
  const KNOWN = ["planned", "applying", "up", "failed", "destroying"];
  const byId = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function stateClass(state) { return KNOWN.includes(state) ? "st-" + state : "st-other"; }
  function money(v, currency) {
    return (typeof v === "number") ? v.toFixed(2) + " " + currency + "/h" : "-";
  }
  function when(ts) { return new Date(ts * 1000).toLocaleString(); }
  function summary(d) {
    const out = [el("span", "pill", d.total + " environments")];
    for (const s of d.states.concat(Object.keys(d.counts).filter((k) => !d.states.includes(k)))) {
      if (d.counts[s]) out.push(el("span", "pill " + stateClass(s), s + ": " + d.counts[s]));
    }
    out.push(el("span", "pill", "cost now: " + money(d.cost.per_hour, d.cost.currency)));
    byId("summary").replaceChildren(...out);
  }
  function grid(d) {
    const tiles = d.students.map((s) => {
      const t = el("div", "tile " + stateClass(s.state));
      t.dataset.student = s.id;
      t.dataset.state = s.state;
      t.title = s.id + " (" + s.name + ") " + s.state + " at " + s.site + (s.error ? ": " + s.error : "");
      t.append(el("div", "sid", s.id), el("div", "meta state", s.state), el("div", "meta", s.site),
               el("div", "meta", s.setup));
      return t;
    });
    byId("grid").replaceChildren(...tiles);
    byId("empty").hidden = tiles.length > 0;
  }
  function timeline(d) {
    const rows = d.students.filter((s) => typeof s.lease_end_ts === "number")
      .sort((a, b) => a.lease_end_ts - b.lease_end_ts);
    const last = Math.max(d.now + 3600, ...rows.map((s) => s.lease_end_ts));
    byId("timeline").replaceChildren(...rows.map((s) => {
      const left = s.lease_end_ts - d.now;
      const r = el("div", "tl-row" + (left <= 0 ? " tl-past" : ""));
      const track = el("div", "tl-track");
      const bar = el("div", "tl-bar");
      bar.style.width = Math.max(0, Math.min(100, 100 * left / (last - d.now))) + "%";
      track.append(bar);
      const end = (left <= 0 ? "ended " : "") + when(s.lease_end_ts);
      r.append(el("span", "tl-id", s.id), track, el("span", "tl-end", end));
      r.title = s.id + ": " + s.lease_end;
      return r;
    }));
    byId("no-leases").hidden = rows.length > 0;
  }
  function failures(d) {
    byId("failures").replaceChildren(...d.failures.map((f) => {
      const r = el("tr", "failure");
      r.append(el("td", "sid", f.id), el("td", "", f.site), el("td", "err", f.error));
      return r;
    }));
    byId("no-failures").hidden = d.failures.length > 0;
  }
  function sites(d) {
    byId("sites").replaceChildren(...d.sites.map((s) => {
      const counts = Object.entries(s.counts).map(([k, v]) => k + ": " + v).join(", ");
      const r = el("tr", "site");
      r.append(el("td", "", s.site), el("td", "", s.total), el("td", "", counts),
               el("td", "", money(s.cost_per_hour, d.cost.currency)));
      return r;
    }));
    const note = d.cost.as_of ? "on-demand prices as of " + d.cost.as_of : "";
    const unpriced = d.cost.unpriced.length ? "; no price for " + d.cost.unpriced.join(", ") : "";
    byId("price-note").textContent = note + unpriced;
  }
  async function tick() {
    const conn = byId("conn");
    try {
      const r = await fetch("api/status", {cache: "no-store", credentials: "same-origin"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      const d = await r.json();
      summary(d); grid(d); timeline(d); failures(d); sites(d);
      conn.className = "ok";
      conn.textContent = "live, updated " + new Date().toLocaleTimeString();
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    } catch (e) {
      conn.className = "bad";
      conn.textContent = "cannot reach labctl (" + e.message + "); retrying";
    } finally {
      setTimeout(tick, poll);
    }
  }
  tick();
})();
"""

BODY = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>__TITLE__</title><style>__STYLE__</style></head>
<body data-poll-ms="__POLL__">
<h1>__TITLE__</h1><div id="conn">connecting...</div>
<div class="summary" id="summary"></div>
<h2>Students</h2><div class="grid" id="grid"></div><p class="muted" id="empty">No environments yet.</p>
<h2>Failures</h2><table><thead><tr><th>student</th><th>site</th><th>error</th></tr></thead>
<tbody id="failures"></tbody></table><p class="muted" id="no-failures">None.</p>
<h2>Sites</h2><table><thead><tr><th>site</th><th>environments</th><th>states</th><th>cost</th></tr></thead>
<tbody id="sites"></tbody></table><p class="muted" id="price-note"></p>
<h2>Lease ends</h2><div class="timeline" id="timeline"></div>
<p class="muted" id="no-leases">No lease ends known yet.</p>
<script>__SCRIPT__</script>
</body></html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: Only this page's own script and style run; it may fetch only from its own origin; nothing may frame it.
CSP = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; connect-src 'self'; "
       "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def render(lab: str, course: str, poll_seconds: float) -> str:
    """The page for course/lab, polling every `poll_seconds`."""
    title = html.escape(f"labctl class dashboard: {course}/{lab}")
    poll_ms = str(max(100, int(poll_seconds * 1000)))
    # The title last: a lab or course name that reads like a placeholder is not expanded.
    return (BODY.replace("__STYLE__", STYLE).replace("__SCRIPT__", SCRIPT).replace("__POLL__", poll_ms)
            .replace("__TITLE__", title))
