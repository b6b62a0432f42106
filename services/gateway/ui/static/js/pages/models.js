// The model registry (GET /api/v1/models): the list of models (#/models), and one model with its versions
// (#/models/<name>): each version's checkpoint links to the trial that stored it, with its experiment beside it.
// Registering and deleting stay in the CLI (`kiln model ...`) and the API; these pages read.
import * as api from "../api.js";
import { h, clear, link, badge, fmtTime, fmtNum, sortableTable, errorBox } from "../dom.js";

const modelHref = (name) => `#/models/${encodeURIComponent(name)}`;

function chips(labels) {
  return labels.length ? labels.map((l) => h("span.chip", l)) : h("span.muted", "–");
}

// Metadata as key=value text (nested values as JSON), or a dash.
export function fmtMetadata(metadata) {
  const entries = Object.entries(metadata || {});
  if (!entries.length) return "–";
  return entries.map(([k, v]) => `${k}=${typeof v === "object" && v !== null ? JSON.stringify(v) : fmtNum(v)}`).join(" ");
}

export async function renderList(root, ctx) {
  document.title = "Models · Kiln";
  const wrap = h("div.table-wrap");
  let typing = null;
  const name = h("input", { name: "name", type: "search", placeholder: "name contains…", value: ctx.query.get("name") || "",
    oninput: () => {
      ctx.replace(name.value ? `#/models?name=${encodeURIComponent(name.value)}` : "#/models");
      clearTimeout(typing);
      typing = setTimeout(() => load().catch((err) => clear(wrap, errorBox(err))), 250); // when the typing pauses
    } });
  root.append(h("h1", "Models"), h("form.filters", { onsubmit: (e) => e.preventDefault() }, name,
    h("span.muted", "Register a checkpoint as a version with ", h("code", "kiln model register-version NAME CHECKPOINT_UUID"), ".")),
  wrap);
  let asked = 0;

  async function load() {
    const mine = ++asked;
    const models = await api.all("/api/v1/models", { name: name.value.trim() || undefined });
    if (mine !== asked) return;
    if (!models.length) {
      clear(wrap, h("p.muted", name.value ? "No model's name contains that." : "No models yet."));
      return;
    }
    const table = sortableTable([
      { key: "name", label: "Name", render: (m) => link(modelHref(m.name), m.name) },
      { key: "num_versions", label: "Versions", descFirst: true },
      { key: "owner", label: "Owner" },
      { key: "labels", label: "Labels", value: (m) => m.labels.join(","), render: (m) => chips(m.labels) },
      { key: "description", label: "Description", render: (m) => h("span.muted", m.description || "") },
      { key: "updated_at", label: "Updated", descFirst: true, render: (m) => fmtTime(m.updated_at) },
    ], models, { rowAttrs: (m) => ({ dataset: { model: m.name } }) });
    table.classList.add("models");
    clear(wrap, table);
  }
  await load();
}

export async function renderModel(root, ctx) {
  const name = ctx.params[0];
  const [model, versions] = await Promise.all([
    api.get(`/api/v1/models/${encodeURIComponent(name)}`, null, ctx.signal),
    api.get(`/api/v1/models/${encodeURIComponent(name)}/versions`, { order: "desc" }, ctx.signal),
  ]);
  document.title = `${model.name} · Models · Kiln`;
  root.append(
    h("div.head",
      h("div.title-row", h("h1", model.name), h("span.muted", "model ", link("#/models", "(all models)"))),
      model.description ? h("p.description", model.description) : null,
      h("dl.facts",
        h("dt", "owner"), h("dd", model.owner),
        h("dt", "labels"), h("dd", chips(model.labels)),
        h("dt", "versions"), h("dd", String(model.num_versions)),
        h("dt", "metadata"), h("dd.metadata", fmtMetadata(model.metadata)),
        h("dt", "created"), h("dd", fmtTime(model.created_at)),
        h("dt", "updated"), h("dd", fmtTime(model.updated_at)))),
    h("h2", "Versions"),
    versions.length ? h("div.table-wrap", versionTable(versions))
      : h("p.muted", "No versions yet: ", h("code", `kiln model register-version ${model.name} CHECKPOINT_UUID`), "."));
}

function versionTable(versions) {
  const table = sortableTable([
    { key: "version", label: "Version", descFirst: true, render: (v) => h("strong", `v${v.version}`) },
    { key: "name", label: "Name", render: (v) => v.name || h("span.muted", "–") },
    { key: "checkpoint_uuid", label: "Checkpoint", render: (v) => h("a.checkpoint", {
      href: `#/trials/${v.trial_id}?checkpoint=${v.checkpoint_uuid}`, title: `${v.checkpoint_uuid}: in the checkpoints of trial ${v.trial_id}` },
    h("code", v.checkpoint_uuid.slice(0, 8))) },
    { key: "experiment_id", label: "Experiment", render: (v) => h("a.experiment", { href: `#/experiments/${v.experiment_id}` },
      `experiment ${v.experiment_id}`) },
    { key: "trial_id", label: "Trial", render: (v) => h("a.trial", { href: `#/trials/${v.trial_id}` }, `trial ${v.trial_id}`) },
    { key: "steps_completed", label: "Steps" },
    { key: "checkpoint_state", label: "State", render: (v) => (v.checkpoint_state ? badge(v.checkpoint_state)
      : h("span.muted", { title: "the checkpoint is not in the read model" }, "unknown")) },
    { key: "registered_by", label: "Registered by" },
    { key: "registered_at", label: "Registered", render: (v) => fmtTime(v.registered_at) },
    { key: "metadata", label: "Metadata", value: (v) => fmtMetadata(v.metadata),
      render: (v) => h("span.details", fmtMetadata(v.metadata)) },
    { key: "comment", label: "Comment", render: (v) => v.comment || h("span.muted", "–") },
  ], versions, { sortKey: "version", descending: true, rowAttrs: (v) => ({ dataset: { version: v.version, uuid: v.checkpoint_uuid } }) });
  table.classList.add("versions");
  return table;
}
