"""Workers on separate hosts: each `kiln worker` agent in a network namespace of its own with its own address,
the control plane (`kiln up --host ... --remote-worker ...`) in the root namespace. A 2-slot trial spans two
such hosts; a host whose link is cut is declared lost, its trial resumes on the other host from its
checkpoint, and when the link comes back its late reports are fenced and its run is killed."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy import stack
from tests.e2e import hosts as vhosts
from tests.e2e.conftest import REPO, Stack, local_stack, wait_for
from tests.e2e.test_multihost import SPANNING_TRAIN

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(vhosts.available()), reason=vhosts.available() or "ok")]

WORKERS = ("worker-h0", "worker-h1")
STEPS = 60
CUT_TRAIN = textwrap.dedent("""\
    import json, time
    import kiln as det

    info = det.get_cluster_info()
    with det.core.init() as ctx:
        start = 0
        if info.latest_checkpoint:
            with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
                start = json.loads((path / "state.json").read_text())["step"]
        for step in range(start + 1, STEPS + 1):
            time.sleep(0.5)
            # "by_<worker>": a metric only this host's run writes, so a point the other run later writes for the
            # same step cannot hide it.
            ctx.train.report_validation_metrics(steps_completed=step, metrics={
                "accuracy": step / STEPS, "host": info.agent_id, "by_" + info.agent_id: step})
            if step % 5:
                continue
            try:  # a host cut off from the store cannot upload: keep training (best-effort checkpoints)
                with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                    (path / "state.json").write_text(json.dumps({"step": step}))
            except Exception as exc:
                print(f"checkpoint at step {step} failed: {exc!r}", flush=True)
