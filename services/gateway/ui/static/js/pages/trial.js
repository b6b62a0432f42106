// One trial: its state and hparams, metric charts (a group like val_acc_class_0..9 as one chart of many
// series), logs (follow, search, rank), checkpoints with download, and its allocations (restarts, hosts).
import * as api from "../api.js";
import { h, clear, link, badge, progressBar, fmtTime, duration, fmtNum, fmtBytes, flatten, errorBox } from "../dom.js";
import { LineChart, chartControls } from "../chart.js";
import { LogView } from "../logs.js";
import { stoppedEarly } from "../rungs.js";
import { TRIAL_LINKS } from "../pages.js";

// Metrics that differ only in a trailing number (val_acc_class_0 … _9, loss/3) form one group: one chart.
export function metricGroups(names) {
  const groups = new Map();
  for (const { kind, name } of names) {
    const base = name.replace(/\d+$/, "*");
    const key = `${kind}:${base}`;
    if (!groups.has(key)) groups.set(key, { kind, label: base, names: [] });
    groups.get(key).names.push(name);
  }
  return [...groups.values()].map((g) => (g.names.length === 1 ? { ...g, label: g.names[0] } : g))
    .sort((a, b) => a.label.localeCompare(b.label));
}

export async function render(root, ctx) {
  const id = Number(ctx.params[0]);
  let trial = await api.get(`/api/v1/trials/${id}`, null, ctx.signal);
  const experiment = await api.get(`/api/v1/experiments/${trial.experiment_id}`, null, ctx.signal);
  document.title = `Trial ${id} · Kiln`;
  const head = h("div.head");
  const charts = h("section.metrics");
  const logsEl = h("section.logs");
  const checkpoints = h("section.checkpoints");
  const allocations = h("section.allocations");
  root.append(head, h("h2", "Metrics"), charts, h("h2", "Logs"), logsEl, h("h2", "Checkpoints"), checkpoints,
    h("h2", "Allocations"), allocations);

  const drawHead = () => clear(head, header(trial, experiment, ctx));
  const drawAllocations = () => clear(allocations, allocationTable(trial));
  async function refresh() {
    trial = await api.get(`/api/v1/trials/${id}`, null, ctx.signal);
    drawHead();
    drawAllocations();
    logs.setAllocations(trial.allocations);
  }
  drawHead();
  drawAllocations();

  const logs = new LogView(logsEl, id, ctx, { follow: !trial.ended_at });
  logs.setAllocations(trial.allocations);
  const names = await api.get(`/api/v1/trials/${id}/metric-names`, null, ctx.signal);
  const panels = ["training", "validation"].map((kind) => metricPanel(charts, trial, experiment, kind, names, ctx));
  await Promise.all([...panels.map((p) => p.load()), logs.load(), loadCheckpoints(checkpoints, id, ctx)]);

  if (!trial.ended_at) {
    followTrial(trial, ctx, (event, data) => panels.forEach((p) => p.onLive(event, data)));
    ctx.every(2000, () => { if (logs.follow.checked) logs.load(); });
    ctx.every(5000, async () => {
      if (trial.ended_at) return;
      await Promise.all([refresh(), loadCheckpoints(checkpoints, id, ctx)]);
      if (trial.ended_at) { // the last lines and points
        await Promise.all([logs.load(), ...panels.map((p) => p.load())]);
      }
    });
  }
}

