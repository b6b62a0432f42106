"""The seed story, end to end, on a running Kiln stack (``kiln up``): ETL into Delta, an ASHA search, a weak
class found, more data, a 2-slot fine-tune from the best checkpoint, a registered model, Spark batch inference.

    python examples/seed_story/story.py                       # what `just demo-seed` runs
    python examples/seed_story/story.py --quick --json out.json  # small budgets (the e2e test)

Each step prints the command a user would type for it; the end prints a before/after table. One Spark session
serves every Spark step (a JVM start is the slowest part of a small Spark job).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "model"))
sys.path.insert(0, str(HERE))

T = TypeVar("T")


class Story:
    """The steps, their timings and what each found."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kiln.client import Client

        self.args = args
        self.client = Client()
        self.times: dict[str, float] = {}
        self.found: dict[str, Any] = {}
        run = args.run or time.strftime("story-%Y%m%d-%H%M%S")
        self.table = f"s3://{args.bucket}/{run}/digits"
        self.predictions = f"s3://{args.bucket}/{run}/predictions"

    @contextmanager
    def step(self, name: str, title: str) -> Iterator[None]:
        print(f"\n== {title}", flush=True)
        started = time.monotonic()
        yield
        self.times[name] = time.monotonic() - started
        print(f"   ({self.times[name]:.0f} s)", flush=True)

    def kiln(self, *argv: str) -> str:
        """Run the kiln CLI as a user would (printed first); its output."""
        print("   $ kiln " + shlex.join(_relative(a) for a in argv), flush=True)
        out = subprocess.run([sys.executable, "-m", "kiln.cli", *argv], text=True, capture_output=True)
        if out.returncode != 0:
            raise SystemExit(f"kiln {' '.join(argv)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out.stdout

    def create(self, config: str, *overrides: str) -> int:
        flags = [f"--config={o}" for o in overrides]
        out = self.kiln("experiment", "create", str(HERE / config), str(HERE / "model"), *flags)
        match = re.search(r"^Created experiment (\d+)", out, re.M)
        assert match, out
        return int(match.group(1))

    def wait(self, exp_id: int) -> dict[str, Any]:
        exp = self.client.wait_experiment(exp_id, timeout_s=self.args.timeout)
        if exp["state"] != "COMPLETED":
            raise SystemExit(f"experiment {exp_id} ended {exp['state']}: see `kiln experiment describe {exp_id}`")
        return exp

    def last_validation(self, trial_id: int) -> dict[str, Any]:
        points = self.client.trial_metrics(trial_id, kind="validation")
        return dict(max(points, key=lambda p: p["steps_completed"])["metrics"])


def _retry(fn: Callable[[], T], what: str, attempts: int = 30) -> T:
    """The read model follows the bus by a moment: retry what it may not show yet."""
    for _ in range(attempts - 1):
        try:
            return fn()
        except (LookupError, AssertionError):
            time.sleep(1.0)
    try:
        return fn()
    except (LookupError, AssertionError) as exc:
        raise SystemExit(f"{what}: {exc}") from exc


def run(args: argparse.Namespace, raw_dir: Path) -> dict[str, Any]:
    """Every step; the summary."""
    from etl import class_counts, ingest, raw
    from lake import Lake, spark_session
    from net import class_metric
    from score import score

    import kiln.spark

    story = Story(args)
    lake = Lake()
    found = story.found
    found["table"] = story.table

    with story.step("etl_v0", "1. ETL: raw drop 1 -> Delta table version 0 (Spark computes, delta-rs writes)"):
        print(f"   raw drops in {raw_dir}: {raw(raw_dir, args.weak_class, args.keep)}")
        spark = spark_session("seed-story")
        version, rows = ingest(spark, lake, raw_dir / "drop-1", story.table)
        print(f"   {story.table}: version {version}, {rows} rows")
        found["v0"], found["v0_rows"] = version, rows

    with story.step("search", "2. Search: adaptive ASHA over lr, momentum, width on data version 0"):
        search = story.create("search.yaml", f"data.delta_table={story.table}", f"data.version={found['v0']}",
                              f"searcher.max_trials={args.trials}", f"searcher.max_time={args.epochs}")
        found["search_experiment"] = search
        exp = story.wait(search)
        best = exp["best_trial"]["id"]
        found["best_trial"] = best
        trial = story.client.get_trial(best)
        found["best_hparams"] = trial["hparams"]
        before = story.last_validation(best)
        print(f"   best trial {best}: validation accuracy {before['validation_accuracy']:.4f},"
              f" hparams {trial['hparams']}")

    with story.step("diagnose", "3. Diagnose: per-class accuracy of the best trial, class counts in version 0"):
        story.kiln("trial", "describe", str(best))
        counts = class_counts(spark, lake, story.table, found["v0"])
        weak = min(counts, key=lambda r: r["train"])["label"]
        found["weak_class"] = weak
        print(f"   {'class':>5} {'accuracy':>9} {'train rows':>10} {'val rows':>8} {'train share':>11}")
        for row in counts:
            acc = before.get(class_metric(row["label"]), float("nan"))
            mark = "  <- under-represented" if row["label"] == weak else ""
            print(f"   {row['label']:>5} {acc:>9.3f} {row['train']:>10} {row['val']:>8}"
                  f" {row['train_share']:>11.3f}{mark}")
        found["before"] = {"overall": before["validation_accuracy"],
                           "weak": before[class_metric(weak)]}

    with story.step("etl_v1", "4. More data: raw drop 2 (the missing images) appended -> version 1"):
        version, rows = ingest(spark, lake, raw_dir / "drop-2", story.table)
        print(f"   {story.table}: version {version}, {rows} rows appended")
        found["v1"], found["v1_rows"] = version, rows

    with story.step("finetune", "5. Fine-tune the best trial on version 1, on 2 slots"):
        hp = found["best_hparams"]
        tune = story.create("finetune.yaml", f"data.delta_table={story.table}", f"data.version={found['v1']}",
                            f"searcher.source_trial_id={best}", f"searcher.max_length.epochs={args.finetune_epochs}",
                            f"hyperparameters.learning_rate={hp['learning_rate']}",
                            f"hyperparameters.momentum={hp['momentum']}", f"hyperparameters.width={hp['width']}")
        found["finetune_experiment"] = tune
        story.wait(tune)
        tuned_trial = story.client.list_trials(tune)[0]["id"]
        found["finetune_trial"] = tuned_trial
        after = story.last_validation(tuned_trial)
        found["after"] = {"overall": after["validation_accuracy"], "weak": after[class_metric(weak)]}
        lineage = _retry(lambda: story.client.get_experiment(tune)["lineage"] or _missing("lineage"), "lineage")
        found["lineage"] = lineage
        print(f"   lineage: data {lineage['data']['table']} version {lineage['data']['version']}; parent"
              f" checkpoint {lineage['parent']['uuid']} (experiment {lineage['parent']['experiment_id']}, trial"
              f" {lineage['parent']['trial_id']}); the search read version"
              f" {story.client.get_experiment(search)['lineage']['data']['version']}")

    with story.step("register", "6a. Register the fine-tune's best checkpoint as a model version"):
        best_ckpt = story.client.experiment_checkpoints(tune, sort_by="metric", state="COMPLETED", limit=1)[0]
        try:
            story.client.get_model(args.model)
        except Exception:  # noqa: BLE001 - absent (404): create it
            story.kiln("model", "create", args.model, "--description", "the seed story's digits CNN")
        registered = json.loads(story.kiln("model", "register-version", args.model, best_ckpt["uuid"], "--comment",
                                           f"fine-tuned on {story.table} v{found['v1']}", "--json"))
        found["model_version"] = int(registered["version"])
        found["registered_checkpoint"] = best_ckpt["uuid"]
        print(f"   {args.model} version {found['model_version']} = checkpoint {best_ckpt['uuid']}")

    with story.step("inference", "6b. Spark batch inference: every image of version 1 scored, written to Delta"):
        model = kiln.spark.model_version(args.model, found["model_version"])
        scored = score(spark, lake, story.table, found["v1"], model, story.predictions)
        found["inference"] = {**scored, "table": story.predictions}
        print(f"   {scored['rows_scored']} of {scored['rows_in']} rows scored -> {story.predictions} version"
              f" {scored['output_version']} (accuracy {scored['accuracy']:.4f})")
        spark.stop()
    found["seconds"] = story.times
    return found


def _relative(arg: str) -> str:
    """A path argument as the user would type it from where they are."""
    if arg.startswith("/") and Path(arg).exists():
        return os.path.relpath(arg)
    return arg


def _missing(what: str) -> Any:
    raise LookupError(f"no {what} yet")


def table(found: dict[str, Any], model: str) -> str:
    """The before/after summary."""
    weak = found["weak_class"]
    b, a, t = found["before"], found["after"], found["seconds"]
    lines = [
        f"{'':36} {'before (search)':>18} {'after (fine-tune)':>18}",
        f"{'experiment':36} {found['search_experiment']:>18} {found['finetune_experiment']:>18}",
    ]
    v0 = f"v{found['v0']} ({found['v0_rows']} rows)"
    v1 = f"v{found['v1']} (+{found['v1_rows']} rows)"
    lines += [
        f"{'data version':36} {v0:>18} {v1:>18}",
        f"{'slots per trial':36} {1:>18} {2:>18}",
        f"{'validation accuracy':36} {b['overall']:>18.4f} {a['overall']:>18.4f}",
        f"{f'class {weak} accuracy (the weak one)':36} {b['weak']:>18.4f} {a['weak']:>18.4f}",
        "",
        f"model version: {model} v{found['model_version']} (checkpoint {found['registered_checkpoint']})",
        f"rows scored by Spark: {found['inference']['rows_scored']} of {found['inference']['rows_in']},"
        f" -> {found['inference']['table']} v{found['inference']['output_version']}",
        "time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + f"; total {sum(t.values()):.0f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the budgets, run the story, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budgets: 2 trials of 2 epochs, 2-epoch fine-tune")
    parser.add_argument("--trials", type=int, default=8, help="the search's max_trials")
    parser.add_argument("--epochs", type=int, default=8, help="the search's max_time (epochs)")
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--weak-class", type=int, default=8)
    parser.add_argument("--keep", type=int, default=3, help="training images of the weak class in version 0")
    parser.add_argument("--bucket", default="kiln-seed")
    parser.add_argument("--run", help="the tables' directory in the bucket (default: story-<time>)")
    parser.add_argument("--model", default="seed-digits", help="the registered model's name")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each experiment")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.epochs, args.finetune_epochs = 2, 2, 2
    raw_dir = Path(tempfile.mkdtemp(prefix="kiln-seed-raw-"))
    try:
        found = run(args, raw_dir)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    print("\n" + table(found, args.model))
    if args.json:
        args.json.write_text(json.dumps(found, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
