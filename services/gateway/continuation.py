"""Continue and fine-tune: the rules the gateway checks before it records anything (pure, no I/O).

``kiln experiment continue`` follows Determined's ``det experiment continue``: an ended experiment trains
again. A single-trial search takes an override config (a longer ``searcher.max_length``, more restarts...)
and its one trial resumes from its latest checkpoint; a grid or random search takes no overrides and reruns
the trials that did not complete; other searchers cannot be continued. The trials to continue are decided
here, from the read model, and recorded in the ``ExperimentContinued`` event, so a replay never decides again.

A fine-tune (``searcher.source_checkpoint_uuid`` or ``searcher.source_trial_id``) names a checkpoint every
trial starts from; ``source_problem`` says why one cannot be used.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import api
from schemas.trial import INVALID_HP_EXIT_CODE, stored_checkpoint_prefix

# As Determined: a single search takes overrides; grid and random rerun their unfinished trials as they were.
CONTINUABLE = ("single", "grid", "random")
ENDED = ("COMPLETED", "ERROR", "CANCELED")
# Override fields a continue refuses: where an experiment lives (Determined refuses them too), and the
# fine-tune's source (a continued trial resumes from its own checkpoint; fork to start from another).
_NOT_CONTINUED = {
    "project": "'project' cannot be changed by a continue",
    "workspace": "'workspace' cannot be changed by a continue",
}
_SOURCE_FIELDS = ("source_checkpoint_uuid", "source_trial_id")


class Refused(Exception):
    """A request the rules refuse: ``status`` (400, 403 or 409) and a message naming what is wrong."""

    def __init__(self, status: int, detail: str, path: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.path = path  # the config field at fault, for ``extra.errors``; "" when it is not about one


class TrialFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a continue needs to know of one trial (from the read model)."""

    id: int
    state: str
    exit_code: int | None = None
    latest_checkpoint: str | None = None
    latest_checkpoint_deleted: bool = False


def override_problems(overrides: dict[str, Any]) -> list[api.ConfigProblem]:
    """Fields an override config of a continue may not set."""
    problems = [api.ConfigProblem(path=key, message=why) for key, why in _NOT_CONTINUED.items() if key in overrides]
    searcher = overrides.get("searcher")
    if isinstance(searcher, dict):
        problems += [api.ConfigProblem(path=f"searcher.{key}", message="a continued trial resumes from its own latest"
                                       " checkpoint: fork the experiment to fine-tune from another one")
                     for key in _SOURCE_FIELDS if key in searcher]
    return problems


def continue_trials(experiment_id: int, state: str, searcher: str, overridden: bool, continued_searcher: str,
                    trials: list[TrialFacts]) -> list[int]:
    """The trials a continue of this experiment trains again; ``Refused`` when it cannot be continued.

    ``searcher``: the experiment's search method; ``overridden``: the request carries overrides;
    ``continued_searcher``: the method of the config with the overrides merged in."""
    if state not in ENDED:
        raise Refused(409, f"experiment {experiment_id} is {state}: only an ended experiment can be continued"
                           " (a paused one is activated)")
    if searcher not in CONTINUABLE:
        raise Refused(400, f"experiment {experiment_id} uses searcher {searcher!r}: as in Determined, only"
                           f" {', '.join(CONTINUABLE)} searches can be continued; fork it to train it again",
                      "searcher.name")
    if searcher != "single" and overridden:
        raise Refused(400, f"experiment {experiment_id} uses searcher {searcher!r}: as in Determined, an override"
                           " config is taken only by a single-trial search (searcher.name: single); continue it"
                           " without one (its unfinished trials run again as they were), or fork it")
    if continued_searcher != searcher:
        raise Refused(400, f"a continue keeps the search method: searcher.name must stay {searcher!r}, got"
                           f" {continued_searcher!r} (fork the experiment to search differently)", "searcher.name")
    if searcher == "single":
        chosen = list(trials)
    else:
        # Invalid hyperparameters would be as invalid again (and the search already replaced those trials).
        chosen = [t for t in trials if t.state != "COMPLETED" and t.exit_code != INVALID_HP_EXIT_CODE]
    if not chosen:
        raise Refused(409, f"experiment {experiment_id} has completed: every trial of it completed, so there is"
                           " nothing to continue (fork it to train again)")
    for t in chosen:
        if t.latest_checkpoint_deleted:
            raise Refused(409, f"trial {t.id}'s latest checkpoint {t.latest_checkpoint} was deleted: continuing"
                               " would start it over; fork the experiment instead")
    return [t.id for t in chosen]


def source_problem(checkpoint: api.Checkpoint, bucket: str) -> str:
    """Why a fine-tune cannot start from ``checkpoint``; "" when it can."""
    if checkpoint.state != "COMPLETED":
        reason = f" ({checkpoint.delete_reason})" if checkpoint.delete_reason else ""
        return f"checkpoint {checkpoint.uuid} was deleted{reason}: its files are gone"
    if stored_checkpoint_prefix(checkpoint.storage, checkpoint.uuid, bucket) is None:
        return (f"checkpoint {checkpoint.uuid} is stored in {checkpoint.storage}, outside the cluster's store:"
                " a fine-tune starts from a checkpoint in the cluster's store")
    return ""
