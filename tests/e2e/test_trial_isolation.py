"""A trial is confined: it can store and read its own experiment's checkpoints and nothing else.

Replays the attacks found against the stack: from a real trial, list the bucket, read, overwrite and delete
another experiment's checkpoint (anonymously and through presigned URLs asked of the worker), read the
stack's credentials and a service's environment. Each is refused, and the other experiment's checkpoint is
still downloadable afterwards. The trial's work dir is 0700 and its user's while it runs, and ended
allocations' work dirs are pruned to the newest few.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

# Stores one checkpoint and completes.
VICTIM = textwrap.dedent("""\
    import kiln as det

    with det.core.init() as ctx:
        with ctx.checkpoint.store_path({"steps_completed": 1}) as (path, _):
            (path / "weights.bin").write_bytes(b"precious weights" * 1000)
        ctx.train.report_validation_metrics(steps_completed=1, metrics={"accuracy": 1.0})
""")

# Tries everything it should not be able to do and prints what happened as one JSON line.
ATTACKER = textwrap.dedent("""\
    import json, os, pathlib, urllib.error, urllib.request
    import kiln as det
    from kiln.core._bus import LinkError
    from kiln._info import wire_cluster_info

    info = det.get_cluster_info()
    data = info.trial.user_data
    victim, state = data["victim_key"], pathlib.Path(data["state_dir"])
    wire = wire_cluster_info()
    s3 = "http://" + wire.s3_endpoint + "/" + wire.s3_bucket
    out = {"uid": os.getuid(), "env": dict(os.environ)}

    def http(method, url):
        try:
            request = urllib.request.Request(url, method=method, data=b"x" if method == "PUT" else None)
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except Exception as exc:
            return repr(exc)

    # The store without a credential: list, read, overwrite, delete.
    out["anon"] = {m: http(m, s3 + "/" + victim) for m in ("GET", "PUT", "DELETE")}
    out["anon"]["LIST"] = http("GET", s3 + "?list-type=2")
    if data.get("weed_ports"):
        # SeaweedFS's own APIs behind S3 (filer, volume server, master), on loopback like S3: plain HTTP, and
        # HTTPS without a client certificate; gRPC in the clear (HTTP/2 prior knowledge) and over TLS.
        import socket, ssl
        host, ports, bucket = wire.s3_endpoint.split(":")[0], data["weed_ports"], wire.s3_bucket
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE

        def http2(method, url):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10, context=tls) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except Exception as exc:
                return repr(exc)

        key = "/buckets/" + bucket + "/" + victim
        paths = {"filer": [("GET", key), ("DELETE", key), ("GET", "/buckets/" + bucket + "/checkpoints/")],
                 "volume": [("GET", "/status"), ("GET", "/1,01")],
                 "master": [("GET", "/dir/status"), ("GET", "/dir/assign"),
                            ("GET", "/col/delete?collection=" + bucket)]}
        out["weed_http"] = {}
        for name, reqs in paths.items():
            for method, path in reqs:
                for scheme in ("http", "https"):
                    url = scheme + "://" + host + ":" + str(ports[name]) + path
                    out["weed_http"][method + " " + scheme + "://" + name + path] = http2(method, url)
        preface = b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
        out["weed_grpc"] = {}
        for name, port in ports.items():
            if not name.endswith("grpc"):
                continue
            try:
                with socket.create_connection((host, port), timeout=5) as sock:
                    sock.sendall(preface)
                    got = sock.recv(64)
                out["weed_grpc"][name + " plain"] = "answered: " + repr(got) if got else "closed"
            except OSError as exc:
                out["weed_grpc"][name + " plain"] = "refused: " + repr(exc)
            try:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                ctx.set_alpn_protocols(["h2"])
                with ctx.wrap_socket(socket.create_connection((host, port), timeout=5)) as sock:
                    sock.sendall(preface)
                    got = sock.recv(64)
                out["weed_grpc"][name + " tls"] = "answered: " + repr(got) if got else "closed"
            except OSError as exc:
                out["weed_grpc"][name + " tls"] = "refused: " + repr(exc)

    def attempt(fn):
        try:
            return "allowed: " + str(fn())[:200]
        except (LinkError, OSError) as exc:
            return "refused: " + str(exc)

    with det.core.init() as ctx:
        link = ctx._reporter
        # Through the worker: presign another experiment's key, list outside its own prefix.
        out["presign_get"] = attempt(lambda: link.presign("GET", victim))
        out["presign_put"] = attempt(lambda: link.presign("PUT", victim))
        escape = "checkpoints/%d/../%s" % (info.trial.experiment_id, victim)
        out["presign_escape"] = attempt(lambda: link.presign("GET", escape))
        out["list_bucket"] = attempt(lambda: link.list_keys(""))
        out["list_checkpoints"] = attempt(lambda: link.list_keys("checkpoints/"))
        # TensorBoard files: its own trial's prefix only, and write only.
        own_board = "tensorboard/%d/%d/" % (info.trial.experiment_id, info.trial.trial_id)
        out["board_other_trial"] = attempt(lambda: link.presign(
            "PUT", "tensorboard/%d/%d/x" % (info.trial.experiment_id, info.trial.trial_id + 1)))
        out["board_read"] = attempt(lambda: link.presign("GET", own_board + "x"))
        out["board_own"] = attempt(lambda: link.presign("PUT", own_board + "x"))
        # Its own checkpoints work.
        with ctx.checkpoint.store_path({"steps_completed": 1}) as (path, sid):
            (path / "mine.txt").write_text("mine")
        with ctx.checkpoint.restore_path(sid) as path:
            out["own_roundtrip"] = (path / "mine.txt").read_text()
        # The OS: the stack's secrets, the services' environments.
        out["credentials"] = attempt(lambda: (state / "credentials.json").read_text())
        out["state_listing"] = attempt(lambda: os.listdir(state))
        out["s3_data"] = attempt(lambda: os.listdir(state / "s3"))
        out["logs"] = attempt(lambda: (state / "logs" / "gateway.log").read_text())
        out["outbox"] = attempt(lambda: (pathlib.Path.cwd().parent / "outbox.sqlite").read_bytes())
        environs = {}
        for proc in pathlib.Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\\0", b" ").decode()
            except OSError:
                continue
            for svc in ("services.gateway.main", "services.worker.main", "services.tracker.main", "nats-server",
                        "weed"):
                if svc in cmd and svc not in environs:
                    environs[svc] = attempt(lambda: (proc / "environ").read_bytes())
        out["environ"] = environs
        work = pathlib.Path.cwd().stat()
        out["work_dir"] = {"uid": work.st_uid, "mode": oct(work.st_mode & 0o777)}
        print("ATTACK " + json.dumps(out), flush=True)
        ctx.train.report_validation_metrics(steps_completed=1, metrics={"accuracy": 1.0})
