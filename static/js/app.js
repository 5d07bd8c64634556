// SmolVLM attention viewer: fetches numbers from /api/attention and draws them on canvases.
// Token text only ever goes through textContent (never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  run: null, info: null, index: null, data: null, selectable: [],
  cache: new Map(), reverse: null, request: 0,
};
const CACHE_LIMIT = 300;

// -- helpers -----------------------------------------------------------------------------------
async function getJSON(url) {
  const resp = await fetch(url);
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON: reported below */ }
  if (!resp.ok || !body || body.success === false) {
    throw new Error((body && body.error) || `request failed: HTTP ${resp.status}`);
  }
  return body;
}

function showError(message) {
  $("alert-text").textContent = message;
  $("alert").hidden = false;
}

function clearError() { $("alert").hidden = true; }

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function hot(x) {  // matplotlib's "hot", as smolattn.heatmap.hot
  const c = (v) => Math.round(Math.min(1, Math.max(0, v)) * 255);
  return [c(x / 0.365079), c((x - 0.365079) / 0.380953), c((x - 0.746032) / 0.253968)];
}

function blues(x) {  // light to dark blue, for the image-mass overview
  const mix = (a, b) => Math.round(a + (b - a) * Math.min(1, Math.max(0, x)));
  return `rgb(${mix(239, 30)},${mix(246, 64)},${mix(255, 175)})`;
}

function fmt(v) { return v === 0 ? "0" : Math.abs(v) >= 0.01 ? v.toFixed(3) : v.toPrecision(2); }

function option(select, value, label) { select.append(new Option(label, value)); }

function radio(name) { return document.querySelector(`input[name="${name}"]:checked`).value; }

// -- runs ----------------------------------------------------------------------------------------
async function listRuns(query) {
  const body = await getJSON(`/api/runs?q=${encodeURIComponent(query)}&limit=200`);
  const select = $("run-select");
  select.replaceChildren();
  for (const r of body.runs) {
    const grid = r.grid ? (r.grid[0] ? ` — ${r.grid[0]}×${r.grid[1]} tiles` : " — global tile only") : "";
    option(select, r.name, r.error ? `${r.name} (failed: ${r.error})` : `${r.name}${grid}`);
  }
  if (state.run && body.runs.some((r) => r.name === state.run)) select.value = state.run;
  $("run-count").textContent = `${body.runs.length} of ${body.total}`;
  $("picker").hidden = body.single;
  return body.runs;
}

async function loadRun(name) {
  state.run = name;
  state.index = null;
  state.data = null;
  state.cache.clear();
  setReverse(null);
  const url = new URL(location.href);
  url.searchParams.set("run", name);
  history.replaceState(null, "", url);
  let info;
  try {
    info = await getJSON(`/api/initialize?run=${encodeURIComponent(name)}`);
  } catch (e) {
    state.info = null;
    $("prompt-tokens").replaceChildren();
    $("answer-tokens").replaceChildren();
    $("image").removeAttribute("src");
    $("image").hidden = true;
    $("standin-banner").hidden = true;
    $("run-meta").textContent = "";
    $("download").disabled = true;
    drawAll();
    showError(e.message);
    return;
  }
  clearError();
  state.info = info;
  $("standin-banner").hidden = !info.standin;
  const g = info.geometry;
  $("run-meta").textContent = `${info.run} · ${info.model || "unknown model"} · ${g.image_size[0]}×${g.image_size[1]} px · `
    + (g.rows ? `${g.rows}×${g.cols} tiles` : "global tile only") + ` · ${info.num_layers} layers × ${info.num_heads} heads`;
  $("semantics").textContent = `Rows: ${info.query_semantics}.`;
  fillControls(info);
  renderTokens(info);
  $("image").hidden = false;
  $("image").src = info.image_url;
  const first = state.selectable.find((t) => t.kind === "answer") || state.selectable[0];
  if (first) select(first.index);
}

function fillControls(info) {
  for (const id of ["layer", "layer-from", "layer-to"]) {
    const s = $(id);
    s.replaceChildren();
    for (let i = 0; i < info.num_layers; i++) option(s, i, String(i));
  }
  $("layer").value = info.num_layers - 1;
  $("layer-to").value = info.num_layers - 1;
  const heads = $("heads");
  while (heads.options.length > 2) heads.remove(2);
  for (let h = 0; h < info.num_heads; h++) option(heads, h, `Head ${h}`);
}

