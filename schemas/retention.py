"""Checkpoint retention as Determined defines it: which checkpoints an experiment keeps. Pure, no I/O.

``checkpoint_storage`` says how many to keep (Determined's defaults: 0, 1, 1):

- ``save_experiment_best``: the N best checkpoints with a validation, over every trial of the experiment;
- ``save_trial_best``: the N best checkpoints with a validation, of each trial;
- ``save_trial_latest``: the N latest checkpoints of each trial.

A checkpoint in any of these sets is kept (once). "Best" is by the searcher metric of the validation at the
checkpoint's step (``smaller_is_better`` decides the direction); a checkpoint without such a validation is
never "best" but may be "latest". The searcher (services/searcher/core.py) applies this as trials finish,
when the experiment ends and when the policy changes; only finished trials' checkpoints are ever collected
(a running trial still needs its latest one to resume), and protected checkpoints (registered model versions)
never are.

``checkpoint_after_validation`` is Determined's ``checkpoint_policy`` (``best``, ``all``, ``none``): whether a
training loop (``kiln.pytorch``'s Trainer) takes a checkpoint after a validation. It governs taking, not
keeping: a checkpoint taken for another reason (the end of training, a preemption) is kept by the rules above.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Literal

import msgspec

CheckpointPolicy = Literal["best", "all", "none"]

DEFAULT_SAVE_EXPERIMENT_BEST = 0
DEFAULT_SAVE_TRIAL_BEST = 1
DEFAULT_SAVE_TRIAL_LATEST = 1


class RetentionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How many checkpoints to keep (``checkpoint_storage.save_*``)."""

    save_experiment_best: int = DEFAULT_SAVE_EXPERIMENT_BEST
    save_trial_best: int = DEFAULT_SAVE_TRIAL_BEST
    save_trial_latest: int = DEFAULT_SAVE_TRIAL_LATEST

    def changed(self, save_experiment_best: int | None = None, save_trial_best: int | None = None,
                save_trial_latest: int | None = None) -> RetentionPolicy:
        """This policy with the given values replaced (None keeps one)."""
        return RetentionPolicy(
            save_experiment_best=self.save_experiment_best if save_experiment_best is None else save_experiment_best,
            save_trial_best=self.save_trial_best if save_trial_best is None else save_trial_best,
            save_trial_latest=self.save_trial_latest if save_trial_latest is None else save_trial_latest)


class CheckpointFact(msgspec.Struct, frozen=True, kw_only=True):
    """What retention needs to know about one checkpoint."""

    uuid: str
    trial_id: int
    steps_completed: int
    order: int = 0  # the order it was stored in (ties between equal steps: later is later)
    metric: float | None = None  # the searcher metric of the validation at this step, if there was one


def _usable(metric: float | None) -> bool:
    return metric is not None and not math.isnan(metric)


def _best_first(facts: Iterable[CheckpointFact], smaller_is_better: bool) -> list[CheckpointFact]:
    """Checkpoints with a usable metric, best first (ties: the later checkpoint first, then by uuid)."""
    rated = [f for f in facts if _usable(f.metric)]
    sign = 1.0 if smaller_is_better else -1.0
    return sorted(rated, key=lambda f: (sign * f.metric, -f.steps_completed, -f.order, f.uuid))  # type: ignore[operator]


def _latest_first(facts: Iterable[CheckpointFact]) -> list[CheckpointFact]:
    return sorted(facts, key=lambda f: (-f.steps_completed, -f.order, f.uuid))


def kept(facts: Collection[CheckpointFact], policy: RetentionPolicy, smaller_is_better: bool) -> set[str]:
    """The uuids the policy keeps among ``facts`` (every checkpoint of the experiment that still exists)."""
    keep = {f.uuid for f in _best_first(facts, smaller_is_better)[:max(policy.save_experiment_best, 0)]}
    by_trial: dict[int, list[CheckpointFact]] = {}
    for f in facts:
        by_trial.setdefault(f.trial_id, []).append(f)
    for trial_facts in by_trial.values():
        keep |= {f.uuid for f in _best_first(trial_facts, smaller_is_better)[:max(policy.save_trial_best, 0)]}
        keep |= {f.uuid for f in _latest_first(trial_facts)[:max(policy.save_trial_latest, 0)]}
    return keep


def to_collect(facts: Collection[CheckpointFact], policy: RetentionPolicy, smaller_is_better: bool,
               finished_trials: Collection[int], protected: Collection[str] = ()) -> list[str]:
    """The uuids to delete now, in a fixed order: not kept by the policy, of a finished trial, not protected.

    Deleting only finished trials' checkpoints is final and safe while others run: a checkpoint outside the
    experiment's best N now can only fall further as more checkpoints arrive, and a finished trial's own best
    and latest no longer change.
    """
    keep = kept(facts, policy, smaller_is_better)
    return [f.uuid for f in sorted(facts, key=lambda f: (f.order, f.uuid))
            if f.uuid not in keep and f.trial_id in finished_trials and f.uuid not in protected]


def checkpoint_after_validation(policy: CheckpointPolicy, metric: float | None, best_so_far: float | None,
                                smaller_is_better: bool) -> bool:
    """Determined's ``checkpoint_policy``: take a checkpoint after this validation? ``best``: only when it beats
    every earlier validation (``best_so_far``: the best of them, None for none); ``all``: always; ``none``: never."""
    match policy:
        case "all":
            return True
        case "none":
            return False
        case "best":
            if not _usable(metric):
                return False
            if best_so_far is None or math.isnan(best_so_far):
                return True
            return metric < best_so_far if smaller_is_better else metric > best_so_far  # type: ignore[operator]
