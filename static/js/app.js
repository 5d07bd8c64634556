// SmolVLM attention viewer: fetches numbers from /api/attention and draws them on canvases.
// Token text only ever goes through textContent (never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  run: null, info: null, index: null, selectable: [], units: new Map(),
  views: { a: null, b: null }, cache: new Map(), reverse: null, request: 0, textRequest: 0,
  runs: { offset: 0, limit: 200, total: 0 },
  image: 0,   // several images / a video: the one whose map is shown (0-based)
  panels: [], // several images: every image's map of the selected token (one panel each)
  overview: null,   // the layer x head overview shown: /api/overview's (an image, or all summed)
};
const PANELS_MAX = 8;   // more images than this (a video's frames): the strip and the selected one only
const CACHE_LIMIT = 300;
const TITLE = "SmolVLM attention viewer";
// the two views: A uses the main controls, B (compare mode) its own row under its image
const VIEWS = {
  a: { stage: "stage", image: "image", overlay: "overlay", label: "label-a" },
  b: { stage: "stage-b", image: "image-b", overlay: "overlay-b", label: "label-b" },
};

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

async function getOrShow(url) {  // the body, or null after showing the error
  try {
    return await getJSON(url);
  } catch (e) {
    showError(e.message);
    return null;
  }
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

function shown(text) { return text.replace(/\n/g, "↵"); }

function safeName(text) { return text.replace(/[^\w.-]+/g, "_"); }

// other modules (static/js/interventions.js) follow the page through these events
function emit(name, detail) { document.dispatchEvent(new CustomEvent(name, { detail })); }

// -- runs ----------------------------------------------------------------------------------------
async function listRuns() {
  const r = state.runs;
  const p = new URLSearchParams({ q: $("run-search").value, sort: $("run-sort").value, offset: r.offset, limit: r.limit });
  const body = await getJSON(`/api/runs?${p}`);
  const select = $("run-select");
  select.replaceChildren();
  for (const e of body.runs) {
    const grid = e.grid ? (e.grid[0] ? ` — ${e.grid[0]}×${e.grid[1]} tiles` : " — global tile only") : "";
    const answer = e.answer ? ` — ${e.answer.slice(0, 60)}` : "";
    option(select, e.name, e.error ? `${e.name} (failed: ${e.error})` : `${e.name}${grid}${answer}`);
    if (e.error) select.lastChild.disabled = true;
  }
  if (state.run && !body.runs.some((e) => e.name === state.run)) {
    option(select, state.run, state.run);   // the open run stays visible whatever the page
  }
  if (state.run) select.value = state.run;
  r.total = body.total;
  const last = Math.min(body.total, r.offset + body.runs.length);
  $("run-count").textContent = (body.total ? `${r.offset + 1}–${last} of ${body.total}` : "no match")
    + (body.complete === false ? ` (reading answers: ${body.pending} to go)` : "");
  clearTimeout(r.again);   // a large root: ask again until every run's answer and grid are read
  if (body.complete === false) r.again = setTimeout(() => listRuns().catch((e) => showError(e.message)), 2000);
  $("runs-prev").disabled = r.offset === 0;
  $("runs-next").disabled = last >= body.total;
  $("picker").hidden = body.single;
  return body.runs;
}

function pageRuns(delta) {
  const r = state.runs;
  r.offset = Math.max(0, Math.min(r.offset + delta * r.limit, Math.max(0, r.total - 1)));
  listRuns().catch((e) => showError(e.message));
}

async function loadRun(name, wanted = null) {
  state.run = name;
  state.index = null;
  state.views = { a: null, b: null };
  state.cache.clear();
  setReverse(null);
  let info;
  try {
    info = await getJSON(`/api/initialize?run=${encodeURIComponent(name)}`);
  } catch (e) {
    state.info = null;
    document.title = TITLE;
    $("prompt-tokens").replaceChildren();
    $("answer-tokens").replaceChildren();
    $("pieces").hidden = true;
    for (const v of Object.values(VIEWS)) {
      $(v.image).removeAttribute("src");
      $(v.image).hidden = true;
    }
    $("standin-banner").hidden = true;
    $("run-meta").textContent = "";
    $("download").disabled = $("download-numbers").disabled = true;
    drawAll();
    showError(e.message);
    emit("viewer:run", { info: null, wanted });
    writeUrl();
    return;
  }
  clearError();
  state.info = info;
  state.image = 0;
  state.panels = [];
  state.overview = null;
  fillImages(info);
  fillOverviewImages(info);
  emit("viewer:run", { info, wanted });
  document.title = `${info.run} · ${TITLE}`;
  $("standin-banner").hidden = !info.standin;
  setExport(info);
  const g = info.geometry, n = (info.images || []).length;
  $("run-meta").textContent = `${info.run} · ${info.model || "unknown model"} · `
    + (n > 1 ? `${n} ${info.video ? "frames" : "images"}` : `${g.image_size[0]}×${g.image_size[1]} px · `
      + (g.rows ? `${g.rows}×${g.cols} tiles` : "global tile only")) + ` · ${info.num_layers} layers × ${info.num_heads} heads`;
  $("semantics").textContent = `Rows: ${info.query_semantics}.`;
  fillControls(info);
  if (wanted) applyUrl(wanted);
  renderTokens(info);
  for (const v of Object.values(VIEWS)) {
    $(v.image).hidden = false;
    $(v.image).src = info.image_url;
  }
  const k = startImage(info, wanted);
  if (k) setImage(k);
  const asked = wanted && wanted.get("token") !== null ? Number(wanted.get("token")) : NaN;
  const first = state.selectable.find((t) => t.index === asked)
    || state.selectable.find((t) => t.kind === "answer") || state.selectable[0];
  if (first) select(first.index);
  else writeUrl();
}

function startImage(info, wanted) {
  // which image (frame) the page opens on: the URL's (a reload keeps it), else the one an intervened
  // run's knockout targets (image:K, frame:K, box:K:..., outside:K:...), else 0
  const n = (info.images || []).length;
  if (n < 2) return 0;
  const asked = wanted ? Number(wanted.get("image")) : NaN;
  if (wanted && wanted.get("image") !== null && Number.isInteger(asked) && asked >= 0 && asked < n) return asked;
  for (const ko of (info.intervention && info.intervention.knockouts) || []) {
    const m = /^(?:image|frame):(\d+)$|^(?:box|outside):(\d+):/.exec(ko.to || "");
    if (m && Number(m[1] || m[2]) < n) return Number(m[1] || m[2]);
  }
  return 0;
}

function setExport(info) {
  // the Export HTML link: disabled, with the reason as its tooltip, where the server would refuse
  const link = $("export-html"), ex = info.export || { ok: true };
  link.dataset.title = link.dataset.title || link.title;
  link.classList.toggle("disabled", !ex.ok);
  link.setAttribute("aria-disabled", String(!ex.ok));
  if (ex.ok) {
    link.href = `/export?run=${encodeURIComponent(info.run)}`;
    link.title = link.dataset.title;
  } else {
    link.removeAttribute("href");
    link.title = `Not available: ${ex.reason}`;
  }
}

function fillControls(info) {
  for (const id of ["layer", "layer-from", "layer-to", "b-layer-from", "b-layer-to"]) {
    const s = $(id);
    s.replaceChildren();
    for (let i = 0; i < info.num_layers; i++) option(s, i, String(i));
  }
  $("layer").value = info.num_layers - 1;
  $("layer-to").value = info.num_layers - 1;
  $("b-layer-from").value = $("b-layer-to").value = info.num_layers - 1;
  for (const id of ["heads", "b-heads"]) {
    const heads = $(id);
    while (heads.options.length > 2) heads.remove(2);
    for (let h = 0; h < info.num_heads; h++) option(heads, h, id === "heads" ? `Head ${h}` : `head ${h}`);
  }
  const start = $("start-layer");
  start.replaceChildren();
  for (let i = 0; i < info.num_layers; i++) option(start, i, String(i));
  $("start-layer-end").textContent = `to ${info.num_layers - 1}`;
  fillMethods(info);
}

// -- methods: raw attention, or maps the extractor stored (rollout, relevancy, relative) ---------------
function methodInfo(name) {
  return ((state.info && state.info.methods) || []).find((m) => m.name === name) || { name, axis: "layer", label: name };
}

function fillMethods(info) {
  const missing = info.methods.filter((m) => !m.available);
  for (const id of ["method", "b-method"]) {
    const s = $(id);
    s.replaceChildren();
    for (const m of info.methods) {
      option(s, m.name, m.available ? m.label : `${m.label} (not in this run)`);
      s.lastChild.disabled = !m.available;            // greyed out; the note says how to add it
      s.lastChild.title = m.available ? `${m.label}: ${m.rows}`
        : m.command ? `Not stored in this run. Add it with: ${m.command}` : "Not stored in this run.";
    }
  }
  const note = $("method-note");
  note.replaceChildren();
  note.hidden = !missing.length;
  if (missing.length) {
    const what = `Not in this run: ${missing.map((m) => m.label.toLowerCase()).join(", ")}.`;
    if (info.methods_command) note.append(`${what} Add with:`, el("code", "", info.methods_command));
    else note.append(`${what} An intervened run stores raw attention only (intervene.py); its base run can have them.`);
  }
}

function methodControls() {
  // rollout/relevancy: a start layer instead of a layer range; derived maps have no heads
  const m = methodInfo($("method").value);
  const start = m.axis === "start_layer", raw = m.name === "raw";
  $("start-layer-row").hidden = !start;
  for (const id of ["layer-mode", "layer", "layer-from", "layer-to"]) $(id).disabled = start;
  $("heads").disabled = !raw;
  $("heads").closest(".field").classList.toggle("disabled", !raw);
  $("layer-mode").closest(".field").classList.toggle("disabled", start);
  const b = methodInfo($("b-method").value);
  $("b-heads").disabled = b.name !== "raw";
  $("b-layer-to").disabled = b.axis === "start_layer";
}

// -- URL state: run, token, layers, heads, method (+ the compared view) ----------------------------
function setLayers(spec, prefix) {
  const m = /^(\d+)(?:-(\d+))?$/.exec(spec || "");
  if (!m || !state.info || Number(m[2] ?? m[1]) >= state.info.num_layers) return;
  const [a, b] = [m[1], m[2] ?? m[1]];
  if (prefix === "b-") {
    $("b-layer-from").value = a;
    $("b-layer-to").value = b;
  } else if (m[2] === undefined) {
    $("layer-mode").value = "single";
    $("layer").value = a;
  } else {
    $("layer-mode").value = "range";
    $("layer-from").value = a;
    $("layer-to").value = b;
  }
}

function setSelect(id, value) {
  if (value !== null && [...$(id).options].some((o) => o.value === value && !o.disabled)) $(id).value = value;
}

function applyUrl(p) {
  setLayers(p.get("layers"), "");
  setSelect("heads", p.get("heads"));
  setSelect("method", p.get("method"));
  setSelect("start-layer", p.get("start_layer"));
  if (p.get("norm") === "shared") document.querySelector('input[name="norm"][value="shared"]').checked = true;
  $("drop-sink").checked = p.get("drop_sink") === "1";
  $("compare").checked = p.get("compare") === "1";
  setLayers(p.get("layers_b"), "b-");
  setSelect("b-heads", p.get("heads_b"));
  setSelect("b-method", p.get("method_b"));
}

function writeUrl() {
  const url = new URL(location.href);
  url.search = "";
  const p = url.searchParams;
  if (state.run) p.set("run", state.run);
  if (state.info && state.index !== null) {
    p.set("token", state.index);
    if ((state.info.images || []).length > 1) p.set("image", state.image);
    const a = selectionParams("a");
    p.set("layers", a.layers);
    p.set("heads", a.heads);
    p.set("method", a.method);
    if (a.start_layer !== undefined) p.set("start_layer", a.start_layer);
    if (radio("norm") !== "map") p.set("norm", radio("norm"));
    if ($("drop-sink").checked) p.set("drop_sink", "1");
    if ($("compare").checked) {
      const b = selectionParams("b");
      p.set("compare", "1");
      p.set("layers_b", b.layers);
      p.set("heads_b", b.heads);
      p.set("method_b", b.method);
      if (b.start_layer !== undefined) p.set("start_layer_b", b.start_layer);
    }
    if (!$("iv-panel").hidden) p.set("compare_base", "1");
  }
  history.replaceState(null, "", url);
}

// -- tokens --------------------------------------------------------------------------------------
// A unit is one token, or consecutive tokens that together spell whole characters (byte-level BPE
// splits Korean, Japanese, emoji...): one chip shows the characters; its tokens are in the split view.
function renderTokens(info) {
  const [first, last] = info.geometry.image_block;
  const areas = { prompt: $("prompt-tokens"), answer: $("answer-tokens") };
  areas.prompt.replaceChildren();
  areas.answer.replaceChildren();
  $("pieces").hidden = true;
  state.selectable = [];
  state.units = new Map();
  const many = info.images && info.images.length > 1;
  const blocks = many ? info.images.map((im) => im.geometry.image_block) : [[first, last]];
  const inBlock = (i) => blocks.some(([a, b]) => i >= a && i <= b);
  // a run that kept the rows of the text between its images or frames (--keep-frame-rows): one chip
  // per image or frame, with that text (its timestamps) clickable between them; else one chip for all
  const between = many && info.token_table.some((t) => t.has_row && t.index > first && t.index < last && !inBlock(t.index));
  for (const t of info.token_table) {
    const area = t.index < info.prompt_length ? areas.prompt : areas.answer;
    if (between && inBlock(t.index)) {
      const k = blocks.findIndex(([a]) => a === t.index);
      if (k >= 0) {
        const im = info.images[k];
        area.append(el("span", "chip image-chip", info.video
          ? `[frame ${k}: ${im.geometry.num_keys} tokens]` : `[image ${k}: ${im.geometry.num_keys} tokens]`));
      }
      continue;
    }
    if (t.index === first && !between) {
      const g = info.geometry;
      const layout = g.rows ? `${g.rows}×${g.cols} tiles + global` : "global tile only";
      const keys = many ? info.images.reduce((n, im) => n + im.geometry.num_keys, 0) : g.num_keys;
      area.append(el("span", "chip image-chip", many
        ? `[${info.images.length} ${info.video ? "frames, each its timestamp and one global tile" : "images"}, ${keys} image tokens]`
        : `[image: ${layout}, ${g.num_keys} tokens]`));
    }
    if (!between && t.index >= first && t.index <= last) continue;
    if (t.has_row) state.selectable.push(t);
    const [u0, u1] = t.unit;
    if (u1 > u0) {                                     // several tokens: one chip, made at its first
      state.units.set(t.index, t.unit);
      if (t.index !== u0) continue;
      const pieces = info.token_table.slice(u0, u1 + 1);
      const chip = el("span", `token unit ${t.kind}`, t.unit_text);
      chip.dataset.unit = `${u0}-${u1}`;
      chip.title = `#${u0}–${u1} ${t.kind}: ${u1 - u0 + 1} tokens spell ${JSON.stringify(t.unit_text)}: `
        + pieces.map((x) => JSON.stringify(x.raw)).join(" ");
      if (pieces.some((x) => x.has_row)) chip.classList.add("selectable");
      area.append(chip);
      continue;
    }
    const blank = t.text.trim() === "" && t.text.includes("\n");
    const span = el("span", `token ${t.kind}${blank ? " newline" : ""}`, blank ? "↵" : t.text);
    span.dataset.index = t.index;
    span.title = `#${t.index} ${t.kind}: ${JSON.stringify(t.raw)}`;
    span.classList.add(t.has_row ? "selectable" : "inert");
    area.append(span);
    if (blank) area.append(el("br"));
  }
}

function showPieces(unit, index) {
  const [u0, u1] = unit;
  const list = $("pieces-list");
  list.replaceChildren();
  for (const t of state.info.token_table.slice(u0, u1 + 1)) {
    const span = el("span", `token piece ${t.kind} ${t.has_row ? "selectable" : "inert"}`, t.text);
    span.dataset.index = t.index;
    span.title = `#${t.index}: ${JSON.stringify(t.raw)}`;
    if (t.index === index) span.classList.add("selected");
    list.append(span);
  }
  $("pieces-label").textContent = `"${shown(state.info.token_table[u0].unit_text)}" is ${u1 - u0 + 1} tokens:`;
  $("pieces").hidden = false;
}

function select(index) {
  state.index = index;
  for (const node of document.querySelectorAll(".token.selected")) node.classList.remove("selected");
  const unit = state.units.get(index);
  let span;
  if (unit) {
    span = document.querySelector(`.token.unit[data-unit="${unit[0]}-${unit[1]}"]`);
    showPieces(unit, index);
  } else {
    $("pieces").hidden = true;
    span = document.querySelector(`.token[data-index="${index}"]`);
  }
  if (span) {
    span.classList.add("selected");
    span.scrollIntoView({ block: "nearest" });
  }
  const t = state.info.token_table[index];
  const label = unit ? `"${shown(t.unit_text)}" · token ${index - unit[0] + 1} of ${unit[1] - unit[0] + 1}: ${t.text}`
    : JSON.stringify(t.text);
  $("sel-token").textContent = `#${index} ${label}`;
  document.title = `${shown(t.unit_text).trim() || t.raw} · ${state.run} · ${TITLE}`;
  $("download").disabled = $("download-numbers").disabled = false;
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
function selectionParams(view) {
  if (view === "b") {
    let from = Number($("b-layer-from").value), to = Number($("b-layer-to").value);
    if (from > to) { $("b-layer-to").value = from; to = from; }
    const out = { layers: from === to ? `${from}` : `${from}-${to}`, heads: $("b-heads").value, method: $("b-method").value };
    if (methodInfo(out.method).axis === "start_layer") out.start_layer = String(from);   // B: its first layer
    return out;
  }
  const range = $("layer-mode").value === "range";
  let from = Number($("layer-from").value), to = Number($("layer-to").value);
  if (range && from > to) { $("layer-to").value = from; to = from; }
  const out = { layers: range ? `${from}-${to}` : $("layer").value, heads: $("heads").value, method: $("method").value };
  if (methodInfo(out.method).axis === "start_layer") out.start_layer = $("start-layer").value;
  return out;
}

async function cachedJSON(url) {
  let data = state.cache.get(url);
  if (!data) {
    data = await getJSON(url);
    if (state.cache.size >= CACHE_LIMIT) state.cache.delete(state.cache.keys().next().value);
    state.cache.set(url, data);
  }
  return data;
}

async function fetchView(view, image = state.image) {
  const p = new URLSearchParams({ run: state.run, index: state.index, ...selectionParams(view),
    drop_sink: $("drop-sink").checked ? "1" : "0", norm: radio("norm") });
  if (state.info && state.info.images && state.info.images.length > 1) p.set("image", image);
  return cachedJSON(`/api/attention?${p}`);
}

function fetchPanels() {   // several images: every image's map, as view A's (the selected one is A's)
  if (!panelsShown()) return [];
  return Promise.all(state.info.images.map((im) => fetchView("a", im.index)));
}

function fetchOverview() {   // several images: the overview of one image or of all (null: A's own, all summed)
  const k = $("overview-image").value;
  if (!state.info.images || state.info.images.length < 2 || k === "all") return null;
  const p = new URLSearchParams({ run: state.run, index: state.index, image: k });
  return cachedJSON(`/api/overview?${p}`);
}

async function update() {
  $("layer-single").hidden = $("layer-mode").value !== "single";
  $("layer-range").hidden = $("layer-mode").value !== "range";
  methodControls();
  const compare = $("compare").checked;
  $("view-b").hidden = !compare;
  $("label-a").hidden = !compare;
  $("figure").classList.toggle("compare", compare);
  writeUrl();
  if (!state.info || state.index === null) return;
  const ticket = ++state.request;
  try {
    const [a, b, panels, overview] = await Promise.all([fetchView("a"), compare ? fetchView("b") : null, fetchPanels(),
      fetchOverview()]);
    if (ticket !== state.request) return;  // a newer request superseded this one
    clearError();
    state.views = { a, b };
    state.panels = panels;
    state.overview = overview;
  } catch (e) {
    if (ticket === state.request) showError(e.message);
    return;
  }
  drawAll();
  if (state.reverse) loadReverse(state.reverse);
  if ($("text-view").open) loadText();
}

// -- several images / video frames ------------------------------------------------------------------
function imageLabel(im) {
  if (im.timestamp === null || im.timestamp === undefined) return `image ${im.index}`;
  const t = im.timestamp, m = Math.floor(t / 60), sec = t - 60 * m;
  return `frame ${im.index} · ${String(m).padStart(2, "0")}:${sec.toFixed(1).padStart(4, "0")}`;
}

function fillImages(info) {
  // One thumbnail per image (or frame) and a timeline of the selected token's attention mass per image.
  const images = info.images || [];
  const strip = $("image-strip");
  strip.replaceChildren();
  $("images-panel").hidden = images.length < 2;
  if (images.length < 2) return;
  $("images-title").textContent = info.video ? `${images.length} frames` : `${images.length} images`;
  $("images-unit").textContent = info.video ? "frame" : "image";
  const panels = panelsShown();
  strip.hidden = panels;
  $("image-panels").hidden = !panels;
  if (panels) fillPanels(images);
  else for (const im of images) {
    const b = el("button", "thumb");
    b.type = "button";
    b.dataset.image = im.index;
    const t = el("img");
    t.src = im.url;
    t.alt = imageLabel(im);
    b.append(t, el("span", "thumb-label", imageLabel(im)));
    b.addEventListener("click", () => showImage(im.index));
    strip.append(b);
  }
  $("timeline").onclick = (event) => {   // a bar of the timeline: that image / frame
    const r = $("timeline").getBoundingClientRect();
    showImage(Math.min(images.length - 1, Math.max(0, Math.floor((event.clientX - r.left) / r.width * images.length))));
  };
  markImage();
}

function markImage() {
  for (const b of [...$("image-strip").children, ...$("image-panels").children]) {
    b.classList.toggle("selected", Number(b.dataset.image) === state.image);
  }
}

function panelsShown() {
  const images = state.info && state.info.images;
  return !!images && images.length > 1 && images.length <= PANELS_MAX && !state.info.video;
}

function panelTitle(im) {
  const g = im.geometry;
  return `image ${im.index} · ${g.image_size[0]}×${g.image_size[1]} px · `
    + (g.rows ? `${g.rows}×${g.cols} tiles + global` : "global tile only");
}

function fillPanels(images) {
  // One panel per image: its picture with the selected token's map of that image (click: the main view).
  const box = $("image-panels");
  for (const im of images) {
    const fig = el("figure", "image-panel");
    fig.dataset.image = im.index;
    fig.title = `Show image ${im.index} in the main view`;
    const stage = el("div", "panel-stage"), img = el("img"), canvas = el("canvas", "panel-overlay");
    img.src = im.url;
    img.alt = `image ${im.index}`;
    img.addEventListener("load", drawPanels);
    stage.append(img, canvas);
    fig.append(el("figcaption", "panel-title", panelTitle(im)), stage, el("div", "panel-mass muted small", ""));
    fig.addEventListener("click", () => showImage(im.index));
    box.append(fig);
  }
}

function drawPanels() {
  const box = $("image-panels");
  if (box.hidden) return;
  const dpr = window.devicePixelRatio || 1;
  for (const fig of box.children) {
    const k = Number(fig.dataset.image), d = state.panels[k];
    const img = fig.querySelector("img"), canvas = fig.querySelector("canvas");
    canvas.width = Math.max(1, Math.round(img.clientWidth * dpr));
    canvas.height = Math.max(1, Math.round(img.clientHeight * dpr));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.index;
    fig.querySelector(".panel-mass").textContent = d && d.image_masses
      ? `${(d.image_masses[k] * 100).toFixed(1)}% of the ${d.method === "raw" ? "attention" : "map"} · its own colour scale` : "";
    if (!d || !img.complete || !img.naturalWidth) continue;
    paint(ctx, heatCanvas(d.grid || d.global, d.vmin, d.vmax), canvas.width, canvas.height);
    canvas.dataset.index = d.index;   // which token and image is drawn (tests)
    canvas.dataset.image = d.image;
    canvas.dataset.grid = `${(d.grid || d.global).length}x${(d.grid || d.global)[0].length}`;
  }
}

function fillOverviewImages(info) {
  // the overview's selector: every image summed, or one image (frame)
  const s = $("overview-image"), images = info.images || [];
  s.replaceChildren();
  s.hidden = images.length < 2;
  option(s, "all", info.video ? "all frames (sum)" : "all images (sum)");
  for (const im of images) option(s, im.index, `${info.video ? "frame" : "image"} ${im.index}`);
  s.value = "all";
}

function setImage(k) {
  // The main panel shows image (frame) k: its picture and its grid (the map follows on the next update).
  const im = state.info.images[k];
  state.image = k;
  state.info.geometry = { ...state.info.geometry, ...im.geometry };
  emit("viewer:image", { image: k });
  for (const v of Object.values(VIEWS)) $(v.image).src = im.url;
  markImage();
}

function showImage(k) {
  // Switch the main panel to image (frame) k: its picture, its grid, its map of the same token.
  setImage(k);
  setReverse(null);
  update();
}

function drawTimeline(d) {
  const canvas = $("timeline");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!d || !d.image_masses) return;
  const m = d.image_masses, n = m.length, top = Math.max(...m) || 1, w = canvas.width / n;
  for (let k = 0; k < n; k++) {
    const h = Math.round((m[k] / top) * (canvas.height - 12));
    ctx.fillStyle = k === state.image ? "#d62728" : "#1f77b4";
    ctx.fillRect(k * w + 1, canvas.height - h, Math.max(1, w - 2), h);
  }
  ctx.fillStyle = "#555";
  ctx.font = "10px sans-serif";
  ctx.fillText(`max ${fmt(top)}`, 2, 10);
  canvas.dataset.masses = m.join(",");
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

function span(d) {  // which layers (and heads) a map covers
  const layers = d.layers[0] === d.layers[1] ? `layer ${d.layers[0]}` : `layers ${d.layers[0]}–${d.layers[1]}`;
  if (d.start_layer !== null && d.start_layer !== undefined) return `from layer ${d.layers[0]} (to ${d.layers[1]})`;
  if (d.heads === null || d.heads === undefined) return layers;
  return `${layers} · ${typeof d.heads === "number" ? `head ${d.heads}` : `${d.heads} over heads`}`;
}

function describe(d) { return `${span(d)} · ${d.method || "raw"}`; }

function share(d) {  // the map's share of the attention, or a dash for ratios
  return d && d.image_mass !== null && d.image_mass !== undefined ? `${(d.image_mass * 100).toFixed(1)}%` : "–";
}

function drawAll() {
  $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
  const { a, b } = state.views;
  drawOverlay("a", a);
  drawOverlay("b", $("compare").checked ? b : null);
  drawGlobal(a);
  drawColorbar(a);
  drawOverview(a);
  drawTimeline(a);
  drawPanels();
  $("label-a").textContent = a ? `A: ${describe(a)}` : "";
  $("label-b").textContent = b ? `B: ${describe(b)}` + (b.image_mass === null ? "" : ` · ${share(b)} on the image`) : "B";
  $("sel-mass").textContent = a && a.image_mass !== null ? `${share(a)} of the ${a.method === "raw" ? "attention" : `${methodInfo(a.method).label.toLowerCase()} row`}` : "–";
  emit("viewer:draw", state.views);
}

function drawOverlay(view, d) {
  const v = VIEWS[view];
  const img = $(v.image), canvas = $(v.overlay);
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(img.clientWidth * dpr));
  canvas.height = Math.max(1, Math.round(img.clientHeight * dpr));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  delete canvas.dataset.index;
  if (!d || !img.complete || !img.naturalWidth) return;
  paint(ctx, heatCanvas(d.grid || d.global, d.vmin, d.vmax), canvas.width, canvas.height);
  canvas.dataset.index = d.index;  // lets tests (and you) see which token is drawn
  canvas.dataset.layers = d.layers.join("-");
  canvas.dataset.method = d.method || "raw";
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
  const unit = { raw: d.drop_sink ? "Share of the image attention" : "Attention weight",
    rollout: d.drop_sink ? "Attention rollout, share of the image" : "Attention rollout (row of the layer product)",
    relevancy: d.drop_sink ? "Gradient relevancy, share of the image" : "Gradient relevancy (Chefer et al.)",
    relative: d.drop_sink ? "Relative attention, share of the image" : "Relative attention (÷ generic prompt)" }[d.method]
    || methodInfo(d.method).label;
  $("colorbar-label").textContent = `${unit} · ${span(d)}`
    + (d.norm === "shared" ? ` · scale shared across all ${d.start_layer === null || d.start_layer === undefined ? "" : "start "}layers`
      : " · scale of this map")
    + ($("compare").checked ? " · view A (B uses its own scale)" : "");
}

function drawOverview(d) {
  const box = $("overview");
  box.replaceChildren();
  $("overview-caption").textContent = "";
  if (!d) return;
  const which = state.overview && state.overview.index === d.index ? state.overview : null;
  const m = which ? which.layer_head_mass : d.layer_head_mass, heads = m[0].length;
  const many = state.info && state.info.images && state.info.images.length > 1;
  const unit = state.info && state.info.video ? "frame" : "image";
  const on = !many ? "the image" : which ? `${unit} ${which.image}` : `the ${unit}s (all ${state.info.images.length} summed)`;
  box.dataset.image = which ? which.image : "all";
  const top = Math.max(...m.flat(), 1e-9);
  box.style.gridTemplateColumns = `2.2em repeat(${heads}, 1fr)`;
  const [a, b] = d.layers;
  const headOn = (h) => d.heads === "mean" || d.heads === "max" || d.heads === h;
  const iv = state.info && state.info.intervention;   // an intervened run: its ablated heads are marked
  const ablated = new Set(((iv && iv.heads) || []).map(([l, h]) => `${l}:${h}`));
  box.append(el("span", "axis", "L\\H"));
  for (let h = 0; h < heads; h++) box.append(el("span", `axis${headOn(h) ? " on" : ""}`, String(h)));
  m.forEach((row, layer) => {
    box.append(el("span", `axis${layer >= a && layer <= b ? " on" : ""}`, String(layer)));
    row.forEach((v, h) => {
      const cell = el("button", "cell");
      cell.type = "button";
      cell.style.background = blues(v / top);
      cell.title = `layer ${layer}, head ${h}: ${(v * 100).toFixed(1)}% on ${on}`;
      cell.dataset.value = v;
      cell.dataset.layer = layer;
      cell.dataset.head = h;
      if (a === b && layer === a && d.heads === h) cell.classList.add("current");
      if (ablated.has(`${layer}:${h}`)) {
        cell.classList.add("ablated");
        cell.title += " · ablated (pattern computed, output removed)";
      }
      cell.addEventListener("click", () => {
        $("layer-mode").value = "single";
        $("layer").value = layer;
        $("heads").value = h;
        update();
      });
      box.append(cell);
    });
  });
  $("overview-caption").textContent = `Darkest: ${(top * 100).toFixed(1)}% of the token's attention on ${on}. `
    + "Click a cell to show that layer and head."
    + (ablated.size ? ` Red-outlined: the ${ablated.size} ablated head${ablated.size > 1 ? "s" : ""} (pattern computed, output removed).` : "");
}

// -- text -> text view ---------------------------------------------------------------------------
async function loadText() {
  const list = $("text-list");
  if (!state.info || state.index === null) { list.replaceChildren(); return; }
  const a = selectionParams("a");
  const p = new URLSearchParams({ run: state.run, index: state.index, layers: a.layers, heads: a.heads });
  const ticket = ++state.textRequest;
  const body = await getOrShow(`/api/text_attention?${p}`);
  if (!body || ticket !== state.textRequest) return;
  const total = body.tokens.reduce((s, t) => s + t.value, 0);
  $("text-caption").textContent = `#${body.index}: ${(total * 100).toFixed(1)}% on earlier text, `
    + `${(body.image * 100).toFixed(1)}% on the image. Top tokens:`;
  list.replaceChildren();
  for (const t of [...body.tokens].sort((x, y) => y.value - x.value).slice(0, 15)) {
    const item = el("li");
    item.dataset.index = t.index;
    const text = t.text === t.unit_text ? t.text : `${t.unit_text} (${t.text})`;
    item.append(el("span", `token ${t.kind} selectable`, shown(text)), el("span", "value", fmt(t.value)));
    item.title = `#${t.index}`;
    item.addEventListener("click", () => select(t.index));
    list.append(item);
  }
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
  const { layers, heads } = selectionParams("a");
  const p = new URLSearchParams({ run: state.run, cell: `${i},${j}`, view: target.view, layers, heads });
  if (state.info.images && state.info.images.length > 1) p.set("image", state.image);
  const body = await getOrShow(`/api/reverse?${p}`);
  if (!body || state.reverse !== target) return;
  $("reverse-caption").textContent = `Tokens attending most to ${target.view} cell (${i}, ${j}):`;
  const list = $("reverse-list");
  list.replaceChildren();
  for (const t of body.tokens) {
    const item = el("li");
    item.dataset.index = t.index;
    const tok = el("span", `token ${t.kind} selectable`, shown(t.text));
    item.append(tok, el("span", "value", fmt(t.value)));
    item.addEventListener("click", () => select(t.index));
    list.append(item);
  }
}

// -- export --------------------------------------------------------------------------------------
function exportName(d, ext) {
  const heads = d.heads === null || d.heads === undefined ? "" : `_heads-${d.heads}`;
  const layers = d.start_layer === null || d.start_layer === undefined ? `_layers${d.layers.join("-")}` : `_start${d.start_layer}`;
  return `${safeName(state.run)}_${d.method || "raw"}_token${d.index}${layers}${heads}.${ext}`;
}

function save(blob, name) {
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function download() {
  const img = $("image"), d = state.views.a;
  if (!d || !img.naturalWidth) return;
  const canvas = el("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  paint(ctx, heatCanvas(d.grid || d.global, d.vmin, d.vmax), canvas.width, canvas.height);
  canvas.toBlob((blob) => save(blob, exportName(d, "png")), "image/png");
}

function downloadNumbers() {
  const d = state.views.a;
  if (!d) return;
  const t = state.info.token_table[d.index];
  const out = { run: state.run, index: d.index, token: t.unit_text, piece: t.text, raw: t.raw,
    method: d.method || "raw", method_rows: methodInfo(d.method || "raw").rows,
    start_layer: d.start_layer, layers: d.layers, heads: d.heads, drop_sink: d.drop_sink, norm: d.norm,
    image_mass: d.image_mass, vmin: d.vmin, vmax: d.vmax, grid: d.grid, global: d.global,
    query_semantics: state.info.query_semantics,
    note: "grid: the tiled view, rows x cols of image cells (null when the image was not split); global: the global tile" };
  save(new Blob([JSON.stringify(out)], { type: "application/json" }), exportName(d, "json"));
}

// -- wiring --------------------------------------------------------------------------------------
function wire() {
  for (const id of ["layer-mode", "layer", "layer-from", "layer-to", "heads", "method", "start-layer", "drop-sink", "compare",
    "b-layer-from", "b-layer-to", "b-heads", "b-method"]) {
    $(id).addEventListener("change", update);
  }
  for (const input of document.querySelectorAll('input[name="norm"]')) input.addEventListener("change", update);
  $("overview-image").addEventListener("change", update);
  new ResizeObserver(drawPanels).observe($("image-panels"));
  for (const input of document.querySelectorAll('input[name="upsample"]')) input.addEventListener("change", drawAll);
  $("opacity").addEventListener("input", drawAll);
  $("download").addEventListener("click", download);
  $("download-numbers").addEventListener("click", downloadNumbers);
  $("alert-close").addEventListener("click", clearError);
  $("text-view").addEventListener("toggle", () => { if ($("text-view").open) loadText(); });
  for (const v of Object.values(VIEWS)) {
    $(v.image).addEventListener("load", drawAll);
    new ResizeObserver(() => drawOverlay(v === VIEWS.a ? "a" : "b", v === VIEWS.a ? state.views.a : state.views.b))
      .observe($(v.image));
  }

  const tokenClick = (event) => {
    const span = event.target.closest(".token.selectable");
    if (!span) return;
    if (span.dataset.unit) {   // a unit chip: its last token (the one that has read every character)
      const [u0, u1] = span.dataset.unit.split("-").map(Number);
      const withRow = state.selectable.filter((t) => t.index >= u0 && t.index <= u1);
      if (withRow.length) select(withRow[withRow.length - 1].index);
    } else {
      select(Number(span.dataset.index));
    }
  };
  for (const id of ["prompt-tokens", "answer-tokens", "pieces-list"]) $(id).addEventListener("click", tokenClick);

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
  const relist = () => {
    state.runs.offset = 0;
    listRuns().catch((e) => showError(e.message));
  };
  $("run-search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(relist, 150);
  });
  $("run-sort").addEventListener("change", relist);
  $("runs-prev").addEventListener("click", () => pageRuns(-1));
  $("runs-next").addEventListener("click", () => pageRuns(1));
  $("run-select").addEventListener("change", () => loadRun($("run-select").value));
}

async function main() {
  wire();
  const wanted = new URLSearchParams(location.search || window.smolattnStart || "");   // exports: offline.js
  try {
    const runs = await listRuns();
    const name = wanted.get("run") || (runs.find((e) => !e.error) || {}).name;
    if (!name) throw new Error("no runs to show");
    if (!runs.some((e) => e.name === name)) option($("run-select"), name, name);
    $("run-select").value = name;
    await loadRun(name, wanted);
  } catch (e) {
    showError(e.message);
  }
}

main();
