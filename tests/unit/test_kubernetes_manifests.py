"""deploy/kubernetes/ and deploy/systemd/: valid objects, probes, GPUs, and settings the services really read."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy import cluster, stack
from services.gateway.main import GatewaySettings
from services.runtime import BusSettings, S3Settings
from services.scheduler.main import SchedulerSettings
from services.searcher.main import SearcherSettings
from services.tracker.main import TrackerSettings
from services.worker.main import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
SYSTEMD = REPO / "deploy" / "systemd"
KUBERNETES_VERSION = "1.33.0"
SETTINGS = (BusSettings, S3Settings, GatewaySettings, TrackerSettings, SearcherSettings, SchedulerSettings,
            WorkerSettings)
KNOWN_SETTINGS = {f"KILN_{field.upper()}" for cls in SETTINGS for field in cls.__struct_fields__}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _secrets() -> list[dict[str, Any]]:
    creds = stack.Credentials(nats={u: f"pw-{u}" for u in cluster.users(cluster.EXAMPLE_WORKERS)},
                              pg_password="pg", s3_access_key="ak", s3_secret_key="sk", admin_password="adm")
    return cluster.secrets_manifests(cluster.EXAMPLE_WORKERS, creds, "postgresql://kiln:pg@db:5432/kiln")


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "DaemonSet", "Job")}


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_object_and_secret_validates_against_the_kubernetes_schemas() -> None:
    docs = _docs(K8S / "kiln.yaml") + _secrets()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Job", "Deployment", "Service", "DaemonSet", "Secret"}
    for doc in docs:
        _validate(doc)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check can fail: an unknown field and a wrongly typed one are refused, naming the field."""
    deployment = next(d for d in _docs(K8S / "kiln.yaml") if d["kind"] == "Deployment")
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        _validate(unknown)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError, match="'one' is not of type"):
        _validate(wrong)


def test_services_and_workers_have_readiness_and_liveness_probes() -> None:
    docs = _docs(K8S / "kiln.yaml")
    long_running = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    assert {d["metadata"]["name"] for d in long_running} == {
        "kiln-gateway", "kiln-tracker", "kiln-searcher", "kiln-scheduler", "kiln-worker"}
    for d in long_running:
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert "readinessProbe" in container and "livenessProbe" in container, d["metadata"]["name"]
        ready = container["readinessProbe"].get("httpGet", {})
        assert ready.get("path") == "/health", d["metadata"]["name"]


def test_the_worker_daemonset_takes_gpus_and_keeps_its_outbox_on_the_node() -> None:
    (worker,) = [d for d in _docs(K8S / "kiln.yaml") if d["kind"] == "DaemonSet"]
    spec = worker["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["hostNetwork"] is True  # the rendezvous of a trial spanning nodes listens on the node's address
    work = next(v for v in spec["volumes"] if v["name"] == "work")
    assert "hostPath" in work
    env = {e["name"]: e for e in container["env"]}
    assert env["KILN_WORK_DIR"]["value"] == next(m["mountPath"] for m in container["volumeMounts"]
                                                 if m["name"] == "work")
    assert env["KILN_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_every_setting_the_manifests_set_is_one_a_service_reads() -> None:
    docs = _docs(K8S / "kiln.yaml")
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    names = set(config["data"])
    for spec in _pod_specs(docs).values():
        for c in spec["containers"]:
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("KILN_")}
    # Set by the worker's own start command, not in env: the id, its NATS user and its password file.
    names |= {"KILN_WORKER_ID", "KILN_NATS_USER", "KILN_NATS_PASSWORD_FILE"}
    unknown = sorted(names - KNOWN_SETTINGS)
    assert not unknown, f"settings no service reads: {unknown}"


def test_secret_references_name_keys_the_secrets_command_writes() -> None:
    written = {(s["metadata"]["name"], key) for s in _secrets() for key in s["stringData"]}
    for name, spec in _pod_specs(_docs(K8S / "kiln.yaml")).items():
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert (ref["name"], ref["key"]) in written, (name, e["name"], ref)
        for v in spec.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in {n for n, _ in written}
    # The NATS pods' password variables come from the Secret with every user.
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    for var, source in values["container"]["env"].items():
        ref = source["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) in written and var == cluster.env_var(ref["key"])


def test_the_commands_run_modules_that_exist() -> None:
    for name, spec in _pod_specs(_docs(K8S / "kiln.yaml")).items():
        for c in spec["containers"]:
            line = " ".join(c["command"])
            modules = [w for w in line.replace('"', " ").split() if w.startswith(("services.", "deploy."))]
            assert modules, name
            for module in modules:
                assert importlib.util.find_spec(module) is not None, (name, module)


def test_nats_values_are_current_and_give_each_user_a_password_from_the_secret() -> None:
    text = (K8S / "nats-values.yaml").read_text()
    assert text == cluster.nats_values_text(cluster.EXAMPLE_WORKERS), \
        "stale: python -m deploy.cluster nats-values " + " ".join(cluster.EXAMPLE_WORKERS)
    values = yaml.safe_load(text)
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True
    users = values["config"]["merge"]["accounts"][cluster.ACCOUNT]["users"]
    assert [u["user"] for u in users] == list(cluster.users(cluster.EXAMPLE_WORKERS))
    for u in users:
        assert u["password"] == f"<< ${cluster.env_var(u['user'])} >>"  # no password in the values
        assert ("permissions" in u) == (u["user"] != "admin")
    (worker,) = [u for u in users if u["user"] == "worker-gpu-node-0"]
    assert "kiln.heartbeat.worker-gpu-node-0" in worker["permissions"]["publish"]["allow"]


def test_node_names_become_worker_ids_nats_accepts() -> None:
    assert cluster.worker_id_for_node("gpu-a.us-east1.internal") == "worker-gpu-a-us-east1-internal"
    with pytest.raises(ValueError, match="must start with 'worker-'"):
        cluster.users(["gpu-a"])


def test_systemd_worker_unit_and_env_file(tmp_path: Path) -> None:
    unit = (SYSTEMD / "kiln-worker.service").read_text()
    assert "EnvironmentFile=/etc/kiln/worker.env" in unit and "ExecStart=/opt/kiln/.venv/bin/kiln worker" in unit
    env = cluster.read_env_file(SYSTEMD / "kiln-worker.env.example")
    unknown = sorted(set(env) - KNOWN_SETTINGS)
    assert not unknown, f"settings no service reads: {unknown}"
    assert env["KILN_NATS_USER"] == env["KILN_WORKER_ID"]
    assert len(BusSettings(nats_url=env["KILN_NATS_URL"]).servers) == 3
    # The env file a control plane writes for an agent reads back the same.
    made = cluster.agent_env(worker_id="worker-x", nats_urls=["nats://a:1", "nats://b:2"], password='p"w $x',
                             s3_endpoint="s3:1", s3_access_key="a", s3_secret_key="s", master_url="http://m:1")
    (tmp_path / "agent.env").write_text(cluster.env_file_text(made))
    assert cluster.read_env_file(tmp_path / "agent.env") == made


def test_a_worker_pod_computes_its_id_without_the_local_stack_s_tools() -> None:
    """The DaemonSet runs `python -m deploy.cluster worker-id` in the image, which has no supervisor, no weed."""
    import subprocess
    import sys

    code = ("import sys; from deploy import cluster; print(cluster.worker_id_for_node('gpu-1.zone'));"
            " print(sorted(m for m in ('supervisor', 'minio', 'deploy.stack', 'deploy.parts') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split("\n")[:2] == ["worker-gpu-1-zone", "[]"]
