// An exported run (viewer/export.py): the viewer's page with no server. This script runs before app.js
// and answers the /api/* requests app.js makes from the data embedded in the file, as viewer/api.py
// does on the server (same parameters, same JSON, same errors), so the page's own code draws everything.
"use strict";

(() => {
  const DATA = JSON.parse(document.getElementById("smolattn-export").textContent);
  const S = DATA.shape;
  const L = S.layers, H = S.heads, Q = S.rows, K = S.image_keys, T = S.text_keys;
  const info = DATA.info;
  // every image (frame) of the prompt: its geometry and where its keys start on the key axis (geometry.Layout)
  const IMAGES = (info.images && info.images.length ? info.images : [{ geometry: info.geometry }]).map((im) => im.geometry);
  const OFFSETS = IMAGES.reduce((o, im) => [...o, o[o.length - 1] + im.num_keys], [0]);
  const SEVERAL = IMAGES.length > 1;
  if (SEVERAL && info.image_url === null) info.image_url = info.images[0].url;   // viewer/export.py inlines each once
  const TEXT_KINDS = new Set(["prompt", "answer", "special"]);
  const REVERSE_TOP = 20;
  const rowOf = new Map(DATA.positions.map((p, r) => [p, r]));
  const kinds = info.token_table.map((t) => t.kind);
  let A = null;   // the decoded arrays

  class ApiError extends Error {
    constructor(message, status = 400) { super(message); this.status = status; }
  }

  // -- data --------------------------------------------------------------------------------------
  function unbase85(text) {   // viewer/export.py's b85: 5 characters -> 4 bytes, big-endian
    const value = new Int16Array(128).fill(-1);
    for (let i = 0; i < DATA.alphabet.length; i++) value[DATA.alphabet.charCodeAt(i)] = i;
    const out = new Uint8Array(Math.ceil(text.length / 5) * 4);
    for (let i = 0, o = 0; i < text.length; i += 5, o += 4) {
      let w = 0;
      for (let j = 0; j < 5; j++) {
        const d = value[text.charCodeAt(i + j)];
        if (d < 0) throw new ApiError("the exported data is damaged (a character outside its alphabet)", 500);
        w = w * 85 + d;
      }
      out[o] = w >>> 24; out[o + 1] = (w >>> 16) & 255; out[o + 2] = (w >>> 8) & 255; out[o + 3] = w & 255;
    }
    return out.subarray(0, DATA.packed_bytes);
  }

  async function decode() {
    if (typeof DecompressionStream === "undefined") {
      throw new ApiError("this browser cannot open the exported file (no DecompressionStream); use a current browser", 500);
    }
    const packed = unbase85(document.getElementById("smolattn-blob").textContent.trim());
    const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate"));
    const buf = await new Response(stream).arrayBuffer();
    const out = {};
    const Typed = { uint8: Uint8Array, uint32: Uint32Array, float32: Float32Array };
    for (const [name, m] of Object.entries(DATA.arrays)) {
      out[name] = new Typed[m.dtype](buf, m.offset, m.shape.reduce((a, b) => a * b, 1));
    }
    for (const [name, m] of Object.entries(DATA.arrays)) {
      if (!m.predict) continue;
      // each row was stored as its difference from the row before, rescaled to its own scale (mod 256)
      const a = out[name], ratio = out[m.predict];
      const cols = m.shape[m.shape.length - 1], rows = m.shape[m.shape.length - 2];
      for (let base = 0, r = 0; base < a.length; base += cols, r++) {
        if (r % rows === 0) continue;
        const f = ratio[r];
        for (let k = base; k < base + cols; k++) a[k] += Math.min(255, Math.floor((a[k - cols] * f + 32768) / 65536));
      }
    }
    return out;
  }

  const ready = decode().then((a) => { A = a; });

  // value of layer l, head h, kept row q: image key k / text key k
  function imageRow(l, h, q, out, add = false) {
    const s = A.image_scale[(l * H + h) * Q + q] / 255, base = ((l * H + h) * Q + q) * K, c = A.image_codes;
    if (add) for (let k = 0; k < K; k++) out[k] += c[base + k] * s;
    else for (let k = 0; k < K; k++) out[k] = c[base + k] * s;
    return out;
  }

  function imageValue(l, h, q, k) { return A.image_codes[((l * H + h) * Q + q) * K + k] * A.image_scale[(l * H + h) * Q + q] / 255; }

  function rowSum(codes, scale, n, l, h, q) {
    const base = ((l * H + h) * Q + q) * n;
    let s = 0;
    for (let k = 0; k < n; k++) s += codes[base + k];
    return s * scale[(l * H + h) * Q + q] / 255;
  }

  // (K,) one layer's map reduced over heads: "mean", "max" or a head index (smolattn.heatmap.reduce_heads)
  function reduced(l, q, heads) {
    const out = new Float64Array(K);
    if (heads === "mean") {
      for (let h = 0; h < H; h++) imageRow(l, h, q, out, true);
      for (let k = 0; k < K; k++) out[k] /= H;
    } else if (heads === "max") {
      const tmp = new Float64Array(K);
      imageRow(l, 0, q, out);
      for (let h = 1; h < H; h++) {
        imageRow(l, h, q, tmp);
        for (let k = 0; k < K; k++) if (tmp[k] > out[k]) out[k] = tmp[k];
      }
    } else {
      imageRow(l, heads, q, out);
    }
    return out;
  }

  function reduceList(values, heads) {   // (H,) -> one number
    if (heads === "mean") return values.reduce((a, b) => a + b, 0) / values.length;
    if (heads === "max") return Math.max(...values);
    return values[heads];
  }

  function sum(x) { let s = 0; for (const v of x) s += v; return s; }
  function dropSink(x) { const s = sum(x); return x.map((v) => (s > 0 ? v / s : 0)); }
  function min(x) { let m = Infinity; for (const v of x) if (v < m) m = v; return m; }
  function max(x) { let m = -Infinity; for (const v of x) if (v > m) m = v; return m; }
  function range(a, b) { return Array.from({ length: b - a + 1 }, (_, i) => a + i); }

  function lhMass(q) {   // (L, H): image / (image + text) (smolattn.summary.Summary.lh_mass)
    return range(0, L - 1).map((l) => range(0, H - 1).map((h) => {
      const image = rowSum(A.image_codes, A.image_scale, K, l, h, q), text = rowSum(A.text_codes, A.text_scale, T, l, h, q);
      return image + text > 0 ? image / (image + text) : 0;
    }));
  }

  function split(values, g) {   // smolattn.geometry.Geometry.split of one image's keys: (tiled grid or null, global grid)
    const s = g.side, per = s * s, tiles = values.length - per;
    const glob = range(0, s - 1).map((i) => Array.from(values.slice(tiles + i * s, tiles + (i + 1) * s)));
    if (!g.rows) return [null, glob];
    const grid = range(0, g.rows * s - 1).map(() => new Array(g.cols * s));
    for (let r = 0; r < g.rows; r++) for (let c = 0; c < g.cols; c++) {
      const t = (r * g.cols + c) * per;
      for (let i = 0; i < s; i++) for (let j = 0; j < s; j++) grid[r * s + i][c * s + j] = values[t + i * s + j];
    }
    return [grid, glob];
  }

  // -- parameters (viewer/api.py) ----------------------------------------------------------------
  function asInt(value, name) {
    if (!/^\s*-?\d{1,9}\s*$/.test(String(value))) throw new ApiError(`${name} must be an integer, got '${value}'`);
    return Number(value);
  }

  function choice(p, name, choices, dflt) {
    const v = p.get(name) ?? dflt;
    if (!choices.includes(v)) throw new ApiError(`${name} must be one of ${choices.join(", ")}, got '${v}'`);
    return v;
  }

  function getRun(p) {
    const name = p.get("run");
    if (name !== null && name !== DATA.run) throw new ApiError(`unknown run '${name}'; this file holds only '${DATA.run}'`, 404);
  }

  function getToken(p) {
    const value = p.get("index");
    if (value === null) throw new ApiError("parameter 'index' is required");
    const pos = asInt(value, "index");
    if (!(pos >= 0 && pos < info.token_table.length)) {
      throw new ApiError(`unknown token ${pos}: the run has tokens 0..${info.token_table.length - 1}`, 404);
    }
    if (!rowOf.has(pos)) {
      const t = info.token_table[pos];
      throw new ApiError(`token ${pos} (${t.kind} '${t.text}') has no stored attention row: only text/answer tokens have rows`, 404);
    }
    return [pos, rowOf.get(pos)];
  }

  function getLayers(value) {
    if (value === null || value === "") return [0, L - 1];
    const m = /^(\d{1,4})(?:-(\d{1,4}))?$/.exec(value);
    if (!m) throw new ApiError(`layers must be 'i' or 'a-b', got '${value}'`);
    const a = Number(m[1]), b = Number(m[2] ?? m[1]);
    if (a > b) throw new ApiError(`layers range '${value}' is reversed`);
    if (b >= L) throw new ApiError(`unknown layer ${b}: the run has layers 0..${L - 1}`, 404);
    return [a, b];
  }

  function getImage(p, dflt = "0", allowAll = false) {   // viewer/api.py get_image
    const value = p.get("image") ?? dflt;
    if (allowAll && value === "all") return null;
    if (!/^\s*-?\d{1,9}\s*$/.test(value)) {
      throw new ApiError(`image must be an image index 0..${IMAGES.length - 1}${allowAll ? " or 'all' (every image summed)" : ""}, got '${value}'`);
    }
    const k = Number(value);
    if (!(k >= 0 && k < IMAGES.length)) {
      throw new ApiError(`image ${k} out of range: the run has ${IMAGES.length} image(s), 0..${IMAGES.length - 1}`, 404);
    }
    return k;
  }

  function masses(values) {   // smolattn.geometry.Layout.mass: the values summed per image
    return IMAGES.map((_, k) => { let s = 0; for (let i = OFFSETS[k]; i < OFFSETS[k + 1]; i++) s += values[i]; return s; });
  }

  function getHeads(value) {
    if (value === null || value === "" || value === "mean") return "mean";
    if (value === "max") return "max";
    const h = asInt(value, "head");
    if (!(h >= 0 && h < H)) throw new ApiError(`head ${h} out of range 0..${H - 1} (or mean, max)`);
    return h;
  }

  // -- methods stored in the run (rollout, relevancy, relative) ------------------------------------
  function methodMaps(name, pos) {
    const m = DATA.methods[name];
    const i = m.positions.indexOf(pos);
    if (i < 0) throw new ApiError(`token '${info.token_table[pos].text.trim()}' at position ${pos} has no ${name} map (${name} covers ${m.rows || "other tokens"})`, 404);
    const [n, P] = DATA.arrays[`method_${name}_codes`].shape;
    const codes = A[`method_${name}_codes`], lo = A[`method_${name}_lo`], hi = A[`method_${name}_hi`];
    const layer = (l) => {
      const out = new Float64Array(K), base = (l * P + i) * K, a = lo[l * P + i], span = (hi[l * P + i] - a) / 255;
      for (let k = 0; k < K; k++) out[k] = a + codes[base + k] * span;
      return out;
    };
    return { m, n, layer };
  }

  // -- routes ------------------------------------------------------------------------------------
  function viewValues(pos, q, p) {
    let layers = getLayers(p.get("layers"));
    const drop = choice(p, "drop_sink", ["0", "1"], "0") === "1";
    const method = choice(p, "method", info.methods.map((m) => m.name), "raw");
    if (method === "raw") {
      const heads = getHeads(p.get("heads"));
      const values = new Float64Array(K);
      for (let l = layers[0]; l <= layers[1]; l++) {
        const r = drop ? dropSink(reduced(l, q, heads)) : reduced(l, q, heads);
        for (let k = 0; k < K; k++) values[k] += r[k];
      }
      const n = layers[1] - layers[0] + 1;
      for (let k = 0; k < K; k++) values[k] /= n;
      return { method, layers, heads, drop, values, every: null, start_layer: null };
    }
    if (!DATA.methods[method]) throw new ApiError(`this run has no ${method} maps`, 404);
    const start = asInt(p.get("start_layer") ?? "0", "start_layer");
    const { m, n, layer } = methodMaps(method, pos);
    let values;
    const startAxis = m.axis === "start_layer";
    if (startAxis) {
      if (!(start >= 0 && start < n)) throw new ApiError(`start layer ${start} out of range: this run has layers 0..${n - 1}`, 404);
      values = layer(start);
      layers = [start, L - 1];
    } else {
      values = new Float64Array(K);
      for (let l = layers[0]; l <= layers[1]; l++) { const r = layer(l); for (let k = 0; k < K; k++) values[k] += r[k]; }
      for (let k = 0; k < K; k++) values[k] /= layers[1] - layers[0] + 1;
    }
    let every = range(0, n - 1).map(layer);
    if (drop) { values = dropSink(values); every = every.map(dropSink); }
    return { method, layers, heads: null, drop, values, every, start_layer: startAxis ? start : null };
  }

  function attention(p) {
    getRun(p);
    const [pos, q] = getToken(p);
    const norm = choice(p, "norm", ["map", "shared"], "map");
    const lh = lhMass(q);
    const v = viewValues(pos, q, p);
    let vmin, vmax;
    if (norm === "map") {
      vmin = min(v.values); vmax = max(v.values);
    } else if (v.every === null) {   // every layer's map at these heads (smolattn.summary.Summary.scale)
      vmin = Infinity; vmax = -Infinity;
      for (let l = 0; l < L; l++) {
        const r = reduced(l, q, v.heads), s = v.drop ? sum(r) : 1;
        vmin = Math.min(vmin, s > 0 ? min(r) / s : 0);
        vmax = Math.max(vmax, s > 0 ? max(r) / s : 0);
      }
    } else {
      vmin = Math.min(...v.every.map(min)); vmax = Math.max(...v.every.map(max));
    }
    let imageMass;
    if (v.method === "raw") {
      let s = 0;
      for (let l = v.layers[0]; l <= v.layers[1]; l++) s += reduceList(lh[l], v.heads);
      imageMass = s / (v.layers[1] - v.layers[0] + 1);
    } else {
      imageMass = v.start_layer !== null && !v.drop ? sum(v.values) : null;
    }
    const k = getImage(p);
    let values = v.values, imageMasses = null;
    if (SEVERAL) {   // one image's map; the token's mass per image (a video: per frame, its timeline)
      imageMasses = masses(values);
      values = values.slice(OFFSETS[k], OFFSETS[k + 1]);
      if (norm === "map") { vmin = min(values); vmax = max(values); }
    }
    const [grid, glob] = split(values, IMAGES[k]);
    return { success: true, run: DATA.run, index: pos, text: info.token_table[pos].text, method: v.method,
      image: k, image_masses: imageMasses,
      layers: v.layers, heads: v.heads, drop_sink: v.drop, norm, start_layer: v.start_layer,
      grid, global: glob, image_mass: imageMass, vmin, vmax, layer_head_mass: lh };
  }

  function textAttention(p) {
    getRun(p);
    const [pos, q] = getToken(p);
    const layers = getLayers(p.get("layers")), heads = getHeads(p.get("heads"));
    const n = layers[1] - layers[0] + 1;
    const text = new Float64Array(T);
    let image = 0;
    for (let l = layers[0]; l <= layers[1]; l++) {
      const perHead = range(0, H - 1).map((h) => {
        const s = A.text_scale[(l * H + h) * Q + q] / 255, base = ((l * H + h) * Q + q) * T;
        return Float64Array.from({ length: T }, (_, k) => A.text_codes[base + k] * s);
      });
      for (let k = 0; k < T; k++) text[k] += reduceList(perHead.map((x) => x[k]), heads) / n;
      image += reduceList(range(0, H - 1).map((h) => rowSum(A.image_codes, A.image_scale, K, l, h, q)), heads) / n;
    }
    const tokens = [];
    DATA.text_keys.forEach((key, k) => {
      const t = info.token_table[key];
      if (key <= pos && TEXT_KINDS.has(t.kind)) tokens.push({ index: key, text: t.text, unit_text: t.unit_text, kind: t.kind, value: text[k] });
    });
    return { success: true, run: DATA.run, index: pos, layers, heads, image, tokens };
  }

  function reverse(p) {
    getRun(p);
    const im = getImage(p), g = IMAGES[im];
    let view = choice(p, "view", ["tiles", "global"], "tiles");
    if (view === "tiles" && g.rows === 0) view = "global";
    const m = /^(\d{1,4}),(\d{1,4})$/.exec(p.get("cell") || "");
    if (!m) throw new ApiError("cell must be 'i,j' (row, column of the grid)");
    const i = Number(m[1]), j = Number(m[2]), s = g.side;
    const [gh, gw] = view === "tiles" ? g.grid : [s, s];
    if (!(i < gh && j < gw)) throw new ApiError(`cell ${i},${j} is outside the ${gh}x${gw} ${view} grid`);
    const key = OFFSETS[im] + (view === "tiles" ? (Math.floor(i / s) * g.cols + Math.floor(j / s)) * s * s + (i % s) * s + (j % s)
      : g.rows * g.cols * s * s + i * s + j);
    const layers = getLayers(p.get("layers")), heads = getHeads(p.get("heads"));
    const n = layers[1] - layers[0] + 1;
    const values = new Float64Array(Q);
    for (let q = 0; q < Q; q++) {
      for (let l = layers[0]; l <= layers[1]; l++) {
        values[q] += reduceList(range(0, H - 1).map((h) => imageValue(l, h, q, key)), heads) / n;
      }
    }
    const rows = range(0, Q - 1).filter((r) => TEXT_KINDS.has(kinds[DATA.positions[r]]));
    const top = rows.sort((a, b) => values[b] - values[a]).slice(0, REVERSE_TOP);
    return { success: true, run: DATA.run, cell: [i, j], view, key, tokens: top.map((r) => {
      const t = info.token_table[DATA.positions[r]];
      return { index: DATA.positions[r], text: t.text, kind: t.kind, value: values[r] };
    }) };
  }

  function overview(p) {   // viewer/api.py overview: image K's share per layer and head, or every image's
    getRun(p);
    const [pos, q] = getToken(p);
    const k = getImage(p, "all", true);
    let lh = lhMass(q);
    if (k !== null && SEVERAL) {
      lh = range(0, L - 1).map((l) => range(0, H - 1).map((h) => {
        const all = rowSum(A.image_codes, A.image_scale, K, l, h, q), text = rowSum(A.text_codes, A.text_scale, T, l, h, q);
        const base = ((l * H + h) * Q + q) * K;
        let mine = 0;
        for (let i = OFFSETS[k]; i < OFFSETS[k + 1]; i++) mine += A.image_codes[base + i];
        mine *= A.image_scale[(l * H + h) * Q + q] / 255;
        return all + text > 0 ? mine / (all + text) : 0;
      }));
    }
    return { success: true, run: DATA.run, index: pos, image: k === null ? "all" : k, images: IMAGES.length, layer_head_mass: lh };
  }

  const ROUTES = {
    "/api/runs": () => ({ success: true, total: 1, offset: 0, limit: 200, sort: "name", desc: false, single: true, runs: [DATA.entry] }),
    "/api/initialize": (p) => { getRun(p); return info; },
    "/api/attention": attention,
    "/api/text_attention": textAttention,
    "/api/reverse": reverse,
    "/api/overview": overview,
  };

  async function answer(url) {
    const u = new URL(url, "http://export.invalid");
    const route = ROUTES[u.pathname];
    try {
      if (!route) throw new ApiError(`${u.pathname} needs the viewer server (smolattn-view); this is an exported file`, 404);
      await ready;
      return [200, route(u.searchParams)];
    } catch (e) {
      return [e.status || 500, { success: false, error: e.status ? e.message : `internal error: ${e.message}` }];
    }
  }

  const serverFetch = window.fetch.bind(window);
  window.fetch = async (input, init) => {
    const url = typeof input === "string" ? input : input.url;
    if (!url.startsWith("/api/")) return serverFetch(input, init);
    const [status, body] = await answer(url);
    return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
  };
  window.smolattnExport = { data: DATA, ready, answer };
  window.smolattnStart = DATA.start;   // the view to open at when the URL has none (app.js main)

  // A file:// page may not rewrite its own URL in some browsers: the URL state is then simply not kept.
  const replaceState = history.replaceState.bind(history);
  history.replaceState = (...args) => { try { replaceState(...args); } catch (e) { /* file:// */ } };

  // Links and buttons that need the server (the dataset page, Export HTML) are hidden.
  document.addEventListener("DOMContentLoaded", () => {
    for (const node of document.querySelectorAll('a[href^="/"], .server-only')) node.style.display = "none";
    const meta = document.getElementById("run-meta");
    if (meta) meta.title = `Exported file: ${DATA.precision}`;
  });
})();
