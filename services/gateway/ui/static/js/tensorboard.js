// "TensorBoard" on an experiment's and a trial's header: the command that shows its trials in TensorBoard, with a
// copy button. `kiln tensorboard start` runs TensorBoard where the user is (it syncs the trials' event files from
// the cluster's store through the gateway), not in the cluster, so the UI hands over the command rather than a link.
// Shown to those who may read the files: the experiment's owner or an admin (as its checkpoints).
import { h } from "./dom.js";

// The exact command for an experiment, or for one trial.
export function command({ experimentId, trialId }) {
  return trialId !== undefined ? `kiln tensorboard start --trial ${trialId}` : `kiln tensorboard start ${experimentId}`;
}

// The header redraws every few seconds while a run goes on: the same element is reused so an open panel stays open.
const made = new Map();

function entry(key, cmd, what) {
  if (made.has(key)) return made.get(key);
  const code = h("code.tb-command", cmd);
  const status = h("span.muted.tb-status", { role: "status" });
  const copy = h("button", { type: "button", dataset: { copy: "tensorboard" }, onclick: async () => {
    status.textContent = (await copyText(cmd, code)) ? "Copied." : "Select the command and copy it (Ctrl-C).";
  } }, "Copy");
  const el = h("details.tensorboard", { dataset: { tensorboard: key } },
    h("summary", { title: "Show the command that opens TensorBoard on your machine" }, "TensorBoard"),
    h("div.tb-panel",
      h("p", `TensorBoard runs on your machine, not in the cluster. To see ${what} in it, run where the Kiln CLI`
        + " is signed in to this gateway:"),
      h("div.tb-row", code, copy),
      status,
      h("p.muted", "It syncs the trials' event files from the cluster's store, keeps syncing while they run, and prints"
        + " the address to open (on 127.0.0.1, a free port). Ctrl-C stops it. To point the CLI at this gateway: ",
      h("code", `export KILN_MASTER=${location.origin}`), " and ", h("code", "kiln user login"), "."),
    ));
  made.set(key, el);
  return el;
}

async function copyText(text, el) {
  try { // the Clipboard API needs a secure context (https or 127.0.0.1/localhost)
    await navigator.clipboard.writeText(text);
    return true;
  } catch { /* fall back to selecting the text */ }
  const range = document.createRange();
  range.selectNodeContents(el);
  const sel = window.getSelection();
  sel.removeAllRanges();
  sel.addRange(range);
  try {
    return document.execCommand("copy");
  } catch {
    return false;
  }
}

function mayRead(user, experiment) {
  return Boolean(user && (user.admin || user.username === experiment.submitted_by));
}

// EXPERIMENT_LINKS entry: (experiment, {user}) -> element or null.
export function experimentLink(experiment, { user } = {}) {
  if (!mayRead(user, experiment)) return null;
  return entry(`experiment-${experiment.id}`, command({ experimentId: experiment.id }),
    `every trial of experiment ${experiment.id}`);
}

// TRIAL_LINKS entry: (trial, {user, experiment}) -> element or null.
export function trialLink(trial, { user, experiment } = {}) {
  if (!experiment || !mayRead(user, experiment)) return null;
  return entry(`trial-${trial.id}`, command({ trialId: trial.id }), `trial ${trial.id}`);
}
