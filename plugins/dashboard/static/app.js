// The llmos dashboard: one page, four views (overview, a job, pipelines, models), kept live by
// one server-sent-events stream of the kernel's journal. A stream that drops (the kernel or the
// dashboard restarted) reconnects and catches up from the last sequence number it saw.
"use strict";

const view = document.getElementById("view");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const COLORS = ["#2f6fdf", "#e07b39", "#2e8b57", "#9b59b6", "#c53030", "#16a2b8", "#b7791f"];

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

// ---------------------------------------------------------------- formatting

function cores(n) {
  return `${num(n)} ${n === 1 ? "core" : "cores"}`;
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(bytes), i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v < 10 && i ? 1 : 0)} ${units[i]}`;
}
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, s);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.round((s % 3600) / 60)}m`;
}
function num(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return Number(v).toExponential(2);
  return Number(v).toPrecision(4).replace(/\.?0+$/, "");
}
function clock(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : "–"; }
const badge = (state) => `<span class="state state-${esc(state)}">${esc(state)}</span>`;
const jobLink = (id) => (id === null || id === undefined ? "–" : `<a href="#/job/${id}">${id}</a>`);

function progressCell(job) {
  const p = job.progress;
  if (!p) return '<span class="muted">–</span>';
  const pct = p.total ? Math.min(100, (100 * p.step) / p.total) : null;
  const fields = Object.entries(p.fields || {}).filter(([k]) => ["loss", "tokens_per_s", "lr"].includes(k)).map(([k, v]) => `${k} ${num(v)}`).join(" · ");
  const bar = pct === null ? "" : `<span class="bar" title="${pct.toFixed(0)}%"><span style="width:${pct}%"></span></span> `;
  return `${bar}${esc(p.step)}${p.total ? "/" + esc(p.total) : ""} <span class="muted">${esc(p.message || fields)}</span>`;
}

// ---------------------------------------------------------------- the live stream

const live = { es: null, prefix: "", last: 0, handler: null, timer: null, down: false, onReconnect: null };

function setConn(state, text) {
  const el = document.getElementById("conn");
  el.dataset.state = state;
  el.textContent = text || state;
}

// Each route() starts a new generation; what a page began before (a fetch, a debounced reload)
// finds it is no longer current and leaves the view and the event stream alone.
let generation = 0;
const current = (me) => me === generation;
function paint(me, html) {
  if (current(me)) view.innerHTML = html;
  return current(me);
}

function follow(me, prefix, since, handler, onReconnect) {
  if (!current(me)) return;
  stopFollowing();
  Object.assign(live, { prefix, last: since, handler, onReconnect: onReconnect || null, down: false });
  connect();
}

function connect() {
  clearTimeout(live.timer);
  const es = new EventSource(`api/events?prefix=${encodeURIComponent(live.prefix)}&since=${live.last}`);
  live.es = es;
  es.onopen = () => {
    setConn("live");
    if (live.down) {
      live.down = false;
      if (live.onReconnect) live.onReconnect();
    }
  };
  es.onmessage = (m) => {
    const e = JSON.parse(m.data);
    if (e.seq <= live.last) return;
    live.last = e.seq;
    if (e.type === "kernel.started") kernelLine();
    try { live.handler(e); } catch (err) { console.error(err); }
  };
  es.onerror = () => {
    setConn("reconnecting", "reconnecting…");
    live.down = true;
    if (es.readyState === EventSource.CLOSED) live.timer = setTimeout(connect, 1500); // the browser gave up: start again
  };
}

function stopFollowing() {
  clearTimeout(live.timer);
  if (live.es) live.es.close();
  live.es = null;
}

function debounce(fn, ms) {
  let t = null;
  return () => { if (t === null) t = setTimeout(() => { t = null; fn(); }, ms); };
}

async function kernelLine() {
  try {
    const d = await api("api/overview");
    document.getElementById("kernel").textContent = `kernel ${d.kernel.version} · pid ${d.kernel.pid}`;
  } catch (err) { /* shown by the connection badge */ }
}

