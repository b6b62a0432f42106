// Line charts on uPlot (vendor/uplot, loaded by index.html as the global `uPlot`): one line per series, each
// with its own x values (steps, wall time or time since its first point); log scale; smoothing; hovering a
// line shows its label and details. The chart element carries data-series-count and data-point-count.
import { h, fmtNum } from "./dom.js";

export function color(i) {
  return `hsl(${Math.round((i * 137.508) % 360)}, 62%, 44%)`;
}

// Exponential moving average, debiased as TensorBoard's (weight 0: the values as they are). Gaps stay gaps.
export function smooth(values, weight) {
  if (!weight) return values.slice();
  let acc = 0;
  let n = 0;
  return values.map((v) => {
    if (v === null || v === undefined || !isFinite(v)) return v;
    acc = acc * weight + (1 - weight) * v;
    n += 1;
    return acc / (1 - weight ** n);
  });
}

// A series' points on the chosen x axis, sorted: "step", "time" (wall clock) or "relative" (s since its first).
export function xy(points, x) {
  const t0 = points.length ? Math.min(...points.map((p) => p.wall_time ?? Infinity)) : 0;
  const xOf = x === "step" ? (p) => p.step : x === "time" ? (p) => p.wall_time : (p) => p.wall_time - t0;
  const pairs = points.filter((p) => xOf(p) !== null && xOf(p) !== undefined && isFinite(xOf(p)))
    .map((p) => [xOf(p), p.value]).sort((a, b) => a[0] - b[0]);
  return { xs: pairs.map((p) => p[0]), ys: pairs.map((p) => p[1]) };
}

const X_LABEL = { step: "steps", time: "wall time", relative: "seconds since the trial's first point" };

export class LineChart {
  // series: [{key, label, detail, points: [{step, value, wall_time}]}]; options: {x, log, smoothing, yLabel}
  constructor(parent, { height = 340 } = {}) {
    this.height = height;
    this.el = h("div.chart", { dataset: { seriesCount: "0", pointCount: "0" } });
    this.tip = h("div.chart-tip", { hidden: true });
    this.empty = h("div.chart-empty", "No points yet.");
    this.el.append(this.empty);
    parent.append(this.el);
    this.series = [];
    this.options = { x: "step", log: false, smoothing: 0, yLabel: "" };
    this.u = null;
    this.shape = "";
    this.resize = new ResizeObserver(() => {
      if (this.u) this.u.setSize({ width: this.width(), height: this.height });
    });
    this.resize.observe(this.el);
  }

  width() {
    return Math.max(this.el.clientWidth, 300);
  }

  set(series, options = {}) {
    this.series = series.filter((s) => s.points.length);
    Object.assign(this.options, options);
    this.draw();
  }

  draw() {
    const { x, log, smoothing } = this.options;
    const lines = this.series.map((s) => {
      const { xs, ys } = xy(s.points, x);
      const cleaned = ys.map((v) => (v === null || !isFinite(v) || (log && v <= 0) ? null : v));
      return { ...s, xs, ys: smooth(cleaned, smoothing) };
    });
    this.lines = lines;
    this.el.dataset.seriesCount = String(lines.length);
    this.el.dataset.pointCount = String(lines.reduce((n, l) => n + l.xs.length, 0));
    this.el.dataset.x = x;
    this.el.dataset.log = String(Boolean(log));
    this.empty.hidden = lines.length > 0;
    const data = lines.length ? uPlot.join(lines.map((l) => [l.xs, l.ys])) : [[]];
    const shape = JSON.stringify([x, Boolean(log), lines.map((l) => l.key), this.options.yLabel]);
    if (this.u && shape === this.shape) {
      this.u.setData(data);
      return;
    }
    this.destroyPlot();
    this.shape = shape;
    if (!lines.length) return;
    this.u = new uPlot({
      width: this.width(),
      height: this.height,
      legend: { show: false },
      cursor: { focus: { prox: -1 }, drag: { x: true, y: false } },
      focus: { alpha: 0.25 },
      scales: { x: { time: x === "time" }, y: { distr: log ? 3 : 1 } },
      axes: [
        { label: X_LABEL[x], stroke: "#555", grid: { stroke: "#eee" } },
        { label: this.options.yLabel, stroke: "#555", size: 64, grid: { stroke: "#eee" },
          values: (u, splits) => splits.map(fmtNum) },
      ],
      series: [{}, ...lines.map((l, i) => ({
        label: l.label, stroke: l.color || color(i), width: 1.5, spanGaps: true,
      }))],
      hooks: { setCursor: [(u) => this.hover(u)], draw: [() => this.drawn()] },
    }, data, this.el);
    this.u.over.append(this.tip);
    this.u.over.addEventListener("mouseleave", () => this.unfocus());
  }

