// xdsserver console: a read-only single page over /ui/api/* (vanilla JS, no dependency).
// Text from the server is only ever set as textContent, never parsed as HTML.
"use strict";

const main = document.getElementById("main");
const state = { overview: null, receivedAt: 0, view: "", live: false };

// -- helpers ---------------------------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function fmtAge(s) {
  if (s === null || s === undefined) return "never";
  s = Math.max(0, s);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function fmtIn(s) {
  if (s < 0) return "expired";
  if (s < 3600) return `in ${Math.floor(s / 60)} min`;
  if (s < 86400 * 2) return `in ${Math.floor(s / 3600)} h`;
  return `in ${Math.floor(s / 86400)} d`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${(n / 1024 / 1024).toFixed(2)} MB`;
}

// An age that keeps counting between updates: seconds at the server's time + time since received.
function age(seconds, prefix) {
  return h("span", { class: "age", "data-since": seconds, "data-t0": state.receivedAt, "data-prefix": prefix || "" },
    (prefix || "") + fmtAge(seconds));
}

setInterval(() => {
  for (const el of document.querySelectorAll(".age[data-since]")) {
    const since = parseFloat(el.dataset.since);
    if (Number.isNaN(since)) continue;
    el.textContent = el.dataset.prefix + fmtAge(since + (Date.now() - parseFloat(el.dataset.t0)) / 1000);
  }
}, 1000);

const STATE_LABEL = { ok: "in sync", nack: "NACK", absent: "no ztunnel", stale: "not ACKed", syncing: "syncing", unknown: "unknown" };

function kv(pairs) {
  const box = h("div", { class: "kv" });
  for (const [k, v] of pairs) {
    if (v === null || v === undefined || v === "") continue;
    box.append(h("span", { text: k }), v instanceof Node ? v : h("span", { text: String(v) }));
  }
  return box;
}

function link(href, text) { return h("a", { href, text }); }

// -- live updates (server-sent events; polling if the browser has no EventSource) ------------------
function setLive(on, text) {
  const el = document.getElementById("live");
  el.className = "live " + (on ? "on" : "off");
  document.getElementById("live-text").textContent = text;
}

function onOverview(data) {
  state.overview = data;
  state.receivedAt = Date.now();
  if (state.view === "overview") renderOverviewInto(data);
  else if (state.view === "node") refreshNodeCard();
}

function startLive() {
  if (!("EventSource" in window)) {
    const poll = () => getJSON("api/overview").then((d) => { setLive(true, "live (polling)"); onOverview(d); })
      .catch(() => setLive(false, "disconnected"));
    poll();
    setInterval(poll, 1000);
    return;
  }
  const es = new EventSource("api/events");
  es.addEventListener("open", () => setLive(true, "live"));
  es.addEventListener("overview", (ev) => onOverview(JSON.parse(ev.data)));
  es.addEventListener("error", () => setLive(false, "reconnecting"));
}

// -- router ---------------------------------------------------------------------------------------
function route() {
  const [path, query] = (location.hash || "#/").slice(1).split("?");
  const params = new URLSearchParams(query || "");
  let nav = "overview";
  if (path.startsWith("/node/")) {
    state.view = "node";
    renderNode(decodeURIComponent(path.slice("/node/".length)));
  } else if (path === "/path") {
    state.view = "path";
    nav = "path";
    renderPath(params);
  } else {
    state.view = "overview";
    main.replaceChildren(h("p", { class: "muted", text: "Loading…" }));
    if (state.overview) renderOverviewInto(state.overview);
    else getJSON("api/overview").then(onOverview).catch(showError);
  }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
}

function showError(err) {
  main.replaceChildren(h("div", { class: "attention", role: "alert" }, h("strong", { text: "Error: " }), err.message));
}

// -- overview -------------------------------------------------------------------------------------
function renderOverviewInto(d) {
  const inp = d.input, c = d.counts;
  const head = h("div", { class: "page-head" },
    h("h1", { text: "Mesh overview" }),
    h("span", { class: "muted" }, `generation ${inp.generation} · loaded `,
      inp.loaded_at ? age(d.server_time - inp.loaded_at) : "never", ` · flavor ${inp.flavor}`));
  const attention = d.attention.length
    ? h("div", { class: "attention", role: "alert", id: "attention" },
        h("strong", { text: `Needs attention (${d.attention.length})` }),
        h("ul", {}, d.attention.map((a) => h("li", { class: a.severity },
          a.node ? [link(`#/node/${encodeURIComponent(a.node)}`, a.node), ": "] : null, h("span", { class: "txt", text: a.text })))))
    : h("div", { class: "attention calm", id: "attention" },
        h("strong", { text: "All clear. " }), `${c.connected_ztunnels} ztunnel stream(s) connected, every sent version ACKed.`);
  const stat = (v, k) => h("div", { class: "stat" }, h("div", { class: "v", text: v }), h("div", { class: "k", text: k }));
  const stats = h("div", { class: "grid stats" },
    stat(c.nodes, "nodes"), stat(c.connected_ztunnels, "ztunnel streams"), stat(`${c.enrolled_pods} / ${c.pods}`, "pods in mesh / total"),
    stat(c.identities, "identities"), stat(c.services, "services"));
  const input = h("div", { class: "panel", id: "input" },
    h("h2", { text: "Input" }),
    kv([["sources", inp.sources.join(", ") || "—"], ["loaded", inp.loaded_at ? new Date(inp.loaded_at * 1000).toLocaleString() : "not yet"],
        ["last input error", inp.last_error ? "below" : "none"]]),
    inp.last_error ? h("pre", { class: "error", text: inp.last_error }) : null);
  const nodes = h("div", { class: "grid nodes", id: "nodes" }, d.nodes.map((n) => nodeCard(n, d)));
  main.replaceChildren(head, attention, stats, nodes, input);
}

