"""Adaptive search on the whole stack: early stopping, the best trial to max_time, a searcher restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgspec
import nats
import pytest

from deploy import parts, stack
from schemas import events as ev
from schemas.config import parse_config
from tests.e2e.conftest import REPO, Stack

pytestmark = pytest.mark.e2e


def _created_trials(kiln_stack: Stack, experiment_id: int) -> list[ev.TrialCreated]:
    """Every TrialCreated of an experiment, straight from the event stream."""
    url, user, password = kiln_stack.nats_admin

    async def read() -> list[ev.TrialCreated]:
        nc = await nats.connect(url, user=user, password=password)
        js = nc.jetstream()
        sub = await js.subscribe(f"kiln.events.{experiment_id}.trial.*.*", ordered_consumer=True)
        decoder = msgspec.json.Decoder(ev.DomainEvent)
        found = []
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except nats.errors.TimeoutError:
                break
            event = decoder.decode(msg.data)
            if isinstance(event, ev.TrialCreated):
                found.append(event)
        await nc.close()
        return found

    return asyncio.run(read())


def test_adaptive_asha_stops_weak_trials_and_survives_a_searcher_restart(kiln_stack: Stack) -> None:
    """examples/digits/adaptive.yaml: some trials stop early, the best reaches max_time, and killing the
    searcher mid-search changes nothing: the same number of trials, none created twice."""
    config_text = (REPO / "examples/digits/adaptive.yaml").read_text()
    config, _ = parse_config(config_text)
    max_time = config.searcher.max_time
    api = kiln_stack.http  # signed in as admin
    created = kiln_stack.kiln("experiment", "create", "examples/digits/adaptive.yaml", "examples/digits")
    assert created.returncode == 0, created.stderr
    exp_id = int(created.stdout.split("Created experiment ", 1)[1].split()[0])

    # Once a few trials exist, kill -9 the searcher and bring it back (`kiln up` restarts what died).
    deadline = time.monotonic() + 120
    while len(api.get(f"/api/v1/experiments/{exp_id}/trials").json()) < 3:
        assert time.monotonic() < deadline, "trials were not created"
        time.sleep(0.3)
    pid = parts.read_pid(kiln_stack.cfg.state_dir, "searcher")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    stack.up(kiln_stack.cfg)

    deadline = time.monotonic() + 400
    while (exp := api.get(f"/api/v1/experiments/{exp_id}").json())["state"] not in ("COMPLETED", "ERROR"):
        assert time.monotonic() < deadline, f"experiment did not end: {exp}"
        time.sleep(1.0)
    assert exp["state"] == "COMPLETED"

    trials = api.get(f"/api/v1/experiments/{exp_id}/trials").json()
    assert len(trials) == config.searcher.max_trials
    assert all(t["state"] == "COMPLETED" for t in trials)
    events = _created_trials(kiln_stack, exp_id)
    assert len(events) == config.searcher.max_trials
    assert len({e.request_id for e in events}) == len(events)  # nothing created twice

    def epochs_trained(trial: dict) -> int:  # type: ignore[type-arg]
        latest = trial["latest_validation"] or {"metrics": {}}
        return int(latest["metrics"].get("epochs", 0))

    stopped_early = [t for t in trials if t["stop_requested"] and epochs_trained(t) < max_time]
    assert stopped_early, "ASHA stopped no trial early"
    best = max(trials, key=lambda t: t["best_metric"] or 0.0)
    assert epochs_trained(best) == max_time


def test_promotion_asha_pauses_trials_and_resumes_promoted_ones_from_checkpoints(kiln_stack: Stack) -> None:
    """examples/digits/promotion.yaml (stop_once: false): promoted trials resume from their checkpoint
    and train on to the next rung; the best reaches max_time; no trial counts a restart."""
    config, _ = parse_config((REPO / "examples/digits/promotion.yaml").read_text())
    run = kiln_stack.kiln("experiment", "create", "examples/digits/promotion.yaml", "examples/digits", "--follow")
    assert run.returncode == 0, run.stdout + run.stderr
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])
    api = kiln_stack.http  # signed in as admin
    trials = api.get(f"/api/v1/experiments/{exp_id}/trials").json()
    assert len(trials) == config.searcher.max_trials
    resumed = []
    for t in trials:
        detail = api.get(f"/api/v1/trials/{t['id']}").json()
        assert detail["restarts"] == 0
        if len(detail["allocations"]) > 1:
            resumed.append(t)
            epochs = [p["metrics"]["epochs"] for p in
                      api.get(f"/api/v1/trials/{t['id']}/metrics", params={"kind": "validation"}).json()]
            assert epochs == list(range(1, len(epochs) + 1))  # resumed where it paused: no epoch twice
    assert resumed, "no trial was promoted and resumed"
    assert max(int(t["latest_validation"]["metrics"]["epochs"]) for t in trials) == config.searcher.max_time
