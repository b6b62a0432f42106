"""The web UI in a real browser: Debian's chromium driven by Playwright against the whole stack.

What a person sees: the sign-in form (and an error for a wrong password), every page with the right number of
lines on its charts (the chart elements carry ``data-series-count``), a stopped-early badge on an ASHA trial, an
experiment's curves and a trial's log lines growing without a reload, downloads that yield the files, the API docs
at ``/schema`` with every request kept on the gateway's own origin (anything else is refused and recorded). Each
test saves screenshots (``KILN_UI_SCREENSHOTS``, default ``test-artifacts/web-ui``; README's are made with
``KILN_UI_SCREENSHOTS=docs/screenshots``).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e
expect.set_options(timeout=30_000)  # what a page shows follows the read model, which follows the bus

CHROMIUM = "/usr/bin/chromium"  # Debian's (deploy/setup.sh); Playwright's own browser download cannot work here
SHOTS = Path(os.environ.get("KILN_UI_SCREENSHOTS") or REPO / "test-artifacts" / "web-ui")
TAG = uuid.uuid4().hex[:8]  # names and labels of this module's experiments

TRAIN = textwrap.dedent("""\
    import time

    import kiln as det

    info = det.get_cluster_info()
    lr = float(info.trial.hparams["lr"])
    pause = float(info.trial.hparams["pause"])
    with det.core.init() as ctx:
        total = int(ctx.searcher.max_length)  # epochs
        epoch = 0
        if info.latest_checkpoint:
            with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
                epoch = int((path / "state.txt").read_text())
            print(f"resumed at epoch {epoch}", flush=True)
        while epoch < total:
            for b in range(1, 11):
                step = epoch * 10 + b
                ctx.train.report_training_metrics(steps_completed=step, metrics={"loss": (1 + lr) / step ** 0.5})
            epoch += 1
            acc = 1 - abs(lr - 0.3) - 0.5 / (epoch + 1)
            per_class = {f"val_acc_class_{k}": acc - 0.02 * k for k in range(10)}
            ctx.train.report_validation_metrics(steps_completed=epoch * 10,
                                                metrics={"accuracy": acc, "epochs": epoch, **per_class})
            print(f"epoch {epoch}/{total} accuracy {acc:.4f}", flush=True)
            with ctx.checkpoint.store_path({"steps_completed": epoch * 10}) as (path, _):
                (path / "state.txt").write_text(str(epoch))
                (path / "weights.bin").write_bytes(bytes(4096))
            ctx.train.report_progress(epoch / total)
            if ctx.preempt.should_preempt():
                print("preempted: exiting", flush=True)
                break
            time.sleep(pause)
""")
# Two rungs (3 and 9 epochs): of five trials the searcher stops some at 3.
ASHA = textwrap.dedent(f"""\
    name: ui-asha-{TAG}
    labels: [ui-{TAG}]
    entrypoint: python3 train.py
    hyperparameters:
      lr: {{type: log, base: 10, minval: -2, maxval: 0}}
      pause: 0.3
    searcher: {{name: adaptive_asha, metric: accuracy, smaller_is_better: false, time_metric: epochs, max_time: 9,
               max_trials: 5, divisor: 3, mode: aggressive, max_concurrent_trials: 2}}
""")
# Long enough to watch it grow, then pause, activate and kill it.
LIVE = textwrap.dedent(f"""\
    name: ui-live-{TAG}
    entrypoint: python3 train.py
    hyperparameters: {{lr: 0.3, pause: 0.7}}
    searcher: {{name: single, metric: accuracy, smaller_is_better: false, max_length: {{epochs: 200}}}}
""")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless chromium for the module."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (deploy/setup.sh does it as root)")
    with sync_playwright() as p:
        # --no-sandbox: chromium refuses its sandbox as root (CI runs as root).
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("web-ui")
    (d / "train.py").write_text(TRAIN)
    (d / "asha.yaml").write_text(ASHA)
    (d / "live.yaml").write_text(LIVE)
    return d


def _submit(kiln_stack: Stack, code_dir: Path, config: str) -> int:
    out = kiln_stack.kiln("experiment", "create", str(code_dir / config), str(code_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.split("Created experiment ", 1)[1].split()[0])


@pytest.fixture(scope="module")
def asha(kiln_stack: Stack, code_dir: Path) -> int:
    """The ASHA experiment's id (submitted once; tests that need it ended wait for it)."""
    return _submit(kiln_stack, code_dir, "asha.yaml")


