// Dataset page: the layer x head grid of a head analysis (analyze_heads.py), coloured by a chosen score;
// click a head for its best and worst runs (overlays from /api/overlay.png), click a run to open it in
// the run view at that layer, head and query token. Text only ever goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, score: "frequency", layer: null, head: null };
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function getJSON(url) {
  const resp = await fetch(url);
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok || !body || body.success === false) throw new Error((body && body.error) || `request failed: HTTP ${resp.status}`);
  return body;
}

function showError(message) { $("alert-text").textContent = message; $("alert").hidden = false; }

function fmt(v) {
  if (v === null || v === undefined) return "n/a";
  if (v === "inf") return "∞";
  return Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(3) : v.toPrecision(2);
}

function finite(v) { return typeof v === "number" && Number.isFinite(v); }

function writeUrl() {
  const url = new URL(location.href);
  url.search = "";
  url.searchParams.set("score", state.score);
  if (state.layer !== null) { url.searchParams.set("layer", state.layer); url.searchParams.set("head", state.head); }
  history.replaceState(null, "", url);
}

function drawGrid() {
  const info = state.info, [L, H] = info.shape, values = info.table[state.score] || [];
  const meta = info.scores[state.score], flat = values.flat().filter(finite);
  const lo = flat.length ? Math.min(...flat) : 0, hi = flat.length ? Math.max(...flat) : 1;
  const better = (v) => (hi > lo ? (meta.higher_is_better ? (v - lo) : (hi - v)) / (hi - lo) : 1);
  const box = $("grid");
  box.replaceChildren();
  box.style.gridTemplateColumns = `2.4em repeat(${H}, minmax(14px, 1fr))`;
  box.append(el("span", "axis", "L\\H"));
  for (let h = 0; h < H; h++) box.append(el("span", "axis", String(h)));
  for (let l = 0; l < L; l++) {
    box.append(el("span", "axis", String(l)));
    for (let h = 0; h < H; h++) {
      const v = values[l] ? values[l][h] : null, cell = el("span", "cell");
      if (finite(v)) cell.style.background = viridis(better(v));
      else cell.classList.add("na");
      if (l === state.layer && h === state.head) cell.classList.add("on");
      cell.title = `layer ${l}, head ${h}: ${meta.label} = ${fmt(v)}`;
      cell.dataset.layer = l;
      cell.dataset.head = h;
      cell.addEventListener("click", () => selectHead(l, h));
      box.append(cell);
    }
  }
  const ctx = $("legend").getContext("2d");
  for (let x = 0; x < 200; x++) { ctx.fillStyle = viridis(x / 199); ctx.fillRect(x, 0, 1, 10); }
  $("legend-lo").textContent = `${fmt(meta.higher_is_better ? lo : hi)} (worse)`;
  $("legend-hi").textContent = `${fmt(meta.higher_is_better ? hi : lo)} (better)`;
  $("grid-caption").textContent = `${meta.label}; bright = better; hatched = no value (no boxes, or an empty map).`;
}

function exampleCard(ex, layer, head) {
  const token = ex.position, run = encodeURIComponent(ex.run);
  const a = el("a", "ds-example");
  a.href = `/?run=${run}&token=${token}&layers=${layer}&heads=${head}`;
  a.title = "Open in the run view at this layer, head and token";
  const img = el("img");
  img.loading = "lazy";
  img.alt = `L${layer} H${head} on ${ex.run}`;
  img.src = `/api/overlay.png?run=${run}&index=${token}&layers=${layer}&heads=${head}`;
  const frame = el("div", "ds-frame");
  frame.append(img);
  for (const [x, y, w, h] of ex.boxes || []) {   // the object's COCO boxes, as fractions of the image
    const b = el("div", "ds-box");
    Object.assign(b.style, { left: `${100 * x}%`, top: `${100 * y}%`, width: `${100 * w}%`, height: `${100 * h}%` });
    frame.append(b);
  }
  a.append(frame);
  const what = ex.object ? ` · "${ex.object}" label ${ex.label}, said ${ex.pred}` : "";
  a.append(el("div", "cap", `${ex.run} · ${fmt(ex.value)}${what}`));
  return a;
}