""")


def _config(name: str, data: dict[str, Any] | None = None) -> str:
    cfg = {"name": name, "entrypoint": "python3 train.py",
           "searcher": {"name": "single", "metric": "accuracy", "max_length": {"batches": 1}}, "max_restarts": 0}
    if data:
        cfg["data"] = data
    return json.dumps(cfg)


_wait = functools.partial(wait_for, timeout=120.0, poll_s=0.3)


def _run(stack: Stack, tmp: Path, script: str, cfg: str) -> dict[str, Any]:
    tmp.mkdir()
    (tmp / "train.py").write_text(script)
    (tmp / "cfg.yaml").write_text(cfg)
    created = stack.kiln("experiment", "create", str(tmp / "cfg.yaml"), str(tmp))
    assert created.returncode == 0, created.stderr
    exp_id = int(created.stdout.split("Created experiment ", 1)[1].split()[0])
    api = stack.http
    exp = _wait(lambda: (e := api.get(f"/api/v1/experiments/{exp_id}").json())["state"] in
                ("COMPLETED", "ERROR", "CANCELED") and e, what=f"experiment {exp_id} to end")
    trial = api.get(f"/api/v1/experiments/{exp_id}/trials").json()[0]
    logs = api.get(f"/api/v1/trials/{trial['id']}/logs").json()
    assert exp["state"] == "COMPLETED", "\n".join(line["text"] for line in logs)
    return {"exp": exp_id, "trial": trial, "logs": logs}


def _download(stack: Stack, uuid: str) -> dict[str, bytes]:
    resp = stack.http.get(f"/api/v1/checkpoints/{uuid}/download")
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_a_trial_reaches_only_its_own_experiments_checkpoints_and_no_secret(kiln_stack: Stack,
                                                                          tmp_path: Path) -> None:
    victim = _run(kiln_stack, tmp_path / "victim", VICTIM, _config("victim"))
    ckpt = kiln_stack.http.get(f"/api/v1/trials/{victim['trial']['id']}/checkpoints").json()[0]
    assert ckpt["storage"].endswith(f"/checkpoints/{victim['exp']}")  # grouped by experiment
    before = _download(kiln_stack, ckpt["uuid"])
    assert before["weights.bin"] == b"precious weights" * 1000
    victim_key = f"checkpoints/{victim['exp']}/{ckpt['uuid']}/weights.bin"

    attacker = _run(kiln_stack, tmp_path / "attacker", ATTACKER,
                    _config("attacker", {"victim_key": victim_key, "state_dir": str(kiln_stack.cfg.state_dir)}))
    line = next(x["text"] for x in attacker["logs"] if x["text"].startswith("ATTACK "))
    out = json.loads(line.removeprefix("ATTACK "))

    # The store: nothing without a credential, nothing outside its prefix through the worker.
    assert out["anon"] == {"GET": 403, "PUT": 403, "DELETE": 403, "LIST": 403}, out["anon"]
    for what in ("presign_get", "presign_put", "presign_escape", "list_bucket", "list_checkpoints",
                 "board_other_trial", "board_read"):
        assert out[what].startswith("refused: "), (what, out[what])
    assert out["board_own"].startswith("allowed: "), out["board_own"]
    assert out["own_roundtrip"] == "mine"
    # The OS: no secret of the stack is readable, none is in its environment. (A stack that is not root runs
    # trials as its own user: then only the environment is checked.)
    assert (out["uid"] != 0) == (os.geteuid() == 0)
    if os.geteuid() == 0:
        for what in ("credentials", "state_listing", "s3_data", "logs", "outbox"):
            assert out[what].startswith("refused: ") and "Permission denied" in out[what], (what, out[what])
        assert set(out["environ"]) >= {"services.gateway.main", "services.worker.main", "nats-server"}
        for svc, got in out["environ"].items():
            assert got.startswith("refused: "), (svc, got)
        assert out["work_dir"]["mode"] == "0o700" and out["work_dir"]["uid"] == out["uid"]
    env_text = json.dumps(out["env"])
    creds = kiln_stack.creds
    for secret in (creds.s3_access_key, creds.s3_secret_key, creds.pg_password, *creds.nats.values()):
        assert secret not in env_text

    # The victim's checkpoint is intact and still downloadable.
    assert _download(kiln_stack, ckpt["uuid"]) == before

    # Ended allocations' work dirs: the newest few are kept, the rest removed.
    work = kiln_stack.cfg.state_dir / "work"
    for worker_dir in work.glob("worker-*"):
        allocs = [d for d in worker_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
        assert len(allocs) <= 5 + 1, (worker_dir, allocs)
        for d in allocs:
            st = d.stat()
            assert st.st_mode & 0o777 == 0o700 and st.st_uid == out["uid"]


def _weed_ports(stack: Stack) -> dict[str, int]:
    # deploy.parts.weed_ports: HTTP at s3_ports_base + 0..2, gRPC at + 10000..10004 (master, volume, filer, admin, S3).
    b = stack.cfg.s3_ports_base
    names = ("master", "volume", "filer", "admin", "s3")
    return {"master": b, "volume": b + 1, "filer": b + 2, **{f"{n}.grpc": b + 10000 + i for i, n in enumerate(names)}}


def test_a_trial_cannot_go_around_s3_to_the_stores_own_apis(kiln_stack: Stack, tmp_path: Path) -> None:
    victim = _run(kiln_stack, tmp_path / "victim", VICTIM, _config("victim"))
    ckpt = kiln_stack.http.get(f"/api/v1/trials/{victim['trial']['id']}/checkpoints").json()[0]
    victim_key = f"checkpoints/{victim['exp']}/{ckpt['uuid']}/weights.bin"
    before = _download(kiln_stack, ckpt["uuid"])
    attacker = _run(kiln_stack, tmp_path / "attacker", ATTACKER,
                    _config("attacker", {"victim_key": victim_key, "state_dir": str(kiln_stack.cfg.state_dir),
                                         "weed_ports": _weed_ports(kiln_stack)}))
    line = next(x["text"] for x in attacker["logs"] if x["text"].startswith("ATTACK "))
    out = json.loads(line.removeprefix("ATTACK "))
    # weed's HTTP APIs are HTTPS with client certificates only (deploy.parts.weed_security): plain HTTP is a 400
    # ("Client sent an HTTP request to an HTTPS server"; a DELETE is hung up on unanswered), HTTPS without a
    # certificate fails the handshake.
    for what, got in out["weed_http"].items():
        if what.split()[1].startswith("http:"):
            assert got == 400 or (isinstance(got, str) and "RemoteDisconnected" in got), (what, got)
        else:
            assert isinstance(got, str) and "CERTIFICATE_REQUIRED" in got, (what, got)
    # gRPC is mutual TLS: in the clear the server hangs up, over TLS without a certificate the handshake fails.
    assert len(out["weed_grpc"]) == 2 * 5, out["weed_grpc"]
    for what, got in out["weed_grpc"].items():
        if what.endswith(" plain"):
            assert got == "closed" or got.startswith("refused: "), (what, got)
        else:
            assert got.startswith("refused: ") and "CERTIFICATE_REQUIRED" in got, (what, got)
    # The victim's checkpoint survived (the master's /col/delete would have dropped the bucket's volumes).
    assert _download(kiln_stack, ckpt["uuid"]) == before
