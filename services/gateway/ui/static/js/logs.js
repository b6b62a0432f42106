// A trial's logs: loaded from GET /api/v1/trials/{id}/logs, followed by asking for what was written since
// the newest line (with an overlap, deduplicated by allocation and line number, as `kiln trial logs -f`),
// filtered by text and by rank (the [rank=N] prefix kiln.launch puts on each line of a process).
import * as api from "./api.js";
import { h, clear } from "./dom.js";

const RANK = /^\[rank=(\d+)\] ?/;
const OVERLAP_MS = 30_000; // lines of other hosts may arrive a little late: ask again for the last 30 s

export function parseLine(line, workers) {
  const m = RANK.exec(line.text);
  return {
    key: `${line.allocation_id}:${line.line_no}`,
    ts: line.ts,
    rank: m ? Number(m[1]) : null,
    worker: workers.get(line.allocation_id) || "",
    stream: line.stream,
    text: m ? line.text.slice(m[0].length) : line.text,
  };
}

function clock(iso) {
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").slice(0, 23);
}

export class LogView {
  constructor(el, trialId, ctx, { follow = true } = {}) {
    this.trialId = trialId;
    this.ctx = ctx;
    this.workers = new Map();
    this.lines = new Map();
    this.sorted = [];
    this.ranks = new Set();
    this.search = h("input", { type: "search", name: "log-search", placeholder: "search the logs…",
      oninput: () => this.draw() });
    this.rank = h("select", { name: "rank", onchange: () => this.draw() }, h("option", { value: "" }, "every rank"));
    this.follow = h("input", { type: "checkbox", name: "follow", checked: follow });
    this.count = h("span.muted");
    this.box = h("div.log", { dataset: { lineCount: "0" }, tabindex: "0" });
    el.append(h("div.toolbar", h("label", this.follow, " follow"), this.search, this.rank, this.count), this.box);
  }

  setAllocations(allocations) {
    for (const a of allocations) this.workers.set(a.id, a.nodes.length > 1 ? "" : a.worker_id);
  }

  async load() {
    const newest = this.sorted.length ? new Date(this.sorted[this.sorted.length - 1].ts) : null;
    const params = newest ? { since: new Date(newest - OVERLAP_MS).toISOString(), limit: 10000 }
      : { tail: true, limit: 10000 };
    const got = await api.get(`/api/v1/trials/${this.trialId}/logs`, params, this.ctx.signal);
    let added = 0;
    for (const line of got) {
      const rec = parseLine(line, this.workers);
      if (this.lines.has(rec.key)) continue;
      this.lines.set(rec.key, rec);
      if (rec.rank !== null && !this.ranks.has(rec.rank)) {
        this.ranks.add(rec.rank);
        this.rank.append(h("option", { value: rec.rank }, `rank ${rec.rank}`));
      }
      added++;
    }
    if (added) {
      this.sorted = [...this.lines.values()].sort((a, b) => (a.ts < b.ts ? -1 : a.ts > b.ts ? 1 : a.key < b.key ? -1 : 1));
      this.draw();
    } else if (!this.sorted.length) {
      this.draw();
    }
  }

  draw() {
    const text = this.search.value.toLowerCase();
    const rank = this.rank.value === "" ? null : Number(this.rank.value);
    const shown = this.sorted.filter((r) => (rank === null || (r.rank ?? 0) === rank) // no prefix: rank 0
      && (!text || r.text.toLowerCase().includes(text)));
    const atBottom = this.box.scrollTop + this.box.clientHeight >= this.box.scrollHeight - 4;
    clear(this.box, shown.length ? shown.map((r) => h("div.line", { class: r.stream === "stderr" ? "stderr" : null },
      h("span.ts", clock(r.ts)), r.rank !== null ? h("span.rank", `[rank=${r.rank}]`) : null,
      r.worker ? h("span.worker", r.worker) : null, highlight(r.text, text))) : h("div.muted", "No log lines."));
    this.box.dataset.lineCount = String(shown.length);
    this.count.textContent = `${shown.length} of ${this.sorted.length} lines`;
    if (this.follow.checked && (atBottom || !this.drawn)) this.box.scrollTop = this.box.scrollHeight;
    this.drawn = true;
  }
}

function highlight(text, needle) {
  const span = h("span.text");
  if (!needle) {
    span.textContent = text;
    return span;
  }
  const lower = text.toLowerCase();
  let at = 0;
  for (let i = lower.indexOf(needle); i >= 0; i = lower.indexOf(needle, at)) {
    span.append(text.slice(at, i), h("mark", text.slice(i, i + needle.length)));
    at = i + needle.length;
  }
  span.append(text.slice(at));
  return span;
}
