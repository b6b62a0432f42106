// The cluster as the scheduler last published it: workers and their slots (GPU name, memory, utilisation when
// known) and the job queue with positions (GET /api/v1/agents, /api/v1/jobs). Refreshed every few seconds.
import * as api from "../api.js";
import { h, clear, link, badge, fmtDuration, errorBox } from "../dom.js";

export async function render(root, ctx) {
  document.title = "Cluster · Kiln";
  const agentsEl = h("div");
  const jobsEl = h("div");
  root.append(h("h1", "Cluster"), h("h2", "Workers"), agentsEl, h("h2", "Job queue"), jobsEl);

  async function load() {
    let agents, jobs;
    try {
      [agents, jobs] = await Promise.all([api.get("/api/v1/agents", null, ctx.signal), api.get("/api/v1/jobs", null, ctx.signal)]);
    } catch (err) {
      if (err.name !== "AbortError") clear(agentsEl, errorBox(err));
      return;
    }
    const now = Date.now() / 1000;
    const slots = agents.reduce((n, a) => n + a.slots.length, 0);
    const busy = agents.reduce((n, a) => n + a.slots.filter((s) => s.trial_id !== null && s.trial_id !== undefined).length, 0);
    clear(agentsEl, h("p.muted", `${agents.length} workers, ${slots} slots, ${busy} in use.`),
      h("table.grid.agents",
        h("thead", h("tr", ["worker", "pool", "address", "last seen", "slot", "kind", "device", "memory",
          "utilisation", "running"].map((c) => h("th", c)))),
        h("tbody", agents.flatMap((a) => agentRows(a, now)))));
    const order = (j) => (j.position ?? 0) + (j.state === "QUEUED" ? 1e9 : 0);
    clear(jobsEl, jobs.length ? h("table.grid.jobs", h("thead", h("tr", ["position", "experiment", "trial", "state",
      "priority", "weight", "slots", "pool", "worker", "note"].map((c) => h("th", c)))),
    h("tbody", [...jobs].sort((a, b) => order(a) - order(b)).map((j) => h("tr", { dataset: { trial: j.trial_id, state: j.state } },
      h("td", j.position ?? "–"), h("td", link(`#/experiments/${j.experiment_id}`, String(j.experiment_id))),
      h("td", link(`#/trials/${j.trial_id}`, String(j.trial_id))), h("td", badge(j.state)), h("td", String(j.priority)),
      h("td", String(j.weight)), h("td", String(j.slots)), h("td", j.resource_pool), h("td", j.worker_id || "–"),
      h("td", [j.preempting ? "preempting " : "", j.reason])))))
      : h("p.muted", "Nothing running or queued."));
  }

  await load();
  ctx.every(3000, load);
}

// One row per slot; the worker's cells span them.
function agentRows(a, now) {
  const span = { rowspan: Math.max(1, a.slots.length) };
  const worker = [
    h("td", span, a.worker_id, a.lost ? [" ", badge("LOST")] : ""), h("td", span, a.resource_pool),
    h("td", span, a.address), h("td", span, `${fmtDuration(now - a.last_seen)} ago`),
  ];
  if (!a.slots.length) return [h("tr", { dataset: { worker: a.worker_id } }, worker, h("td", { colspan: 6 }, h("span.muted", "no slots")))];
  return a.slots.map((s, i) => {
    const running = s.trial_id !== null && s.trial_id !== undefined;
    return h("tr", { dataset: { worker: a.worker_id, slot: s.slot.slot_id }, class: a.lost ? "lost" : null },
      i === 0 ? worker : null,
      h("td", s.slot.slot_id), h("td", s.slot.kind), h("td", s.slot.name || "–"),
      h("td", s.slot.memory_mb ? `${(s.slot.memory_mb / 1024).toFixed(1)} GiB` : "–"),
      h("td", s.slot.kind === "cuda" ? utilisation(s.slot.utilization) : "–"),
      h("td", running ? link(`#/trials/${s.trial_id}`, `trial ${s.trial_id}`) : h("span.muted", "idle")));
  });
}

function utilisation(pct) {
  return h("span.util", { title: `${pct}%` }, h("span.track", h("span.bar", { style: `width:${pct}%` })), ` ${pct}%`);
}
