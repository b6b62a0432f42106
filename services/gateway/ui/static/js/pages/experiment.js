// One experiment: header and actions, then tabs (#/experiments/7/<tab>): learning curves of every trial, hparam
// views, the trials table, ASHA rungs, the config, the code, the audit trail. While it runs, the live stream
// (GET /api/v1/experiments/{id}/metrics/stream) grows the curves and moves states without a reload.
import * as api from "../api.js";
import {
  h, clear, link, badge, progressBar, fmtTime, duration, fmtNum, fmtHparams, flatten, errorBox, sortableTable,
} from "../dom.js";
import { LineChart, chartControls } from "../chart.js";
import { parallelCoordinates, scatter, varyingHparams } from "../hparams.js";
import { isAdaptive, rungView, stoppedEarly } from "../rungs.js";
import { EXPERIMENT_LINKS } from "../pages.js";

export const CURVES_DRAWN = "kiln:curves-drawn";

const TABS = [
  ["curves", "Curves"], ["hparams", "HParams"], ["trials", "Trials"], ["rungs", "Rungs"], ["config", "Config"],
  ["code", "Code"], ["events", "Audit trail"],
];

export async function render(root, ctx) {
  const id = Number(ctx.params[0]);
  const model = { id, experiment: null, trials: [], names: [] };
  const listeners = new Set(); // the open tab's live handler
  let tab = ctx.params[1] || "curves";

  async function reload() {
    const [experiment, trials] = await Promise.all([
      api.get(`/api/v1/experiments/${id}`, null, ctx.signal),
      api.all(`/api/v1/experiments/${id}/trials`),
    ]);
    model.experiment = experiment;
    model.trials = trials;
  }
  await reload();
  document.title = `${model.experiment.name} · Kiln`;

  const head = h("div.head");
  const tabBar = h("nav.tabs");
  const body = h("div.tab-body");
  root.append(head, tabBar, body);
  let tabState = null;

  function drawHead() {
    // After an action: the state the gateway answered with, until the periodic refresh reads the read model
    // (which shows it once the tracker has folded the request).
    clear(head, header(model, ctx, (answer) => { model.experiment.state = answer.state; drawHead(); }));
  }

  function drawTabs() {
    const adaptive = isAdaptive(model.experiment.config.searcher);
    clear(tabBar, TABS.filter(([key]) => key !== "rungs" || adaptive).map(([key, label]) =>
      h("a", { href: `#/experiments/${id}/${key}`, class: key === tab ? "active" : null, dataset: { tab: key },
        onclick: (e) => { e.preventDefault(); show(key); } }, label)));
  }

  async function show(key) {
    tab = TABS.some(([k]) => k === key) ? key : "curves";
    ctx.replace(`#/experiments/${id}/${tab}`);
    drawTabs();
    listeners.clear();
    if (tabState && tabState.destroy) tabState.destroy();
    const el = h("div", { dataset: { tab } });
    clear(body, el);
    try {
      tabState = (await TAB_RENDER[tab](el, model, ctx)) || null;
    } catch (err) {
      if (err.name !== "AbortError") el.append(errorBox(err));
      tabState = null;
    }
    if (tabState && tabState.onLive) listeners.add(tabState.onLive);
  }
  ctx.signal.addEventListener("abort", () => tabState && tabState.destroy && tabState.destroy());

  drawHead();
  await show(tab);

  // Live: the stream while it runs, and a refresh of states, best metrics and progress every few seconds.
  if (!model.experiment.ended_at) {
    follow(model, ctx, (event, data) => {
      for (const fn of listeners) fn(event, data);
      if (event === "end") reload().then(() => { drawHead(); if (tabState && tabState.refresh) tabState.refresh(); });
    });
    ctx.every(4000, async () => {
      if (model.experiment.ended_at) return;
      await reload();
      drawHead();
      if (tabState && tabState.refresh) tabState.refresh();
    });
  }
}