// {"cpus":1,"memory":0,"gpus":0} as "cpus 1": what is set, nested objects the same way, memory in bytes as sizes.
function terse(o) {
  if (o === null || o === undefined) return "–";
  if (Array.isArray(o)) return o.length ? o.map(terse).join(", ") : "none";
  if (typeof o !== "object") return String(o);
  const parts = Object.entries(o).filter(([, v]) => v !== 0 && v !== null && v !== "" && !(Array.isArray(v) && !v.length))
    .map(([k, v]) => `${k} ${typeof v === "number" && /memory|bytes/.test(k) ? size(v) : typeof v === "object" ? `(${terse(v)})` : v}`);
  return parts.join(" · ") || "–";
}

// ---------------------------------------------------------------- charts (SVG, no library)

function lineChart(key, title, series, xlabel, opts = {}) {
  const W = 460, H = 200, L = 52, R = 10, T = 22, B = 28;
  const pts = series.flatMap((s) => s.points);
  const count = pts.length;
  let body = "";
  if (count) {
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (opts.zero) y0 = Math.min(0, y0);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 0; }
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      body += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}"/><text x="${L - 4}" y="${sy(y) + 3}" text-anchor="end">${esc(opts.fmt ? opts.fmt(y) : num(y))}</text>`;
    }
    body += `<text x="${L}" y="${H - 8}">${esc(opts.xfmt ? opts.xfmt(x0) : num(x0))}</text><text x="${W - R}" y="${H - 8}" text-anchor="end">${esc(opts.xfmt ? opts.xfmt(x1) : num(x1))}</text>`;
    body += `<text x="${(L + W - R) / 2}" y="${H - 8}" text-anchor="middle">${esc(xlabel)}</text>`;
    series.forEach((s, i) => {
      if (!s.points.length) return;
      const color = s.color || COLORS[i % COLORS.length];
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      body += `<path class="line" d="${d}" stroke="${color}"/>`;
      if (s.points.length < 40) body += s.points.map((p) => `<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="2.2" fill="${color}"/>`).join("");
      body += `<text x="${L + 6 + i * 110}" y="14" fill="${color}">■ ${esc(s.name)}</text>`;
    });
  } else {
    body = `<text x="${W / 2}" y="${H / 2}" text-anchor="middle">no points yet</text>`;
  }
  body += `<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/><line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
  return `<div class="card chart" data-chart="${esc(key)}" data-points="${count}"><h2>${esc(title)}</h2><svg viewBox="0 0 ${W} ${H}">${body}</svg></div>`;
}

// ---------------------------------------------------------------- overview

async function overview(me) {
  let data = null;
  const load = async () => { data = await api("api/overview"); render(); };
  const render = () => {
    if (!current(me)) return;
    const k = data.kernel;
    document.getElementById("kernel").textContent = `kernel ${k.version} · pid ${k.pid}`;
    const st = k.storage;
    const storage = st ? `${badge(st.state)} ${size(st.free)} free of ${size(st.total)} <span class="muted">${esc(st.path)}</span>` : "";
    const nodes = {};
    for (const d of data.devices) (nodes[d.node || "this machine"] ||= []).push(d);
    const devRows = Object.entries(nodes).flatMap(([node, devs]) => devs.map((d) => {
      const cap = d.kind === "cpu" ? `${cores(d.capacity)} · ${size(d.memory_total)}` : `${size(d.memory_total)}`;
      const res = d.kind === "cpu" ? `${cores(d.share_reserved)} · ${size(d.memory_reserved)}` : `${num(d.share_reserved)} share · ${size(d.memory_reserved)}`;
      const u = d.used || {};
      const used = d.kind === "cpu" ? `${u.cpu_percent !== undefined ? num(u.cpu_percent) + "% CPU" : "–"} · ${size(u.memory_used)}`
        : `${u.utilization !== undefined ? num(u.utilization) + "% · " : ""}${size(u.memory_used)}`;
      return `<tr data-device="${esc(d.id)}"><td>${esc(node)}</td><td>${esc(d.id)}${d.fake ? ' <span class="muted">(simulated)</span>' : ""}</td><td>${cap}</td><td>${res}</td><td>${(d.jobs || []).map(jobLink).join(", ") || "–"}</td><td>${used}</td></tr>`;
    })).join("");
    const jobRow = (j) => `<tr data-job="${j.id}"><td>${jobLink(j.id)}</td><td>${esc(j.kind)}</td><td>${badge(j.state)}</td><td>${progressCell(j)}</td>
      <td>${j.started_at ? duration((j.ended_at || data.now) - j.started_at) : "–"}</td><td class="wrap">${esc(j.state === "pending" ? j.reason || "" : "")}</td></tr>`;
    const services = data.services.map((s) => `<tr data-service="${esc(s.name)}"><td>${esc(s.name)}</td><td>${s.replicas.map((r) => jobLink(r.job_id)).join(", ")}</td><td>${s.in_flight}</td>
      <td>${s.queue ? `${s.queue.running}${s.queue.max_seqs ? "/" + s.queue.max_seqs : ""} running · ${s.queue.waiting} waiting` : "–"}</td><td class="wrap muted">${esc([...new Set(s.replicas.map((r) => r.version).filter(Boolean))].join(", "))}</td></tr>`).join("");
    paint(me, `<h1>Overview</h1>
      <div class="grid">
        <div class="card"><h2>Nodes and devices</h2><table id="devices"><tr><th>node</th><th>device</th><th>capacity</th><th>reserved</th><th>by jobs</th><th>measured</th></tr>${devRows}</table>
          <p class="muted">storage ${storage}</p></div>
        <div class="card"><h2>Services</h2><table id="services"><tr><th>name</th><th>replicas (jobs)</th><th>in flight</th><th>queue</th><th>serves</th></tr>${services || '<tr><td colspan="5" class="muted">none</td></tr>'}</table></div>
      </div>
      <div class="card" style="margin-top:14px"><h2>Running and pending jobs</h2><table id="jobs"><tr><th>id</th><th>kind</th><th>state</th><th>progress</th><th>time</th><th>waiting for</th></tr>
        ${data.jobs.map(jobRow).join("") || '<tr><td colspan="6" class="muted">nothing running</td></tr>'}</table></div>
      <div class="card" style="margin-top:14px"><h2>Recently ended</h2><table id="recent"><tr><th>id</th><th>kind</th><th>state</th><th>progress</th><th>time</th><th></th></tr>
        ${data.recent.slice().reverse().map(jobRow).join("")}</table></div>`);
  };
  await load();
  const again = debounce(() => load().catch(console.error), 250);
  follow(me, "", data.last_seq, (e) => { if (!e.topic.endsWith(".log") && !e.topic.endsWith(".metric")) again(); }, () => load().catch(console.error));
}

// ---------------------------------------------------------------- one job

async function jobPage(id, me) {
  const d = await api(`api/jobs/${id}`);
  if (!current(me)) return;
  const s = { job: d.job, metrics: d.metrics, progress: d.progress, usage: d.usage, logs: d.logs, states: d.states, level: "info", follow: true, x: "step" };
  const LEVELS = ["debug", "info", "warning", "error", "critical"];
  view.innerHTML = `<h1>Job ${id} <span id="job-state"></span></h1>
    <div class="grid"><div class="card"><div class="kv" id="job-info"></div></div>
      <div class="card"><details><summary><b>Parameters</b> <span class="muted" id="job-params-count"></span></summary><pre id="job-params"></pre></details></div></div>
    <div class="toolbar" style="margin-top:14px"><h2 style="margin:0">Metrics</h2><label>over <select id="x-axis"><option value="step" selected>steps</option><option value="time">time</option></select></label></div>
    <div class="charts" id="charts"></div>
    <h2 style="margin-top:14px">Resource use</h2><div class="charts" id="usage-charts"></div>
    <div class="card" style="margin-top:14px"><div class="toolbar"><h2 style="margin:0">Log</h2>
      <label>level <select id="log-level">${LEVELS.map((l) => `<option${l === "info" ? " selected" : ""}>${l}</option>`).join("")}</select></label>
      <label><input type="checkbox" id="log-follow" checked> follow</label><span class="muted" id="log-count"></span></div>
      <div class="logs" id="logs"></div></div>`;

  const info = () => {
    if (!current(me)) return;
    const j = s.job;
    document.getElementById("job-state").innerHTML = badge(j.state);
    const place = j.placement ? terse(j.placement) : "–";
    const rows = [["kind", esc(j.kind)], ["state", `${badge(j.state)} ${esc(j.reason || "")}`], ["progress", progressCell(j)], ["attempts", esc(j.attempts)],
      ["submitted", clock(j.submitted_at)], ["ran", j.started_at ? duration((j.ended_at || Date.now() / 1000) - j.started_at) : "–"],
      ["resources", esc(terse(j.resources))], ["placement", `<span class="wrap">${esc(place)}</span>`],
      ["result", j.result ? `<pre>${esc(JSON.stringify(j.result, null, 1)).slice(0, 2000)}</pre>` : "–"]];
    document.getElementById("job-info").innerHTML = rows.map(([k, v]) => `<div>${k}</div><div>${v}</div>`).join("");
    document.getElementById("job-params").textContent = JSON.stringify(j.params, null, 2);
    document.getElementById("job-params-count").textContent = `(${Object.keys(j.params || {}).length})`;
  };

  const charts = () => {
    if (!current(me)) return;
    const m = s.metrics, out = [];
    const loss = ["train_loss", "val_loss"].filter((n) => m[n]);
    // Over steps, or over time since the job started (metrics are [step, value, ts]; progress [step, ts, fields]).
    const byTime = s.x === "time";
    const start = byTime ? s.job.started_at || Math.min(...Object.values(m).flat().map((p) => p[2]), ...s.progress.map((p) => p[1])) : 0;
    const xl = byTime ? "time" : "step", xo = byTime ? { xfmt: (x) => duration(x) } : {};
    const bystep = (pts) => pts.map((p, i) => [byTime ? p[2] - start : p[0] ?? i, p[1]]);
    if (loss.length) out.push(lineChart("loss", "loss", loss.map((n) => ({ name: n, points: bystep(m[n]) })), xl, xo));
    for (const [name, pts] of Object.entries(m)) if (!loss.includes(name)) out.push(lineChart(name, name, [{ name, points: bystep(pts) }], xl, xo));
    const field = (f) => s.progress.filter((p) => typeof p[2][f] === "number").map((p, i) => [byTime ? p[1] - start : p[0] ?? i, p[2][f]]);
    const lr = field("lr"), tps = field("tokens_per_s");
    if (lr.length) out.push(lineChart("lr", "learning rate", [{ name: "lr", points: lr }], xl, xo));
    if (tps.length) out.push(lineChart("tokens_per_s", "tokens/s", [{ name: "tokens/s", points: tps }], xl, { zero: true, ...xo }));
    document.getElementById("charts").innerHTML = out.join("") || '<p class="muted">no metrics yet</p>';
    const t0 = s.usage.length ? s.usage[0][0] : 0, xfmt = (x) => duration(x);
    const u = (i, scale) => s.usage.filter((p) => p[i] !== null && p[i] !== undefined).map((p) => [p[0] - t0, p[i] / scale]);
    const uc = [lineChart("cpu", "CPU %", [{ name: "cpu %", points: u(1, 1) }], "time", { zero: true, xfmt }),
      lineChart("rss", "resident memory (MiB)", [{ name: "rss", points: u(2, 1048576) }], "time", { zero: true, xfmt })];
    if (u(3, 1).length) uc.push(lineChart("gpu_memory", "GPU memory (MiB)", [{ name: "gpu", points: u(3, 1048576) }], "time", { zero: true, xfmt }));
    document.getElementById("usage-charts").innerHTML = uc.join("");
  };

  const logLine = (l) => {
    const fields = Object.entries(l[4] || {}).map(([k, v]) => `${k}=${typeof v === "number" ? num(v) : typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    return `<div class="${esc(l[2])}" data-seq="${l[0]}">${esc(clock(l[1]))} ${esc((l[2] || "").padEnd(7))} ${esc(l[3])} ${esc(fields)}</div>`;
  };
  const shown = (l) => LEVELS.indexOf(l[2]) >= LEVELS.indexOf(s.level);
  const logs = () => {
    if (!current(me)) return;
    const box = document.getElementById("logs");
    const lines = s.logs.filter(shown);
    box.innerHTML = lines.map(logLine).join("");
    document.getElementById("log-count").textContent = `${lines.length} of ${s.logs.length} lines`;
    if (s.follow) box.scrollTop = box.scrollHeight;
  };
  document.getElementById("log-level").onchange = (ev) => { s.level = ev.target.value; logs(); };
  document.getElementById("x-axis").onchange = (ev) => { s.x = ev.target.value; charts(); };
  document.getElementById("log-follow").onchange = (ev) => { s.follow = ev.target.checked; logs(); };

  info(); charts(); logs();
  const redraw = debounce(charts, 200);
  const refresh = debounce(async () => { s.job = (await api(`api/jobs/${id}`)).job; info(); }, 300);
  follow(me, `job.${id}.`, d.last_seq, (e) => {
    const kind = e.topic.split(".").pop();
    if (kind === "metric") { (s.metrics[e.body.name] ||= []).push([e.body.step, e.body.value, e.ts]); redraw(); }
    else if (kind === "progress") { s.progress.push([e.body.step, e.ts, e.body.fields || {}]); s.job.progress = e.body; redraw(); info(); }
    else if (kind === "usage") { s.usage.push([e.ts, e.body.cpu_percent, e.body.rss, e.body.gpu_memory]); redraw(); }
    else if (kind === "log") {
      const l = [e.seq, e.ts, e.body.level, e.body.event, e.body.fields || {}];
      s.logs.push(l);
      if (s.logs.length > 5000) s.logs.splice(0, s.logs.length - 5000);
      if (shown(l)) {
        const box = document.getElementById("logs");
        box.insertAdjacentHTML("beforeend", logLine(l));
        document.getElementById("log-count").textContent = `${s.logs.filter(shown).length} of ${s.logs.length} lines`;
        if (s.follow) box.scrollTop = box.scrollHeight;
      }
    } else if (kind === "state") { s.job.state = e.body.state; s.job.reason = e.body.reason; info(); refresh(); }
  }, () => refresh());
}

