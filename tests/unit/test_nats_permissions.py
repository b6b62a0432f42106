"""The stack's NATS permissions, as generated (deploy.stack): least privilege, read off the config."""

from __future__ import annotations

from deploy import stack
from schemas import subjects
from tests.unit.test_subjects import _matches

USERS = stack.nats_users(2)
PERMS = stack.nats_permissions(USERS)


def test_every_user_but_admin_is_restricted_and_each_worker_has_its_own() -> None:
    assert set(USERS) == {"gateway", "searcher", "scheduler", "tracker", "admin", "reader", "worker-0", "worker-1"}
    assert set(PERMS) == set(USERS) - {"admin"}
    assert "trial" not in USERS and "worker" not in USERS


def test_nobody_but_admin_manages_streams_or_reads_messages_by_body() -> None:
    for user, perms in PERMS.items():
        allow = perms["publish"].get("allow", [])
        for api in ("STREAM.CREATE", "STREAM.DELETE", "STREAM.UPDATE", "STREAM.PURGE", "STREAM.MSG.GET"):
            assert not any(api in a or a in (">", "$JS.>", "$JS.API.>") for a in allow), (user, api)
        assert perms["publish"].get("deny") in (stack._STREAM_ADMIN, [">"])


def test_each_user_subscribes_to_its_own_inbox_only() -> None:
    for user, perms in PERMS.items():
        inboxes = [s for s in perms["subscribe"]["allow"] if s.startswith("_INBOX")]
        assert inboxes == [f"_INBOX_{user}.>"], user
        assert ">" not in perms["subscribe"]["allow"]


def test_only_the_gateway_may_publish_a_submission() -> None:
    submitted = "kiln.events.5.experiment.gateway"
    may = [u for u, perms in PERMS.items() if any(_matches(a, submitted) for a in perms["publish"].get("allow", []))]
    assert may == ["gateway"]


def test_a_worker_publishes_on_its_own_subjects_only() -> None:
    allow = PERMS["worker-0"]["publish"]["allow"]
    assert any(_matches(a, "kiln.metrics.5.6.w-worker-0") for a in allow)
    assert any(_matches(a, "kiln.heartbeat.worker-0") for a in allow)
    for subject in ("kiln.metrics.5.6.w-worker-1", "kiln.heartbeat.worker-1", "kiln.events.5.trial.6.searcher",
                    "kiln.events.5.experiment.w-worker-0", "$KV.kiln_snapshots.searcher"):
        assert not any(_matches(a, subject) for a in allow), subject


def test_snapshot_keys_are_their_owners_alone() -> None:
    key = "$JS.API.DIRECT.GET.KV_kiln_snapshots.$KV.kiln_snapshots.searcher"
    may = [u for u, perms in PERMS.items() if any(_matches(a, key) for a in perms["publish"].get("allow", []))]
    assert may == ["searcher"]
    assert subjects.HEARTBEAT_SUBJECT in PERMS["scheduler"]["subscribe"]["allow"]