// -- tokens --------------------------------------------------------------------------------------
function renderTokens(info) {
  const [first, last] = info.geometry.image_block;
  const areas = { prompt: $("prompt-tokens"), answer: $("answer-tokens") };
  areas.prompt.replaceChildren();
  areas.answer.replaceChildren();
  state.selectable = [];
  for (const t of info.token_table) {
    const area = t.index < info.prompt_length ? areas.prompt : areas.answer;
    if (t.index === first) {
      const g = info.geometry;
      const layout = g.rows ? `${g.rows}×${g.cols} tiles + global` : "global tile only";
      area.append(el("span", "chip image-chip", `[image: ${layout}, ${g.num_keys} tokens]`));
    }
    if (t.index >= first && t.index <= last) continue;
    const blank = t.text.trim() === "" && t.text.includes("\n");
    const span = el("span", `token ${t.kind}${blank ? " newline" : ""}`, blank ? "↵" : t.text);
    span.dataset.index = t.index;
    span.title = `#${t.index} ${t.kind}: ${JSON.stringify(t.raw)}`;
    if (t.has_row) {
      span.classList.add("selectable");
      span.tabIndex = -1;
      state.selectable.push(t);
    } else {
      span.classList.add("inert");
    }
    area.append(span);
    if (blank) area.append(el("br"));
  }
}

function select(index) {
  state.index = index;
  for (const node of document.querySelectorAll(".token.selected")) node.classList.remove("selected");
  const span = document.querySelector(`.token[data-index="${index}"]`);
  if (span) {
    span.classList.add("selected");
    span.scrollIntoView({ block: "nearest" });
  }
  const t = state.info.token_table[index];
  $("sel-token").textContent = `#${index} ${JSON.stringify(t.text)}`;
  $("download").disabled = false;
  update();
}

function step(delta) {
  const list = state.selectable;
  if (!list.length) return;
  const at = list.findIndex((t) => t.index === state.index);
  const next = at < 0 ? 0 : Math.min(list.length - 1, Math.max(0, at + delta));
  select(list[next].index);
}

// -- data ----------------------------------------------------------------------------------------
function selectionParams() {
  const range = $("layer-mode").value === "range";
  let from = Number($("layer-from").value), to = Number($("layer-to").value);
  if (range && from > to) { $("layer-to").value = from; to = from; }
  return {
    layers: range ? `${from}-${to}` : $("layer").value,
    heads: $("heads").value,
  };
}

async function update() {
  $("layer-single").hidden = $("layer-mode").value !== "single";
  $("layer-range").hidden = $("layer-mode").value !== "range";
  if (!state.info || state.index === null) return;
  const p = new URLSearchParams({ run: state.run, index: state.index, ...selectionParams(),
    drop_sink: $("drop-sink").checked ? "1" : "0", norm: radio("norm") });
  const key = p.toString();
  const ticket = ++state.request;
  try {
    let data = state.cache.get(key);
    if (!data) {
      data = await getJSON(`/api/attention?${key}`);
      if (state.cache.size >= CACHE_LIMIT) state.cache.delete(state.cache.keys().next().value);
      state.cache.set(key, data);
    }
    if (ticket !== state.request) return;  // a newer request superseded this one
    clearError();
    state.data = data;
  } catch (e) {
    if (ticket === state.request) showError(e.message);
    return;
  }
  drawAll();
  if (state.reverse) loadReverse(state.reverse);
}

