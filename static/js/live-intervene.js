// The intervention panel of the run view (live mode): switch heads off by clicking cells of the
// layer x head grid (or the top N localisation heads of the loaded analysis), draw a box over the
// photo for a knockout (query set, layer range), block image attention from a layer; "Run" reruns the
// run's configuration under it in the worker and opens "compare with base"; "Sweep" runs the
// layer-window knockout sweep and opens its curve. The server checks every value again.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const st = {info: null, heads: new Set(), box: null, boxFrac: null, picking: false, drawing: false, job: null, analysis: false,
              image: 0, boxImage: 0};
  const several = () => !!(st.info && st.info.images && st.info.images.length > 1);

  function error(msg) { byId("lv-iv-error").textContent = msg || ""; byId("lv-iv-error").hidden = !msg; }

  function fillLayers(id, n, value) {
    const s = byId(id);
    s.replaceChildren();
    for (let l = 0; l < n; l++) s.append(new Option(String(l), String(l)));
    s.value = String(value);
  }

  function targets() {
    // several images or a video: "the whole image" is the one shown (image:K / frame:K); "every" all of them
    const sel = byId("lv-ko-to"), what = st.info && st.info.video ? "frame" : "image";
    const whole = sel.querySelector('option[value="image"]');
    let every = sel.querySelector('option[value="every"]');
    if (several()) {
      whole.textContent = `this ${what} (${st.image}, the one shown)`;
      if (!every) sel.append(every = new Option("", "every"));
      every.textContent = `every ${what}`;
    } else {
      whole.textContent = "the whole image";
      if (every) every.remove();
    }
  }

  function onRun(info) {
    st.info = info;
    st.heads.clear();
    st.box = st.boxFrac = null;
    st.image = st.boxImage = 0;
    drawBox();
    byId("lv-iv").hidden = !info;
    if (!info) return;
    targets();
    const iv = info.intervention;
    byId("lv-iv-note").hidden = !iv;
    byId("lv-iv-form").hidden = !!iv;
    if (iv) {
      byId("lv-iv-note").textContent = "This run is itself an intervened run: open its base run to intervene.";
      return;
    }
    const L = info.num_layers;
    fillLayers("lv-ko-lo", L, Math.floor(L / 4));
    fillLayers("lv-ko-hi", L, Math.floor((3 * L) / 4));
    fillLayers("lv-block-from", L, Math.floor(L / 2));
    byId("lv-window").max = L;
    byId("lv-window").value = Math.min(9, L);
    heads();
  }

  // -- heads off: the overview's cells ---------------------------------------------------------
  function heads() {
    const n = st.heads.size;
    byId("lv-heads-count").textContent = n ? `${n} head${n > 1 ? "s" : ""} off: ${[...st.heads].sort((a, b) => {
      const [la, ha] = a.split(":").map(Number), [lb, hb] = b.split(":").map(Number);
      return la - lb || ha - hb;
    }).join(", ")}` : "No head switched off.";
    byId("lv-heads-clear").hidden = !n;
    for (const cell of document.querySelectorAll("#overview .cell")) {
      cell.classList.toggle("lv-off", st.heads.has(`${cell.dataset.layer}:${cell.dataset.head}`));
    }
    byId("overview").classList.toggle("lv-picking", st.picking);
  }

  byId("overview").addEventListener("click", (e) => {
    if (!st.picking) return;
    const cell = e.target.closest(".cell");
    if (!cell) return;
    e.stopPropagation();    // not the viewer's "show this layer and head"
    e.preventDefault();
    const key = `${cell.dataset.layer}:${cell.dataset.head}`;
    if (st.heads.has(key)) st.heads.delete(key); else st.heads.add(key);
    heads();
  }, true);
  byId("lv-pick-heads").addEventListener("change", () => { st.picking = byId("lv-pick-heads").checked; heads(); });
  byId("lv-heads-clear").addEventListener("click", () => { st.heads.clear(); heads(); });
  document.addEventListener("viewer:draw", heads);     // the grid is drawn again for every token

  // -- the box over the photo ----------------------------------------------------------------------
  const stage = byId("stage"), img = byId("image");
  let rect = null, start = null;

  function drawBox() {
    if (rect) rect.remove();
    rect = null;
    byId("lv-box").textContent = st.box ? `box ${st.box.join(", ")} px` : "no box";
    if (!st.boxFrac) return;
    const [a, b, c, d] = st.boxFrac;
    rect = document.createElement("div");
    rect.className = "lv-boxrect";
    rect.id = "lv-boxrect";
    Object.assign(rect.style, {left: `${a * 100}%`, top: `${b * 100}%`, width: `${(c - a) * 100}%`, height: `${(d - b) * 100}%`});
    stage.append(rect);
  }

  function frac(e) {
    const r = img.getBoundingClientRect();
    return [Math.min(1, Math.max(0, (e.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (e.clientY - r.top) / r.height))];
  }

  function setBox(p, q) {
    const [w, h] = st.info.geometry.image_size;
    const f = [Math.min(p[0], q[0]), Math.min(p[1], q[1]), Math.max(p[0], q[0]), Math.max(p[1], q[1])];
    st.boxFrac = f;
    st.boxImage = st.image;     // a box is in the pixels of the image it was drawn on
    st.box = [Math.round(f[0] * w), Math.round(f[1] * h), Math.round(f[2] * w), Math.round(f[3] * h)];
    drawBox();
  }

  function drawMode(on) {
    st.drawing = on;
    byId("lv-draw").classList.toggle("on", on);
    byId("lv-draw").textContent = on ? "Drag over the photo…" : "Draw a box on the photo";
    stage.classList.toggle("lv-drawing", on);
  }

  const figure = byId("figure");
  figure.addEventListener("mousedown", (e) => {
    if (!st.drawing || !stage.contains(e.target)) return;
    e.preventDefault();
    e.stopPropagation();
    start = frac(e);
  }, true);
  window.addEventListener("mousemove", (e) => { if (st.drawing && start) setBox(start, frac(e)); });
  window.addEventListener("mouseup", (e) => {
    if (!st.drawing || !start) return;
    setBox(start, frac(e));
    start = null;
    const [x0, y0, x1, y1] = st.box;
    if (x1 - x0 < 2 || y1 - y0 < 2) { st.box = st.boxFrac = null; drawBox(); return; }
    drawMode(false);
    st.drawnAt = e.timeStamp;
    byId("lv-ko-on").checked = true;
  });
  figure.addEventListener("click", (e) => {     // the click that ends a drag is not a reverse-view click
    if ((st.drawing || e.timeStamp - (st.drawnAt || -1e9) < 300) && stage.contains(e.target)) e.stopPropagation();
  }, true);
  byId("lv-draw").addEventListener("click", () => drawMode(!st.drawing));

  // -- run and sweep -----------------------------------------------------------------------------
  function knockoutTo() {
    // {to, image}: intervene's target; image (several images or a video) says which one
    const to = byId("lv-ko-to").value;
    if (to === "every") return {to: "image"};
    if (to !== "image" && !st.box) throw new Error("draw a box on the photo first (or knock out the whole image)");
    if (!several()) return {to};
    return {to, image: to === "image" ? st.image : st.boxImage};
  }

  function body() {
    const b = {run: st.info.run, ablation: byId("lv-ablation").value};
    if (byId("lv-use-top").checked) b.top = Number(byId("lv-top").value);
    else if (st.heads.size) b.heads = [...st.heads].map((k) => k.split(":").map(Number));
    if (byId("lv-ko-on").checked) {
      b.knockout = {from: byId("lv-ko-from").value, ...knockoutTo(), box: st.box,
                    layers: [Number(byId("lv-ko-lo").value), Number(byId("lv-ko-hi").value)]};
    }
    if (byId("lv-block-on").checked) b.block_from = Number(byId("lv-block-from").value);
    return b;
  }

  async function submit(url, payload) {
    error("");
    byId("lv-iv-run").disabled = byId("lv-iv-sweep").disabled = true;
    try {
      const r = await Live.post(url, payload());
      st.job = r.job;
      byId("lv-iv-status").textContent = "Queued…";
      watch();
    } catch (e) {
      error(e.message);
      byId("lv-iv-run").disabled = byId("lv-iv-sweep").disabled = false;
    }
  }

  let watching = false;
  function watch() {
    if (watching) return;
    watching = true;
    Live.watch((snap) => {
      const job = snap.jobs.find((j) => j.id === st.job);
      if (!job) return;
      const s = byId("lv-iv-status");
      s.dataset.status = job.status;
      byId("lv-iv-cancel").hidden = !["queued", "running"].includes(job.status);
      if (job.status === "done") {
        s.textContent = "Done: opening…";
        location.href = Live.where(job);
      } else if (job.status === "failed" || job.status === "cancelled") {
        s.textContent = "";
        error(`${job.status === "failed" ? "Failed" : "Cancelled"}: ${job.error}`);
        byId("lv-iv-run").disabled = byId("lv-iv-sweep").disabled = false;
      } else {
        s.textContent = `${job.label}: ${Live.progress(job)}` + (job.text ? ` · “${job.text}”` : "");
      }
    });
  }

  byId("lv-iv-run").addEventListener("click", () => submit("/api/live/intervene", body));
  byId("lv-iv-cancel").addEventListener("click", () => Live.post("/api/live/cancel", {job: st.job}).catch((e) => error(e.message)));
  byId("lv-iv-sweep").addEventListener("click", () => submit("/api/live/sweep", () => {
    const frm = byId("lv-ko-from").value;
    if (frm === "answer") throw new Error("a sweep measures the first answer token: knock out from the last token, the question or all text");
    return {run: st.info.run, from: frm, ...knockoutTo(), box: st.box, window: Number(byId("lv-window").value)};
  }));

  document.addEventListener("viewer:run", (e) => onRun(e.detail.info));
  document.addEventListener("viewer:image", (e) => {   // another image shown: a box drawn on the last one goes
    st.image = e.detail.image;
    if (st.box && st.boxImage !== st.image) { st.box = st.boxFrac = null; drawBox(); }
    if (st.info) targets();
  });
  fetch("/api/live/status").then((r) => r.json()).then((s) => { st.analysis = !!s.analysis; byId("lv-top-row").hidden = !st.analysis; });
})();
