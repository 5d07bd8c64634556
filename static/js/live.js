// The ask page (live mode): pick or upload an image, type a prompt, Ask; the answer streams in as the
// worker generates it, then the run opens in the normal view. The queue below shows every job with its
// progress and a Cancel button; a failed or cancelled job says why. Text only ever goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = null, mine = null, opened = false;

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function error(message) {
  $("lv-error").textContent = message || "";
  $("lv-error").hidden = !message;
}

const source = () => document.querySelector('input[name="lv-source"]:checked').value;

async function setup() {
  const st = await fetch("/api/live/status").then((r) => r.json());
  limits = st.limits;
  $("lv-limits").textContent = `Upload: ${limits.formats.join(", ")}; at most ${Math.round(limits.upload_bytes / 1048576)} MiB `
    + `and ${Math.round(limits.upload_pixels / 1e6)} megapixels.`;
  $("lv-tokens").max = limits.max_new_tokens;
  $("lv-tokens").value = limits.default_new_tokens;
  const methods = $("lv-methods");
  for (const m of st.methods.filter((m) => m !== "raw")) {
    const label = el("label");
    const box = el("input");
    box.type = "checkbox"; box.value = m; box.name = "lv-method";
    label.append(box, ` ${m}`);
    methods.append(label);
  }
  const imgs = await fetch("/api/live/images").then((r) => r.json());
  for (const im of imgs.images) $("lv-run").append(new Option(im.run, im.run));
  if (!imgs.images.length) document.querySelector('input[value="run"]').disabled = true;
  render(st);
  Live.watch(render);
}

function preview() {
  const img = $("lv-preview");
  if (source() === "upload") {
    const f = $("lv-file").files[0];
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    if (!f) { img.hidden = true; return; }
    img.dataset.url = URL.createObjectURL(f);
    img.src = img.dataset.url;
  } else {
    const run = $("lv-run").value;
    if (!run) { img.hidden = true; return; }
    img.src = `/api/image?run=${encodeURIComponent(run)}`;
  }
  img.hidden = false;
}

async function ask(event) {
  event.preventDefault();
  error("");
  const form = new FormData();
  if (source() === "upload") {
    const f = $("lv-file").files[0];
    if (!f) { error("choose an image to upload, or pick a run's image"); return; }
    form.append("image", f, f.name);
  } else {
    form.append("image_run", $("lv-run").value);
  }
  form.append("prompt", $("lv-prompt").value);
  form.append("max_new_tokens", $("lv-tokens").value);
  form.append("methods", ["raw", ...[...document.querySelectorAll('input[name="lv-method"]:checked')].map((b) => b.value)].join(","));
  $("lv-ask").disabled = true;
  try {
    const r = await Live.post("/api/live/ask", form);
    mine = r.job; opened = false;
    $("lv-answer").textContent = "";
    $("lv-outcome").textContent = "";
  } catch (e) {
    error(e.message);
  } finally {
    $("lv-ask").disabled = false;
  }
}

function renderCurrent(job) {
  $("lv-current").hidden = !job;
  $("lv-idle").hidden = !!job;
  if (!job) return;
  $("lv-current-label").textContent = job.label;
  $("lv-progress").textContent = Live.progress(job);
  const ans = $("lv-answer");
  if (ans.textContent !== job.text) ans.textContent = job.text;
  ans.dataset.tokens = job.tokens;
  ans.dataset.status = job.status;
  ans.classList.toggle("waiting", ["queued", "running"].includes(job.status));
  $("lv-cancel").disabled = !["queued", "running"].includes(job.status);
  $("lv-cancel").dataset.job = job.id;
  const out = $("lv-outcome");
  out.className = `small lv-outcome-${job.status}`;
  if (job.status === "done") {
    out.textContent = "Written: ";
    const a = el("a", "", job.target);
    a.href = Live.where(job);
    out.append(a);
    if ($("lv-open").checked && !opened) { opened = true; setTimeout(() => { location.href = Live.where(job); }, 400); }
  } else if (job.status === "failed" || job.status === "cancelled") {
    out.textContent = `${job.status === "failed" ? "Failed" : "Cancelled"}: ${job.error}`;
  } else if (job.status === "queued") {
    out.textContent = "Waiting for the model…";
  } else {
    out.textContent = job.phase === "prefill" ? "Reading the image and the prompt…" : job.phase === "writing" ? "Writing the run…" : "";
  }
}

function render(snap) {
  const m = snap.model;
  $("lv-model").textContent = snap.state === "ready" && m ? `${m.model} · ${m.device} · ${m.dtype}`
    : snap.state === "loading" ? "Loading the model…" : `Model unavailable: ${snap.error}`;
  $("standin-banner").hidden = !(m && m.standin);
  $("lv-ask").disabled = snap.state === "failed";
  $("lv-state").textContent = snap.state === "loading" ? "(the model is loading)" : "";
  const body = document.querySelector("#lv-queue tbody");
  body.replaceChildren();
  for (const job of snap.jobs) {
    const tr = el("tr");
    tr.dataset.job = job.id;
    tr.dataset.status = job.status;
    const what = el("td", "", job.label);
    tr.append(what, el("td"), el("td", "num", job.kind === "sweep" ? "–" : String(job.tokens)),
              el("td", "num", job.status === "queued" ? `waiting ${Live.seconds(job.waited)}` : Live.seconds(job.elapsed)), el("td"));
    const st = tr.children[1];
    st.append(el("span", `lv-status ${job.status}`, job.status));
    if (job.status === "running" || job.status === "queued") st.append(el("div", "muted small", Live.progress(job)));
    if (job.error) st.append(el("div", "lv-why", job.error));
    const act = tr.children[4];
    if (job.status === "done" && job.target) {
      const a = el("a", "", "open");
      a.href = Live.where(job);
      act.append(a);
    } else if (job.status === "queued" || job.status === "running") {
      const b = el("button", "lv-queue-cancel", "Cancel");
      b.type = "button";
      b.onclick = () => cancel(job.id);
      act.append(b);
    }
    body.append(tr);
  }
  renderCurrent(snap.jobs.find((j) => j.id === mine) || null);
}

async function cancel(id) {
  try { await Live.post("/api/live/cancel", {job: id}); } catch (e) { error(e.message); }
}

$("lv-form").addEventListener("submit", ask);
$("lv-file").addEventListener("change", () => { document.querySelector('input[value="upload"]').checked = true; $("lv-run").disabled = true; preview(); });
$("lv-run").addEventListener("change", preview);
for (const r of document.querySelectorAll('input[name="lv-source"]')) {
  r.addEventListener("change", () => { $("lv-run").disabled = source() !== "run"; preview(); });
}
$("lv-cancel").addEventListener("click", () => cancel($("lv-cancel").dataset.job));
setup().catch((e) => error(e.message));