function nodeCard(n, d) {
  const cls = "node-card" + (n.state === "nack" ? " alert" : ["absent", "stale", "unknown"].includes(n.state) ? " warning" : "");
  const res = Object.entries(n.resources).map(([t, k]) => `${t} ${k}`).join(" · ");
  const card = h("section", { class: cls, "data-node": n.name, "data-state": n.state, role: n.state === "nack" ? "alert" : null },
    h("header", {},
      link(`#/node/${encodeURIComponent(n.name)}`, n.name),
      h("span", { class: `pill ${n.state}`, text: STATE_LABEL[n.state] || n.state }),
      h("span", { class: "muted", style: null }, `${n.local_workloads} mesh pod(s) · ${n.identities} identit${n.identities === 1 ? "y" : "ies"}`)),
    h("div", { class: "meta", text: res ? `serving ${res}` : "no configuration" }),
    n.problems.map((p) => h("div", { class: `problem ${p.severity}`, "data-kind": p.kind, text: p.text })));
  if (!n.streams.length) card.append(h("div", { class: "muted", text: "No ztunnel connected to this node's configuration." }));
  for (const s of n.streams) {
    card.append(h("div", { class: "stream-head" }, `stream ${s.stream} · ${s.mode} · ${s.peer || "local"} · connected `, age(s.age)));
    const rows = s.types.map((t) => {
      const acked = t.acked_version || "—";
      const vcls = t.nack_active ? "ver nacked" : t.sent_version !== t.acked_version ? "ver pending" : "ver";
      return h("tr", { "data-type": t.type },
        h("td", {}, h("strong", { text: t.type })),
        h("td", { class: "ver", text: t.sent_version || "—", title: "sent version" }),
        h("td", { class: vcls, "data-acked": t.acked_version || "", text: acked }),
        h("td", {}, t.since_send === null ? "—" : age(t.since_send)),
        h("td", { class: "ver" }, t.nack ? h("span", { class: `pill ${t.nack_active ? "nack" : "info"}`, title: t.nack.message,
          text: `${t.nack_active ? "NACK" : "last NACK"} ${t.nack.version}` }) : ""));
    });
    card.append(h("table", {}, h("thead", {}, h("tr", {}, ["type", "sent", "ACKed", "last push", ""].map((x) => h("th", { text: x })))),
      h("tbody", {}, rows)));
  }
  return card;
}