""").replace("STEPS", str(STEPS))


class Cluster:
    """The control plane and the two hosts with their agents."""

    def __init__(self, s: Stack, net: vhosts.Network, logs: Path) -> None:
        self.s = s
        self.net = net
        self.logs = logs
        self.host_of = {w: h for w, h in zip(WORKERS, net.hosts, strict=True)}

    def get(self, path: str) -> Any:
        return self.s.http.get(f"{self.s.cfg.master_url}{path}").json()

    def submit(self, tmp_path: Path, script: str, cfg: str) -> int:
        (tmp_path / "train.py").write_text(script)
        (tmp_path / "cfg.yaml").write_text(cfg)
        run = self.s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path))
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split("Created experiment ", 1)[1].split()[0])

    def events(self, exp_id: int) -> list[dict[str, Any]]:
        return self.get(f"/api/v1/experiments/{exp_id}/events")  # type: ignore[no-any-return]

    def ended(self, exp_id: int) -> dict[str, Any] | None:
        exp = self.get(f"/api/v1/experiments/{exp_id}")
        return exp if exp.get("state") in ("COMPLETED", "ERROR", "CANCELED") else None

    def live_agents(self) -> dict[str, dict[str, Any]]:
        return {a["worker_id"]: a for a in self.get("/api/v1/agents") if not a["lost"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("agents")
    # The agents' work dirs: passable for the unprivileged user their trials run as (pytest's tmp is 0700).
    work = Path(tempfile.mkdtemp(prefix="kiln-agents-"))
    work.chmod(0o755)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        yield from _cluster(logs, work)


def _cluster(logs: Path, work: Path) -> Iterator[Cluster]:
    with vhosts.virtual_hosts(2) as net, \
            local_stack("kiln-hosts-", host=net.control, workers=0, remote_workers=list(WORKERS)) as s:
        c = Cluster(s, net, logs)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env["KILN_PING_INTERVAL_S"] = "1"  # notice a cut link within seconds
        for worker, host in c.host_of.items():
            agent_env = stack.agent_env_path(s.cfg, worker)
            assert oct(agent_env.stat().st_mode & 0o777) == "0o600"
            host.start([sys.executable, "-m", "kiln.cli", "worker", "--env-file", str(agent_env),
                        "--address", host.address, "--slots", "1", "--pool", "default",
                        "--work-dir", str(work / worker)], env=env, log=logs / f"{worker}.log", cwd=REPO)
        agents = wait_for(lambda: (a := c.live_agents()) and len(a) == 2 and a, timeout=90,
                          what="both remote agents heartbeating")
        assert {a["address"] for a in agents.values()} == {h.address for h in net.hosts}
        yield c


def test_a_two_slot_trial_spans_two_hosts_in_their_own_namespaces(cluster: Cluster, tmp_path: Path) -> None:
    steps = 4
    exp_id = cluster.submit(tmp_path, SPANNING_TRAIN.replace("STEPS", str(steps)).replace("DELAY", "0.2"),
                            textwrap.dedent(f"""\
        name: spanning-hosts
        entrypoint: python3 train.py
        searcher: {{name: single, metric: accuracy, smaller_is_better: false, max_length: {{batches: {steps}}}}}
        resources: {{slots_per_trial: 2}}
        max_restarts: 0
    """))
    exp = wait_for(lambda: cluster.ended(exp_id), timeout=240, what="the spanning experiment")
    assert exp["state"] == "COMPLETED", cluster.events(exp_id)
    (trial,) = cluster.get(f"/api/v1/experiments/{exp_id}/trials")
    # One world of two ranks on the two hosts; node 0's rendezvous was at its own address.
    assert trial["latest_validation"]["metrics"] == {"accuracy": 1.0, "world": 2, "hosts": 2}
    assigned = [e["event"] for e in cluster.events(exp_id) if e["type"] == "AllocationAssigned"]
    assert sorted(a["worker_id"] for a in assigned) == sorted(WORKERS)
    (node0,) = [a for a in assigned if a.get("node_rank", 0) == 0]
    assert [n["address"] for n in node0["nodes"]] == [cluster.host_of[n["worker_id"]].address for n in node0["nodes"]]
    # Its checkpoints went to the shared store, from the host of rank 0.
    checkpoints = cluster.get(f"/api/v1/experiments/{exp_id}/checkpoints")
    assert len(checkpoints) == steps and all(c["storage"].startswith("s3://") for c in checkpoints)


def test_a_cut_host_is_declared_lost_its_trial_resumes_elsewhere_and_its_late_reports_are_fenced(
        cluster: Cluster, tmp_path: Path) -> None:
    exp_id = cluster.submit(tmp_path, CUT_TRAIN, textwrap.dedent(f"""\
        name: cut-host
        entrypoint: python3 train.py
        searcher: {{name: single, metric: accuracy, smaller_is_better: false, max_length: {{batches: {STEPS}}}}}
        max_restarts: 2
    """))

    def running(min_steps: int, restarts: int) -> dict[str, Any] | None:
        trials = cluster.get(f"/api/v1/experiments/{exp_id}/trials")
        ok = trials and trials[0]["state"] == "RUNNING" and trials[0]["restarts"] == restarts \
            and (trials[0]["steps_completed"] or 0) >= min_steps
        return trials[0] if ok else None  # type: ignore[no-any-return]

    trial = wait_for(lambda: running(7, 0), timeout=120, what="the trial running with a checkpoint (step 5)")
    (first,) = [e["event"] for e in cluster.events(exp_id) if e["type"] == "AllocationAssigned"]
    victim = cluster.host_of[first["worker_id"]]
    victim.cut()
    try:
        # Declared lost (heartbeats stop), restarted on the other host from its last published checkpoint.
        wait_for(lambda: running(1, 1), timeout=120, what="the trial running again, elsewhere")
        assigned = [e["event"] for e in cluster.events(exp_id) if e["type"] == "AllocationAssigned"]
        second = assigned[-1]
        assert second["worker_id"] != first["worker_id"] and second["latest_checkpoint"]
        resumed_from = cluster.get(f"/api/v1/checkpoints/{second['latest_checkpoint']}")["steps_completed"]

        def new_run_reporting() -> bool:
            points = cluster.s.http.get(f"/api/v1/trials/{trial['id']}/metrics", params={"kind": "validation"}).json()
            return len([p for p in points if p["metrics"].get("host") == second["worker_id"]]) >= 2

        wait_for(new_run_reporting, timeout=120, what="the new run reporting")
    finally:
        victim.restore()

    def stale_run_killed() -> list[dict[str, Any]]:
        return [e["event"] for e in cluster.events(exp_id) if e["type"] == "AllocationExited"
                and e["event"]["allocation_id"] == first["allocation_id"]]

    # Back on the network, the cut-off worker hears it was declared lost and kills the run it still had.
    (stale_exit,) = wait_for(stale_run_killed, timeout=120, what="the stale run's exit")
    assert stale_exit["killed"] is True and stale_exit["worker_id"] == first["worker_id"]
    exp = wait_for(lambda: cluster.ended(exp_id), timeout=180, what="the experiment's end")
    assert exp["state"] == "COMPLETED"

    events = cluster.events(exp_id)
    kinds = [e["type"] for e in events]
    assert kinds.count("AllocationLost") == 1 and kinds.count("TrialRestarting") == 1
    lost = [e["event"] for e in events if e["type"] == "AllocationLost"][0]
    assert lost["allocation_id"] == first["allocation_id"]
    # The stale run did report while it was cut off (its outbox kept it), and those reports reached the log
    # after the loss: the fencing had something to refuse.
    seq_lost = next(e["seq"] for e in events if e["type"] == "AllocationLost")
    late = [e for e in events if e["type"] == "ValidationReported" and e["seq"] > seq_lost
            and e["event"].get("allocation_id") == first["allocation_id"]]
    assert late and max(e["event"]["steps_completed"] for e in late) > resumed_from
    # ...and none of them reached the read model: every step once, each after the resume from the new host.
    points = cluster.s.http.get(f"/api/v1/trials/{trial['id']}/metrics", params={"kind": "validation"}).json()
    assert [p["steps_completed"] for p in points] == list(range(1, STEPS + 1))
    by_step = {p["steps_completed"]: p["metrics"] for p in points}
    stale_key = f"by_{first['worker_id']}"
    assert [e["event"]["steps_completed"] for e in late if stale_key in by_step[e["event"]["steps_completed"]]] == []
    hosts = {p["steps_completed"]: p["metrics"]["host"] for p in points}
    assert {hosts[s] for s in range(resumed_from + 1, STEPS + 1)} == {second["worker_id"]}
    assert {hosts[s] for s in range(1, resumed_from + 1)} == {first["worker_id"]}
    detail = cluster.get(f"/api/v1/trials/{trial['id']}")
    assert detail["restarts"] == 1 and detail["steps_completed"] == STEPS
    # The trial's latest checkpoint is the new run's last one, not one the stale run stored late.
    latest = cluster.get(f"/api/v1/checkpoints/{detail['latest_checkpoint']}")
    assert latest["steps_completed"] == STEPS
