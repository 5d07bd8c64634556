// Sweep page: a layer sweep (intervene.py --sweep) as its picture (sweep.png) with its numbers
// (sweep.json): per window centre, the knocked-out layers, the probability of the base answer's first
// token and its relative change. Text only ever goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);

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

const num = (v, digits = 4) => (typeof v === "number" ? v.toPrecision(digits) : "–");
const pct = (v) => (typeof v === "number" ? `${v > 0 ? "+" : v < 0 ? "−" : ""}${Math.abs(v).toFixed(1)}%` : "–");

function fact(dl, label, value, code = false) {
  if (value === null || value === undefined || value === "") return;
  const dd = el("dd");
  dd.append(code ? el("code", "", String(value)) : String(value));
  dl.append(el("dt", "", label), dd);
}

function render(body) {
  const s = body.sweep, iv = body.intervention;
  document.title = `${body.name} · Layer sweep · SmolVLM attention viewer`;
  $("standin-banner").hidden = !body.standin;
  $("sw-badge").hidden = false;
  $("sw-badge").textContent = iv.label;
  $("sw-badge").title = iv.slug || "";
  $("sw-meta").textContent = body.name;
  if (body.base) {
    $("sw-base").href = `/?run=${encodeURIComponent(body.base)}`;
    $("sw-base").textContent = `Base run: ${body.base}`;
  } else {
    $("sw-base").textContent = "Run view (base run not served)";
    $("sw-base").title = body.base_error || "";
  }
  if (body.png_url) {
    $("sw-picture").src = body.png_url;
    $("sw-picture").hidden = false;
  } else {
    $("sw-picture-missing").textContent = `No picture: ${body.png_error}.`;
    $("sw-picture-missing").hidden = false;
  }
  const facts = $("sw-facts");
  facts.replaceChildren();
  fact(facts, "Knocked out", `${s.from ?? "?"} → ${s.to ?? "?"}, windows of ${s.window ?? "?"} layers`);
  fact(facts, "Token", s.token === undefined ? null : `${JSON.stringify(s.token)} (id ${s.token_id ?? "?"}), the base answer's first`);
  fact(facts, "Base probability", num(s.base_prob));
  fact(facts, "Pixels", iv.pixels);
  fact(facts, "Base run", body.base || body.base_error);
  fact(facts, "Command", iv.command, true);
  if (body.problem) fact(facts, "Problem", body.problem);

  const centres = s.centres || [], change = s.relative_change_pct || [];
  const finite = change.filter((v) => typeof v === "number");
  const peak = finite.length ? change.indexOf(Math.min(...finite)) : -1;
  $("sw-caption").textContent = `${centres.length} windows. Change = (p_knockout − p_base) / p_base × 100.`
    + (peak >= 0 ? ` Largest drop at centre ${centres[peak]}: ${pct(change[peak])}.` : "");
  const table = $("sw-table");
  table.replaceChildren();
  const head = el("tr");
  for (const t of ["Centre", "Layers", "P(token)", "Change"]) head.append(el("th", "", t));
  table.append(head);
  centres.forEach((c, k) => {
    const row = el("tr", k === peak ? "peak" : "");
    const layers = (s.layers || [])[k];
    const v = change[k];
    row.append(el("td", "", String(c)), el("td", "", Array.isArray(layers) ? `${layers[0]}–${layers[1]}` : "–"),
      el("td", "", num((s.prob || [])[k])), el("td", typeof v === "number" ? (v < 0 ? "down" : "up") : "", pct(v)));
    table.append(row);
  });
}

async function main() {
  const name = new URLSearchParams(location.search).get("name");
  if (!name) {
    showError("no sweep given: open /sweep?name=FOLDER (the runs link their sweeps)");
    return;
  }
  try {
    render(await getJSON(`/api/sweep?name=${encodeURIComponent(name)}`));
  } catch (e) {
    showError(e.message);
  }
}

$("alert-close").addEventListener("click", () => { $("alert").hidden = true; });
main();