// -- node page ------------------------------------------------------------------------------------
function refreshNodeCard() {
  const slot = document.getElementById("node-card");
  if (!slot || !state.overview) return;
  const n = state.overview.nodes.find((x) => x.name === slot.dataset.name);
  slot.replaceChildren(n ? nodeCard(n, state.overview) : h("p", { class: "muted", text: "not in the overview" }));
}

async function renderNode(name) {
  main.replaceChildren(h("p", { class: "muted", text: `Loading ${name}…` }));
  let d;
  try { d = await getJSON(`api/node?node=${encodeURIComponent(name)}`); } catch (e) { showError(e); return; }
  if (!state.overview) { try { state.overview = await getJSON("api/overview"); state.receivedAt = Date.now(); } catch (e) { /* live feed fills it */ } }
  const now = Date.now() / 1000;
  const podRows = d.pods.map((p) => h("tr", { "data-pod": p.key },
    h("td", {}, p.key), h("td", { class: "mono", text: p.ips.join(", ") }),
    h("td", { class: "mono", text: p.identity || "—" }),
    h("td", {}, h("span", { class: `pill ${p.enrolled ? "ok" : "info"}`, text: p.enrolled ? "in mesh" : "not enrolled" }))));
  const resources = Object.entries(d.resources).map(([t, items]) => {
    const total = items.reduce((a, r) => a + r.bytes, 0);
    return h("details", { "data-type": t },
      h("summary", {}, h("strong", { text: t }), ` · ${items.length} resource(s) · ${fmtBytes(total)}`),
      h("table", {}, h("thead", {}, h("tr", {}, ["name", "size", "version"].map((x) => h("th", { text: x })))),
        h("tbody", {}, items.map((r) => h("tr", {}, h("td", { class: "mono", text: r.name }), h("td", { class: "num", text: fmtBytes(r.bytes) }),
          h("td", { class: "ver", text: r.version }))))));
  });
  const secrets = d.secrets.map((s) => h("tr", { "data-secret": s.name },
    h("td", { class: "mono", text: s.name }), h("td", { text: s.kind }),
    h("td", { class: "mono", text: (s.sans || []).join(", ") || s.subject || "" }),
    h("td", {}, s.not_after ? `${new Date(s.not_after * 1000).toISOString().replace("T", " ").slice(0, 16)} UTC (${fmtIn(s.not_after - now)})` : "—")));
  main.replaceChildren(
    h("div", { class: "page-head" }, h("h1", { text: d.name }), h("span", { class: "muted" }, link("#/", "← overview"))),
    h("div", { id: "node-card", "data-name": d.name, class: "panel-slot" }),
    h("div", { class: "grid", style: null },
      h("div", { class: "panel" }, h("h2", { text: `Pods on this node (${d.pods.length})` }),
        h("table", {}, h("thead", {}, h("tr", {}, ["pod", "IP", "identity", ""].map((x) => h("th", { text: x })))), h("tbody", {}, podRows))),
      h("div", { class: "panel" }, h("h2", { text: `Local identities (${d.identities.length})` }),
        h("ul", { class: "mono" }, d.identities.map((i) => h("li", { text: i })))),
      h("div", { class: "panel", id: "matchers" }, h("h2", { text: "Capture path: listener matchers" }),
        d.matchers.map((m, i) => matcherPanel(m, i))),
      h("div", { class: "panel", id: "resources" }, h("h2", { text: "Resources this ztunnel receives" }), resources),
      h("div", { class: "panel", id: "secrets" }, h("h2", { text: "Secrets (names and expiry only)" }),
        h("table", {}, h("thead", {}, h("tr", {}, ["name", "kind", "SAN", "expires"].map((x) => h("th", { text: x })))), h("tbody", {}, secrets)))));
  const card = document.getElementById("node-card");
  card.classList.add("spaced");
  refreshNodeCard();
}