@pytest.fixture(scope="module")
def live(kiln_stack: Stack, code_dir: Path) -> int:
    """The long single-trial experiment's id (the live test watches it, then kills it)."""
    return _submit(kiln_stack, code_dir, "live.yaml")


def _ended(kiln_stack: Stack, experiment_id: int) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        e = kiln_stack.http.get(f"/api/v1/experiments/{experiment_id}").json()
        return e if e.get("ended_at") else None

    return wait_for(done, timeout=400, what=f"experiment {experiment_id} to end", poll_s=1.0)


class Visit:
    """A browser context of its own: every request off the gateway's origin is refused and recorded, uncaught
    page errors are collected."""

    def __init__(self, browser: Browser, kiln_stack: Stack) -> None:
        self.origin = kiln_stack.cfg.master_url
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        self.context.set_default_timeout(60_000)
        self.offsite: list[str] = []
        self.errors: list[str] = []

        def route(r: Any) -> None:
            if r.request.url.startswith(self.origin):
                r.continue_()
            else:
                self.offsite.append(r.request.url)
                r.abort()

        self.context.route("**/*", route)
        self.page: Page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def sign_in(self, username: str, password: str) -> Page:
        self.page.goto(f"{self.origin}/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        self.page.click("form.login button[type=submit]")
        expect(self.page.locator("[data-user]")).to_have_text(re.compile(username))
        return self.page

    def go(self, hash_path: str) -> Page:
        self.page.goto(f"{self.origin}/#{hash_path}")
        return self.page

    def shot(self, name: str, full_page: bool = False) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)

    def close(self) -> None:
        self.context.close()
        assert not self.offsite, f"requests off the gateway's origin: {self.offsite}"
        assert not self.errors, f"uncaught errors in the page: {self.errors}"


@pytest.fixture
def visit(browser: Browser, kiln_stack: Stack) -> Iterator[Visit]:
    v = Visit(browser, kiln_stack)
    yield v
    v.close()


@pytest.fixture
def admin(visit: Visit, kiln_stack: Stack) -> Visit:
    visit.sign_in("admin", kiln_stack.creds.admin_password)
    return visit


def _count(page: Page, selector: str, attribute: str) -> int:
    return int(page.locator(selector).first.get_attribute(attribute) or 0)


def test_an_anonymous_visit_shows_the_sign_in_form_and_a_wrong_password_an_error(visit: Visit) -> None:
    page = visit.go("/experiments")
    expect(page.locator("form.login")).to_be_visible()
    expect(page.get_by_role("heading", name="Sign in to Kiln")).to_be_visible()
    visit.shot("sign-in")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "not the password")
    page.click("form.login button[type=submit]")
    expect(page.locator("form.login .error")).to_have_text("Wrong username or password.")
    expect(page.locator("form.login")).to_be_visible()  # still there: not a blank page


def test_the_api_docs_render_offline(visit: Visit) -> None:
    page = visit.page
    page.goto(f"{visit.origin}/schema")
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/experiments/page").first).to_be_visible()
    assert page.locator(".opblock").count() > 30  # every operation, rendered by the vendored Swagger UI
    visit.shot("api-docs")
    # Visit.close asserts that nothing was asked of any other host.