// The live stream until the experiment ends or the page goes; reconnects after a break (the periodic refresh
// fills in what it missed).
async function follow(model, ctx, onEvent) {
  const path = `/api/v1/experiments/${model.id}/metrics/stream`;
  let ended = false;
  while (!ended && !ctx.signal.aborted) {
    try {
      await api.stream(path, (event, data) => {
        if (event === "end") ended = true;
        onEvent(event, data);
      }, ctx.signal);
    } catch (err) {
      if (ctx.signal.aborted) return;
    }
    if (!ended) await new Promise((r) => setTimeout(r, 2000));
  }
}

function header(model, ctx, answered) {
  const e = model.experiment;
  const s = e.config.searcher;
  const mayChange = ctx.user.admin || ctx.user.username === e.submitted_by;
  const message = h("div.error", { role: "alert", hidden: true });
  const act = (verb, what) => h("button", {
    type: "button", dataset: { action: verb },
    onclick: async (ev) => {
      if (verb === "kill" && !confirm(`Kill experiment ${e.id} and all its trials?`)) return;
      ev.target.disabled = true;
      try {
        answered(await api.post(`/api/v1/experiments/${e.id}/${verb}`));
      } catch (err) {
        message.textContent = err.message;
        message.hidden = false;
        ev.target.disabled = false;
      }
    },
  }, what);
  const actions = mayChange && !e.ended_at ? [
    e.state === "ACTIVE" ? act("pause", "Pause") : null,
    e.state === "PAUSED" ? act("activate", "Activate") : null,
    act("kill", "Kill"),
  ] : [];
  const counts = Object.entries(e.trial_states).map(([state, n]) => `${n} ${state.toLowerCase()}`).join(", ");
  return [
    h("div.title-row",
      h("h1", e.name, h("span.muted", ` #${e.id}`)), badge(e.state), progressBar(e.progress),
      h("span.spacer"), h("span.actions", actions, EXPERIMENT_LINKS.map((f) => f(e, { user: ctx.user })))),
    e.description ? h("p.description", e.description) : null,
    message,
    h("dl.facts",
      h("dt", "searcher"), h("dd", `${s.name} · ${e.searcher_metric} (${e.smaller_is_better ? "smaller" : "larger"} is better)`),
      h("dt", "best"), h("dd", e.best_trial
        ? [fmtNum(e.best_trial.best_metric), " in ", link(`#/trials/${e.best_trial.id}`, `trial ${e.best_trial.id}`)]
        : "–"),
      h("dt", "trials"), h("dd", counts || "none yet"),
      h("dt", "owner"), h("dd", e.submitted_by),
      h("dt", "labels"), h("dd", e.labels.length ? e.labels.map((l) => h("span.chip", l)) : "–"),
      h("dt", "started"), h("dd", fmtTime(e.submitted_at)),
      h("dt", "duration"), h("dd", duration(e.submitted_at, e.ended_at), e.end_reason ? ` (${e.end_reason})` : ""),
    ),
  ];
}

// -- tabs: each renders into its element and may return {onLive(event, data), refresh(), destroy()} ------------

const TAB_RENDER = { curves, hparams, trials: trialsTab, rungs, config, code, events };

function trialDetail(t) {
  return `${t.state}${t.stop_requested ? " (stopped early)" : ""} · ${fmtHparams(t.hparams)}`;
}