function matcherPanel(m, i) {
  const label = i < 3 && m.tree ? `stage ${i + 1} · ` : "";
  return h("details", { class: "tree", open: i === 0, "data-listener": m.listener },
    h("summary", {}, h("strong", { text: `${label}${m.listener}` }), h("span", { class: "muted" },
      ` ${m.address ? "on " + m.address : m.internal ? "internal listener" : ""} · ${m.chains} chain(s)`)),
    m.tree ? matcherTree(m.tree) : h("div", { class: "leaf muted", text: "no matcher" }),
    m.default_chain ? h("div", { class: "leaf" }, h("span", { class: "input", text: "default chain " }), h("span", { class: "chain", text: m.default_chain })) : null);
}

function matcherTree(t) {
  const out = [];
  const entry = (keyText, e) => e.matcher
    ? h("details", { "data-key": keyText }, h("summary", {}, h("span", { class: "input", text: `${t.input} ` }), h("span", { class: "k", text: keyText })),
        matcherTree(e.matcher))
    : h("div", { class: "leaf", "data-key": keyText }, h("span", { class: "input", text: `${t.input} ` }), h("span", { class: "k", text: keyText }),
        h("span", { class: "arrow", text: " → " }), h("span", { class: "chain", text: e.chain }),
        e.cluster ? [h("span", { class: "arrow", text: " → " }), h("span", { class: "muted", text: e.cluster })] : null,
        e.pod_table_rows != null ? h("span", { class: "muted", text: ` (pod table, ${e.pod_table_rows} rows)` }) : null,
        e.next ? [h("span", { class: "arrow", text: " ⇢ " }), h("span", { class: "muted", text: e.next })] : null);
  for (const e of t.entries) out.push(entry(e.key, e));
  if (t.total > t.entries.length) out.push(h("div", { class: "leaf muted", text: `… ${t.total - t.entries.length} more entries` }));
  if (t.on_no_match) out.push(entry("(no match)", t.on_no_match));
  return out;
}

// -- path -----------------------------------------------------------------------------------------
let targetsCache = null;

async function renderPath(params) {
  const src = params.get("src") || "", dst = params.get("dst") || "";
  const srcIn = h("input", { id: "path-src", name: "src", list: "src-options", value: src, placeholder: "default/productpage-v1-… or 10.244.2.3", required: true });
  const dstIn = h("input", { id: "path-dst", name: "dst", list: "dst-options", value: dst, placeholder: "default/reviews:9080 or 10.96.183.192:9080", required: true });
  const srcList = h("datalist", { id: "src-options" }), dstList = h("datalist", { id: "dst-options" });
  const form = h("form", { class: "picker", id: "path-form", onsubmit: (ev) => {
    ev.preventDefault();
    location.hash = `#/path?${new URLSearchParams({ src: srcIn.value.trim(), dst: dstIn.value.trim() })}`;
  } },
  h("label", {}, "From (pod or IP)", srcIn), h("label", {}, "To (Service:port, pod:port or IP:port)", dstIn),
  h("button", { type: "submit", id: "path-go", text: "Draw path" }), srcList, dstList);
  const result = h("div", { id: "path-result" });
  main.replaceChildren(
    h("div", { class: "page-head" }, h("h1", { text: "Connection path" }),
      h("span", { class: "muted", text: "drawn from the same walk as `xdsserver explain` over the configuration this server serves" })),
    h("div", { class: "panel" }, form), result);
  try {
    targetsCache = targetsCache || await getJSON("api/targets");
    const pods = [...targetsCache.pods].sort((a, b) => (b.enrolled - a.enrolled) || a.key.localeCompare(b.key));
    srcList.replaceChildren(...pods.map((p) => h("option", { value: p.key, label: `${p.ips[0]} · ${p.node}${p.enrolled ? "" : " · not in mesh"}` })));
    const opts = [];
    for (const s of targetsCache.services) for (const p of s.ports) opts.push(h("option", { value: `${s.key}:${p.port}`, label: `Service ${s.cluster_ips[0]}:${p.port}` }));
    for (const p of pods) for (const port of p.ports) opts.push(h("option", { value: `${p.key}:${port}`, label: `pod ${p.ips[0]}:${port}` }));
    dstList.replaceChildren(...opts);
  } catch (e) { /* pickers still accept typed input */ }
  if (!src || !dst) {
    result.append(h("p", { class: "hint", text: "Pick a source pod and a destination. Services fan out to one branch per endpoint." }));
    return;
  }
  result.append(h("p", { class: "muted", text: "Walking the configuration…" }));
  try {
    const d = await getJSON(`api/path?${new URLSearchParams({ src, dst })}`);
    result.replaceChildren(drawWalk(d));
  } catch (e) {
    result.replaceChildren(h("div", { class: "box rejected", role: "alert" }, h("div", { class: "title", text: "Cannot draw this path" }),
      h("div", { class: "sub", text: e.message })));
  }
}

