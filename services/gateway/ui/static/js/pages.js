// The route table and the top navigation. A new page (the model registry, TensorBoard) is a module under
// pages/ exporting render(root, ctx); add its route here and, if it has one, its NAV entry.
// Links a later feature adds to an experiment's or a trial's header go in EXPERIMENT_LINKS / TRIAL_LINKS:
// functions (experiment, {user}) or (trial, {user, experiment}) -> an element, or null when there is nothing to
// link to.
import * as experiments from "./pages/experiments.js";
import * as experiment from "./pages/experiment.js";
import * as trial from "./pages/trial.js";
import * as compare from "./pages/compare.js";
import * as cluster from "./pages/cluster.js";
import * as models from "./pages/models.js";
import { experimentLink as tensorboardForExperiment, trialLink as tensorboardForTrial } from "./tensorboard.js";

export const ROUTES = [
  { pattern: /^\/experiments\/?$/, render: experiments.render },
  { pattern: /^\/experiments\/(\d+)(?:\/([a-z]+))?\/?$/, render: experiment.render },
  { pattern: /^\/trials\/(\d+)\/?$/, render: trial.render },
  { pattern: /^\/compare\/?$/, render: compare.render },
  { pattern: /^\/cluster\/?$/, render: cluster.render },
  { pattern: /^\/models\/?$/, render: models.renderList },
  { pattern: /^\/models\/([A-Za-z0-9][A-Za-z0-9_.-]*)\/?$/, render: models.renderModel },
];

export const NAV = [
  { href: "#/experiments", label: "Experiments", match: /^\/(experiments|trials)/ },
  { href: "#/compare", label: "Compare", match: /^\/compare/ },
  { href: "#/models", label: "Models", match: /^\/models/ },
  { href: "#/cluster", label: "Cluster", match: /^\/cluster/ },
];

export const EXPERIMENT_LINKS = [tensorboardForExperiment];
export const TRIAL_LINKS = [tensorboardForTrial];