// ---------------------------------------------------------------- pipelines

async function pipelinesPage(me) {
  let data;
  const load = async () => {
    data = await api("api/pipelines");
    const rows = data.pipelines.map((p) => {
      const counts = {};
      for (const st of p.stages || []) counts[st.state] = (counts[st.state] || 0) + 1;
      return `<tr data-pipeline="${p.id}"><td><a href="#/pipeline/${p.id}">${p.id}</a></td><td>${esc(p.name)}</td><td>${badge(p.state)}</td>
        <td>${Object.entries(counts).map(([k, v]) => `${v} ${esc(k)}`).join(", ")}</td><td>${clock(p.created_at)}</td></tr>`;
    }).join("");
    paint(me, `<h1>Pipelines</h1><div class="card"><table id="pipelines"><tr><th>id</th><th>name</th><th>state</th><th>stages</th><th>created</th></tr>
      ${rows || '<tr><td colspan="5" class="muted">no pipelines yet: llmos pipeline run FILE, or llmos demo</td></tr>'}</table></div>`);
  };
  const status = await api("api/overview");  // the seq before the snapshot: nothing between them is missed
  await load();
  const again = debounce(() => load().catch(console.error), 300);
  follow(me, "pipeline.", status.last_seq, again, again);
}

function graph(stages) {
  const depth = {}, byName = Object.fromEntries(stages.map((s) => [s.name, s]));
  const d = (name, seen = new Set()) => {
    if (depth[name] !== undefined) return depth[name];
    if (seen.has(name)) return 0;
    seen.add(name);
    const needs = (byName[name]?.needs || []).filter((n) => byName[n]);
    return (depth[name] = needs.length ? 1 + Math.max(...needs.map((n) => d(n, seen))) : 0);
  };
  stages.forEach((s) => d(s.name));
  const cols = {};
  for (const s of stages) (cols[depth[s.name]] ||= []).push(s);
  const BW = 150, BH = 44, GX = 60, GY = 18;
  const pos = {};
  let rows = 0;
  for (const [c, list] of Object.entries(cols)) {
    list.forEach((s, r) => { pos[s.name] = [20 + Number(c) * (BW + GX), 20 + r * (BH + GY)]; });
    rows = Math.max(rows, list.length);
  }
  const W = 40 + Object.keys(cols).length * (BW + GX), H = 40 + rows * (BH + GY);
  const fill = { running: "#2f6fdf", serving: "#2f6fdf", succeeded: "#2e8b57", failed: "#c53030", rejected: "#c53030", cancelled: "#c53030", waiting: "#8a8f98", skipped: "#b0b4bb" };
  let edges = "", boxes = "";
  for (const s of stages) {
    for (const n of s.needs || []) {
      if (!pos[n]) continue;
      const [x0, y0] = pos[n], [x1, y1] = pos[s.name];
      edges += `<path d="M${x0 + BW},${y0 + BH / 2} C${x0 + BW + GX / 2},${y0 + BH / 2} ${x1 - GX / 2},${y1 + BH / 2} ${x1},${y1 + BH / 2}"/>`;
    }
    const [x, y] = pos[s.name];
    const box = `<g data-stage="${esc(s.name)}" data-state="${esc(s.state)}"><rect x="${x}" y="${y}" width="${BW}" height="${BH}" fill="${fill[s.state] || "#8a8f98"}"/>
      <text x="${x + 10}" y="${y + 18}" font-weight="600">${esc(s.name)}</text><text x="${x + 10}" y="${y + 34}">${esc(s.kind)} · ${esc(s.state)}</text></g>`;
    boxes += s.job_id !== null && s.job_id !== undefined ? `<a href="#/job/${s.job_id}">${box}</a>` : box;
  }
  return `<svg viewBox="0 0 ${W} ${H}" style="max-width:${W}px"><defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">
    <path d="M0,0 L10,5 L0,10 z" fill="#aab" stroke="none"/></marker></defs>${edges}${boxes}</svg>`;
}