def test_a_live_experiment_grows_on_screen_and_obeys_pause_activate_and_kill(
        admin: Visit, kiln_stack: Stack, live: int) -> None:
    exp_id = live
    page = admin.go(f"/experiments/{exp_id}/curves")
    chart = "[data-tab=curves] .chart"
    wait_for(lambda: _count(page, chart, "data-point-count") >= 2, timeout=180, what="the first validations")
    first = _count(page, chart, "data-point-count")
    # No reload: the live stream adds the points.
    wait_for(lambda: _count(page, chart, "data-point-count") > first + 1, timeout=120, what="the curve to grow")
    assert _count(page, chart, "data-series-count") == 1
    admin.shot("live-experiment")

    trial_id = kiln_stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()[0]["id"]
    page = admin.go(f"/trials/{trial_id}")

    def newest_epoch() -> int:
        return max([int(n) for n in re.findall(r"epoch (\d+)/", page.locator(".log").inner_text())] or [0])

    wait_for(newest_epoch, timeout=60, what="log lines")
    seen = newest_epoch()
    wait_for(lambda: newest_epoch() > seen + 1, timeout=60, what="new log lines to arrive")  # followed, no reload
    expect(page.locator("input[name=follow]")).to_be_checked()
    admin.shot("live-trial")

    page = admin.go(f"/experiments/{exp_id}/curves")
    state = page.locator(".head .title-row > .badge")
    page.click("[data-action=pause]")
    expect(state).to_have_attribute("data-state", "PAUSED")
    page.click("[data-action=activate]")
    expect(state).to_have_attribute("data-state", "ACTIVE")
    page.once("dialog", lambda d: d.accept())
    page.click("[data-action=kill]")
    expect(state).to_have_attribute("data-state", "CANCELED", timeout=120_000)
    expect(page.locator(".head [data-action]")).to_have_count(0)  # nothing left to do to it


def test_the_experiments_list_filters_sorts_and_pages_on_the_server(
        admin: Visit, kiln_stack: Stack, asha: int, live: int) -> None:
    page = admin.go("/experiments")
    rows = page.locator("table.experiments tbody tr")
    expect(rows.first).to_be_visible()
    total = kiln_stack.http.get("/api/v1/experiments/page", params={"archived": "false"}).json()["total"]
    expect(page.locator(".pager .count")).to_contain_text(f"of {total}")
    page.fill("input[name=label]", f"ui-{TAG}")  # only this module's ASHA experiment has it
    expect(rows).to_have_count(1)
    row = page.locator(f"tr[data-experiment='{asha}']")
    expect(row.locator(".col-searcher")).to_have_text("adaptive_asha")
    expect(row.locator(".col-labels")).to_have_text(f"ui-{TAG}")
    page.fill("input[name=label]", "")
    page.fill("input[name=name]", f"ui-live-{TAG}")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".col-name")).to_have_text(f"ui-live-{TAG}")
    page.fill("input[name=name]", TAG)
    expect(rows).to_have_count(2)
    page.click("th[data-key=name]")  # sorted by the gateway: descending first, then ascending
    expect(rows.first.locator(".col-name")).to_have_text(f"ui-live-{TAG}")
    page.click("th[data-key=name]")
    expect(rows.first.locator(".col-name")).to_have_text(f"ui-asha-{TAG}")
    assert "sort=name" in page.url and "order=asc" in page.url
    page.select_option("select[name=limit]", "25")
    expect(page.locator(".pager .count")).to_have_text("1–2 of 2")
    admin.shot("experiments")


