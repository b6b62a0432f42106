"""The scheduler core's seams: every DomainEvent routed by one table; the snapshot format kept."""

from __future__ import annotations

import base64
import typing

import msgspec
import pytest

from schemas import events as ev
from services.scheduler.core import _HANDLERS, SchedulerCore

# A snapshot written by the scheduler before its core was split into modules (state, lifecycle, placement,
# views): two 2-slot workers, experiment 1 (3 slots per trial, priority 7) paused, its trial 10 running on
# both workers with a checkpoint and a preemption requested, trial 11 queued.
OLD_SNAPSHOT = base64.b64decode(
    "had3b3JrZXJzgqJ3MYepd29ya2VyX2lkoncxrXJlc291cmNlX3Bvb2ynZGVmYXVsdKhzbG90X2lkc5KldzEtZzCldzEtZzGpbGFzdF9zZWVu"
    "y0CPQAAAAAAAp2FkZHJlc3OoMTAuMC4wLjGkbG9zdMKlc2xvdHOShqdzbG90X2lkpXcxLWcwpGtpbmSkY3VkYaRuYW1loKR1dWlkoKltZW1v"
    "cnlfbWIAq3V0aWxpemF0aW9uAIanc2xvdF9pZKV3MS1nMaRraW5kpGN1ZGGkbmFtZaCkdXVpZKCpbWVtb3J5X21iAKt1dGlsaXphdGlvbgCi"
    "dzKHqXdvcmtlcl9pZKJ3Mq1yZXNvdXJjZV9wb29sp2RlZmF1bHSoc2xvdF9pZHOSpXcyLWcwpXcyLWcxqWxhc3Rfc2VlbstAj0AAAAAAAKdh"
    "ZGRyZXNzqDEwLjAuMC4ypGxvc3TCpXNsb3Rzkoanc2xvdF9pZKV3Mi1nMKRraW5kpGN1ZGGkbmFtZaCkdXVpZKCpbWVtb3J5X21iAKt1dGls"
    "aXphdGlvbgCGp3Nsb3RfaWSldzItZzGka2luZKRjdWRhpG5hbWWgpHV1aWSgqW1lbW9yeV9tYgCrdXRpbGl6YXRpb24ApnRyaWFsc4IK3gAZ"
    "rWV4cGVyaW1lbnRfaWQBqHRyaWFsX2lkCqVzbG90cwOocHJpb3JpdHkHrXJlc291cmNlX3Bvb2ynZGVmYXVsdKxtYXhfcmVzdGFydHMFrHF1"
    "ZXVlZF9vcmRlcgClc3RhdGWnUlVOTklOR6dhdHRlbXB0AahyZXN0YXJ0cwCtYWxsb2NhdGlvbl9pZKQxMC4xqXdvcmtlcl9pZKJ3MahzbG90"
    "X2lkc5KldzEtZzCldzEtZzGlcGVlcnOBoncykaV3Mi1nMLFsYXRlc3RfY2hlY2twb2ludKJja65raWxsX3JlcXVlc3RlZMKqc3RhcnRlZF9h"
    "dMtAj0gAAAAAAKptYXhfbGVuZ3RowK9hc3NpZ25lZF9sZW5ndGjArnN0b3BfcmVxdWVzdGVkwrFwcmVlbXB0X3JlcXVlc3RlZMOtcHJlZW1w"
    "dF9zaW5jZcsAAAAAAAAAAK1zdGFydGVkX29yZGVyAKdocGFyYW1zgaJscss/uZmZmZmZmqRzZWVkCgveABmtZXhwZXJpbWVudF9pZAGodHJp"
    "YWxfaWQLpXNsb3RzA6hwcmlvcml0eQetcmVzb3VyY2VfcG9vbKdkZWZhdWx0rG1heF9yZXN0YXJ0cwWscXVldWVkX29yZGVyAaVzdGF0ZaZR"
    "VUVVRUSnYXR0ZW1wdACocmVzdGFydHMArWFsbG9jYXRpb25faWSgqXdvcmtlcl9pZKCoc2xvdF9pZHOQpXBlZXJzgLFsYXRlc3RfY2hlY2tw"
    "b2ludMCua2lsbF9yZXF1ZXN0ZWTCqnN0YXJ0ZWRfYXTLAAAAAAAAAACqbWF4X2xlbmd0aMCvYXNzaWduZWRfbGVuZ3RowK5zdG9wX3JlcXVl"
    "c3RlZMKxcHJlZW1wdF9yZXF1ZXN0ZWTCrXByZWVtcHRfc2luY2XLAAAAAAAAAACtc3RhcnRlZF9vcmRlcgCnaHBhcmFtc4GibHLLP7mZmZmZ"
    "mZqkc2VlZAurZXhwZXJpbWVudHOBAYyvc2xvdHNfcGVyX3RyaWFsA6hwcmlvcml0eQetcmVzb3VyY2VfcG9vbKdkZWZhdWx0rG1heF9yZXN0"
    "YXJ0cwWma2lsbGVkwqZwYXVzZWTDpndlaWdodMs/8AAAAAAAAKltYXhfc2xvdHPAqHBhdXNhYmxlwqtmdWxsX2xlbmd0aASmY29uZmlnhKRu"
    "YW1loXiqZW50cnlwb2ludKN0OlSoc2VhcmNoZXKDpG5hbWWmc2luZ2xlpm1ldHJpY6Rsb3Nzqm1heF9sZW5ndGiBp2JhdGNoZXMEqXJlc291"
    "cmNlc4Kvc2xvdHNfcGVyX3RyaWFsA6hwcmlvcml0eQeuY29udGV4dF9kaWdlc3Soc2hhMjU2OjCqbmV4dF9vcmRlcgKqbmV4dF9zdGFydAE="
)


