"""The admin dashboard (``GET /`` on the admin endpoint): one self-contained HTML page.

Inline CSS and JavaScript, no external asset, no framework: it works offline and from a vendored copy.
The page polls ``/status`` once a second and keeps the last five minutes of samples in the browser, from
which it draws, per backend, the request rate and error rate as small inline-SVG sparklines; state
colours, weight, in-flight requests, latency and health transitions come straight from ``/status``.
The drain / maint / ready buttons call the write API (adminapi.py) with a bearer token the operator
types once (kept in the tab's sessionStorage only).

The page is static bytes: the balancer does no work per view beyond answering ``/status``.
"""

from __future__ import annotations

__all__ = ["DASHBOARD"]

_HTML = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>balrs</title>
<style>
:root { --bg:#0f1419; --panel:#171e26; --line:#26313d; --text:#d8dee6; --dim:#8a96a3; --up:#3fb950;
        --down:#f85149; --drain:#d29922; --maint:#8b949e; --accent:#58a6ff; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; background:var(--bg);
       color:var(--text); }
header { display:flex; align-items:baseline; gap:1.5em; padding:14px 22px; border-bottom:1px solid var(--line);
         flex-wrap:wrap; }
header h1 { font-size:18px; margin:0; letter-spacing:.5px; }
header .meta { color:var(--dim); font-size:13px; }
#conn { margin-left:auto; font-size:13px; }
#conn.ok::before, #conn.bad::before { content:"\25cf  "; }
#conn.ok::before { color:var(--up); } #conn.bad::before { color:var(--down); }
main { padding:16px 22px 40px; }
.cards { display:flex; gap:12px; flex-wrap:wrap; margin-bottom:18px; }
.card { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:10px 14px; min-width:140px; }
.card .v { font-size:22px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .k { color:var(--dim); font-size:12px; text-transform:uppercase; letter-spacing:.6px; }
section.pool { margin-bottom:22px; }
section.pool h2 { font-size:15px; margin:0 0 6px; }
section.pool h2 .sub { color:var(--dim); font-weight:400; font-size:13px; margin-left:.6em; }
table { width:100%; border-collapse:collapse; background:var(--panel); border:1px solid var(--line);
        border-radius:8px; overflow:hidden; }
th, td { padding:7px 10px; text-align:left; border-bottom:1px solid var(--line); white-space:nowrap; }
th { color:var(--dim); font-weight:500; font-size:12px; text-transform:uppercase; letter-spacing:.5px; }
tr:last-child td { border-bottom:none; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
.state { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12px; font-weight:600; color:#0f1419; }
.state.up { background:var(--up); } .state.down { background:var(--down); }
.state.drain { background:var(--drain); } .state.maint { background:var(--maint); }
tr.s-down td { background:rgba(248,81,73,.07); }
svg.spark { width:120px; height:26px; vertical-align:middle; }
svg.spark path.l { fill:none; stroke-width:1.5; }
svg.spark path.a { stroke:none; opacity:.18; }
.rate path { stroke:var(--accent); fill:var(--accent); }
.err path { stroke:var(--down); fill:var(--down); }
button { background:transparent; color:var(--text); border:1px solid var(--line); border-radius:6px;
         padding:3px 9px; font:inherit; font-size:12px; cursor:pointer; }
button:hover { border-color:var(--accent); color:var(--accent); }
.dim { color:var(--dim); }
#msg { min-height:1.4em; color:var(--drain); margin:0 0 10px; font-size:13px; }
footer { color:var(--dim); font-size:12px; padding:0 22px 20px; }
footer a { color:var(--accent); }
</style>
</head>
<body>
<header>
  <h1>balrs</h1>
  <span class="meta" id="meta">connecting to /status&hellip;</span>
  <span id="conn" class="bad">offline</span>
</header>
<main>
  <div class="cards" id="cards"></div>
  <p id="msg"></p>
  <div id="pools"></div>
</main>
<footer>Live from <a href="/status">/status</a> every second; sparklines show the last 5 minutes.
Prometheus: <a href="/metrics">/metrics</a>. Buttons use the write API (<code>[admin] token_file</code>).</footer>
<script>
"use strict";
var HISTORY = 300;            // samples kept per backend (one a second: 5 minutes)
var hist = {};                // name -> {t:[], req:[], err:[], last:{requests, errors, t}}
var state = null;

function el(tag, attrs, children) {
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) {
    if (k === "class") e.className = attrs[k];
    else if (k === "text") e.textContent = attrs[k];
    else e.setAttribute(k, attrs[k]);
  }
  (children || []).forEach(function (c) { if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
  return e;
}

function fmt(n, digits) {
  if (n == null || isNaN(n)) return "\u2013";
  if (Math.abs(n) >= 1000) return (n / 1000).toFixed(1) + "k";
  return n.toFixed(digits == null ? 0 : digits);
}

function sample(b, now) {
  var h = hist[b.name] || (hist[b.name] = {t: [], req: [], err: [], last: null});
  var errors = b.responses ? b.responses["5xx"] + (b.failures || 0) : (b.failures || 0);
  if (h.last) {
    var dt = Math.max(0.001, (now - h.last.t) / 1000);
    var dreq = Math.max(0, b.requests - h.last.requests);
    var derr = Math.max(0, errors - h.last.errors);
    h.t.push(now); h.req.push(dreq / dt); h.err.push(dreq ? Math.min(1, derr / dreq) : 0);
    if (h.t.length > HISTORY) { h.t.shift(); h.req.shift(); h.err.shift(); }
  }
  h.last = {requests: b.requests, errors: errors, t: now};
  return h;
}

function spark(values, cls, max) {
  var w = 120, hgt = 26;
  var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark " + cls);
  svg.setAttribute("viewBox", "0 0 " + w + " " + hgt);
  if (values.length < 2) return svg;
  var top = max || Math.max.apply(null, values.concat([1e-9]));
  // The x axis spans the samples kept, at least a minute's, so a fresh page is not a sliver.
  var step = w / (Math.max(values.length, 60) - 1), x0 = w - (values.length - 1) * step, d = "";
  values.forEach(function (v, i) {
    var x = x0 + i * step, y = hgt - 1 - (v / top) * (hgt - 3);
    d += (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
  });
  var area = document.createElementNS(svg.namespaceURI, "path");
  area.setAttribute("class", "a");
  area.setAttribute("d", d + "L" + w + " " + hgt + "L" + x0.toFixed(1) + " " + hgt + "Z");
  var line = document.createElementNS(svg.namespaceURI, "path");
  line.setAttribute("class", "l");
  line.setAttribute("d", d);
  svg.appendChild(area); svg.appendChild(line);
  return svg;
}

function token() {
  var t = sessionStorage.getItem("balrs-token");
  if (!t) {
    t = window.prompt("Admin token ([admin] token_file):");
    if (t) sessionStorage.setItem("balrs-token", t);
  }
  return t;
}

function act(name, op) {
  var t = token();
  if (!t) return;
  var msg = document.getElementById("msg");
  fetch("/api/backends/" + encodeURIComponent(name) + "/" + op, {
    method: "POST", headers: {"Authorization": "Bearer " + t}
  }).then(function (r) {
    return r.json().catch(function () { return {}; }).then(function (doc) {
      if (r.status === 401 || r.status === 403) sessionStorage.removeItem("balrs-token");
      msg.textContent = r.ok ? op + " " + name + ": " + (doc.state || "ok")
                             : op + " " + name + " refused: " + r.status + " " + (doc.error || "");
      poll();
    });
  }).catch(function (e) { msg.textContent = op + " " + name + ": " + e; });
}

function card(k, v) { return el("div", {"class": "card"}, [el("div", {"class": "v", text: v}), el("div", {"class": "k", text: k})]); }

function render(doc, now) {
  var total = 0, up = 0, rate = 0, inflight = 0;
  var byPool = {};
  doc.backends.forEach(function (b) {
    var h = sample(b, now);
    b._h = h;
    total++; if (b.state === "up") up++;
    rate += h.req.length ? h.req[h.req.length - 1] : 0;
    inflight += b.active;
    (byPool[b.pool || "default"] = byPool[b.pool || "default"] || []).push(b);
  });
  var resp = doc.responses || {}, all = 0, bad = 0;
  for (var code in resp) { all += resp[code]; if (code >= 500) bad += resp[code]; }
  document.getElementById("meta").textContent = "v" + doc.version + " \u00b7 pid " + doc.pid +
    (doc.workers ? " \u00b7 " + doc.workers_answered + "/" + doc.workers + " workers" : "") +
    " \u00b7 " + (doc.listen || []).join(", ") + (doc.draining ? " \u00b7 DRAINING" : "");
  var cards = document.getElementById("cards");
  cards.replaceChildren(card("backends up", up + " / " + total), card("requests / s", fmt(rate, 1)),
    card("in flight", String(inflight)), card("client connections", String(doc.client_connections)),
    card("responses", fmt(all)), card("5xx share", all ? (100 * bad / all).toFixed(2) + "%" : "\u2013"));
  var pools = document.getElementById("pools");
  var order = (doc.pools && doc.pools.length) ? doc.pools.map(function (p) { return p.name; }) : Object.keys(byPool);
  Object.keys(byPool).forEach(function (p) { if (order.indexOf(p) < 0) order.push(p); });
  var sections = [];
  order.forEach(function (pname) {
    var list = byPool[pname] || [];
    var pinfo = (doc.pools || []).filter(function (p) { return p.name === pname; })[0] || {};
    var rows = list.map(function (b) {
      var h = b._h, last = h.req.length ? h.req[h.req.length - 1] : 0;
      var errNow = h.err.length ? h.err[h.err.length - 1] : 0;
      return el("tr", {"class": "s-" + b.state, "data-backend": b.name, "data-state": b.state}, [
        el("td", {}, [el("strong", {text: b.name}), el("div", {"class": "dim", text: b.address})]),
        el("td", {}, [el("span", {"class": "state " + b.state, text: b.state})]),
        el("td", {"class": "num", text: b.weight + (b.effective_weight != null && b.effective_weight < b.weight ? " (" + fmt(b.effective_weight, 1) + ")" : "")}),
        el("td", {"class": "num", text: String(b.active) + (b.max_connections ? " / " + b.max_connections : "")}),
        el("td", {"class": "num", text: fmt(last, 1)}),
        el("td", {}, [spark(h.req, "rate")]),
        el("td", {"class": "num", text: (100 * errNow).toFixed(1) + "%"}),
        el("td", {}, [spark(h.err, "err", 1)]),
        el("td", {"class": "num", text: b.response_time_ms != null ? fmt(b.response_time_ms, 1) + " ms" : "\u2013"}),
        el("td", {"class": "num", text: String(b.transitions)}),
        el("td", {}, [b.state === "drain" || b.state === "maint"
          ? el("button", {"data-op": "ready", text: "ready"})
          : el("button", {"data-op": "drain", text: "drain"}), " ",
          b.state === "maint" ? null : el("button", {"data-op": "maint", text: "maint"})])
      ]);
    });
    var head = el("tr", {}, ["backend", "state", "weight", "in flight", "req/s", "last 5 min", "errors",
      "last 5 min", "latency", "health changes", ""].map(function (t) { return el("th", {text: t}); }));
    sections.push(el("section", {"class": "pool"}, [
      el("h2", {}, [pname, el("span", {"class": "sub", text: (pinfo.strategy || doc.strategy || "") +
        (pinfo.backup ? " \u00b7 backup " + pinfo.backup : "") + (pinfo.panic ? " \u00b7 PANIC" : "") +
        (pinfo.queue_length ? " \u00b7 queued " + pinfo.queue_length : "")})]),
      el("table", {"class": "backends"}, [el("thead", {}, [head]), el("tbody", {}, rows)])
    ]));
  });
  pools.replaceChildren.apply(pools, sections);
  document.body.setAttribute("data-ready", "1");
}

document.addEventListener("click", function (ev) {
  var op = ev.target && ev.target.getAttribute && ev.target.getAttribute("data-op");
  if (!op) return;
  var row = ev.target.closest("tr");
  if (row) act(row.getAttribute("data-backend"), op);
});

var busy = false;
function poll() {
  if (busy) return;
  busy = true;
  fetch("/status", {cache: "no-store"}).then(function (r) {
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r.json();
  }).then(function (doc) {
    state = doc;
    var c = document.getElementById("conn"); c.className = "ok"; c.textContent = "live";
    render(doc, Date.now());
  }).catch(function (e) {
    var c = document.getElementById("conn"); c.className = "bad"; c.textContent = "offline (" + e.message + ")";
  }).then(function () { busy = false; });
}
poll();
setInterval(poll, 1000);
</script>
</body>
</html>
"""

DASHBOARD = _HTML.encode("utf-8")
