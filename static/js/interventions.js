// Intervened runs on the run page (issue 18): the intervention's badge, "compare with base" (both
// answers, the teacher-forced log-probability change of each base-answer token as a chart, P(yes)/P(no),
// and the intervened and base maps side by side on one colour scale) and links to the run's sweeps.
// app.js marks the ablated heads in its overview. Loaded before app.js: app.js's helpers (el, getJSON,
// heatCanvas, paint, span, share, fmt, shown, writeUrl, drawAll, state) are used from event handlers only.
// Text only ever goes through textContent.
"use strict";

(() => {
  const iv = { info: null, compare: null, key: null, maps: { run: null, base: null }, ticket: 0 };
  const SVG = "http://www.w3.org/2000/svg";
  const byId = (id) => document.getElementById(id);

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const signed = (v, digits = 2) => (v === null || v === undefined ? "–"
    : `${v > 0 ? "+" : v < 0 ? "−" : ""}${Math.abs(v).toFixed(digits)}`);
  const prob = (v) => (v === null || v === undefined ? "–" : v.toFixed(3));

  // -- the run was opened: badge, compare button, sweeps -------------------------------------------
  function onRun(info, wanted) {
    closePanel(false);
    iv.info = (info && info.intervention) || null;
    iv.compare = null;
    iv.key = null;
    const badge = byId("iv-badge");
    badge.replaceChildren();
    badge.hidden = !iv.info;
    byId("iv-compare").hidden = !iv.info;
    if (iv.info) {
      badge.append(el("span", "iv-kind", iv.info.label));
      badge.dataset.slug = iv.info.slug || "";
      badge.title = [`Intervened run: ${iv.info.slug || "?"}`, iv.info.command,
        iv.info.pixels && `pixels: ${iv.info.pixels}`,
        iv.info.base ? `base run: ${iv.info.base}` : `base run: ${iv.info.base_error}`].filter(Boolean).join("\n");
    }
    const sweeps = byId("iv-sweeps");
    sweeps.replaceChildren();
    const list = (info && info.sweeps) || [];
    sweeps.hidden = !list.length;
    if (list.length) sweeps.append(list.length > 1 ? "Sweeps: " : "Sweep: ");
    list.forEach((s, k) => {
      const a = el("a", "iv-sweep-link", s.label);
      a.href = `/sweep?name=${encodeURIComponent(s.name)}`;
      a.title = `Open the layer sweep ${s.name}`;
      if (k) sweeps.append(" · ");
      sweeps.append(a);
    });
    if (iv.info && wanted && wanted.get("compare_base") === "1") openPanel();
  }

  // -- the compare panel ---------------------------------------------------------------------------
  function showPanel(open) {
    byId("iv-panel").hidden = !open;
    byId("figure").hidden = open;
    document.querySelector(".colorbar").hidden = open;
    const button = byId("iv-compare");
    button.classList.toggle("on", open);
    button.textContent = open ? "Back to the run view" : "Compare with base";
  }

  function closePanel(redraw = true) {
    iv.ticket++;
    if (byId("iv-panel").hidden) return;
    showPanel(false);
    if (redraw) {
      writeUrl();
      drawAll();
    }
  }

  function note(text) {
    byId("iv-note").textContent = text;
    byId("iv-note").hidden = !text;
  }

  async function openPanel() {
    if (!iv.info || !state.run) return;
    const ticket = ++iv.ticket;
    showPanel(true);
    byId("iv-title").textContent = `${iv.info.label} · ${iv.info.slug || ""}`;
    let body;
    try {
      body = await getJSON(`/api/compare?run=${encodeURIComponent(state.run)}`);
    } catch (e) {
      if (ticket === iv.ticket) note(e.message);
      return;
    }
    if (ticket !== iv.ticket) return;
    iv.compare = body;
    iv.key = null;
    renderCompare(body);
    writeUrl();
    refreshMaps();
  }

  function renderCompare(b) {
    const notes = [];
    if (b.base_error) notes.push(`No base run to compare with: ${b.base_error}.`);
    if (b.effects_error) notes.push(`No answer effects: ${b.effects_error}.`);
    note(notes.join(" "));
    const base = b.answers.base, run = b.answers.intervened;
    byId("iv-answer-base").textContent = base ?? "–";
    const runAnswer = byId("iv-answer-run");
    runAnswer.textContent = run ?? "–";
    runAnswer.classList.toggle("changed", base != null && run != null && base !== run);
    if (base != null && run != null) runAnswer.append(el("span", "iv-tag", base === run ? "same" : "changed"));
    const e = b.effects;
    byId("iv-effects").hidden = !e;
    if (!e) return;
    chart(e);
    byId("iv-sums").textContent = `Sum over the ${e.tokens.length} tokens: base ${signed(e.base_sum)}, `
      + `intervened ${signed(e.intervened_sum)} (change ${signed(e.delta_sum)}; `
      + `×${Math.exp(e.delta_sum ?? 0).toPrecision(3)} in probability).`
      + (e.standin ? " Stand-in model: these effects say nothing about SmolVLM." : "");
    yesNo(e.yes_no);
  }

  function chart(e) {
    const box = byId("iv-chart");
    box.replaceChildren();
    const n = e.delta.length;
    if (!n) {
      box.append(el("p", "muted small", "The base answer has no tokens."));
      return;
    }
    const W = 720, H = 190, L = 56, R = 10, T = 14, B = 42;
    const vals = e.delta.map((v) => v ?? 0);
    let lo = Math.min(0, ...vals), hi = Math.max(0, ...vals);
    if (hi - lo < 1e-6) { lo = Math.min(lo, -0.1); hi = Math.max(hi, 0.1); }
    const pad = 0.14 * (hi - lo);            // room for the value labels above and below the bars
    const top = hi > 0 ? hi + pad : hi, bottom = lo < 0 ? lo - pad : lo;
    const y = (v) => T + ((top - v) / (top - bottom)) * (H - T - B);
    const bw = (W - L - R) / n;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "iv-svg", role: "img",
      "aria-label": "Change of each base-answer token's log-probability under the intervention" });
    for (const v of [...new Set([hi, 0, lo])].filter((v) => v === 0 || Math.abs(y(v) - y(0)) > 14)) {
      root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: v === 0 ? "zero" : "grid" }));
      root.append(svg("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, signed(v)));
    }
    root.append(svg("text", { x: 12, y: (T + H - B) / 2, class: "axis-title", "text-anchor": "middle",
      transform: `rotate(-90 12 ${(T + H - B) / 2})` }, "Δ log p"));
    const every = Math.ceil(n / 24), chars = Math.max(3, Math.floor((bw * every) / 7));
    vals.forEach((v, k) => {
      const x = L + k * bw, y0 = y(0), y1 = y(v);
      const bar = svg("rect", { x: x + bw * 0.15, width: Math.max(1, bw * 0.7), y: Math.min(y0, y1),
        height: Math.max(1, Math.abs(y1 - y0)), class: `bar ${v < 0 ? "down" : "up"}`, "data-index": k });
      bar.append(svg("title", {}, `${JSON.stringify(e.tokens[k])}: log p ${signed(e.base_logprobs[k], 3)} → `
        + `${signed(e.intervened_logprobs[k], 3)} (change ${signed(e.delta[k], 3)})`));
      root.append(bar);
      if (k % every === 0) {
        let label = shown(e.tokens[k]).trim() || "␣";
        if (label.length > chars) label = `${label.slice(0, chars - 1)}…`;
        root.append(svg("text", { x: x + bw / 2, y: H - B + 16, class: "label", "text-anchor": "middle" }, label));
      }
      if (n <= 16) {
        root.append(svg("text", { x: x + bw / 2, y: v < 0 ? y1 + 12 : y1 - 4, class: "value", "text-anchor": "middle" },
          signed(v)));
      }
    });
    root.append(svg("text", { x: (L + W - R) / 2, y: H - 6, class: "axis-title", "text-anchor": "middle" },
      "base answer token (each predicted at the position before it)"));
    box.append(root);
  }

  function yesNo(yn) {
    const table = byId("iv-yesno");
    table.replaceChildren();
    table.hidden = !yn;
    if (!yn) return;
    const head = el("tr");
    for (const t of ["At the first answer step", "P(yes)", "P(no)"]) head.append(el("th", "", t));
    table.append(head);
    for (const [label, k] of [["Base", "base"], ["Intervened", "intervened"]]) {
      const row = el("tr");
      row.append(el("th", "", label), el("td", "", prob(yn[k] && yn[k].p_yes)), el("td", "", prob(yn[k] && yn[k].p_no)));
      table.append(row);
    }
  }

  // -- the two maps: the token, layers and heads of the main view, one colour scale -----------------------
  function viewParams(d) {   // the request that gives, for the base run, the map `d` shows
    const layers = d.layers[0] === d.layers[1] ? `${d.layers[0]}` : `${d.layers[0]}-${d.layers[1]}`;
    const p = { run: iv.compare.base || "", index: d.index, layers, heads: d.heads ?? "mean", method: d.method || "raw",
      drop_sink: d.drop_sink ? "1" : "0", norm: d.norm || "map" };
    if (d.start_layer !== null && d.start_layer !== undefined) p.start_layer = d.start_layer;
    if (several()) p.image = d.image;      // the image (frame) the main view shows, in both runs
    return new URLSearchParams(p).toString();
  }

  function several() { return !!(state.info.images && state.info.images.length > 1); }

  async function refreshMaps() {
    const a = state.views.a;
    if (!iv.compare || byId("iv-panel").hidden) return;
    iv.maps.run = a;
    if (!a) {
      byId("iv-maps-title").textContent = "Maps: pick a token";
      drawMaps();
      return;
    }
    const key = viewParams(a);
    if (key === iv.key) { drawMaps(); return; }
    iv.key = key;
    iv.maps.base = null;
    const base = iv.compare.base;
    const k = several() ? a.image : null, what = state.info.video ? "frame" : "image";
    byId("iv-maps-title").textContent = `Maps of token #${a.index} · ${span(a)} · ${a.method || "raw"}`
      + (k === null ? "" : ` · ${what} ${k}`);
    byId("iv-cap-run").textContent = `Intervened: ${JSON.stringify(a.text)}`
      + (a.image_mass === null ? "" : ` · ${share(a)} on the image`);
    byId("iv-cap-base").textContent = base ? `Base (${base})` : "Base";
    const runImg = byId("iv-img-run"), baseImg = byId("iv-img-base");
    const runSrc = k === null ? state.info.image_url : state.info.images[k].url;
    if (runImg.getAttribute("src") !== runSrc) runImg.src = runSrc;
    const baseSrc = `/api/image?run=${encodeURIComponent(base)}` + (k === null ? "" : `&image=${k}`);
    baseImg.hidden = !base;
    missing(base ? "" : "No base run to show (see above).");
    if (base && baseImg.getAttribute("src") !== baseSrc) baseImg.src = baseSrc;
    drawMaps();
    if (!base) return;
    let d = null;
    try {
      d = await getJSON(`/api/attention?${key}`);
    } catch (e) {
      if (key === iv.key) missing(`The base run has no such map: ${e.message}`);
    }
    if (key !== iv.key) return;
    iv.maps.base = d;
    if (d) {
      byId("iv-cap-base").textContent = `Base (${base}): ${JSON.stringify(d.text)}`
        + (d.image_mass === null ? "" : ` · ${share(d)} on the image`);
    }
    drawMaps();
  }

  function missing(text) {
    byId("iv-base-missing").textContent = text;
    byId("iv-base-missing").hidden = !text;
  }

  function drawMaps() {
    if (byId("iv-panel").hidden) return;
    const { run, base } = iv.maps;
    const both = [run, base].filter(Boolean);
    const vmin = Math.min(...both.map((d) => d.vmin)), vmax = Math.max(...both.map((d) => d.vmax));
    drawSide("run", run, vmin, vmax);
    drawSide("base", base, vmin, vmax);
    byId("iv-scale").textContent = !both.length ? ""
      : `${both.length > 1 ? "One colour scale for both maps" : "Colour scale"}: ${fmt(vmin)} (transparent) to ${fmt(vmax)} (white-hot).`;
  }

  function drawSide(side, d, vmin, vmax) {
    const img = byId(`iv-img-${side}`), canvas = byId(`iv-ov-${side}`);
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(img.clientWidth * dpr));
    canvas.height = Math.max(1, Math.round(img.clientHeight * dpr));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.index;
    if (!d || img.hidden || !img.complete || !img.naturalWidth) return;
    paint(ctx, heatCanvas(d.grid || d.global, vmin, vmax), canvas.width, canvas.height);
    canvas.dataset.index = d.index;   // lets tests (and you) see which token is drawn
    canvas.dataset.image = d.image ?? 0;
    const boxes = knockoutBoxes(d.image ?? 0);
    canvas.dataset.boxes = boxes.length;
    const im = several() ? state.info.images[d.image].geometry : state.info.geometry;
    const sx = canvas.width / im.image_size[0], sy = canvas.height / im.image_size[1];
    ctx.lineWidth = 2 * dpr;
    for (const [x0, y0, x1, y1, outside] of boxes) {   // the knocked-out box, in that image's pixels
      ctx.strokeStyle = outside ? "#1f77b4" : "#00e5ff";
      ctx.setLineDash(outside ? [6 * dpr, 4 * dpr] : []);
      ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
    }
  }

  function knockoutBoxes(k) {
    // [x0, y0, x1, y1, outside] of the knockouts' box:/outside: words that are in image k
    const out = [];
    for (const ko of (iv.info && iv.info.knockouts) || []) {
      // the numbers as intervene.py reads them (float(): spaces, 1e2 ...)
      const m = /^(box|outside):(?:\s*(\d+)\s*:)?([^,:]+),([^,]+),([^,]+),([^,]+)$/.exec(ko.to || "");
      const xs = m ? m.slice(3, 7).map(Number) : [];
      if (m && Number(m[2] || 0) === k && xs.every(Number.isFinite)) out.push([...xs, m[1] === "outside"]);
    }
    return out;
  }

  // -- wiring ----------------------------------------------------------------------------------------
  document.addEventListener("viewer:run", (e) => onRun(e.detail.info, e.detail.wanted));
  document.addEventListener("viewer:draw", () => refreshMaps());
  byId("iv-compare").addEventListener("click", () => (byId("iv-panel").hidden ? openPanel() : closePanel()));
  byId("iv-close").addEventListener("click", () => closePanel());
  for (const side of ["run", "base"]) {
    byId(`iv-img-${side}`).addEventListener("load", drawMaps);
    new ResizeObserver(drawMaps).observe(byId(`iv-img-${side}`));
  }
})();
