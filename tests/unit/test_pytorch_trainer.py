"""kiln.pytorch's Trainer in local mode: periods, reducers, exact pause/resume, loading a trained trial.

Real torch on CPU with a tiny model and random data; checkpoints go under a temporary ./checkpoints (the
Core API's local mode), nothing else touches the disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kiln import pytorch
from schemas.config import parse_config
from schemas.trial import CLUSTER_INFO_ENV

HPARAMS = {"global_batch_size": 4, "lr": 0.1}
EXP_CONF = {"reproducibility": {"experiment_seed": 7}}


def _dataset(n: int = 40) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))


class TinyTrial(pytorch.PyTorchTrial):
    """Dropout (global RNG), a shuffled loader, Adam (optimizer state) and a per-batch LR schedule: everything
    a resume has to restore to continue identically."""

    def __init__(self, context: pytorch.PyTorchTrialContext, n: int = 40) -> None:
        self.context = context
        self.n = n
        self.model = context.wrap_model(nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1)))
        self.opt = context.wrap_optimizer(torch.optim.Adam(self.model.parameters(), lr=context.get_hparam("lr")))
        context.wrap_lr_scheduler(torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.9),
                                  step_mode=pytorch.LRScheduler.StepMode.STEP_EVERY_BATCH)

    def build_training_data_loader(self) -> pytorch.DataLoader:
        return pytorch.DataLoader(_dataset(self.n), batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        return pytorch.DataLoader(_dataset(12), batch_size=5)

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.context.backward(loss)
        self.context.step_optimizer(self.opt)
        return {"loss": loss, "batch_idx": batch_idx}

    def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        return {"val_loss": nn.functional.mse_loss(self.model(x), y), "rows": len(x), "largest": float(x.max())}

    def evaluation_reducer(self) -> dict[str, pytorch.Reducer]:
        return {"rows": pytorch.Reducer.SUM, "largest": pytorch.Reducer.MAX}


class _Spy:
    """Records what the trial reports through its Core API context."""

    def __init__(self, core: Any) -> None:
        self.training: list[tuple[int, dict[str, Any]]] = []
        self.validation: list[tuple[int, dict[str, Any]]] = []
        self.checkpoints: list[tuple[int, str]] = []
        train, ckpt = core.train, core.checkpoint
        real_store = ckpt.store_path

        def store_path(metadata: dict[str, Any], **kw: Any) -> Any:
            cm = real_store(metadata, **kw)
            outer = self

            class Wrapped:
                def __enter__(self) -> Any:
                    path, uuid = cm.__enter__()
                    outer.checkpoints.append((metadata["steps_completed"], uuid))
                    return path, uuid

                def __exit__(self, *exc: Any) -> Any:
                    return cm.__exit__(*exc)

            return Wrapped()

        train.report_training_metrics = lambda steps_completed, metrics, **kw: \
            self.training.append((steps_completed, metrics))
        train.report_validation_metrics = lambda steps_completed, metrics: \
            self.validation.append((steps_completed, metrics))
        ckpt.store_path = store_path


@pytest.fixture(autouse=True)
def _local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CLUSTER_INFO_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # local mode writes checkpoints under ./checkpoints
    torch.set_num_threads(1)


def _fit(trial_cls: type[pytorch.PyTorchTrial] = TinyTrial, **fit: Any) -> tuple[pytorch.PyTorchTrial, _Spy]:
    with pytorch.init(hparams=HPARAMS, exp_conf=EXP_CONF) as context:
        spy = _Spy(context._core)
        trial = trial_cls(context)
        pytorch.Trainer(trial, context).fit(**fit)
    return trial, spy


def test_metrics_are_reported_at_their_periods() -> None:
    _, spy = _fit(max_length=pytorch.Batch(12), reporting_period=pytorch.Batch(4),
                  validation_period=pytorch.Batch(6))
    assert [s for s, _ in spy.training] == [4, 6, 8, 12]  # a report ends at every boundary
    # Each report averages the batches since the previous one: batch indices 0..3, then 4..5, ...
    assert [m["batch_idx"] for _, m in spy.training] == [1.5, 4.5, 6.5, 9.5]
    assert [s for s, _ in spy.validation] == [6, 12]
    # Locally checkpoint_policy "best" falls back to "all": one checkpoint per validation, none twice.
    assert [s for s, _ in spy.checkpoints] == [6, 12]


def test_epoch_units_follow_the_loader_length() -> None:
    # 40 records, batches of 4: 10 batches an epoch.
    _, spy = _fit(max_length=pytorch.Epoch(2), validation_period=pytorch.Epoch(1),
                  checkpoint_period=pytorch.Batch([3]), checkpoint_policy="none")
    assert [s for s, _ in spy.validation] == [10, 20]
    assert [s for s, _ in spy.checkpoints] == [3, 20]  # the schedule's, and the final one


def test_evaluation_reducers_and_wrapped_reducers() -> None:
    class Counting(TinyTrial):
        def __init__(self, context: pytorch.PyTorchTrialContext) -> None:
            super().__init__(context)
            self.seen = context.wrap_reducer(lambda values: sum(values), name="seen_rows", for_training=False)

            class Extremes(pytorch.MetricReducer):
                def __init__(self) -> None:
                    self.reset()

                def reset(self) -> None:
                    self.lo, self.hi = float("inf"), float("-inf")

                def update(self, values: torch.Tensor) -> None:
                    self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))

                def per_slot_reduce(self) -> tuple[float, float]:
                    return self.lo, self.hi

                def cross_slot_reduce(self, per_slot: list[tuple[float, float]]) -> dict[str, float]:
                    return {"y_min": min(p[0] for p in per_slot), "y_max": max(p[1] for p in per_slot)}

            self.extremes = context.wrap_reducer(Extremes(), for_validation=False)

        def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
            self.extremes.update(batch[1])  # type: ignore[attr-defined]
            return super().train_batch(batch, epoch_idx, batch_idx)

        def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
            self.seen.update(len(batch[0]))  # type: ignore[attr-defined]
            return super().evaluate_batch(batch, batch_idx)

    _, spy = _fit(Counting, max_length=pytorch.Batch(10))
    (_, val), = spy.validation
    x = _dataset(12).tensors[0]
    assert val["rows"] == 12 and val["seen_rows"] == 12  # SUM over batches of 5, 5, 2
    assert val["largest"] == pytest.approx(float(x.max()))
    assert set(val) == {"val_loss", "rows", "largest", "seen_rows"}  # the training-only reducer stays out
    (_, train), = spy.training
    y = _dataset(40).tensors[1]
    assert train["y_min"] == pytest.approx(float(y.min())) and train["y_max"] == pytest.approx(float(y.max()))


def _params(trial: pytorch.PyTorchTrial) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trial.model.parameters()]  # type: ignore[attr-defined]


def _uuid_at(spy: _Spy, steps: int) -> str:
    return dict(spy.checkpoints)[steps]


def test_pause_and_resume_match_an_uninterrupted_run() -> None:
    straight, spy_straight = _fit(max_length=pytorch.Batch(23), validation_period=pytorch.Batch(23))

    _, first = _fit(max_length=pytorch.Batch(13))  # stops mid-epoch 2, checkpoints at 13
    resumed, second = _fit(max_length=pytorch.Batch(23), validation_period=pytorch.Batch(23),
                           latest_checkpoint=_uuid_at(first, 13))

    for a, b in zip(_params(straight), _params(resumed), strict=True):
        assert torch.equal(a, b)
    assert straight.opt.state_dict()["state"][0]["exp_avg"].equal(resumed.opt.state_dict()["state"][0]["exp_avg"])  # type: ignore[attr-defined]
    assert straight.opt.param_groups[0]["lr"] == resumed.opt.param_groups[0]["lr"]  # type: ignore[attr-defined]
    assert spy_straight.validation == second.validation  # the same metrics at the same step
    assert [s for s, _ in second.training] == [23]  # the resumed run continued from batch 13, not from 0


def test_preemption_checkpoints_and_the_restarted_trial_finishes_identically() -> None:
    straight, _ = _fit(max_length=pytorch.Batch(20))

    class PreemptedAt7(pytorch.PyTorchCallback):
        def __init__(self, core: Any) -> None:
            self.core = core

        def on_training_workload_end(self, avg_metrics: dict[str, Any], batch_metrics: list[Any]) -> None:
            if avg_metrics["batch_idx"] == 6:  # the report after batch index 6: 7 batches done
                self.core.preempt._request("the platform wants the slot back")

    class Preempted(TinyTrial):
        def build_callbacks(self) -> dict[str, pytorch.PyTorchCallback]:
            return {"preempt": PreemptedAt7(self.context._core)}

    _, paused = _fit(Preempted, max_length=pytorch.Batch(20), reporting_period=pytorch.Batch(1))
    assert [s for s, _ in paused.checkpoints] == [7]  # checkpointed on the way out, not trained further
    assert paused.validation == []
    resumed, _ = _fit(max_length=pytorch.Batch(20), latest_checkpoint=_uuid_at(paused, 7))
    for a, b in zip(_params(straight), _params(resumed), strict=True):
        assert torch.equal(a, b)


def test_stop_requested_by_the_trial_ends_training_with_a_checkpoint() -> None:
    class Stops(TinyTrial):
        def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
            if batch_idx == 2:
                self.context.set_stop_requested(True)
            return super().train_batch(batch, epoch_idx, batch_idx)

    _, spy = _fit(Stops, max_length=pytorch.Batch(10), reporting_period=pytorch.Batch(1))
    assert [s for s, _ in spy.checkpoints] == [3]


def test_load_trial_from_checkpoint_path_restores_the_model(tmp_path: Path) -> None:
    trained, spy = _fit(max_length=pytorch.Batch(8))
    path = tmp_path / "checkpoints" / _uuid_at(spy, 8)
    load_data = json.loads((path / "load_data.json").read_text())
    assert load_data["trial_cls_spec"] == f"{__name__}:TinyTrial" and load_data["hparams"] == HPARAMS

    for kwargs in ({}, {"trial_class": TinyTrial, "trial_kwargs": {"n": 8}}):
        loaded = pytorch.load_trial_from_checkpoint_path(str(path), **kwargs)
        assert isinstance(loaded, TinyTrial)
        for a, b in zip(_params(trained), _params(loaded), strict=True):
            assert torch.equal(a, b)
        assert not loaded.model.training  # ready for inference


def test_misuse_is_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="max_length"):
        _fit()

    class NoEval(TinyTrial):
        evaluate_batch = pytorch.PyTorchTrial.evaluate_batch  # type: ignore[assignment]

    with pytest.raises(ValueError, match="exactly one of evaluate_batch"):
        _fit(NoEval, max_length=pytorch.Batch(1))

    class PlainLoader(TinyTrial):
        def build_training_data_loader(self) -> Any:
            return torch.utils.data.DataLoader(_dataset(), batch_size=4)

    with pytest.raises(RuntimeError, match="disable_dataset_reproducibility_checks"):
        _fit(PlainLoader, max_length=pytorch.Batch(1))
    with pytest.raises(ValueError, match="hparams"), pytorch.init():
        pass


def test_data_loader_shards_skips_and_repeats_deterministically() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(10))
    loader = pytorch.DataLoader(data, batch_size=2, shuffle=True)
    whole = [b[0].tolist() for _, b in zip(range(12), loader.get_data_loader(repeat=True, seed=3), strict=False)]
    assert sorted(sum(whole[:5], [])) == list(range(10)) and whole[:5] != whole[5:10]  # a new order each epoch
    skipped = [b[0].tolist() for _, b in zip(range(5), loader.get_data_loader(repeat=True, skip=7, seed=3),
                                                  strict=False)]
    assert skipped == whole[7:12]
    # Training: global batches dealt in turn, the same count to each slot (they step together); the odd
    # fifth batch of each epoch is dropped.
    train = [[b[0].tolist() for _, b in zip(range(4), loader.get_data_loader(repeat=True, num_replicas=2, rank=r,
                                                                            seed=3), strict=False)] for r in (0, 1)]
    assert train == [[whole[0], whole[2], whole[5], whole[7]], [whole[1], whole[3], whole[6], whole[8]]]
    assert [len(loader.get_data_loader(repeat=True, num_replicas=2, rank=r)) for r in (0, 1)] == [2, 2]


def test_evaluation_shards_cover_every_batch_once_even_when_the_slots_get_different_counts() -> None:
    """A validation on 2 slots sees the whole validation set, as on one: no batch dropped, none twice."""
    data = torch.utils.data.TensorDataset(torch.arange(11))
    loader = pytorch.DataLoader(data, batch_size=3)  # 4 global batches, the last one short
    shards = [[b[0].tolist() for b in loader.get_data_loader(num_replicas=3, rank=r)] for r in (0, 1, 2)]
    assert shards == [[[0, 1, 2], [9, 10]], [[3, 4, 5]], [[6, 7, 8]]]
    assert [len(loader.get_data_loader(num_replicas=3, rank=r)) for r in (0, 1, 2)] == [2, 1, 1]


@pytest.mark.parametrize(("searcher", "expected"), [
    ({"max_length": {"epochs": 3}}, (pytorch.Epoch(5), "epochs")),
    ({"max_length": {"batches": 3}}, (pytorch.Batch(5), None)),
    ({"max_length": {"records": 30}}, (pytorch.Batch(1), "records")),  # 5 records, global batch 4
    ({"max_length": 30}, (pytorch.Batch(5), None)),
    ({"time_metric": "batches", "max_time": 30}, (pytorch.Batch(5), "batches")),
])
def test_the_searcher_length_becomes_a_train_unit(searcher: dict[str, Any], expected: Any) -> None:
    from kiln.pytorch._trainer import _cluster_length

    text = json.dumps({"entrypoint": "python3 model_def.py",
                       "searcher": {"name": "single", "metric": "val_loss", **searcher}})
    config, _ = parse_config(text)
    assert _cluster_length(config, 5, None, 4) == expected


def test_determineds_submodule_import_gets_kiln_pytorch() -> None:
    """Determined's examples write ``from determined.pytorch import DataLoader, PyTorchTrial, PyTorchTrialContext``."""
    import determined.pytorch as det_pytorch
    from determined.pytorch import DataLoader, PyTorchTrial, PyTorchTrialContext

    assert det_pytorch is pytorch
    assert (DataLoader, PyTorchTrial, PyTorchTrialContext) == \
        (pytorch.DataLoader, pytorch.PyTorchTrial, pytorch.PyTorchTrialContext)
