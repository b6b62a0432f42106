// Hyperparameter views in plain SVG: parallel coordinates (one axis per varying hparam, the metric last, one
// line per trial coloured by its metric) and a metric-vs-hparam scatter. Hover shows the trial; click opens it.
import { svg, h, fmtNum, flatten } from "./dom.js";

// One axis: numbers on a linear or log scale, anything else as categories.
export function axis(name, values, { log = false } = {}) {
  const present = values.filter((v) => v !== null && v !== undefined && !(typeof v === "number" && isNaN(v)));
  const numeric = present.length > 0 && present.every((v) => typeof v === "number");
  if (numeric) {
    const useLog = log && present.every((v) => v > 0);
    const f = useLog ? Math.log10 : (v) => v;
    let lo = Math.min(...present.map(f)), hi = Math.max(...present.map(f));
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const pos = (v) => (v === null || v === undefined || (useLog && v <= 0) ? null : (f(v) - lo) / (hi - lo));
    const ticks = [0, 0.5, 1].map((t) => {
      const raw = lo + t * (hi - lo);
      return [t, fmtNum(useLog ? 10 ** raw : raw)];
    });
    return { name, pos, ticks, log: useLog };
  }
  const cats = [...new Set(present.map(String))].sort();
  const pos = (v) => (v === null || v === undefined ? null : cats.length === 1 ? 0.5 : cats.indexOf(String(v)) / (cats.length - 1));
  return { name, pos, ticks: cats.map((c) => [pos(c), c]), log: false };
}

// Red (worst) to blue (best) by rank: comparable however the metric is distributed.
function metricColors(values, smallerIsBetter) {
  const ranked = values.map((v, i) => [v, i]).filter(([v]) => typeof v === "number" && isFinite(v))
    .sort((a, b) => (smallerIsBetter ? b[0] - a[0] : a[0] - b[0]));
  const out = values.map(() => "#bbb");
  ranked.forEach(([, i], r) => {
    const t = ranked.length > 1 ? r / (ranked.length - 1) : 1;
    out[i] = `hsl(${Math.round(t * 220)}, 70%, 45%)`;
  });
  return out;
}

// The hparams worth an axis: those that vary across the trials (constants say nothing here).
export function varyingHparams(trials) {
  const flat = trials.map((t) => flatten(t.hparams));
  const names = [...new Set(flat.flatMap((f) => Object.keys(f)))].sort();
  return names.filter((n) => new Set(flat.map((f) => JSON.stringify(f[n]))).size > 1);
}

// trials: [{id, hparams}], metricOf(trial) -> number|null; logNames: hparams of type log.
export function parallelCoordinates(trials, { metricOf, metricName, smallerIsBetter, logNames = new Set(), onPick }) {
  const names = varyingHparams(trials);
  const flat = trials.map((t) => flatten(t.hparams));
  const metrics = trials.map(metricOf);
  const axes = [...names.map((n) => axis(n, flat.map((f) => f[n]), { log: logNames.has(n) })),
    axis(metricName, metrics)];
  const W = Math.max(640, axes.length * 150), H = 360, top = 30, bottom = 40, left = 60, right = 60;
  const xAt = (i) => left + (axes.length === 1 ? 0 : (i * (W - left - right)) / (axes.length - 1));
  const yAt = (p) => top + (1 - p) * (H - top - bottom);
  const colors = metricColors(metrics, smallerIsBetter);
  const tip = h("div.chart-tip", { hidden: true });
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "parcoords" });
  const lines = trials.map((t, ti) => {
    const values = [...names.map((n) => flat[ti][n]), metrics[ti]];
    const pts = values.map((v, i) => [xAt(i), axes[i].pos(v)]).filter(([, p]) => p !== null);
    const d = pts.map(([x, p], i) => `${i ? "L" : "M"}${x.toFixed(1)},${yAt(p).toFixed(1)}`).join("");
    const detail = `trial ${t.id} · ${metricName}=${fmtNum(metrics[ti])} · ` +
      names.map((n) => `${n}=${fmtNum(flat[ti][n])}`).join(" ");
    return svg("path", {
      d, stroke: colors[ti], fill: "none", "stroke-width": 1.6, class: "pc-line", "data-trial": t.id,
      onmouseenter: (e) => {
        root.classList.add("hovering");
        e.target.classList.add("hover");
        tip.textContent = detail;
        tip.hidden = false;
      },
      onmouseleave: (e) => {
        root.classList.remove("hovering");
        e.target.classList.remove("hover");
        tip.hidden = true;
      },
      onclick: () => onPick && onPick(t),
    }, svg("title", {}, detail));
  });
  root.append(...lines);
  axes.forEach((a, i) => {
    const x = xAt(i);
    root.append(svg("line", { x1: x, x2: x, y1: top, y2: H - bottom, class: "pc-axis" }),
      svg("text", { x, y: H - bottom + 18, "text-anchor": "middle", class: "pc-name" }, a.name + (a.log ? " (log)" : "")),
      ...a.ticks.map(([p, label]) => svg("text", { x: x - 6, y: yAt(p) + 4, "text-anchor": "end", class: "pc-tick" }, label)));
  });
  return h("div.figure", { dataset: { lineCount: String(lines.length), axisCount: String(axes.length) } }, tip, root);
}

// The metric against one hparam, one dot per trial.
export function scatter(trials, { hparam, metricOf, metricName, log = false, onPick }) {
  const xs = trials.map((t) => flatten(t.hparams)[hparam]);
  const ys = trials.map(metricOf);
  const ax = axis(hparam, xs, { log }), ay = axis(metricName, ys);
  const W = 640, H = 340, left = 70, right = 20, top = 20, bottom = 44;
  const X = (p) => left + p * (W - left - right), Y = (p) => top + (1 - p) * (H - top - bottom);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "scatter" });
  root.append(
    svg("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "pc-axis" }),
    svg("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "pc-axis" }),
    svg("text", { x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle", class: "pc-name" }, hparam + (ax.log ? " (log)" : "")),
    svg("text", { x: 14, y: (top + H - bottom) / 2, "text-anchor": "middle", class: "pc-name",
      transform: `rotate(-90 14 ${(top + H - bottom) / 2})` }, metricName),
    ...ax.ticks.map(([p, label]) => svg("text", { x: X(p), y: H - bottom + 16, "text-anchor": "middle", class: "pc-tick" }, label)),
    ...ay.ticks.map(([p, label]) => svg("text", { x: left - 6, y: Y(p) + 4, "text-anchor": "end", class: "pc-tick" }, label)),
  );
  let n = 0;
  trials.forEach((t, i) => {
    const px = ax.pos(xs[i]), py = ay.pos(ys[i]);
    if (px === null || py === null) return;
    n++;
    root.append(svg("circle", { cx: X(px), cy: Y(py), r: 5, class: "dot", "data-trial": t.id,
      onclick: () => onPick && onPick(t) },
    svg("title", {}, `trial ${t.id} · ${hparam}=${fmtNum(xs[i])} · ${metricName}=${fmtNum(ys[i])}`)));
  });
  return h("div.figure", { dataset: { pointCount: String(n) } }, root);
}