async function curves(el, model, ctx) {
  const e = model.experiment;
  const names = await api.get(`/api/v1/experiments/${model.id}/metric-names`, null, ctx.signal);
  const options = names.map((n) => `${n.kind}:${n.name}`);
  const preferred = `validation:${e.searcher_metric}`;
  if (!options.includes(preferred)) options.unshift(preferred);
  const saved = ctx.query.get("metric");
  let [kind, name] = (saved && options.includes(saved) ? saved : preferred).split(/:(.*)/s);
  const chartOptions = { x: "step", log: false, smoothing: 0, yLabel: name };
  const select = h("select", { name: "metric", onchange: () => { [kind, name] = select.value.split(/:(.*)/s); load(); } },
    options.map((o) => h("option", { value: o }, o.replace(":", " · "))));
  select.value = `${kind}:${name}`;
  el.append(h("div.toolbar", h("label", "metric ", select),
    chartControls(chartOptions, (o) => { Object.assign(chartOptions, o); draw(); }),
    h("span.muted", "Hover a line for its trial; drag to zoom, double-click to reset.")));
  const chart = new LineChart(el);
  // The first time the curves are on screen: a performance mark (its startTime counts from the navigation), what
  // benchmarks/ui measures.
  chart.onDrawn = (c) => {
    chart.onDrawn = null;
    performance.mark(CURVES_DRAWN, { detail: { series: Number(c.el.dataset.seriesCount),
      points: Number(c.el.dataset.pointCount) } });
  };
  let series = new Map(); // trial id -> points
  let pending = false;

  function draw() {
    const byId = new Map(model.trials.map((t) => [t.id, t]));
    chart.set([...series.entries()].sort((a, b) => a[0] - b[0]).map(([tid, points]) => ({
      key: String(tid), label: `trial ${tid}`, points,
      detail: byId.has(tid) ? trialDetail(byId.get(tid)) : "",
    })), { ...chartOptions, yLabel: name });
  }

  let asked = 0; // a metric chosen while another loads: only the newest is drawn

  async function load() {
    const mine = ++asked;
    const maxPoints = Math.max(50, Math.min(1000, Math.floor(200_000 / Math.max(1, model.trials.length))));
    const answer = await api.get(`/api/v1/experiments/${model.id}/series`, { name, kind, max_points: maxPoints }, ctx.signal);
    if (mine !== asked) return;
    series = new Map(answer.trials.map((t) => [t.trial_id, t.points]));
    draw();
  }
  await load();
  return {
    onLive(event, data) {
      if (event !== kind || typeof data.metrics[name] !== "number") return;
      const points = series.get(data.trial_id) || [];
      points.push({ step: data.steps_completed, value: data.metrics[name], wall_time: Date.now() / 1000 });
      series.set(data.trial_id, points);
      if (!pending) { // at most one redraw a second, however fast points come
        pending = true;
        setTimeout(() => { pending = false; draw(); }, 1000);
      }
    },
    refresh: draw,
    destroy: () => chart.destroy(),
  };
}

// The names of hparams with a log distribution (nested groups as dotted names).
function logHparams(space, prefix = "", out = new Set()) {
  for (const [k, v] of Object.entries(space || {})) {
    if (v && typeof v === "object" && v.type === "log") out.add(prefix + k);
    else if (v && typeof v === "object" && !("type" in v)) logHparams(v, `${prefix}${k}.`, out);
  }
  return out;
}

async function hparams(el, model, ctx) {
  const e = model.experiment;
  const best = `best ${e.searcher_metric}`;
  const validationNames = [...new Set(model.trials.flatMap((t) => Object.keys(t.latest_validation?.metrics || {})))].sort();
  const metricSelect = h("select", { name: "metric", onchange: () => draw() },
    h("option", { value: "" }, best), validationNames.map((n) => h("option", { value: n }, `latest ${n}`)));
  const varying = varyingHparams(model.trials);
  const hpSelect = h("select", { name: "hparam", onchange: () => draw() }, varying.map((n) => h("option", { value: n }, n)));
  const logNames = logHparams(e.config.hyperparameters);
  const figures = h("div");
  el.append(h("div.toolbar", h("label", "metric ", metricSelect), h("label", "scatter against ", hpSelect)), figures);
  const onPick = (t) => { location.hash = `#/trials/${t.id}`; };

  function draw() {
    const m = metricSelect.value;
    const metricOf = m ? (t) => { const v = t.latest_validation?.metrics?.[m]; return typeof v === "number" ? v : null; }
      : (t) => t.best_metric;
    const metricName = m || e.searcher_metric;
    const smallerIsBetter = m && m !== e.searcher_metric ? /loss|error/i.test(m) : e.smaller_is_better;
    if (!model.trials.length) return clear(figures, h("p.muted", "No trials yet."));
    if (!varying.length) return clear(figures, h("p.muted", "Every trial has the same hyperparameters."));
    clear(figures,
      h("h3", "Parallel coordinates"),
      parallelCoordinates(model.trials, { metricOf, metricName, smallerIsBetter, logNames, onPick }),
      h("h3", `${metricName} against ${hpSelect.value}`),
      scatter(model.trials, { hparam: hpSelect.value, metricOf, metricName, log: logNames.has(hpSelect.value), onPick }));
  }
  draw();
  return { refresh: draw };
}