  // After uPlot has drawn the lines: onDrawn() (a page's performance mark), counted on the element.
  drawn() {
    this.el.dataset.drawn = String(Number(this.el.dataset.drawn || 0) + 1);
    if (this.onDrawn) this.onDrawn(this);
  }

  // The line nearest the cursor (in pixels, within 24 px): highlighted, with its label and value shown.
  hover(u) {
    const { left, top } = u.cursor;
    if (left === undefined || left < 0) return this.unfocus();
    const xVal = u.posToVal(left, "x");
    let best = null;
    this.lines.forEach((l, i) => {
      if (!u.series[i + 1].show || !l.xs.length) return;
      let lo = 0, hi = l.xs.length - 1;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (l.xs[mid] < xVal) lo = mid + 1; else hi = mid;
      }
      for (const j of [lo - 1, lo]) {
        if (j < 0 || l.ys[j] === null || l.ys[j] === undefined) continue;
        const dx = u.valToPos(l.xs[j], "x") - left;
        const dy = u.valToPos(l.ys[j], "y") - top;
        const d = Math.hypot(dx, dy);
        if (!best || d < best.d) best = { d, i, j };
      }
    });
    if (!best || best.d > 24) return this.unfocus();
    const l = this.lines[best.i];
    u.setSeries(best.i + 1, { focus: true });
    const xText = this.options.x === "time" ? new Date(l.xs[best.j] * 1000).toLocaleString() : fmtNum(l.xs[best.j]);
    this.tip.replaceChildren(
      h("div.tip-title", { style: `color:${l.color || color(best.i)}` }, l.label),
      h("div", `${this.options.x === "step" ? "step" : "x"} ${xText}: ${fmtNum(l.ys[best.j])}`),
      l.detail ? h("div.tip-detail", l.detail) : null,
    );
    this.tip.hidden = false;
    const overW = u.over.clientWidth;
    this.tip.style.left = `${Math.min(left + 12, Math.max(0, overW - 260))}px`;
    this.tip.style.top = `${Math.max(0, top - 10)}px`;
    this.el.dataset.focused = l.key;
  }

  unfocus() {
    if (this.u) this.u.setSeries(null, { focus: true });
    this.tip.hidden = true;
    delete this.el.dataset.focused;
  }

  destroyPlot() {
    if (this.u) {
      this.u.destroy();
      this.u = null;
    }
  }

  destroy() {
    this.resize.disconnect();
    this.destroyPlot();
  }
}

// The controls every line chart has: x axis, log scale, smoothing. onChange(options) on every change.
export function chartControls(options, onChange) {
  const x = h("select", { name: "x", onchange: () => change() },
    h("option", { value: "step" }, "steps"), h("option", { value: "time" }, "wall time"),
    h("option", { value: "relative" }, "relative time"));
  x.value = options.x;
  const log = h("input", { type: "checkbox", name: "log", checked: options.log, onchange: () => change() });
  const smoothing = h("input", { type: "range", name: "smoothing", min: "0", max: "0.99", step: "0.01",
    value: String(options.smoothing), oninput: () => change() });
  const shown = h("span.muted", String(options.smoothing));
  function change() {
    shown.textContent = smoothing.value;
    onChange({ x: x.value, log: log.checked, smoothing: Number(smoothing.value) });
  }
  return h("span.controls", h("label", "x ", x), h("label", log, " log scale"),
    h("label", "smoothing ", smoothing, shown));
}
