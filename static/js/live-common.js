// Live mode, shared by the ask page (live.js) and the intervention panel (live-intervene.js): POSTs
// carry the page's per-server token (meta live-token), and the job queue comes as server-sent events.
// Text only ever goes through textContent.
"use strict";

const Live = (() => {
  const token = () => (document.querySelector('meta[name="live-token"]') || {}).content || "";

  async function post(url, body) {
    const headers = {"X-Live-Token": token()};
    if (!(body instanceof FormData)) headers["Content-Type"] = "application/json";
    const resp = await fetch(url, {method: "POST", headers, body: body instanceof FormData ? body : JSON.stringify(body),
                                   credentials: "same-origin"});
    let data = null;
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok || !data || data.success === false) {
      const msg = (data && data.error) || (resp.status === 413 ? "the upload is too large" : `request failed: HTTP ${resp.status}`);
      throw new Error(msg.split("\n")[0]);
    }
    return data;
  }

  // onSnapshot(snapshot) for every change of the queue; reconnects after a dropped stream.
  function watch(onSnapshot) {
    let version = -1, source = null;
    const open = () => {
      source = new EventSource(`/api/live/events?since=${version}`);
      source.onmessage = (ev) => {
        const snap = JSON.parse(ev.data);
        version = snap.version;
        onSnapshot(snap);
      };
      source.onerror = () => { source.close(); setTimeout(open, 1000); };
    };
    open();
    return () => source && source.close();
  }

  const seconds = (s) => (s >= 60 ? `${Math.floor(s / 60)}m ${Math.round(s % 60)}s` : `${s.toFixed(1)}s`);

  function progress(job) {
    const parts = [];
    if (job.status === "queued") parts.push(job.position ? `queued, ${job.position} ahead` : "queued, next");
    else if (job.status === "running") parts.push(job.phase === "generating" ? "generating" : job.phase || "running");
    if (job.status !== "queued" && job.kind !== "sweep") parts.push(`${job.tokens}${job.max_tokens ? " / " + job.max_tokens : ""} tokens`);
    if (job.status !== "queued") parts.push(seconds(job.elapsed));
    return parts.join(" · ");
  }

  function where(job) {
    if (!job.target) return null;
    return job.kind === "sweep" ? `/sweep?name=${encodeURIComponent(job.target)}`
      : `/?run=${encodeURIComponent(job.target)}${job.kind === "intervene" ? "&compare_base=1" : ""}`;
  }

  return {token, post, watch, progress, seconds, where};
})();
