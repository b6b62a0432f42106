"""The pure rules of continue, fork and fine-tune: override merge, which trials a continue reruns, what a
fine-tune may start from, and what its trial may read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kiln.cli import override_document
from schemas import api
from schemas.config import ConfigError, load_overrides, merge_overrides, parse_config
from schemas.trial import INVALID_HP_EXIT_CODE, stored_checkpoint_prefix
from services.gateway.continuation import Refused, TrialFacts, continue_trials, override_problems, source_problem
from services.worker.link import StoreGrant, store_refusal

BASE = {
    "name": "base",
    "entrypoint": "python3 train.py",
    "hyperparameters": {"lr": {"type": "double", "minval": 0.01, "maxval": 0.1}, "width": 8},
    "searcher": {"name": "single", "metric": "loss", "max_length": {"batches": 5}},
    "environment": {"environment_variables": ["A=1"]},
}


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, BASE),
    ({"searcher": {"max_length": {"batches": 50}}},
     {**BASE, "searcher": {"name": "single", "metric": "loss", "max_length": {"batches": 50}}}),
    # A length is one choice of unit: the new one replaces the old, never {batches, epochs}.
    ({"searcher": {"max_length": {"epochs": 2}}},
     {**BASE, "searcher": {"name": "single", "metric": "loss", "max_length": {"epochs": 2}}}),
    # A hyperparameter of another type replaces the old one whole; a plain value replaces a mapping.
    ({"hyperparameters": {"lr": {"type": "const", "val": 0.5}, "width": {"type": "int", "minval": 1, "maxval": 4}}},
     {**BASE, "hyperparameters": {"lr": {"type": "const", "val": 0.5}, "width": {"type": "int", "minval": 1,
                                                                                 "maxval": 4}}}),
    ({"hyperparameters": {"lr": {"maxval": 0.2}}},
     {**BASE, "hyperparameters": {"lr": {"type": "double", "minval": 0.01, "maxval": 0.2}, "width": 8}}),
    # Lists are replaced, new keys added.
    ({"environment": {"environment_variables": ["B=2"]}, "description": "d"},
     {**BASE, "environment": {"environment_variables": ["B=2"]}, "description": "d"}),
])
def test_overrides_merge_into_the_config(overrides: dict[str, object], expected: dict[str, object]) -> None:
    assert merge_overrides(BASE, overrides) == expected
    parse_config(merge_overrides(BASE, overrides))  # and the result is a valid config


def test_merging_leaves_both_documents_as_they_were() -> None:
    overrides = {"searcher": {"max_length": {"batches": 9}}}
    merge_overrides(BASE, overrides)
    assert BASE["searcher"] == {"name": "single", "metric": "loss", "max_length": {"batches": 5}}


def test_an_override_document_is_a_yaml_mapping() -> None:
    assert load_overrides("") == {} and load_overrides("  \n") == {}
    assert load_overrides("searcher: {max_length: {batches: 9}}") == {"searcher": {"max_length": {"batches": 9}}}
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_overrides("[1, 2]")
    with pytest.raises(ConfigError, match="line 1"):
        load_overrides("a: [")


def test_the_cli_builds_one_override_document_from_files_and_key_values(tmp_path: Path) -> None:
    f = tmp_path / "o.yaml"
    f.write_text("searcher:\n  max_length: {batches: 20}\nname: from-file\n")
    assert override_document(()) == ""
    doc = load_overrides(override_document((str(f), "searcher.max_length.batches=30", "max_restarts=2")))
    assert doc == {"searcher": {"max_length": {"batches": 30}}, "name": "from-file", "max_restarts": 2}
    assert load_overrides(override_document(("name=x",), config_file="name: y\nlabels: [a]\n")) == \
        {"name": "x", "labels": ["a"]}
    with pytest.raises(ValueError, match="neither"):
        override_document((str(tmp_path / "missing.yaml"),))


def _trials(*rows: tuple[int, str, int | None]) -> list[TrialFacts]:
    return [TrialFacts(id=i, state=s, exit_code=c, latest_checkpoint=f"c{i}") for i, s, c in rows]


def test_a_single_search_continues_its_trial_whatever_its_end() -> None:
    for state in ("COMPLETED", "ERROR", "CANCELED"):
        assert continue_trials(1, state, "single", True, "single", _trials((7, state, None))) == [7]


def test_grid_and_random_rerun_what_did_not_complete_without_overrides() -> None:
    trials = _trials((1, "COMPLETED", 0), (2, "ERROR", 1), (3, "CANCELED", None), (4, "ERROR", INVALID_HP_EXIT_CODE))
    assert continue_trials(5, "ERROR", "random", False, "random", trials) == [2, 3]
    with pytest.raises(Refused) as refused:
        continue_trials(5, "ERROR", "grid", True, "grid", trials)
    assert refused.value.status == 400 and "override config is taken only by a single-trial search" in \
        refused.value.detail
    with pytest.raises(Refused) as done:
        continue_trials(5, "COMPLETED", "grid", False, "grid", _trials((1, "COMPLETED", 0)))
    assert done.value.status == 409 and "nothing to continue" in done.value.detail


@pytest.mark.parametrize(("state", "searcher", "continued", "status", "words"), [
    ("ACTIVE", "single", "single", 409, "only an ended experiment"),
    ("PAUSED", "single", "single", 409, "only an ended experiment"),
    ("COMPLETED", "adaptive_asha", "adaptive_asha", 400, "only single, grid, random searches"),
    ("COMPLETED", "single", "random", 400, "searcher.name must stay 'single'"),
])
def test_what_cannot_be_continued_is_refused_with_a_reason(state: str, searcher: str, continued: str, status: int,
                                                            words: str) -> None:
    with pytest.raises(Refused) as refused:
        continue_trials(9, state, searcher, False, continued, _trials((1, "ERROR", 1)))
    assert refused.value.status == status and words in refused.value.detail


def test_a_trial_whose_latest_checkpoint_was_deleted_is_not_silently_started_over() -> None:
    facts = [TrialFacts(id=1, state="COMPLETED", latest_checkpoint="gone", latest_checkpoint_deleted=True)]
    with pytest.raises(Refused) as refused:
        continue_trials(1, "COMPLETED", "single", True, "single", facts)
    assert refused.value.status == 409 and "gone was deleted" in refused.value.detail


def test_a_continue_may_not_move_the_experiment_or_change_its_source() -> None:
    problems = override_problems({"project": "p", "searcher": {"source_checkpoint_uuid": "u", "max_length": 3}})
    assert [p.path for p in problems] == ["project", "searcher.source_checkpoint_uuid"]
    assert override_problems({"searcher": {"max_length": {"batches": 3}}, "max_restarts": 1}) == []


def _checkpoint(storage: str, state: str = "COMPLETED") -> api.Checkpoint:
    return api.Checkpoint(uuid="u1", trial_id=2, experiment_id=3, steps_completed=5, storage=storage, resources={},
                          metadata={}, reported_at=datetime.now(UTC), state=state,  # type: ignore[arg-type]
                          delete_reason="retention: trial 2 exited" if state == "DELETED" else "")


def test_a_fine_tune_starts_from_a_live_checkpoint_in_the_cluster_store() -> None:
    assert source_problem(_checkpoint("s3://kiln/checkpoints/3"), "kiln") == ""
    assert "was deleted (retention: trial 2 exited)" in source_problem(_checkpoint("s3://kiln/checkpoints/3",
                                                                                   "DELETED"), "kiln")
    assert "outside the cluster's store" in source_problem(_checkpoint("s3://mine/ckpts"), "kiln")
    assert "outside the cluster's store" in source_problem(_checkpoint("file:///shared/ckpts"), "kiln")


@pytest.mark.parametrize(("storage", "uuid", "expected"), [
    ("s3://kiln/checkpoints/3", "u1", "checkpoints/3/u1"),
    ("s3://kiln/checkpoints/3/", "u1", "checkpoints/3/u1"),
    ("s3://other/checkpoints/3", "u1", None),
    ("s3://kiln/checkpoints/3/../4", "u1", None),
    ("s3://kiln/checkpoints/3", "..", None),
    ("s3://kiln/checkpoints/3", "a/b", None),
    ("file:///x", "u1", None),
])
def test_where_a_stored_checkpoint_lives(storage: str, uuid: str, expected: str | None) -> None:
    assert stored_checkpoint_prefix(storage, uuid, "kiln") == expected


def test_a_fine_tune_trial_may_read_its_source_and_nothing_else_of_that_experiment() -> None:
    grant = StoreGrant.of(8, ("checkpoints/3/u1",))
    assert store_refusal(grant, "GET", "checkpoints/3/u1/state_dict.pth") == ""
    assert store_refusal(grant, "LIST", "checkpoints/3/u1/") == ""
    assert store_refusal(grant, "PUT", "checkpoints/3/u1/x") != ""  # read only
    assert store_refusal(grant, "GET", "checkpoints/3/u2/state_dict.pth") != ""  # another checkpoint of it
    assert store_refusal(grant, "LIST", "checkpoints/3/") != ""
    assert store_refusal(grant, "GET", "checkpoints/3/u1x/a") != ""  # a uuid that merely starts the same
    assert store_refusal(grant, "PUT", "checkpoints/8/mine/a") == ""  # its own experiment, as before
