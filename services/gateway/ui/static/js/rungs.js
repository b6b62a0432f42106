// How far trials got in an adaptive (ASHA) search, derived from what the API offers: the experiment's config,
// its trials, and its audit trail (GET /api/v1/experiments/{id}/events). Pure functions, no DOM.
//
// A trial's length is in the searcher's units: the `time_metric` it reports with each validation (or the
// legacy max_length unit), else its steps. Rung lengths are those the search plans (docs/asha.md, "Planning":
// the union over its brackets), else where the searcher decided: the length of each trial's last validation
// before its TrialStopRequested, and the lengths trials were created or promoted to train to. A stopped trial
// belongs to the highest rung at or below its length when it was stopped (a validation it made on its way out
// does not move it up).

export function isAdaptive(searcher) {
  return searcher && ["adaptive_asha", "async_halving"].includes(searcher.name);
}

export function timeMetric(searcher) {
  if (searcher.time_metric) return searcher.time_metric;
  const ml = searcher.max_length;
  if (ml && typeof ml === "object") {
    const unit = Object.keys(ml)[0];
    return unit === "batches" ? null : unit;
  }
  return null;
}

// The length a full trial trains to (max_time, or the max_length value), or null.
export function fullLength(searcher) {
  if (searcher.max_time) return searcher.max_time;
  const ml = searcher.max_length;
  if (typeof ml === "number") return ml;
  if (ml && typeof ml === "object") return Object.values(ml)[0] ?? null;
  return null;
}

// A validation's length in the searcher's units (as the searcher reads it).
export function lengthAt(searcher, steps, metrics) {
  const name = timeMetric(searcher);
  const raw = name && metrics ? metrics[name] : undefined;
  return typeof raw === "number" ? Math.trunc(raw) : steps;
}

export function trialLength(searcher, trial) {
  const lv = trial.latest_validation;
  return lv ? lengthAt(searcher, lv.steps_completed, lv.metrics) : 0;
}

// A trial the searcher stopped before it trained to the full length.
export function stoppedEarly(searcher, trial) {
  const top = fullLength(searcher);
  return Boolean(trial.stop_requested) && (top === null || trialLength(searcher, trial) < top);
}

// The rung lengths the search plans, as docs/asha.md gives them (services/searcher/asha.py computes them for the
// searcher; this is the display's reading of the same rule). Null when the config does not say.
// One known difference: JavaScript's Math.log is not always correctly rounded, so at an exact power with
// max_rungs >= 6 (ln(243)/ln(3)) this may plan one rung more than the searcher.
export function plannedRungs(searcher) {
  const maxTime = fullLength(searcher);
  const d = searcher.divisor;
  if (!maxTime || !(d > 1)) return null;
  let counts;
  if (searcher.name === "async_halving") {
    counts = [searcher.num_rungs ?? searcher.max_rungs];
  } else if (searcher.bracket_rungs && searcher.bracket_rungs.length) {
    counts = searcher.bracket_rungs;
  } else {
    if (!searcher.max_trials) return null;
    const r = Math.min(searcher.max_rungs, Math.trunc(Math.log(maxTime) / Math.log(d)) + 1,
      Math.trunc(Math.log(searcher.max_trials) / Math.log(d)) + 1);
    const from = searcher.mode === "aggressive" ? r : searcher.mode === "conservative" ? 1 : Math.floor((r - 1) / 2) + 1;
    counts = [];
    for (let k = from; k <= r; k++) counts.push(k);
  }
  const lengths = new Set();
  for (const r of counts) {
    for (let i = 0; i < r; i++) lengths.add(Math.max(Math.floor(maxTime / d ** (r - i - 1)), 1));
  }
  return [...lengths].sort((a, b) => a - b);
}

// {rungs: [{length, reached, promoted, stopped, paused, running, completed, ended}], trials: Map id -> {rung,
// outcome, length}}: outcome is "stopped", "paused", "completed", "ended" (errored or killed) or "running".
export function rungView(searcher, trials, events) {
  const per = new Map(trials.map((t) => [t.id, { trial: t, length: 0, stopAt: null, targets: [] }]));
  for (const { type, event } of events) {
    const p = per.get(event.trial_id);
    if (!p) continue;
    if (type === "ValidationReported") {
      p.length = Math.max(p.length, lengthAt(searcher, event.steps_completed, event.metrics));
    } else if (type === "TrialStopRequested" && p.stopAt === null) {
      p.stopAt = p.length;
    } else if ((type === "TrialCreated" || type === "TrialResumeRequested") && event.max_length) {
      p.targets.push(event.max_length);
    }
  }
  for (const p of per.values()) p.length = Math.max(p.length, trialLength(searcher, p.trial));

  const top = fullLength(searcher);
  const lengths = new Set(plannedRungs(searcher) || (top ? [top] : []));
  if (lengths.size <= 1) {
    for (const p of per.values()) {
      p.targets.forEach((t) => lengths.add(t));
      if (p.stopAt) lengths.add(p.stopAt);
    }
  }
  const rungs = [...lengths].filter((l) => top === null || l <= top).sort((a, b) => a - b)
    .map((length) => ({ length, reached: 0, promoted: 0, stopped: 0, paused: 0, running: 0, completed: 0, ended: 0 }));

  const out = new Map();
  for (const p of per.values()) {
    const t = p.trial;
    // A validation on the way out after a stop does not reach a further rung.
    const length = p.stopAt !== null && t.stop_requested ? p.stopAt : p.length;
    let rung = -1;
    rungs.forEach((r, k) => { if (r.length <= length) rung = k; });
    const target = Math.max(0, ...p.targets);
    let outcome;
    if (t.stop_requested && (top === null || length < top)) outcome = "stopped";
    else if (t.state === "PAUSED") outcome = "paused";
    else if (t.ended_at && top !== null && length >= top) outcome = "completed";
    else if (t.ended_at) outcome = t.state === "COMPLETED" ? "completed" : "ended";
    else outcome = "running";
    for (let k = 0; k <= rung; k++) {
      rungs[k].reached++;
      const promoted = k < rung || (outcome === "running" && target > rungs[k].length);
      if (promoted) rungs[k].promoted++;
      else rungs[k][outcome]++;
    }
    out.set(t.id, { rung, outcome, length });
  }
  return { rungs, trials: out };
}
