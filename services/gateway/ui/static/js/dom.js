// Building the page: elements from data with text nodes only (never HTML from data), and formatting.

// h("tag.class", {attr: value, onclick: fn, dataset: {...}}, ...children): children are nodes or text.
export function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "class") el.className += (el.className ? " " : "") + value;
    else if (key === "value") el.value = value;
    else if (key === "checked") el.checked = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const SVG_NS = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function link(href, ...children) {
  return h("a", { href }, ...children);
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

// How long something ran: from `start` to `end`, or to now while it runs.
export function duration(start, end) {
  if (!start) return "–";
  return fmtDuration(((end ? new Date(end) : new Date()) - new Date(start)) / 1000);
}

export function fmtNum(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(3) : String(+v.toPrecision(5));
}

export function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtHparams(hparams) {
  return Object.entries(flatten(hparams)).map(([k, v]) => `${k}=${fmtNum(v)}`).join(" ");
}

// Nested hparam groups as dotted names: {opt: {lr: 1}} -> {"opt.lr": 1}.
export function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, `${prefix}${k}.`, out);
    else out[`${prefix}${k}`] = v;
  }
  return out;
}

export function badge(state) {
  return h("span.badge", { class: `state-${String(state).toLowerCase()}`, dataset: { state } }, state);
}

export function progressBar(fraction) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  return h("span.progress", { title: `${pct}%`, dataset: { progress: String(pct) } },
    h("span.track", h("span.bar", { style: `width:${pct}%` })), h("span.pct", `${pct}%`));
}

export function errorBox(err) {
  return h("div.error", { role: "alert" }, err && err.message ? err.message : String(err));
}

// A table whose columns sort on click (client-side): columns are {key, label, value(row), render(row)};
// `value` gives what sorts (default row[key]), `render` what shows (default the value, formatted); onSort(key,
// descending) hears the user's choice.
export function sortableTable(columns, rows, { sortKey, descending = false, rowAttrs, onSort } = {}) {
  let key = sortKey || columns[0].key;
  let desc = descending;
  const table = h("table.grid");
  const valueOf = (c) => c.value || ((r) => r[c.key]);
  const draw = () => {
    const col = columns.find((c) => c.key === key) || columns[0];
    const value = valueOf(col);
    const sorted = [...rows].sort((a, b) => {
      const va = value(a), vb = value(b);
      if (missing(va) || missing(vb)) return missing(va) - missing(vb);  // missing values last either way
      return compare(va, vb) * (desc ? -1 : 1);
    });
    const head = h("tr", columns.map((c) => h("th", {
      class: c.key === key ? `sorted ${desc ? "desc" : "asc"}` : "sortable",
      dataset: { key: c.key },
      title: c.title,
      onclick: () => {
        desc = c.key === key ? !desc : Boolean(c.descFirst);
        key = c.key;
        if (onSort) onSort(key, desc);
        draw();
      },
    }, c.label)));
    const body = sorted.map((r) => h("tr", rowAttrs ? rowAttrs(r) : null,
      columns.map((c) => h("td", c.render ? c.render(r) : fmtNum(valueOf(c)(r))))));
    clear(table, h("thead", head), h("tbody", body));
  };
  draw();
  return table;
}

function missing(v) {
  return v === null || v === undefined || (typeof v === "number" && isNaN(v));
}

// Numbers as numbers, the rest as text (numbers inside text in numeric order).
export function compare(a, b) {
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}