const selected = new Map(); // experiment id -> the trial ids picked for comparison (kept across refreshes)

async function trialsTab(el, model, ctx) {
  const e = model.experiment;
  const searcher = e.config.searcher;
  const picked = selected.get(model.id) || new Set();
  selected.set(model.id, picked);
  const compare = h("button", { type: "button", dataset: { action: "compare" },
    onclick: () => { location.hash = `#/compare?trials=${[...picked].join(",")}`; } });
  const updateCompare = () => {
    compare.textContent = `Compare selected (${picked.size})`;
    compare.disabled = picked.size < 2;
  };
  updateCompare();
  const wrap = h("div.table-wrap");
  el.append(h("div.toolbar", compare, h("span.muted", "Click a column to sort; pick two or more trials to compare.")), wrap);
  let sortKey = "id", descending = false;

  function draw() {
    const trials = model.trials;
    const hpNames = [...new Set(trials.flatMap((t) => Object.keys(flatten(t.hparams))))].sort();
    const metricNames = [...new Set(trials.flatMap((t) => Object.keys(t.latest_validation?.metrics || {})))].sort();
    const columns = [
      { key: "pick", label: "", value: (t) => (picked.has(t.id) ? 1 : 0), render: (t) => h("input", {
        type: "checkbox", checked: picked.has(t.id), "aria-label": `pick trial ${t.id}`,
        onchange: (ev) => { if (ev.target.checked) picked.add(t.id); else picked.delete(t.id); updateCompare(); },
      }) },
      { key: "id", label: "Trial", render: (t) => link(`#/trials/${t.id}`, String(t.id)) },
      { key: "state", label: "State", render: (t) => [badge(t.state),
        stoppedEarly(searcher, t) ? h("span.badge.stopped-early", { title: "the searcher stopped it before the full length" }, "stopped early") : null] },
      { key: "best_metric", label: `best ${e.searcher_metric}`, descFirst: !e.smaller_is_better },
      { key: "steps_completed", label: "Steps" },
      { key: "restarts", label: "Restarts" },
      { key: "duration", label: "Duration", value: (t) => (t.started_at ? ((t.ended_at ? new Date(t.ended_at) : new Date()) - new Date(t.started_at)) / 1000 : null),
        render: (t) => duration(t.started_at, t.ended_at) },
      ...hpNames.map((n) => ({ key: `hp:${n}`, label: n, title: "hyperparameter", value: (t) => flatten(t.hparams)[n] })),
      ...metricNames.map((n) => ({ key: `m:${n}`, label: n, title: "latest validation", value: (t) => t.latest_validation?.metrics?.[n] ?? null })),
    ];
    const table = sortableTable(columns, trials, {
      sortKey, descending,
      onSort: (key, desc) => { sortKey = key; descending = desc; }, // kept across live refreshes
      rowAttrs: (t) => ({ dataset: { trial: t.id, state: t.state, stoppedEarly: String(stoppedEarly(searcher, t)) } }),
    });
    table.classList.add("trials");
    clear(wrap, table);
  }
  draw();
  return { refresh: draw };
}

