"""The submission hijack: JetStream answering "duplicate" to an ExperimentSubmitted is never a success."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from litestar.testing import TestClient
from nats.js.api import PubAck

from schemas import context
from schemas import events as ev
from services.gateway.app import GatewayDeps, create_app
from tests.unit.test_gateway_errors import AUTH, _OkPool

CONFIG = ("name: t\nentrypoint: python3 train.py\nhyperparameters: {lr: 0.1}\n"
          "searcher: {name: single, metric: loss, max_length: {batches: 10}}\n")


def _submit(tmp_path: Path, duplicate: bool) -> tuple[Any, list[Any]]:
    (tmp_path / "train.py").write_text("print('hi')\n")
    published: list[Any] = []

    async def publish_ack(event: Any) -> PubAck:
        published.append(event)
        return PubAck(stream="KILN_EVENTS", seq=41, duplicate=duplicate or None)

    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        bus = SimpleNamespace(is_connected=True, publish_ack=publish_ack)
        minio = SimpleNamespace(stat_object=lambda bucket, key: None)  # the context is stored already
        yield GatewayDeps(pool=_OkPool(), bus=bus, minio=minio, bucket="kiln",  # type: ignore[arg-type]
                          max_context_bytes=1 << 20)

    with TestClient(create_app(deps, max_body_bytes=4 << 20)) as http:
        resp = http.post("/api/v1/experiments", data={"config": CONFIG}, headers=AUTH,
                         files={"context": ("c.tar.gz", context.pack(tmp_path), "application/gzip")})
    return resp, published


def test_a_submission_jetstream_dropped_as_a_duplicate_is_a_409_not_a_success(tmp_path: Path) -> None:
    resp, published = _submit(tmp_path, duplicate=True)
    assert [type(e) for e in published] == [ev.ExperimentSubmitted]
    assert resp.status_code == 409, resp.text
    assert "already holds" in resp.json()["detail"] and "nothing was recorded" in resp.json()["detail"]


def test_a_new_submission_is_created(tmp_path: Path) -> None:
    resp, _ = _submit(tmp_path, duplicate=False)
    assert resp.status_code == 201, resp.text
    assert resp.json()["id"] == 7