function header(trial, experiment, ctx) {
  const searcher = experiment.config.searcher;
  const mayChange = ctx.user.admin || ctx.user.username === experiment.submitted_by;
  const message = h("div.error", { role: "alert", hidden: true });
  const kill = mayChange && !trial.ended_at ? h("button", { type: "button", dataset: { action: "kill-trial" },
    onclick: async (ev) => {
      if (!confirm(`Kill trial ${trial.id}?`)) return;
      ev.target.disabled = true;
      try {
        const answer = await api.post(`/api/v1/trials/${trial.id}/kill`);
        trial.state = answer.state; // until the periodic refresh reads the read model
        ev.target.replaceWith(badge(answer.state));
      } catch (err) {
        message.textContent = err.message;
        message.hidden = false;
      }
    } }, "Kill trial") : null;
  const lv = trial.latest_validation;
  return [
    h("div.title-row",
      h("h1", `Trial ${trial.id}`), h("span.muted", "of ", link(`#/experiments/${experiment.id}`, `${experiment.name} #${experiment.id}`)),
      badge(trial.state),
      stoppedEarly(searcher, trial) ? h("span.badge.stopped-early", "stopped early") : null,
      progressBar(trial.progress), h("span.spacer"), h("span.actions", kill, TRIAL_LINKS.map((f) => f(trial, { user: ctx.user, experiment })))),
    message,
    h("dl.facts",
      h("dt", `best ${experiment.searcher_metric}`), h("dd", fmtNum(trial.best_metric)),
      h("dt", "latest validation"), h("dd", lv ? `step ${lv.steps_completed}: ` + Object.entries(lv.metrics)
        .filter(([, v]) => typeof v !== "object").slice(0, 8).map(([k, v]) => `${k}=${fmtNum(v)}`).join(" ") : "–"),
      h("dt", "steps"), h("dd", String(trial.steps_completed)),
      h("dt", "restarts"), h("dd", String(trial.restarts)),
      h("dt", "worker"), h("dd", trial.worker_id || "–"),
      h("dt", "started"), h("dd", fmtTime(trial.started_at)),
      h("dt", "duration"), h("dd", duration(trial.started_at, trial.ended_at), trial.end_reason ? ` (${trial.end_reason})` : ""),
      h("dt", "seed"), h("dd", String(trial.seed)),
    ),
    h("table.grid.hparams", h("thead", h("tr", h("th", "hyperparameter"), h("th", "value"))),
      h("tbody", Object.entries(flatten(trial.hparams)).map(([k, v]) => h("tr", h("td", k), h("td", fmtNum(v)))))),
  ];
}

function metricPanel(parent, trial, experiment, kind, names, ctx) {
  const el = h("div.panel", { dataset: { kind } });
  parent.append(el);
  let groups = metricGroups(names.filter((n) => n.kind === kind));
  const options = { x: "step", log: false, smoothing: 0 };
  const select = h("select", { name: `${kind}-metric`, onchange: () => load() });
  const chart = new LineChart(el, { height: 280 });
  el.prepend(h("div.toolbar", h("strong", kind), h("label", " metric ", select),
    chartControls(options, (o) => { Object.assign(options, o); draw(); })));
  ctx.signal.addEventListener("abort", () => chart.destroy());
  let series = {};
  let pending = false;
  const preferred = kind === "validation" ? experiment.searcher_metric : "loss";

  function fillSelect() {
    const current = select.value;
    clear(select, groups.map((g, i) => h("option", { value: i }, g.names.length > 1 ? `${g.label} (${g.names.length})` : g.label)));
    const keep = groups.findIndex((g) => g.label === current || g.names.includes(current));
    const pick = keep >= 0 ? keep : Math.max(0, groups.findIndex((g) => g.names.includes(preferred)));
    select.value = String(pick);
  }

  function group() {
    return groups[Number(select.value)] || null;
  }

  function draw() {
    const g = group();
    chart.set(Object.entries(series).map(([name, points]) => ({ key: name, label: name, points })),
      { ...options, yLabel: g ? g.label : "" });
  }

  let asked = 0; // a metric chosen while another loads: only the newest is drawn

  async function load() {
    const mine = ++asked;
    if (!groups.length) {
      const fresh = await api.get(`/api/v1/trials/${trial.id}/metric-names`, null, ctx.signal);
      groups = metricGroups(fresh.filter((n) => n.kind === kind));
      if (!groups.length) return draw();
      fillSelect();
    }
    const g = group();
    const answer = await api.get(`/api/v1/trials/${trial.id}/series`, { kind, name: g.names, max_points: 1000 }, ctx.signal);
    if (mine !== asked) return;
    series = answer.series;
    draw();
  }
  fillSelect();

  return {
    load,
    onLive(event, data) {
      const g = group();
      if (event !== kind || data.trial_id !== trial.id) return;
      if (!g) { load(); return; }
      for (const name of g.names) {
        const v = data.metrics[name];
        if (typeof v !== "number") continue;
        (series[name] = series[name] || []).push({ step: data.steps_completed, value: v, wall_time: Date.now() / 1000 });
      }
      if (!pending) {
        pending = true;
        setTimeout(() => { pending = false; draw(); }, 1000);
      }
    },
  };
}

