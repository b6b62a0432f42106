"""The web UI's files and routes (no I/O): what the gateway serves at ``/``, ``/ui`` and ``/schema``, that every
file the pages load ships with Kiln (vendored files as the manifest records them, every module import resolving,
no address of another host), and the UI's read routes refusing bad parameters before Postgres.
The UI in a real browser is tests/e2e/test_web_ui.py."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from litestar.testing import TestClient

from schemas import api
from services.gateway import queries, ui
from services.gateway.app import GatewayDeps, create_app

STATIC = ui.STATIC
VENDOR = STATIC / "vendor"
OWN = [p for p in STATIC.rglob("*") if p.is_file() and VENDOR not in p.parents]
AUTH = {"Authorization": "Bearer t"}


class _Conn:
    """Authenticates any token; any other query reaching it fails the test (the input was not refused)."""

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any] | None:
        if "api_tokens" in query:
            return {"user_id": 1, "username": "admin", "admin": True, "token_id": 1}
        raise AssertionError(f"reached the read model with {args!r}")

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        raise AssertionError(f"reached the read model with {args!r}")

    async def fetch(self, query: str, *args: Any) -> Any:
        raise AssertionError(f"reached the read model with {args!r}")


class _Pool:
    def acquire(self, timeout: float | None = None) -> Any:
        @contextlib.asynccontextmanager
        async def one() -> AsyncIterator[_Conn]:
            yield _Conn()

        return one()


@pytest.fixture
def http() -> Iterator[TestClient[Any]]:
    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        yield GatewayDeps(pool=_Pool(), bus=SimpleNamespace(is_connected=True), minio=None,  # type: ignore[arg-type]
                          bucket="kiln", max_context_bytes=1024)

    with TestClient(create_app(deps, max_body_bytes=1 << 20)) as client:
        yield client


# -- what ships -------------------------------------------------------------------------------------------------


def test_the_vendored_files_are_those_the_manifest_records_with_their_licenses() -> None:
    lines = [line.split() for line in (VENDOR / "MANIFEST.sha256").read_text().splitlines()
             if line and not line.startswith("#")]
    recorded = {name: digest for digest, name in lines}
    shipped = {str(p.relative_to(VENDOR)) for p in VENDOR.rglob("*") if p.is_file()} - {"MANIFEST.sha256", "README.md"}
    assert set(recorded) == shipped
    for name, digest in recorded.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, f"{name} differs from the manifest"
    assert {"uplot/LICENSE", "swagger-ui/LICENSE", "swagger-ui/NOTICE"} <= shipped
    assert "uplot@1.6.32" in (VENDOR / "MANIFEST.sha256").read_text()


def test_every_module_import_and_every_file_the_index_page_loads_is_shipped() -> None:
    for js in STATIC.joinpath("js").rglob("*.js"):
        for target in re.findall(r"""^import\b[^;]*?from\s+["']([^"']+)["']""", js.read_text(), flags=re.M | re.S):
            assert target.startswith("."), f"{js.name} imports {target!r}: only the UI's own modules"
            assert (js.parent / target).resolve().is_file(), f"{js.name} imports {target}, which is not shipped"
    index = (STATIC / "index.html").read_text()
    for ref in re.findall(r"""(?:src|href)="([^"#]+)\"""", index):  # "#/...": a page of the UI itself
        assert ref.startswith(ui.PREFIX + "/"), ref
        assert (STATIC / ref.removeprefix(ui.PREFIX + "/")).is_file(), f"index.html loads {ref}, which is not shipped"


def test_the_ui_names_no_other_host() -> None:
    for path in OWN:
        text = path.read_text()
        text = text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace, never fetched
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{path.name} names another host"


# -- what the gateway serves ------------------------------------------------------------------------------------


def test_the_ui_is_served_without_a_token_and_held_to_its_own_origin(http: TestClient[Any]) -> None:
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert b'<script type="module" src="/ui/js/main.js">' in page.content
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp and "connect-src 'self'" in csp
    module = http.get("/ui/js/main.js")
    assert module.status_code == 200 and "javascript" in module.headers["content-type"]
    assert http.get("/ui/vendor/uplot/uPlot.iife.min.js").status_code == 200
    assert http.get("/ui/js/nothing-here.js").status_code == 404
    assert http.get("/ui/../app.py").status_code == 404
    assert http.get("/api/v1/experiments").status_code == 401  # the data still needs a token