// Every event of the experiment's audit trail (paged by sequence number).
async function allEvents(id, signal) {
  const out = [];
  for (let after = 0; ;) {
    const page = await api.get(`/api/v1/experiments/${id}/events`, { after_seq: after, limit: 10000 }, signal);
    out.push(...page);
    if (page.length < 10000) return out;
    after = page[page.length - 1].seq;
  }
}

async function rungs(el, model, ctx) {
  const searcher = model.experiment.config.searcher;
  const wrap = h("div");
  el.append(h("p.muted", "Rungs are the lengths at which the searcher decided; read from the audit trail. ",
    searcher.stop_once === false ? "Promotion-based: trials pause at a rung until promoted." :
      "Stopping-based: a trial that falls out of the top 1/divisor at a rung is stopped."), wrap);

  async function draw() {
    const view = rungView(searcher, model.trials, await allEvents(model.id, ctx.signal));
    const widest = Math.max(1, ...view.rungs.map((r) => r.reached));
    const parts = ["promoted", "stopped", "paused", "running", "completed", "ended"];
    clear(wrap, h("table.grid.rungs",
      h("thead", h("tr", h("th", "Rung"), h("th", "Length"), h("th", "Reached"), parts.map((p) => h("th", p)), h("th", ""))),
      h("tbody", view.rungs.map((r, k) => h("tr", { dataset: { rung: k, length: r.length, reached: r.reached } },
        h("td", String(k)), h("td", String(r.length)), h("td", String(r.reached)),
        parts.map((p) => h("td", { dataset: { part: p } }, r[p] ? String(r[p]) : "")),
        h("td.bars", h("div.stack", { style: `width:${(100 * r.reached) / widest}%` },
          parts.filter((p) => r[p]).map((p) => h(`span.seg.${p}`, { style: `flex:${r[p]}`, title: `${r[p]} ${p}` })))))))),
    h("div.legend", parts.map((p) => h("span", h(`span.seg.${p}.swatch`), ` ${p}`))));
  }
  await draw();
  return { refresh: draw };
}

async function config(el, model) {
  el.append(h("p.muted", "The YAML as submitted."), h("pre.code", model.experiment.config_yaml));
}

async function code(el, model) {
  const e = model.experiment;
  const message = h("div.error", { role: "alert", hidden: true });
  el.append(h("dl.facts", h("dt", "digest"), h("dd", h("code", e.context_digest))),
    h("button", { type: "button", dataset: { action: "download-code" }, onclick: async () => {
      message.hidden = true;
      try {
        await api.download(`/api/v1/experiments/${e.id}/context`, `experiment-${e.id}-context.tar.gz`);
      } catch (err) {
        message.textContent = err.message;
        message.hidden = false;
      }
    } }, "Download the code (tar.gz)"), message);
}

function publisher(subject) {
  return subject.split(".").pop();
}

function summary(event) {
  const { experiment_id: _e, type: _t, ...rest } = event;
  const text = JSON.stringify(rest);
  return text.length > 240 ? `${text.slice(0, 240)}…` : text;
}

async function events(el, model, ctx) {
  const body = h("tbody");
  const more = h("button", { type: "button", onclick: () => load() }, "Load more");
  let after = 0;
  el.append(h("table.grid.events", h("thead", h("tr", h("th", "seq"), h("th", "time"), h("th", "event"),
    h("th", "by"), h("th", "details"))), body), more);
  async function load() {
    const page = await api.get(`/api/v1/experiments/${model.id}/events`, { after_seq: after, limit: 500 }, ctx.signal);
    body.append(...page.map((ev) => h("tr", { dataset: { type: ev.type } }, h("td", String(ev.seq)), h("td", fmtTime(ev.time)),
      h("td", ev.type), h("td", publisher(ev.subject)), h("td.details", summary(ev.event)))));
    if (page.length) after = page[page.length - 1].seq;
    more.hidden = page.length < 500;
  }
  await load();
}