// The experiment's live stream, for one trial's points.
async function followTrial(trial, ctx, onEvent) {
  while (!ctx.signal.aborted) {
    let ended = false;
    try {
      await api.stream(`/api/v1/experiments/${trial.experiment_id}/metrics/stream`, (event, data) => {
        if (event === "end") ended = true;
        if (event === "trial" && data.trial_id === trial.id && !["QUEUED", "RUNNING", "PAUSED"].includes(data.state)) ended = true;
        onEvent(event, data);
      }, ctx.signal);
    } catch {
      if (ctx.signal.aborted) return;
    }
    if (ended) return;
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function loadCheckpoints(el, id, ctx) {
  let rows;
  try {
    rows = await api.get(`/api/v1/trials/${id}/checkpoints`, null, ctx.signal);
  } catch (err) {
    if (err.name !== "AbortError") clear(el, errorBox(err));
    return;
  }
  const message = h("div.error", { role: "alert", hidden: true });
  const wanted = ctx.query.get("checkpoint"); // #/trials/12?checkpoint=<uuid> (a model version's link) marks its row
  clear(el, rows.length ? h("table.grid.checkpoints", h("thead", h("tr", ["uuid", "steps", "state", "size", "files",
    "metric", "reported", ""].map((c) => h("th", c)))),
  h("tbody", rows.map((c) => {
    const size = Object.values(c.resources).reduce((a, b) => a + b, 0);
    return h("tr", { dataset: { uuid: c.uuid, state: c.state }, class: c.uuid === wanted ? "picked" : null },
      h("td", h("code", { title: c.uuid }, c.uuid.slice(0, 8))), h("td", String(c.steps_completed)), h("td", badge(c.state)),
      h("td", fmtBytes(size)), h("td", { title: Object.keys(c.resources).join("\n") }, String(Object.keys(c.resources).length)),
      h("td", c.metric === null ? "–" : `${c.searcher_metric}=${fmtNum(c.metric)}`), h("td", fmtTime(c.reported_at)),
      h("td", c.state === "COMPLETED" ? h("button", { type: "button", dataset: { action: "download-checkpoint", uuid: c.uuid },
        onclick: async () => {
          message.hidden = true;
          try {
            await api.download(`/api/v1/checkpoints/${c.uuid}/download`, `${c.uuid}.tar`);
          } catch (err) {
            message.textContent = err.message;
            message.hidden = false;
          }
        } }, "Download") : c.delete_reason));
  }))) : h("p.muted", "No checkpoints."), message);
  const picked = el.querySelector("tr.picked");
  if (picked && !el.dataset.scrolled) { // once: the periodic refresh leaves the reader where they are
    el.dataset.scrolled = "true";
    picked.scrollIntoView({ block: "center" });
  }
}

function allocationTable(trial) {
  if (!trial.allocations.length) return h("p.muted", "Not placed yet.");
  return h("table.grid.allocations", h("thead", h("tr", ["allocation", "hosts", "slots", "restart", "assigned",
    "started", "ended", "ran", "exit", "reason"].map((c) => h("th", c)))),
  h("tbody", trial.allocations.map((a) => h("tr", { dataset: { allocation: a.id } },
    h("td", h("code", a.id)),
    h("td", a.nodes.length ? a.nodes.map((n) => `${n.worker_id} (${n.address})`).join(", ") : a.worker_id),
    h("td", (a.nodes.length ? a.nodes.flatMap((n) => n.slot_ids) : a.slot_ids).join(", ")),
    h("td", String(a.restarts)), h("td", fmtTime(a.assigned_at)), h("td", fmtTime(a.started_at)), h("td", fmtTime(a.ended_at)),
    h("td", duration(a.started_at, a.ended_at)), h("td", a.exit_code === null ? "–" : String(a.exit_code)), h("td", a.end_reason)))));
}