def test_an_asha_experiment_shows_every_trial_its_hparams_rungs_and_stopped_early_badges(
        admin: Visit, kiln_stack: Stack, asha: int) -> None:
    _ended(kiln_stack, asha)
    trials = kiln_stack.http.get(f"/api/v1/experiments/{asha}/trials").json()
    stopped = [t for t in trials if t["stop_requested"] and t["latest_validation"]["metrics"]["epochs"] < 9]
    assert stopped, "the searcher stopped no trial early"

    page = admin.go(f"/experiments/{asha}/curves")
    chart = page.locator("[data-tab=curves] .chart")
    expect(chart).to_have_attribute("data-series-count", str(len(trials)))
    over = page.locator("[data-tab=curves] .u-over")
    box = over.bounding_box()
    assert box is not None
    hovered = False
    for fx in (0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 0.99):  # sweep until the cursor is near a line
        for fy in range(1, 20):
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy / 20 * box["height"])
            if page.locator(".chart-tip").is_visible():
                hovered = True
                break
        if hovered:
            break
    assert hovered, "hovering the chart showed no trial"
    expect(page.locator(".chart-tip")).to_contain_text(re.compile(r"trial \d+"))
    expect(page.locator(".chart-tip")).to_contain_text("lr=")
    admin.shot("experiment-curves")
    page.select_option("select[name=x]", "time")
    page.check("input[name=log]")
    expect(chart).to_have_attribute("data-log", "true")
    expect(chart).to_have_attribute("data-series-count", str(len(trials)))

    page.click("[data-tab=hparams]")
    expect(page.locator("[data-tab=hparams] .figure").first).to_have_attribute("data-line-count", str(len(trials)))
    expect(page.locator("[data-tab=hparams] .figure").nth(1)).to_have_attribute("data-point-count", str(len(trials)))
    admin.shot("experiment-hparams")

    page.click("nav.tabs [data-tab=trials]")
    rows = page.locator("table.trials tbody tr")
    expect(rows).to_have_count(len(trials))
    expect(page.locator("table.trials .stopped-early")).to_have_count(len(stopped))
    for t in stopped:
        expect(page.locator(f"tr[data-trial='{t['id']}'] .stopped-early")).to_be_visible()
    page.click("th[data-key=best_metric]")  # larger is better: best first
    best = max(trials, key=lambda t: t["best_metric"])
    expect(rows.first).to_have_attribute("data-trial", str(best["id"]))
    admin.shot("experiment-trials")

    page.click("nav.tabs [data-tab=rungs]")
    rung0 = page.locator("table.rungs tr[data-rung='0']")
    expect(rung0).to_have_attribute("data-reached", str(len(trials)))
    expect(rung0.locator("[data-part=stopped]")).to_have_text(str(len(stopped)))
    expect(page.locator("table.rungs tr[data-rung='1']")).to_have_attribute("data-length", "9")
    admin.shot("experiment-rungs")

    page.click("nav.tabs [data-tab=config]")
    expect(page.locator("pre.code")).to_contain_text("adaptive_asha")
    page.click("nav.tabs [data-tab=code]")
    with page.expect_download() as got:
        page.click("[data-action=download-code]")
    with tarfile.open(got.value.path(), "r:gz") as tar:
        assert "train.py" in [Path(n).name for n in tar.getnames()]
    page.click("nav.tabs [data-tab=events]")
    expect(page.locator("table.events tr[data-type=TrialCreated]")).to_have_count(len(trials))
    admin.shot("experiment-audit-trail")


