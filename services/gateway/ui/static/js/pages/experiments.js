// Experiments: filtered, sorted and paged by the gateway (GET /api/v1/experiments/page), so it stays quick
// with thousands. The filters live in the hash (#/experiments?state=ACTIVE&sort=name&order=asc&offset=50).
import * as api from "../api.js";
import { h, clear, link, badge, progressBar, fmtTime, duration, fmtNum, errorBox } from "../dom.js";

const STATES = ["", "ACTIVE", "PAUSED", "COMPLETED", "CANCELED", "ERROR", "STOPPING_CANCELED"];
const PAGE_SIZES = [25, 50, 100, 250];
const COLUMNS = [
  { key: "id", label: "ID", sort: "id" },
  { key: "name", label: "Name", sort: "name" },
  { key: "state", label: "State", sort: "state" },
  { key: "progress", label: "Progress", sort: "progress" },
  { key: "searcher", label: "Searcher", sort: "searcher" },
  { key: "best", label: "Best", sort: "best_metric" },
  { key: "trials", label: "Trials", sort: "num_trials" },
  { key: "owner", label: "Owner", sort: "owner" },
  { key: "labels", label: "Labels" },
  { key: "start", label: "Started", sort: "submitted_at" },
  { key: "duration", label: "Duration", sort: "ended_at" },
];

function cell(key, e) {
  switch (key) {
    case "id": return link(`#/experiments/${e.id}`, String(e.id));
    case "name": return link(`#/experiments/${e.id}`, e.name);
    case "state": return [badge(e.state), e.archived ? h("span.chip", "archived") : null];
    case "progress": return progressBar(e.progress);
    case "searcher": return e.searcher_name;
    case "best": return e.best_trial
      ? h("span", { title: `trial ${e.best_trial.id}` }, `${e.searcher_metric} `,
        link(`#/trials/${e.best_trial.id}`, fmtNum(e.best_trial.best_metric)))
      : h("span.muted", "–");
    case "trials": return String(e.num_trials);
    case "owner": return e.submitted_by;
    case "labels": return e.labels.map((l) => h("span.chip", l));
    case "start": return fmtTime(e.submitted_at);
    case "duration": return duration(e.submitted_at, e.ended_at);
    default: return "";
  }
}

export async function render(root, ctx) {
  const q = ctx.query;
  const state = {
    name: q.get("name") || "", state: q.get("state") || "", owner: q.get("owner") || "",
    label: q.get("label") || "", archived: q.get("archived") === "true",
    sort: q.get("sort") || "id", order: q.get("order") || "desc",
    offset: Number(q.get("offset") || 0), limit: Number(q.get("limit") || 50),
  };
  document.title = "Experiments · Kiln";
  const table = h("div.table-wrap");
  const pager = h("div.pager");
  const input = (key, placeholder) => h("input", {
    name: key, placeholder, value: state[key], type: "search",
    oninput: debounce((e) => { state[key] = e.target.value.trim(); state.offset = 0; load(); }, 250),
  });
  const stateSelect = h("select", { name: "state", onchange: (e) => { state.state = e.target.value; state.offset = 0; load(); } },
    STATES.map((s) => h("option", { value: s }, s || "any state")));
  stateSelect.value = state.state;
  const archived = h("input", { type: "checkbox", name: "archived", checked: state.archived,
    onchange: (e) => { state.archived = e.target.checked; state.offset = 0; load(); } });
  root.append(
    h("h1", "Experiments"),
    h("form.filters", { onsubmit: (e) => e.preventDefault() },
      input("name", "name contains…"), stateSelect, input("owner", "owner"), input("label", "label"),
      h("label", archived, " archived too")),
    table, pager);

  let latest = 0; // answers can arrive out of order (typing, the refresh): only the newest ask is shown

  async function load() {
    const asked = ++latest;
    const params = { limit: state.limit, offset: state.offset, sort: state.sort, order: state.order,
      name: state.name, state: state.state, owner: state.owner, label: state.label,
      archived: state.archived ? undefined : "false" };
    const hashParams = new URLSearchParams(Object.entries({ ...state, archived: state.archived ? "true" : "" })
      .filter(([k, v]) => v !== "" && !(k === "offset" && v === 0)));
    ctx.replace(`#/experiments?${hashParams}`);
    let page;
    try {
      page = await api.get("/api/v1/experiments/page", params, ctx.signal);
    } catch (err) {
      if (err.name !== "AbortError" && asked === latest) clear(table, errorBox(err));
      return;
    }
    if (asked !== latest) return;
    const head = h("tr", COLUMNS.map((c) => h("th", {
      class: c.sort ? (c.sort === state.sort ? `sorted ${state.order}` : "sortable") : null,
      dataset: { key: c.key },
      onclick: c.sort ? () => {
        state.order = c.sort === state.sort && state.order === "desc" ? "asc" : "desc";
        state.sort = c.sort;
        state.offset = 0;
        load();
      } : null,
    }, c.label)));
    const rows = page.experiments.map((e) => h("tr", { dataset: { experiment: e.id, state: e.state } },
      COLUMNS.map((c) => h("td", { class: `col-${c.key}` }, cell(c.key, e)))));
    clear(table, h("table.grid.experiments", { dataset: { total: page.total } }, h("thead", head), h("tbody", rows)),
      page.experiments.length ? null : h("p.muted", "No experiment matches."));
    const first = page.total ? page.offset + 1 : 0;
    const last = page.offset + page.experiments.length;
    const size = h("select", { name: "limit", onchange: (e) => { state.limit = Number(e.target.value); state.offset = 0; load(); } },
      PAGE_SIZES.map((n) => h("option", { value: n }, `${n} a page`)));
    size.value = String(state.limit);
    clear(pager,
      h("button", { type: "button", disabled: state.offset === 0,
        onclick: () => { state.offset = Math.max(0, state.offset - state.limit); load(); } }, "‹ Previous"),
      h("span.count", `${first}–${last} of ${page.total}`),
      h("button", { type: "button", disabled: last >= page.total,
        onclick: () => { state.offset += state.limit; load(); } }, "Next ›"),
      size);
  }

  await load();
  ctx.every(10_000, load); // states and progress move on their own
}

function debounce(fn, ms) {
  let t;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}