def test_the_api_docs_load_only_the_vendored_swagger_ui(http: TestClient[Any]) -> None:
    for path in ("/schema", "/schema/swagger"):
        page = http.get(path)
        assert page.status_code == 200, path
        refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
        assert refs and all(r.startswith("/ui/") for r in refs), refs
        assert "swagger-ui-bundle.js" in page.text and "validatorUrl: null" in page.text
    assert http.get("/schema/openapi.json").json()["info"]["title"] == "Kiln"
    assert http.get("/schema/openapi.yaml").status_code == 200


def test_a_schema_that_holds_a_closing_script_tag_cannot_end_the_page_early() -> None:
    plugin = ui.LocalSwagger(path="/")
    request = SimpleNamespace(route_handler=SimpleNamespace(resolve_type_encoders=lambda: None))
    html = plugin.render(request, {"info": {"title": "K"}, "x": "</script><script>alert(1)</script>"})  # type: ignore[arg-type]
    assert html.count(b"</script>") == 2  # the bundle's and the page's own: the schema's is escaped


# -- the UI's read routes: bad parameters are a 400 naming them, before Postgres -----------------------------


@pytest.mark.parametrize(("path", "param"), [
    ("/api/v1/experiments/page?sort=password", "sort"),
    ("/api/v1/experiments/page?order=sideways", "order"),
    ("/api/v1/experiments/page?limit=0", "limit"),
    ("/api/v1/experiments/page?limit=1001", "limit"),
    ("/api/v1/experiments/page?offset=-1", "offset"),
    ("/api/v1/experiments/page?offset=9223372036854775808", "offset"),
    ("/api/v1/experiments/page?name=" + "x" * 256, "name"),
    ("/api/v1/experiments/page?owner=", "owner"),
    ("/api/v1/experiments/page?label=a%00b", "label"),
    ("/api/v1/experiments/1/series", "name"),
    ("/api/v1/experiments/1/series?name=loss&kind=test", "kind"),
    ("/api/v1/experiments/1/series?name=loss&max_points=1", "max_points"),
    ("/api/v1/experiments/1/series?name=loss&trial_id=x", "trial_id"),
    ("/api/v1/experiments/9223372036854775808/metric-names", "experiment_id"),
])
def test_bad_parameters_are_refused_naming_them(http: TestClient[Any], path: str, param: str) -> None:
    resp = http.get(path, headers=AUTH)
    assert resp.status_code == 400, resp.text
    assert param in resp.text


def test_the_series_of_an_experiment_asks_postgres_only_for_its_own_trials(
        http: TestClient[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[list[int]] = []

    async def get_experiment(conn: Any, experiment_id: int) -> api.Experiment:
        return api.Experiment(
            id=experiment_id, name="e", description="", labels=[], state="ACTIVE", searcher_name="single",
            searcher_metric="loss", smaller_is_better=True, submitted_by="admin", submitted_at=datetime.now(UTC),
            ended_at=None, end_reason="", progress=0.0, context_digest="d", priority=42, weight=1.0, max_slots=None,
            config={}, config_yaml="", seed=1, trial_states={}, best_trial=None)

    async def experiment_trial_ids(conn: Any, experiment_id: int) -> list[int]:
        return [5, 6]

    async def series_of_trials(conn: Any, ids: list[int], kind: str, name: str,
                               max_points: int) -> dict[int, list[api.SeriesPoint]]:
        asked.append(ids)
        return {i: [api.SeriesPoint(step=1, value=0.5, wall_time=1e9)] for i in ids}

    monkeypatch.setattr(queries, "get_experiment", get_experiment)
    monkeypatch.setattr(queries, "experiment_trial_ids", experiment_trial_ids)
    monkeypatch.setattr(queries, "series_of_trials", series_of_trials)
    resp = http.get("/api/v1/experiments/3/series?name=loss&trial_id=6&trial_id=99999999999999999999999",
                    headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert asked == [[6]]
    assert resp.json()["trials"] == [{"trial_id": 6, "points": [{"step": 1, "value": 0.5, "wall_time": 1e9}]}]
    assert http.get("/api/v1/experiments/3/series?name=loss", headers=AUTH).json()["kind"] == "validation"
    assert asked[-1] == [5, 6]
    assert Path(ui.__file__).parent == STATIC.parent