// A policy verdict, wherever the walk carries one (string "allow"/"deny" or {action, policy, reason}).
function policyBadge(v) {
  if (v === null || v === undefined || v === "") return null;
  const o = typeof v === "object" ? v : { action: String(v) };
  const action = String(o.action || o.decision || o.verdict || o.result || "").toLowerCase();
  const cls = /deny|reject|drop/.test(action) ? "deny" : /allow|accept/.test(action) ? "allow" : "info";
  const extra = [o.policy || o.name, o.reason].filter(Boolean).join(": ");
  return h("div", { class: "policy", "data-policy": action },
    h("span", { class: `pill ${cls}`, text: `policy ${action || "?"}` }), extra ? h("span", { class: "sub", text: ` ${extra}` }) : null);
}

const edge = (label) => label ? [h("div", { class: "edge" }), h("div", { class: "edge-label", text: label })] : [h("div", { class: "edge" })];

function drawWalk(d) {
  const ex = d.explain, labels = d.labels || {};
  const ipOf = (hp) => hp.replace(/:\d+$/, "").replace(/^\[|\]$/g, "");
  const flow = h("div", { class: "flow", id: "walk", "data-verdict": typeof ex.verdict === "string" ? ex.verdict : "" });
  const srcLabel = labels[ex.src] || {};
  flow.append(h("div", { class: "box pod", id: "walk-source" },
    h("div", { class: "tag", text: "source" }), h("div", { class: "title", text: srcLabel.pod || ex.src }),
    kv([["IP", ex.src], ["node", ex.node], ["identity", ex.client_identity || (srcLabel.enrolled === false ? "not in the mesh" : "")]])));
  const stages = ex.stages && ex.stages.length ? ex.stages : [{ listener: ex.listener, matched: ex.matched, chain: ex.chain, cluster: ex.cluster }];
  stages.forEach((s, i) => {
    flow.append(...edge(i === 0 ? `captured (${ex.dst})` : `→ internal listener ${s.listener}`));
    flow.append(h("div", { class: "box stage", "data-listener": s.listener },
      h("div", { class: "tag", text: i === 0 ? `capture listener · ztunnel on ${ex.node}` : `internal stage ${i + 1}` }),
      h("div", { class: "title mono", text: s.listener }),
      h("ul", { class: "matched" }, (s.matched || []).map((m) => h("li", { text: m }))),
      kv([["filter chain", s.chain], ["cluster", s.cluster]])));
  });
  const v = typeof ex.verdict === "string" ? ex.verdict : "";
  if (v === "passthrough" || v === "blackhole" || (!ex.endpoints.length && v !== "tunnel")) {
    flow.append(...edge(""));
    const title = v === "passthrough" ? "Passthrough" : v === "blackhole" ? "Blackhole" : "Rejected";
    flow.append(h("div", { class: `box ${v === "passthrough" || v === "blackhole" ? v : "rejected"}`, id: "walk-terminal" },
      h("div", { class: "title", text: title }), h("div", { class: "sub", text: ex.reason || "" }),
      kv([["destination", ex.dst], ["cluster", ex.cluster]])));
  } else {
    const service = ex.endpoints.length > 1 || ex.tunnel_listener;
    flow.append(...edge(service ? `${ex.endpoints.length} endpoint(s) of ${ex.cluster}` : "pod IP"));
    flow.append(h("div", { class: "box stage", id: "walk-origin" },
      h("div", { class: "tag", text: service ? "service endpoints → HBONE origination" : "HBONE origination" }),
      h("div", { class: "title mono", text: ex.tunnel_cluster || ex.cluster }),
      kv([["internal listener", ex.tunnel_listener], ["client certificate", ex.client_identity]])));
    const branches = h("div", { class: "branches", id: "walk-branches" });
    for (const ep of ex.endpoints) branches.append(drawBranch(ex, ep, labels, ipOf));
    flow.append(h("div", { class: "edge" }), branches);
  }
  flow.append(h("div", { class: "verdict", id: "walk-verdict" },
    h("span", { class: `pill ${v === "tunnel" ? "ok" : v === "passthrough" ? "warn" : v ? "err" : "info"}`, text: v || "verdict" }),
    ex.reason && v !== "passthrough" ? h("span", { class: "muted", text: ` ${ex.reason}` }) : null,
    policyBadge(ex.policy || (typeof ex.verdict === "object" ? ex.verdict : null))));
  const cli = `xdsserver explain --node ${ex.node} --src ${ex.src} --dst ${ex.dst}`;
  const q = new URLSearchParams({ node: ex.node, src: ex.src, dst: ex.dst, format: "text" });
  flow.append(h("p", { class: "hint" }, "Same walk as ", h("code", { text: cli }), " · ", link(`/debug/explain?${q}`, "text form")));
  return flow;
}

