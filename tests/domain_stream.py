"""A realistic domain stream for projection tests and the replay benchmark: many trials' lives interleaved."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from schemas import events as ev

CONFIG = {"name": "t", "entrypoint": "python3 train.py", "hyperparameters": {"lr": 0.1},
          "searcher": {"name": "single", "metric": "loss", "smaller_is_better": True,
                       "max_length": {"batches": 10}}}


def mixed_stream(rng: random.Random, experiments: list[int], trials: int, ids: Iterator[int]) -> list[Any]:
    """Many trials' lives interleaved at random, with preemption, pause/resume, restarts, kills, lost workers,
    a spanning allocation, progress, and events about ids that do not exist."""
    out: list[Any] = []
    lives: list[list[Any]] = []
    for e in experiments:
        out.append(ev.ExperimentSubmitted(experiment_id=e, config=CONFIG, config_yaml="name: t",
                                          context_digest="sha256:x", context_size=1, seed=7,
                                          submitted_at=1000.0))
        for _ in range(trials):
            t = next(ids)
            a1, a2 = f"{t}.1", f"{t}.2"
            life: list[Any] = [
                ev.TrialCreated(experiment_id=e, trial_id=t, request_id=t, hparams={"lr": rng.random()}, seed=t),
                ev.AllocationAssigned(experiment_id=e, trial_id=t, allocation_id=a1, worker_id="w0", slot_ids=["c0"]),
                ev.TrialStarted(experiment_id=e, trial_id=t, allocation_id=a1, worker_id="w0", started_at=10.0 + t),
            ]
            for step in range(1, rng.randint(2, 6)):
                life += [
                    ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=step,
                                          metrics={"loss": rng.choice([rng.random(), "NaN", 1e9])}),
                    ev.CheckpointStored(experiment_id=e, trial_id=t, uuid=f"ck-{t}-{step}", steps_completed=step,
                                        storage="s3://b/k", resources={}),
                    ev.TrialProgressReported(experiment_id=e, trial_id=t, progress=step / 6),
                ]
            twist = rng.choice(["preempt", "pause", "restart", "lost", "kill", "span", "plain"])
            if twist == "preempt":
                life += [ev.TrialPreemptRequested(experiment_id=e, trial_id=t, allocation_id=a1),
                         ev.AllocationExited(experiment_id=e, trial_id=t, allocation_id=a1, worker_id="w0",
                                             exit_code=0),
                         ev.TrialPreempted(experiment_id=e, trial_id=t, allocation_id=a1)]
            elif twist == "pause":
                life += [ev.TrialPaused(experiment_id=e, trial_id=t, allocation_id=a1, length=2),
                         ev.TrialResumeRequested(experiment_id=e, trial_id=t, max_length=9)]
            elif twist == "restart":
                life += [ev.AllocationExited(experiment_id=e, trial_id=t, allocation_id=a1, worker_id="w0",
                                             exit_code=1),
                         ev.TrialRestarting(experiment_id=e, trial_id=t, restarts=1, reason="exit code 1")]
            elif twist == "lost":
                life += [ev.WorkerLost(worker_id=f"w{t}", last_seen=5.0, allocation_ids=[a1]),
                         ev.AllocationLost(experiment_id=e, trial_id=t, allocation_id=a1, worker_id="w0")]
            elif twist == "kill":
                life += [ev.TrialKillRequested(experiment_id=e, trial_id=t),
                         ev.AllocationKillRequested(experiment_id=e, trial_id=t, allocation_id=a1, worker_id="w0")]
            elif twist == "span":
                nodes = [ev.AllocationNode(worker_id=w, address=w, slot_ids=["c0"]) for w in ("w1", "w2")]
                life += [ev.AllocationAssigned(experiment_id=e, trial_id=t, allocation_id=a2, worker_id=w,
                                               slot_ids=["c0"], node_rank=r, nodes=nodes, master_port=29400)
                         for r, w in enumerate(("w1", "w2"))]
                life.append(ev.AllocationExited(experiment_id=e, trial_id=t, allocation_id=a2, worker_id="w2",
                                                exit_code=rng.choice([0, 1]), node_rank=1))
            life.append(ev.TrialExited(experiment_id=e, trial_id=t, state="COMPLETED", exit_code=0))
            if rng.random() < 0.2:  # about a trial that was never created
                life.append(ev.TrialStopRequested(experiment_id=e, trial_id=next(ids)))
            lives.append(life)
    while lives:  # interleave: each step takes the next event of a random live trial
        life = rng.choice(lives)
        out.append(life.pop(0))
        if not life:
            lives.remove(life)
    last = next(e for e in reversed(out) if isinstance(e, ev.TrialCreated) and e.experiment_id == experiments[-1])
    out += [ev.ExperimentResourcesChanged(experiment_id=experiments[0], priority=7, max_slots=0, change_id="c"),
            ev.ExperimentEnded(experiment_id=experiments[0], state="COMPLETED"),
            ev.ExperimentKillRequested(experiment_id=experiments[-1]),
            # The mean progress as of a progress event does not count a trial created after it.
            ev.TrialProgressReported(experiment_id=experiments[-1], trial_id=last.trial_id, progress=0.9),
            ev.TrialCreated(experiment_id=experiments[-1], trial_id=next(ids), request_id=0, hparams={}, seed=0)]
    return out + _registry(experiments[0], [e for e in out if isinstance(e, ev.CheckpointStored)], ids)


def _registry(experiment_id: int, stored: list[ev.CheckpointStored], ids: Iterator[int]) -> list[Any]:
    """The model registry's life over some of the stream's checkpoints: a name taken twice, versions registered,
    a number raced for, metadata changed, a version and a model deleted, the freed name taken again."""
    a, b, c = stored[0], stored[1], stored[2]
    m1, m2, m3, m4 = next(ids), next(ids), next(ids), next(ids)

    def reg(model: int, version: int, ck: ev.CheckpointStored) -> ev.ModelVersionRegistered:
        return ev.ModelVersionRegistered(model_id=model, version=version, checkpoint_uuid=ck.uuid,
                                         experiment_id=ck.experiment_id, trial_id=ck.trial_id, registered_at=50.0)

    return [
        ev.ModelCreated(model_id=m1, name=f"mixed-{experiment_id}", labels=["x"], metadata={"k": 1}, created_at=40.0),
        ev.ModelCreated(model_id=m2, name=f"mixed-{experiment_id}", created_at=41.0),  # the name is taken
        reg(m1, 1, a), reg(m1, 2, b), reg(m1, 2, c), reg(m2, 1, c),
        ev.ModelMetadataChanged(model_id=m1, description="d", labels_added=["y"], metadata_set={"k": 2},
                                change_id="1"),
        ev.ModelVersionDeleted(model_id=m1, version=1),
        ev.ModelCreated(model_id=m3, name=f"other-{experiment_id}", created_at=42.0), reg(m3, 1, b),
        ev.ModelDeleted(model_id=m1),
        ev.ModelCreated(model_id=m4, name=f"mixed-{experiment_id}", created_at=43.0), reg(m4, 1, c),
    ]