async function pipelinePage(id, me) {
  let data;
  const load = async () => {
    data = await api(`api/pipelines/${id}`);
    const p = data.pipeline, now = Date.now() / 1000;
    const rows = p.stages.map((s) => {
      const j = s.job_id !== null && s.job_id !== undefined ? data.jobs[String(s.job_id)] : null;
      const took = j && j.started_at ? duration((j.ended_at || now) - j.started_at) : "–";
      return `<tr data-stage="${esc(s.name)}"><td>${esc(s.name)}</td><td>${esc(s.kind)}</td><td>${badge(s.state)}</td><td>${jobLink(s.job_id)}</td>
        <td>${j ? progressCell(j) : "–"}</td><td>${j ? clock(j.started_at) : "–"}</td><td>${took}</td><td class="wrap">${esc(s.reason || "")}</td></tr>`;
    }).join("");
    paint(me, `<h1>Pipeline ${id}: ${esc(p.name)} ${badge(p.state)}</h1><div class="card graph">${graph(p.stages)}</div>
      <div class="card" style="margin-top:14px"><table id="stages"><tr><th>stage</th><th>kind</th><th>state</th><th>job</th><th>progress</th><th>started</th><th>took</th><th>reason</th></tr>${rows}</table></div>`);
    return data;
  };
  const status = await api("api/overview");
  await load();
  const again = debounce(() => load().catch(console.error), 250);
  const mine = () => new Set(data.pipeline.stages.map((s) => s.job_id).filter((x) => x !== null && x !== undefined).map(String));
  follow(me, "", status.last_seq, (e) => {
    const parts = e.topic.split(".");
    if ((parts[0] === "pipeline" && parts[1] === String(id)) || (parts[0] === "job" && mine().has(parts[1]) && ["state", "progress"].includes(parts[2]))) again();
  }, again);
}