def test_every_domain_event_has_exactly_one_handler() -> None:
    assert set(_HANDLERS) == set(typing.get_args(ev.DomainEvent))


@pytest.mark.parametrize(
    "event",
    [
        ev.ValidationReported(experiment_id=1, trial_id=10, steps_completed=4, metrics={"loss": 0.5}),
        ev.TrialProgressReported(experiment_id=1, trial_id=10, progress=0.5),
        ev.AllocationKillRequested(experiment_id=1, trial_id=10, allocation_id="10.1", worker_id="w1"),
        ev.TrialPreempted(experiment_id=1, trial_id=10, allocation_id="10.1"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_events_the_scheduler_has_no_use_for_change_nothing(event: ev.DomainEvent) -> None:
    core = SchedulerCore.restore(OLD_SNAPSHOT)
    before = core.snapshot()
    assert core.handle(event) == []
    assert core.snapshot() == before


# Fields added to the state since OLD_SNAPSHOT was written, with the defaults an old snapshot restores to.
ADDED_SINCE = {"workers": {"lost_at": 0.0}, "trials": {"lost_allocations": []}}


def _as_written_then(snapshot: bytes) -> object:
    """A snapshot decoded, less the fields added since OLD_SNAPSHOT (when they hold their defaults)."""
    data = msgspec.msgpack.decode(snapshot)
    for table, added in ADDED_SINCE.items():
        for row in data[table].values():
            for field, default in added.items():
                if row.get(field) == default:
                    del row[field]
    return data


def test_an_experiment_end_is_remembered_for_a_continue_and_an_old_snapshot_still_restores() -> None:
    # The scheduler keeps which experiments ended (only those may be continued) in a table of its own, so the
    # snapshot written before it existed still restores byte for byte; after an end it records the fact.
    core = SchedulerCore.restore(OLD_SNAPSHOT)
    assert core.handle(ev.ExperimentEnded(experiment_id=1, state="COMPLETED")) == []
    assert core.state.ended == {1}
    assert SchedulerCore.restore(core.snapshot()).state.ended == {1}


def test_an_old_snapshot_restores_to_the_same_state() -> None:
    core = SchedulerCore.restore(OLD_SNAPSHOT)
    # Byte for byte but for the fields added since, each with its default (state.py: added fields need one).
    assert _as_written_then(core.snapshot()) == msgspec.msgpack.decode(OLD_SNAPSHOT)
    run = core.state.trials[10]
    assert (run.state, run.worker_id, run.peers, run.latest_checkpoint, run.preempt_requested) == (
        "RUNNING", "w1", {"w2": ["w2-g0"]}, "ck", True)
    assert [r.trial_id for r in core.state.trials.values() if r.state == "QUEUED"] == [11]
    assert core.queue() == []  # its experiment is paused: waiting, but not in the queue
    assert core.state.experiments[1].paused and core.state.experiments[1].config is not None
    assert msgspec.msgpack.decode(OLD_SNAPSHOT).keys() == {"workers", "trials", "experiments", "next_order",
                                                            "next_start"}