function drawBranch(ex, ep, labels, ipOf) {
  const dstIp = ipOf(ep.destination || ep.endpoint_id);
  const lbl = labels[dstIp] || {};
  const branch = h("div", { class: "branch", "data-endpoint": ep.endpoint_id });
  if (ep.plain) {
    branch.append(h("div", { class: "box passthrough" }, h("div", { class: "tag", text: "plain TCP" }),
      h("div", { class: "title mono", text: ep.endpoint_id }), h("div", { class: "sub", text: "endpoint not in the mesh: no tunnel" })));
  } else {
    const ib = (ex.inbound || []).find((x) => x.final_destination === ep.destination);
    // same node: the destination's inbound chain is on this ztunnel (stock addresses it pod:15008 too)
    const sameNode = ib ? ib.node === ex.node : /:15088$/.test(ep.tunnel_address);
    const server = ep.server_identity || ex.expected_server_identity;
    branch.append(h("div", { class: "box tunnel", "data-tunnel": ep.tunnel_address, "data-server-identity": server, "data-client-identity": ex.client_identity },
      h("div", { class: "tag", text: "HBONE · HTTP/2 CONNECT over mTLS 1.3" }),
      h("div", { class: "title mono" }, `→ ${ep.tunnel_address}`, sameNode ? h("span", { class: "pill info", text: "same node" }) : null),
      kv([["CONNECT", ep.destination], ["client", ex.client_identity], ["server", server]]),
      policyBadge(ep.verdict)));
    if (ib) {
      branch.append(...edge(""));
      branch.append(h("div", { class: "box inbound", "data-node": ib.node, "data-chain": ib.chain },
        h("div", { class: "tag", text: `ztunnel on ${ib.node}` }), h("div", { class: "title mono", text: `${ib.listener} · ${ib.chain}` }),
        kv([["server cert", ib.server_identity], ["client cert", ib.client_cert_required ? `required, ${ib.trusted_peer_prefix}*` : "not required"],
            ["CONNECT guard", ib.destination_guard], ["then", ib.cluster]]),
        policyBadge(ib.verdict !== undefined ? ib.verdict : ib.policy)));
    }
  }
  branch.append(...edge(""));
  branch.append(h("div", { class: "box pod", "data-destination": ep.destination || ep.endpoint_id },
    h("div", { class: "tag", text: "destination pod" }), h("div", { class: "title", text: lbl.pod || dstIp }),
    kv([["address", ep.destination || ep.endpoint_id], ["node", lbl.node]])));
  return branch;
}

// -- start ----------------------------------------------------------------------------------------
window.addEventListener("hashchange", route);
route();
startLive();