// -- drawing -------------------------------------------------------------------------------------
function heatCanvas(grid, vmin, vmax) {
  // One pixel per cell; colour and alpha follow the value (cold cells stay transparent).
  const h = grid.length, w = grid[0].length;
  const canvas = el("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const span = vmax > vmin ? vmax - vmin : 1;
  for (let i = 0; i < h; i++) {
    for (let j = 0; j < w; j++) {
      const x = Math.min(1, Math.max(0, (grid[i][j] - vmin) / span));
      const [r, g, b] = hot(x);
      img.data.set([r, g, b, Math.round(Math.sqrt(x) * 255)], (i * w + j) * 4);
    }
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

function paint(ctx, heat, width, height) {
  ctx.imageSmoothingEnabled = radio("upsample") === "smooth";
  ctx.imageSmoothingQuality = "high";
  ctx.globalAlpha = Number($("opacity").value);
  ctx.drawImage(heat, 0, 0, width, height);
  ctx.globalAlpha = 1;
}

function drawAll() {
  $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
  const d = state.data;
  drawOverlay(d);
  drawGlobal(d);
  drawColorbar(d);
  drawOverview(d);
  $("sel-mass").textContent = d ? `${(d.image_mass * 100).toFixed(1)}% of the attention` : "–";
}

function drawOverlay(d) {
  const img = $("image"), canvas = $("overlay");
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(img.clientWidth * dpr));
  canvas.height = Math.max(1, Math.round(img.clientHeight * dpr));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  delete canvas.dataset.index;
  if (!d || !img.complete || !img.naturalWidth) return;
  paint(ctx, heatCanvas(d.grid || d.global, d.vmin, d.vmax), canvas.width, canvas.height);
  canvas.dataset.index = d.index;  // lets tests (and you) see which token is drawn
}

function drawGlobal(d) {
  const canvas = $("global"), img = $("image");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (img.complete && img.naturalWidth) ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (d) paint(ctx, heatCanvas(d.global, d.vmin, d.vmax), canvas.width, canvas.height);
}

function drawColorbar(d) {
  const canvas = $("colorbar"), ctx = canvas.getContext("2d");
  const bar = ctx.createImageData(256, 1);
  for (let i = 0; i < 256; i++) bar.data.set([...hot(i / 255), 255], i * 4);
  ctx.putImageData(bar, 0, 0);
  const ticks = $("colorbar-ticks");
  ticks.replaceChildren();
  $("colorbar-label").textContent = "";
  if (!d) return;
  for (let k = 0; k <= 4; k++) ticks.append(el("span", "", fmt(d.vmin + (d.vmax - d.vmin) * k / 4)));
  $("colorbar-label").textContent = (d.drop_sink ? "Share of the image attention" : "Attention weight")
    + (d.norm === "shared" ? " · scale shared across all layers" : " · scale of this map");
}

function drawOverview(d) {
  const box = $("overview");
  box.replaceChildren();
  $("overview-caption").textContent = "";
  if (!d) return;
  const m = d.layer_head_mass, heads = m[0].length;
  const top = Math.max(...m.flat(), 1e-9);
  box.style.gridTemplateColumns = `2.2em repeat(${heads}, 1fr)`;
  const [a, b] = d.layers;
  const headOn = (h) => d.heads === "mean" || d.heads === "max" || d.heads === h;
  box.append(el("span", "axis", "L\\H"));
  for (let h = 0; h < heads; h++) box.append(el("span", `axis${headOn(h) ? " on" : ""}`, String(h)));
  m.forEach((row, layer) => {
    box.append(el("span", `axis${layer >= a && layer <= b ? " on" : ""}`, String(layer)));
    row.forEach((v, h) => {
      const cell = el("button", "cell");
      cell.type = "button";
      cell.style.background = blues(v / top);
      cell.title = `layer ${layer}, head ${h}: ${(v * 100).toFixed(1)}% on the image`;
      cell.dataset.layer = layer;
      cell.dataset.head = h;
      if (a === b && layer === a && d.heads === h) cell.classList.add("current");
      cell.addEventListener("click", () => {
        $("layer-mode").value = "single";
        $("layer").value = layer;
        $("heads").value = h;
        update();
      });
      box.append(cell);
    });
  });
  $("overview-caption").textContent = `Darkest: ${(top * 100).toFixed(1)}% of the token's attention on the image. `
    + "Click a cell to show that layer and head.";
}

// -- reverse view --------------------------------------------------------------------------------
function setReverse(target) {
  state.reverse = target;
  $("cell-marker").hidden = !target || target.view !== "tiles";
  if (!target) {
    $("reverse-list").replaceChildren();
    $("reverse-caption").textContent = "Click a spot on the image or the global tile.";
  }
}

function cellAt(event, node, rows, cols) {
  const r = node.getBoundingClientRect();
  const i = Math.min(rows - 1, Math.floor((event.clientY - r.top) / r.height * rows));
  const j = Math.min(cols - 1, Math.floor((event.clientX - r.left) / r.width * cols));
  return [Math.max(0, i), Math.max(0, j)];
}

async function loadReverse(target) {
  setReverse(target);
  const [i, j] = target.cell;
  if (target.view === "tiles") {
    const [gh, gw] = state.info.geometry.grid;
    Object.assign($("cell-marker").style, { left: `${(100 * j) / gw}%`, top: `${(100 * i) / gh}%`,
      width: `${100 / gw}%`, height: `${100 / gh}%` });
  }
  const p = new URLSearchParams({ run: state.run, cell: `${i},${j}`, view: target.view, ...selectionParams() });
  let body;
  try {
    body = await getJSON(`/api/reverse?${p}`);
  } catch (e) {
    showError(e.message);
    return;
  }
  if (state.reverse !== target) return;
  $("reverse-caption").textContent = `Tokens attending most to ${target.view} cell (${i}, ${j}):`;
  const list = $("reverse-list");
  list.replaceChildren();
  for (const t of body.tokens) {
    const item = el("li");
    item.dataset.index = t.index;
    const tok = el("span", `token ${t.kind} selectable`, t.text.replace(/\n/g, "↵"));
    item.append(tok, el("span", "value", fmt(t.value)));
    item.addEventListener("click", () => select(t.index));
    list.append(item);
  }
}

// -- download ------------------------------------------------------------------------------------
function download() {
  const img = $("image"), d = state.data;
  if (!d || !img.naturalWidth) return;
  const canvas = el("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  paint(ctx, heatCanvas(d.grid || d.global, d.vmin, d.vmax), canvas.width, canvas.height);
  canvas.toBlob((blob) => {
    const a = el("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${state.run.replace(/[^\w.-]+/g, "_")}_token${d.index}_layers${d.layers.join("-")}_heads-${d.heads}.png`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }, "image/png");
}

// -- wiring --------------------------------------------------------------------------------------
function wire() {
  for (const id of ["layer-mode", "layer", "layer-from", "layer-to", "heads", "drop-sink"]) {
    $(id).addEventListener("change", update);
  }
  for (const input of document.querySelectorAll('input[name="norm"]')) input.addEventListener("change", update);
  for (const input of document.querySelectorAll('input[name="upsample"]')) input.addEventListener("change", drawAll);
  $("opacity").addEventListener("input", drawAll);
  $("download").addEventListener("click", download);
  $("alert-close").addEventListener("click", clearError);
  $("image").addEventListener("load", drawAll);
  new ResizeObserver(() => drawOverlay(state.data)).observe($("image"));

  const tokenClick = (event) => {
    const span = event.target.closest(".token.selectable");
    if (span) select(Number(span.dataset.index));
  };
  $("prompt-tokens").addEventListener("click", tokenClick);
  $("answer-tokens").addEventListener("click", tokenClick);

  $("stage").addEventListener("click", (event) => {
    if (!state.info) return;
    const [gh, gw] = state.info.geometry.grid;
    const view = state.info.geometry.rows ? "tiles" : "global";
    loadReverse({ view, cell: cellAt(event, $("image"), gh, gw) });
  });
  $("global").addEventListener("click", (event) => {
    if (!state.info) return;
    const side = state.info.geometry.side;
    loadReverse({ view: "global", cell: cellAt(event, $("global"), side, side) });
  });

  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, select, textarea") || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
      event.preventDefault();
      step(event.key === "ArrowLeft" ? -1 : 1);
    }
  });

  let timer = null;
  $("run-search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => listRuns($("run-search").value).catch((e) => showError(e.message)), 150);
  });
  $("run-select").addEventListener("change", () => loadRun($("run-select").value));
}

async function main() {
  wire();
  try {
    const runs = await listRuns("");
    const wanted = new URLSearchParams(location.search).get("run");
    const name = wanted || (runs[0] && runs[0].name);
    if (!name) throw new Error("no runs to show");
    if (wanted && !runs.some((r) => r.name === wanted)) option($("run-select"), wanted, wanted);
    $("run-select").value = name;
    await loadRun(name);
  } catch (e) {
    showError(e.message);
  }
}

main();
