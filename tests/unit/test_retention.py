"""Checkpoint retention against Determined's documented example (experiment config reference,
``checkpoint_storage``): two trials, ten checkpoints, smaller is better."""

from __future__ import annotations

import pytest

from schemas.retention import CheckpointFact, RetentionPolicy, checkpoint_after_validation, kept, to_collect

# Trial, checkpoint id, validation metric: Determined's table.
EXAMPLE = [(1, 1, None), (1, 2, None), (1, 3, 0.6), (1, 4, 0.5), (1, 5, 0.4),
           (2, 6, None), (2, 7, 0.2), (2, 8, 0.3), (2, 9, None), (2, 10, None)]
FACTS = [CheckpointFact(uuid=str(c), trial_id=t, steps_completed=100 * c, order=c, metric=m) for t, c, m in EXAMPLE]


@pytest.mark.parametrize(("experiment_best", "trial_best", "trial_latest", "saved"), [
    (0, 0, 0, set()),
    (2, 0, 0, {8, 7}),
    (0, 1, 0, {7, 5}),
    (0, 0, 2, {10, 9, 5, 4}),
    (2, 1, 0, {8, 7, 5}),
    (2, 0, 2, {10, 9, 8, 7, 5, 4}),
    (0, 1, 2, {10, 9, 7, 5, 4}),
    (2, 1, 2, {10, 9, 8, 7, 5, 4}),
])
def test_determined_example(experiment_best: int, trial_best: int, trial_latest: int, saved: set[int]) -> None:
    policy = RetentionPolicy(save_experiment_best=experiment_best, save_trial_best=trial_best,
                             save_trial_latest=trial_latest)
    assert kept(FACTS, policy, smaller_is_better=True) == {str(c) for c in saved}
    collected = to_collect(FACTS, policy, smaller_is_better=True, finished_trials={1, 2})
    assert set(collected) == {str(c) for c in range(1, 11)} - {str(c) for c in saved}
    assert collected == sorted(collected, key=int)  # in the order they were stored


def test_defaults_keep_each_trials_best_and_latest() -> None:
    assert kept(FACTS, RetentionPolicy(), smaller_is_better=True) == {"5", "7", "10"}


def test_larger_is_better_flips_best() -> None:
    policy = RetentionPolicy(save_experiment_best=1, save_trial_best=0, save_trial_latest=0)
    assert kept(FACTS, policy, smaller_is_better=False) == {"3"}


def test_running_trials_and_protected_checkpoints_are_never_collected() -> None:
    policy = RetentionPolicy(save_experiment_best=0, save_trial_best=0, save_trial_latest=0)
    assert to_collect(FACTS, policy, True, finished_trials={2}) == ["6", "7", "8", "9", "10"]
    assert to_collect(FACTS, policy, True, finished_trials={1, 2}, protected={"2", "7"}) == \
        ["1", "3", "4", "5", "6", "8", "9", "10"]


def test_nan_metric_is_not_best() -> None:
    facts = [CheckpointFact(uuid="a", trial_id=1, steps_completed=1, metric=float("nan")),
             CheckpointFact(uuid="b", trial_id=1, steps_completed=2, metric=None),
             CheckpointFact(uuid="c", trial_id=1, steps_completed=3, metric=1.0)]
    policy = RetentionPolicy(save_experiment_best=0, save_trial_best=5, save_trial_latest=0)
    assert kept(facts, policy, True) == {"c"}


def test_policy_changed_keeps_what_is_not_given() -> None:
    assert RetentionPolicy().changed(save_trial_best=3) == RetentionPolicy(save_trial_best=3)


@pytest.mark.parametrize(("policy", "metric", "best", "smaller", "take"), [
    ("all", 1.0, 0.5, True, True), ("all", None, None, True, True),
    ("none", 0.1, 0.5, True, False),
    ("best", 0.4, 0.5, True, True), ("best", 0.6, 0.5, True, False), ("best", 0.5, 0.5, True, False),
    ("best", 0.6, 0.5, False, True), ("best", 0.6, None, True, True), ("best", None, 0.5, True, False),
    ("best", float("nan"), 0.5, True, False),
])
def test_checkpoint_policy(policy: str, metric: float | None, best: float | None, smaller: bool, take: bool) -> None:
    assert checkpoint_after_validation(policy, metric, best, smaller) is take  # type: ignore[arg-type]