// ---------------------------------------------------------------- models

function scatter(key, title, points) {
  // Size on a log axis (compression moves a model by factors, and a 2 MiB and a 3 MiB model
  // must not sit on one dot beside a 50 MiB one); perplexity up; dot area for decode tokens/s.
  const W = 560, H = 260, L = 56, R = 150, T = 22, B = 30;
  const ok = points.filter((p) => p.figures && p.figures.bytes && p.figures.ppl);
  let body = "";
  if (ok.length) {
    const xs = ok.map((p) => Math.log(p.figures.bytes / 1048576)), ys = ok.map((p) => p.figures.ppl);
    const x0 = Math.min(...xs) - 0.15, x1 = Math.max(...xs) + 0.15;
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    const pad = (y1 - y0) * 0.15 || Math.abs(y1) * 0.02 || 1;
    y0 -= pad; y1 += pad;
    const sx = (mib) => L + ((Math.log(mib) - x0) / (x1 - x0)) * (W - L - R), sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    const tmax = Math.max(...ok.map((p) => p.figures.tokens_per_s || 0), 1);
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      body += `<line class="grid" x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}"/><text x="${L - 4}" y="${sy(y) + 3}" text-anchor="end">${num(y)}</text>`;
    }
    const ticks = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192].filter((t) => Math.log(t) >= x0 && Math.log(t) <= x1);
    for (const t of ticks) body += `<line class="grid" x1="${sx(t)}" x2="${sx(t)}" y1="${T}" y2="${H - B}"/><text x="${sx(t)}" y="${H - B + 12}" text-anchor="middle">${t}</text>`;
    body += `<text x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle">weights (MiB, log scale) · perplexity ↑ · dot area: decode tokens/s</text>`;
    // Each label goes beside its dot where it covers no other label and no dot: right, left,
    // above or below; else the first of those that is clear once moved up or down (with a leader line).
    const dots = ok.map((p) => {
      const f = p.figures;
      return { p, f, cx: sx(f.bytes / 1048576), cy: sy(f.ppl), r: 3 + 12 * Math.sqrt((f.tokens_per_s || 0) / tmax) };
    }).sort((a, b) => a.cy - b.cy || a.cx - b.cx);
    const boxes = dots.map((d) => ({ x: d.cx - d.r, y: d.cy - d.r, w: 2 * d.r, h: 2 * d.r }));
    const clear = (q) => q.x >= L && q.x + q.w <= W && q.y >= T - 12 && q.y + q.h <= H - B
      && boxes.every((o) => q.x >= o.x + o.w || o.x >= q.x + q.w || q.y >= o.y + o.h || o.y >= q.y + q.h);
    let labels = "";
    for (const d of dots) {
      const color = d.f.source ? "#2f6fdf" : d.f.accepted === false || d.p.rejected ? "#c53030" : "#2e8b57";
      body += `<g data-model="${esc(d.p.id)}"><circle cx="${d.cx}" cy="${d.cy}" r="${d.r.toFixed(1)}" fill="${color}" fill-opacity="0.55" stroke="${color}"/></g>`;
      const text = `${d.p.label}${d.f.tokens_per_s ? " · " + num(d.f.tokens_per_s) + " tok/s" : ""}`;
      const w = text.length * 6.3 + 2, h = 11;  // 10px sans: about 6 units a character
      const up = d.cy - d.r - 2 - h, down = d.cy + d.r + 2;
      const tries = [[d.cx + d.r + 3, d.cy - h / 2], [d.cx - d.r - 3 - w, d.cy - h / 2], [d.cx - w / 2, up], [d.cx - d.r, up], [d.cx + d.r - w, up], [d.cx - w / 2, down], [d.cx - d.r, down], [d.cx + d.r - w, down]]
        .map(([x, y]) => ({ x, y, w, h }));
      let spot = tries.find(clear), leader = false;
      for (let k = 1; !spot && k < 20; k++) {
        spot = tries.flatMap((q) => [{ ...q, y: q.y - k * h }, { ...q, y: q.y + k * h }]).find(clear);
        leader = Boolean(spot);
      }
      spot ||= tries[0];
      boxes.push(spot);
      if (leader) {
        const lx = Math.max(spot.x, Math.min(spot.x + spot.w, d.cx)), ly = spot.y + (spot.y > d.cy ? 0 : h);
        labels += `<line stroke="#bbb" x1="${d.cx}" y1="${d.cy}" x2="${lx}" y2="${ly}"/>`;
      }
      labels += `<text x="${spot.x + 1}" y="${spot.y + h - 2}">${esc(text)}</text>`;
    }
    body += labels;
  } else body = `<text x="${W / 2}" y="${H / 2}" text-anchor="middle">no compression figures yet</text>`;
  body += `<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/><line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
  return `<div class="card chart" data-chart="${esc(key)}" data-points="${ok.length}"><h2>${esc(title)}</h2><svg viewBox="0 0 ${W} ${H}">${body}</svg></div>`;
}

async function modelsPage(me) {
  let data;
  const load = async () => {
    data = await api("api/models");
    const models = data.models, byId = Object.fromEntries(models.map((m) => [m.id, m]));
    for (const m of models) m.label = `${m.job_kind || m.kind} ${m.variant ? m.variant + " " : ""}${m.id.slice(0, 6)}`;
    const rootOf = (m, seen = new Set()) => {
      const parent = (m.parents || []).find((p) => byId[p]);
      if (!parent || seen.has(m.id)) return m.id;
      seen.add(m.id);
      return rootOf(byId[parent], seen);
    };
    const families = {};
    for (const m of models) (families[rootOf(m)] ||= []).push(m);
    const charts = Object.entries(families).filter(([, f]) => f.some((m) => m.figures)).map(([root, f]) => scatter(`family-${root}`, `${byId[root].label} and what was made from it`, f)).join("");
    const rows = models.map((m) => {
      const f = m.figures || {};
      const verdict = m.rejected || f.accepted === false ? badge("rejected") : f.accepted ? badge("accepted") : "";
      return `<tr data-model="${esc(m.id)}"><td title="${esc(m.id)}">${esc(m.id.slice(0, 12))}</td><td>${esc(m.job_kind || "")} <span class="muted">${esc(m.variant || "")}</span></td><td>${jobLink(m.job_id)}</td><td>${size(m.size)}</td><td>${f.bytes ? size(f.bytes) : "–"}</td>
        <td>${f.ppl ? num(f.ppl) : "–"}</td><td>${f.tokens_per_s ? num(f.tokens_per_s) : "–"}</td><td>${verdict}</td>
        <td>${(m.parents || []).map((p) => `<span title="${esc(p)}">${esc(p.slice(0, 8))}</span>`).join(", ") || '<span class="muted">trained</span>'}</td>
        <td class="wrap muted">${esc(m.path)}</td></tr>`;
    }).join("");
    paint(me, `<h1>Models</h1><div class="charts">${charts || '<p class="muted">no compression figures yet: prune or quantize a model (llmos demo does)</p>'}</div>
      <div class="card" style="margin-top:14px"><table id="models"><tr><th>artifact</th><th>made by</th><th>job</th><th>on disk</th><th>weights</th><th>perplexity</th><th>tokens/s</th><th>verdict</th><th>from</th><th>path</th></tr>
      ${rows || '<tr><td colspan="10" class="muted">no artifacts yet</td></tr>'}</table></div>`);
  };
  const status = await api("api/overview");
  await load();
  const again = debounce(() => load().catch(console.error), 400);
  follow(me, "job.", status.last_seq, (e) => { if (e.topic.endsWith(".artifact") || e.topic.endsWith(".state")) again(); }, again);
}

// ---------------------------------------------------------------- routing

const ROUTES = [
  [/^#?\/?$/, "overview", (m, me) => overview(me)],
  [/^#\/job\/(\d+)$/, "overview", (m, me) => jobPage(Number(m[1]), me)],
  [/^#\/pipelines$/, "pipelines", (m, me) => pipelinesPage(me)],
  [/^#\/pipeline\/(\d+)$/, "pipelines", (m, me) => pipelinePage(Number(m[1]), me)],
  [/^#\/models$/, "models", (m, me) => modelsPage(me)],
];

async function route() {
  stopFollowing();
  const me = ++generation;
  const hash = location.hash || "#/";
  for (const [re, nav, show] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
    try {
      await show(m, me);
    } catch (err) {
      if (!paint(me, `<div class="banner">${esc(err.message)}</div>`)) return;
      setConn("reconnecting", "reconnecting…");
      setTimeout(() => { if (current(me)) route(); }, 2000); // the kernel or the dashboard is away: try again
    }
    return;
  }
  paint(me, `<div class="banner">no such page: ${esc(hash)}</div>`);
}

window.addEventListener("hashchange", route);
kernelLine();
route();
