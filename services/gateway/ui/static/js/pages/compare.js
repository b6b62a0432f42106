// Two or more trials side by side (#/compare?trials=3,7,9): one chart with a line per trial for any metric
// they reported, and their hyperparameters and results in columns.
import * as api from "../api.js";
import { h, link, badge, fmtNum, flatten } from "../dom.js";
import { LineChart, chartControls } from "../chart.js";

export async function render(root, ctx) {
  const ids = [...new Set((ctx.query.get("trials") || "").split(/[\s,]+/).filter((s) => /^\d+$/.test(s)).map(Number))];
  document.title = "Compare · Kiln";
  const input = h("input", { name: "trials", value: ids.join(", "), placeholder: "trial ids, e.g. 3, 7, 9" });
  root.append(h("h1", "Compare trials"),
    h("form.filters", { onsubmit: (e) => { e.preventDefault(); location.hash = `#/compare?trials=${input.value.replace(/\s+/g, "")}`; } },
      input, h("button", { type: "submit" }, "Compare")));
  if (ids.length < 2) {
    root.append(h("p.muted", "Give two or more trial ids, or pick trials in an experiment's Trials tab."));
    return;
  }
  const trials = await Promise.all(ids.map((id) => api.get(`/api/v1/trials/${id}`, null, ctx.signal)));
  const names = await Promise.all(ids.map((id) => api.get(`/api/v1/trials/${id}/metric-names`, null, ctx.signal)));
  const experiments = new Map();
  for (const t of trials) {
    if (!experiments.has(t.experiment_id)) experiments.set(t.experiment_id, await api.get(`/api/v1/experiments/${t.experiment_id}`, null, ctx.signal));
  }
  const options = [...new Set(names.flat().map((n) => `${n.kind}:${n.name}`))].sort();
  const firstExp = experiments.get(trials[0].experiment_id);
  const preferred = `validation:${firstExp.searcher_metric}`;
  const select = h("select", { name: "metric", onchange: () => load() },
    options.map((o) => h("option", { value: o }, o.replace(":", " · "))));
  select.value = options.includes(preferred) ? preferred : options[0] || "";
  const chartOptions = { x: "step", log: false, smoothing: 0 };
  root.append(h("div.toolbar", h("label", "metric ", select),
    chartControls(chartOptions, (o) => { Object.assign(chartOptions, o); draw(); })));
  const chart = new LineChart(root);
  ctx.signal.addEventListener("abort", () => chart.destroy());
  let series = [];

  function draw() {
    chart.set(series, { ...chartOptions, yLabel: select.value.split(":").slice(1).join(":") });
  }

  let asked = 0; // a metric chosen while another loads: only the newest is drawn

  async function load() {
    const mine = ++asked;
    if (!select.value) return draw();
    const [kind, name] = select.value.split(/:(.*)/s);
    const answers = await Promise.all(ids.map((id) => api.get(`/api/v1/trials/${id}/series`, { kind, name, max_points: 1000 }, ctx.signal)));
    if (mine !== asked) return;
    series = answers.map((a, i) => ({
      key: String(ids[i]), label: `trial ${ids[i]}`, points: a.series[name] || [],
      detail: Object.entries(flatten(trials[i].hparams)).map(([k, v]) => `${k}=${fmtNum(v)}`).join(" "),
    }));
    draw();
  }
  await load();

  const hpNames = [...new Set(trials.flatMap((t) => Object.keys(flatten(t.hparams))))].sort();
  const differs = (n) => new Set(trials.map((t) => JSON.stringify(flatten(t.hparams)[n]))).size > 1;
  const metricNames = [...new Set(trials.flatMap((t) => Object.keys(t.latest_validation?.metrics || {})))].sort();
  root.append(h("h2", "Side by side"), h("table.grid.compare",
    h("thead", h("tr", h("th", ""), trials.map((t) => h("th", link(`#/trials/${t.id}`, `trial ${t.id}`))))),
    h("tbody",
      h("tr", h("th", "experiment"), trials.map((t) => h("td", link(`#/experiments/${t.experiment_id}`, experiments.get(t.experiment_id).name)))),
      h("tr", h("th", "state"), trials.map((t) => h("td", badge(t.state)))),
      h("tr", h("th", "best searcher metric"), trials.map((t) => h("td", fmtNum(t.best_metric)))),
      h("tr", h("th", "steps"), trials.map((t) => h("td", String(t.steps_completed)))),
      hpNames.map((n) => h("tr", { class: differs(n) ? "differs" : null }, h("th", n),
        trials.map((t) => h("td", fmtNum(flatten(t.hparams)[n]))))),
      metricNames.map((n) => h("tr", h("th", `latest ${n}`), trials.map((t) => h("td", fmtNum(t.latest_validation?.metrics?.[n] ?? null))))),
    )));
}