def test_a_trial_page_shows_many_series_metrics_logs_checkpoints_and_allocations(
        admin: Visit, kiln_stack: Stack, asha: int) -> None:
    _ended(kiln_stack, asha)
    trials = kiln_stack.http.get(f"/api/v1/experiments/{asha}/trials").json()
    best = max(trials, key=lambda t: t["best_metric"])
    page = admin.go(f"/trials/{best['id']}")
    validation = page.locator(".panel[data-kind=validation]")
    validation.locator("select[name=validation-metric]").select_option(label="val_acc_class_* (10)")
    expect(validation.locator(".chart")).to_have_attribute("data-series-count", "10")
    expect(page.locator(".panel[data-kind=training] .chart")).to_have_attribute("data-series-count", "1")

    log = page.locator(".log")
    expect(log).to_contain_text("epoch 9/9")
    page.fill("input[name=log-search]", "epoch 9/")
    expect(log).to_have_attribute("data-line-count", "1")

    checkpoints = kiln_stack.http.get(f"/api/v1/trials/{best['id']}/checkpoints").json()
    kept = [c for c in checkpoints if c["state"] == "COMPLETED"]
    assert kept
    expect(page.locator("table.checkpoints tbody tr")).to_have_count(len(checkpoints))
    with page.expect_download() as got:
        page.click(f"[data-action=download-checkpoint][data-uuid='{kept[-1]['uuid']}']")
    data = Path(got.value.path()).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = set(tar.getnames())
        assert names == set(kept[-1]["resources"])
        state = tar.extractfile("state.txt")
        assert state is not None and state.read() == str(kept[-1]["steps_completed"] // 10).encode()

    detail = kiln_stack.http.get(f"/api/v1/trials/{best['id']}").json()
    allocations = page.locator("table.allocations tbody tr")
    expect(allocations).to_have_count(len(detail["allocations"]))
    expect(allocations.first).to_contain_text(detail["allocations"][0]["worker_id"])
    admin.shot("trial", full_page=True)

    stopped = next(t for t in trials if t["stop_requested"] and t["latest_validation"]["metrics"]["epochs"] < 9)
    page = admin.go(f"/trials/{stopped['id']}")
    expect(page.locator(".head .stopped-early")).to_be_visible()


def test_compare_puts_the_picked_trials_on_one_chart(admin: Visit, kiln_stack: Stack, asha: int) -> None:
    _ended(kiln_stack, asha)
    trials = kiln_stack.http.get(f"/api/v1/experiments/{asha}/trials").json()
    a, b = trials[0]["id"], trials[1]["id"]
    page = admin.go(f"/experiments/{asha}/trials")
    page.check(f"tr[data-trial='{a}'] input[type=checkbox]")
    page.check(f"tr[data-trial='{b}'] input[type=checkbox]")
    page.click("[data-action=compare]")
    expect(page.locator(".chart")).to_have_attribute("data-series-count", "2")
    assert re.search(rf"trials={a},{b}$", page.url), page.url
    expect(page.locator("table.compare thead th")).to_have_count(3)
    page.select_option("select[name=metric]", "training:loss")
    expect(page.locator(".chart")).to_have_attribute("data-series-count", "2")
    admin.shot("compare")


def test_the_cluster_page_shows_workers_slots_and_the_queue(admin: Visit, kiln_stack: Stack) -> None:
    page = admin.go("/cluster")
    agents = kiln_stack.http.get("/api/v1/agents").json()
    expect(page.locator("table.agents tr[data-slot]")).to_have_count(sum(len(a["slots"]) for a in agents))
    for a in agents:
        expect(page.locator(f"table.agents tr[data-worker='{a['worker_id']}']").first).to_be_visible()
    expect(page.locator("h2", has_text="Job queue")).to_be_visible()
    admin.shot("cluster")


def test_another_user_sees_no_actions_and_is_refused_the_code(
        visit: Visit, kiln_stack: Stack, asha: int) -> None:
    name, password = f"viewer-{TAG}", "viewer-password-1"
    assert kiln_stack.http.post("/api/v1/users", json={"username": name, "password": password}).status_code == 201
    page = visit.sign_in(name, password)
    visit.go(f"/experiments/{asha}/curves")
    expect(page.locator(".head h1")).to_contain_text(f"ui-asha-{TAG}")
    expect(page.locator(".head [data-action]")).to_have_count(0)
    expect(page.locator(".head details.tensorboard")).to_have_count(0)  # its TensorBoard files are the owner's
    page.click("nav.tabs [data-tab=code]")
    page.click("[data-action=download-code]")
    expect(page.locator("[data-tab=code] .error")).to_contain_text("belong to 'admin'")
    page.click("button:has-text('Sign out')")
    expect(page.locator("form.login")).to_be_visible()



def test_the_models_page_shows_a_registered_checkpoint_with_its_experiment_and_trial(
        admin: Visit, kiln_stack: Stack, asha: int) -> None:
    _ended(kiln_stack, asha)
    trials = kiln_stack.http.get(f"/api/v1/experiments/{asha}/trials").json()
    best = max(trials, key=lambda t: t["best_metric"])
    kept = [c for c in kiln_stack.http.get(f"/api/v1/trials/{best['id']}/checkpoints").json()
            if c["state"] == "COMPLETED"]
    assert kept
    checkpoint = kept[-1]
    name = f"ui-model-{TAG}"
    made = kiln_stack.http.post("/api/v1/models", json={
        "name": name, "description": "digits classifier", "labels": [f"ui-{TAG}"], "metadata": {"task": "digits"}})
    assert made.status_code == 201, made.text
    registered = kiln_stack.http.post(f"/api/v1/models/{name}/versions", json={
        "checkpoint_uuid": checkpoint["uuid"], "name": "best", "comment": "the best of the ASHA run",
        "metadata": {"accuracy": round(best["best_metric"], 4)}})
    assert registered.status_code == 201, registered.text

    page = admin.go("/models")
    expect(page.locator("#top nav a.active")).to_have_text("Models")
    page.fill("input[name=name]", TAG)
    row = page.locator(f"table.models tr[data-model='{name}']")
    expect(row).to_contain_text("admin")
    expect(row).to_contain_text(f"ui-{TAG}")
    expect(row.locator("td").nth(1)).to_have_text("1")  # versions
    admin.shot("models")

    row.get_by_role("link", name=name).click()
    expect(page.locator(".head h1")).to_have_text(name)
    expect(page.locator(".head")).to_contain_text("task=digits")
    version = page.locator("table.versions tr[data-version='1']")
    expect(version).to_have_attribute("data-uuid", checkpoint["uuid"])
    expect(version).to_contain_text("v1")
    expect(version).to_contain_text("best")
    expect(version).to_contain_text(checkpoint["uuid"][:8])
    expect(version).to_contain_text(f"accuracy={round(best['best_metric'], 4)}")
    expect(version.locator(".badge")).to_have_text("COMPLETED")
    expect(version.locator("td").nth(5)).to_have_text(str(checkpoint["steps_completed"]))
    expect(version.locator("td").nth(7)).to_have_text("admin")
    expect(version.locator("a.experiment")).to_have_attribute("href", f"#/experiments/{asha}")
    expect(version.locator("a.trial")).to_have_attribute("href", f"#/trials/{best['id']}")
    admin.shot("model")

    version.locator("a.checkpoint").click()  # the checkpoint, in its trial's page
    expect(page.locator(".head h1")).to_have_text(f"Trial {best['id']}")
    expect(page.locator(f"table.checkpoints tr.picked[data-uuid='{checkpoint['uuid']}']")).to_be_visible()
    page.go_back()
    page.locator("table.versions a.experiment").click()
    expect(page.locator(".head h1")).to_contain_text(f"ui-asha-{TAG}")

    page = admin.go(f"/models/no-such-model-{TAG}")  # a model that is not there: the gateway's 404, said
    expect(page.locator(".page .error")).to_contain_text(f"no-such-model-{TAG}")


def test_tensorboard_shows_the_command_to_run_on_the_users_machine(
        admin: Visit, kiln_stack: Stack, asha: int) -> None:
    trial_id = wait_for(lambda: (kiln_stack.http.get(f"/api/v1/experiments/{asha}/trials").json() or [None])[0],
                        timeout=120, what="a trial")["id"]
    admin.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=admin.origin)
    page = admin.go(f"/experiments/{asha}/curves")
    panel = page.locator(".head details.tensorboard")
    expect(panel.locator(".tb-command")).to_be_hidden()
    panel.locator("summary").click()
    expect(panel.locator(".tb-command")).to_have_text(f"kiln tensorboard start {asha}")
    expect(panel).to_contain_text("runs on your machine, not in the cluster")
    panel.locator("[data-copy=tensorboard]").click()
    expect(panel.locator(".tb-status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == f"kiln tensorboard start {asha}"
    admin.shot("tensorboard")

    page = admin.go(f"/trials/{trial_id}")
    panel = page.locator(".head details.tensorboard")
    panel.locator("summary").click()
    expect(panel.locator(".tb-command")).to_have_text(f"kiln tensorboard start --trial {trial_id}")
    expect(panel).to_contain_text("not in the cluster")

CORES = """async () => {
  const { SSEParser } = await import("/ui/js/sse.js");
  const { smooth, xy } = await import("/ui/js/chart.js");
  const { rungView, plannedRungs, stoppedEarly } = await import("/ui/js/rungs.js");
  const { metricGroups } = await import("/ui/js/pages/trial.js");
  const { parseLine } = await import("/ui/js/logs.js");
  const parser = new SSEParser();
  const messages = [];
  const chunks = ["event: training\\r\\ndata: {\\"a\\":", "1}\\r\\n\\r",
                  "\\n: keep-alive\\n\\nevent: end\\ndata: {}\\n\\n"];
  for (const chunk of chunks) {
    messages.push(...parser.push(chunk));
  }
  const searcher = { name: "adaptive_asha", stop_once: false, max_time: 9, max_trials: 3, divisor: 3,
                     mode: "aggressive", max_rungs: 5, bracket_rungs: [], time_metric: "epochs" };
  const v = (id, epochs) => ({ type: "ValidationReported", event: { trial_id: id, steps_completed: epochs * 10,
                                                                   metrics: { epochs } } });
  const events = [
    { type: "TrialCreated", event: { trial_id: 1, max_length: 3 } },
    { type: "TrialCreated", event: { trial_id: 2, max_length: 3 } },
    { type: "TrialCreated", event: { trial_id: 3, max_length: 3 } },
    v(1, 3), v(2, 3), { type: "TrialResumeRequested", event: { trial_id: 1, max_length: 9 } }, v(3, 3),
    { type: "TrialStopRequested", event: { trial_id: 3 } }, v(1, 9),
  ];
  const t = (id, state, epochs, stop, ended) => ({ id, state, stop_requested: stop, ended_at: ended ? "x" : null,
    latest_validation: { steps_completed: epochs * 10, metrics: { epochs } } });
  const trials = [t(1, "COMPLETED", 9, false, true), t(2, "PAUSED", 3, false, false), t(3, "COMPLETED", 3, true, true)];
  const view = rungView(searcher, trials, events);
  return {
    messages,
    smoothed: smooth([1, null, 3], 0.5),
    relative: xy([{ step: 2, value: 5, wall_time: 110 }, { step: 1, value: 4, wall_time: 100 }], "relative"),
    planned: plannedRungs({ name: "adaptive_asha", max_time: 1000, max_trials: 64, divisor: 4, mode: "standard",
                            max_rungs: 5, bracket_rungs: [] }),
    rungs: view.rungs,
    outcomes: Object.fromEntries([...view.trials].map(([id, r]) => [id, r.outcome])),
    stopped: trials.map((x) => stoppedEarly(searcher, x)),
    groups: metricGroups([{ kind: "validation", name: "acc_class_1" }, { kind: "validation", name: "acc_class_0" },
                          { kind: "validation", name: "loss" }, { kind: "training", name: "loss" }])
      .map((g) => [g.kind, g.label, g.names.length]),
    line: parseLine({ allocation_id: "a", line_no: 3, ts: "t", stream: "stdout", text: "[rank=2] hello" },
                    new Map([["a", "w1"]])),
  };
}"""


def test_the_ui_cores_read_streams_rungs_and_metric_families(visit: Visit) -> None:
    """The pure parts of the UI, run in the browser: the SSE parser over chunks cut anywhere, smoothing, the time
    axis, the rung view of a promotion-based search, metric families, a log line's rank."""
    page = visit.go("/")
    got = page.evaluate(CORES)
    assert got["messages"] == [{"event": "training", "data": {"a": 1}}, {"event": "end", "data": {}}]
    assert got["smoothed"][0] == 1 and got["smoothed"][1] is None and got["smoothed"][2] == pytest.approx(7 / 3)
    assert got["relative"] == {"xs": [0, 10], "ys": [4, 5]}
    assert got["planned"] == [15, 62, 250, 1000]  # docs/asha.md's example
    rung0, rung1 = got["rungs"]
    assert (rung0["length"], rung0["reached"], rung0["promoted"], rung0["paused"], rung0["stopped"]) == (3, 3, 1, 1, 1)
    assert (rung1["length"], rung1["reached"], rung1["completed"]) == (9, 1, 1)
    assert got["outcomes"] == {"1": "completed", "2": "paused", "3": "stopped"}
    assert got["stopped"] == [False, False, True]
    assert sorted(got["groups"]) == [["training", "loss", 1], ["validation", "acc_class_*", 2],
                                     ["validation", "loss", 1]]
    assert got["line"] == {"key": "a:3", "ts": "t", "rank": 2, "worker": "w1", "stream": "stdout", "text": "hello"}
