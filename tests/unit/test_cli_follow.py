"""`kiln experiment create --follow`: what the follower prints from live events (no stack needed)."""

from __future__ import annotations

from kiln.cli import _Follower


def _follower() -> tuple[_Follower, list[str], list[float]]:
    lines: list[str] = []
    now = [0.0]
    return _Follower(echo=lines.append, clock=lambda: now[0]), lines, now


def test_every_validation_and_state_change_is_printed_once() -> None:
    f, lines, _ = _follower()
    f.handle("trial", {"trial_id": 1, "state": "QUEUED"})
    f.handle("trial", {"trial_id": 1, "state": "RUNNING"})
    f.handle("trial", {"trial_id": 1, "state": "RUNNING"})
    for step in (1, 2, 3):
        f.handle("validation", {"trial_id": 1, "steps_completed": step, "metrics": {"acc": step / 3}})
    f.validation(1, 2, {"acc": 2 / 3})  # the read model's catch-up repeats one: not printed twice
    assert lines == ["trial 1: QUEUED", "trial 1: RUNNING", "trial 1: validation at step 1: acc=0.3333",
                     "trial 1: validation at step 2: acc=0.6667", "trial 1: validation at step 3: acc=1"]


def test_training_lines_are_throttled_per_trial_and_carry_progress() -> None:
    f, lines, now = _follower()
    f.handle("progress", {"trial_id": 1, "progress": 0.25})
    for i in range(10):  # ten points within a second: one line
        now[0] = i * 0.05
        f.handle("training", {"trial_id": 1, "steps_completed": i, "metrics": {"loss": 1.0}})
    f.handle("training", {"trial_id": 2, "steps_completed": 1, "metrics": {"loss": 2.0}})  # another trial: shown
    now[0] = 1.5
    f.handle("training", {"trial_id": 1, "steps_completed": 30, "metrics": {"loss": 0.5}})
    assert lines == ["trial 1: step 0: loss=1  (25%)", "trial 2: step 1: loss=2", "trial 1: step 30: loss=0.5  (25%)"]