async function selectHead(layer, head) {
  state.layer = layer;
  state.head = head;
  writeUrl();
  document.querySelectorAll(".ds-grid .cell.on").forEach((c) => c.classList.remove("on"));
  const cell = document.querySelector(`.ds-grid .cell[data-layer="${layer}"][data-head="${head}"]`);
  if (cell) cell.classList.add("on");
  $("head-title").textContent = `Layer ${layer}, head ${head}`;
  let d;
  try {
    d = await getJSON(`/api/dataset/head?layer=${layer}&head=${head}&score=${state.score}&n=4`);
  } catch (e) { showError(e.message); return; }
  if (d.layer !== state.layer || d.head !== state.head) return;   // a newer click won
  const dl = $("head-values");
  dl.replaceChildren();
  for (const [k, meta] of Object.entries(state.info.scores)) {
    dl.append(el("dt", null, meta.label), el("dd", null, fmt(d.values[k])));
  }
  const per = state.info.scores[d.score] ? state.info.scores[d.score].label : d.score;
  $("best-title").textContent = `Best runs by ${per}`;
  $("worst-title").textContent = `Worst runs by ${per}`;
  for (const which of ["best", "worst"]) {
    const box = $(which);
    box.replaceChildren();
    if (!d[which].length) box.append(el("p", "muted small", "No run has a value for this head."));
    for (const ex of d[which]) box.append(exampleCard(ex, layer, head));
  }
}

function showSkipped(several) {
  // the runs of several images or a video the analysis skipped: one line, and links to open each
  const box = $("skipped-several");
  box.replaceChildren();
  box.hidden = !several || !several.count;
  if (box.hidden) return;
  box.append(several.line);
  several.runs.slice(0, 20).forEach((name, i) => {
    const a = el("a", "", name);
    a.href = `/?run=${encodeURIComponent(name)}`;
    box.append(i ? ", " : ": ", a);
  });
  if (several.runs.length > 20) box.append(` and ${several.runs.length - 20} more`);
}

async function init() {
  $("alert-close").addEventListener("click", () => { $("alert").hidden = true; });
  let info;
  try { info = await getJSON("/api/dataset"); } catch (e) { showError(e.message); return; }
  state.info = info;
  $("standin-banner").hidden = !info.inputs.standin;
  const sel = $("score");
  for (const [k, meta] of Object.entries(info.scores)) sel.append(new Option(meta.label, k));
  const p = new URLSearchParams(location.search);
  if (p.get("score") && info.scores[p.get("score")]) state.score = p.get("score");
  sel.value = state.score;
  sel.addEventListener("change", () => {
    state.score = sel.value;
    drawGrid();
    writeUrl();
    if (state.layer !== null) selectHead(state.layer, state.head);
  });
  const i = info.inputs;
  $("ds-meta").textContent = `${i.runs_analysed} runs · ${i.models.join(", ")}${i.standin ? " (STAND-IN)" : ""} · `
    + `${info.shape[0]} layers × ${info.shape[1]} heads · query: ${info.params.query}`;
  $("params").textContent = `Root ${i.root}; ${i.runs_skipped} skipped; ${i.runs_with_boxes} with COCO boxes; `
    + `SE threshold ${info.params.threshold}, per-run top-${info.params.topk}.`
    + (info.same_root ? "" : " Note: the analysis was made for another root than the one served; links may not open.");
  showSkipped(info.several);
  drawGrid();
  const l = Number(p.get("layer")), h = Number(p.get("head"));
  if (p.get("layer") !== null && Number.isInteger(l) && Number.isInteger(h) && l < info.shape[0] && h < info.shape[1]) selectHead(l, h);
}

init();
