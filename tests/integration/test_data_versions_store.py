"""Delta tables on the real S3 store and on disk: the gateway pins versions at submission (clear 400s for what is
not there, a 503 when the store is), and a trial reads exactly its pinned version through its worker's link,
granted that table's prefix and nothing else."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import urllib3
from deltalake import DeltaTable, write_deltalake
from litestar.exceptions import ClientException
from minio import Minio

from deploy import parts as p
from kiln.core._bus import LinkError, TrialBus
from schemas import data as ds
from schemas import events as ev
from schemas.config import parse_config
from schemas.trial import CLUSTER_INFO_ENV, ClusterInfo, TrialInfo
from services.gateway import lineage
from services.gateway.app import GatewayDeps, Unavailable
from services.worker.link import Identity, MinioStore, StoreGrant, TrialLink, socket_path

pytestmark = pytest.mark.integration

# Writers need unsafe rename on a store without conditional puts; Kiln itself only reads.
WRITE = {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}


def _options(parts: p.RunningParts) -> dict[str, str]:
    return ds.s3_storage_options(parts.s3_endpoint, parts.cfg.s3_access_key, parts.cfg.s3_secret_key, secure=False)


def _write_versions(uri: str, options: dict[str, str] | None, checkpoint_at_1: bool = False) -> None:
    """v0: 3 rows, v1: 5 rows, v2: 9 rows (x = 1..9), partitioned by a value that needs escaping in paths."""
    opts = {**options, **WRITE} if options else None
    write_deltalake(uri, pa.table({"x": [1, 2, 3], "p": ["a b", "a b", "c"]}), partition_by=["p"],
                    storage_options=opts)
    write_deltalake(uri, pa.table({"x": [4, 5], "p": ["c", "d"]}), mode="append", partition_by=["p"],
                    storage_options=opts)
    if checkpoint_at_1:
        DeltaTable(uri, storage_options=opts).create_checkpoint()
    write_deltalake(uri, pa.table({"x": [6, 7, 8, 9], "p": ["a b"] * 4}), mode="append", partition_by=["p"],
                    storage_options=opts)


def _deps(parts: p.RunningParts, minio: Minio | None = None) -> GatewayDeps:
    return GatewayDeps(pool=None, bus=None, minio=minio or p.s3_client(parts.cfg), bucket="kiln",  # type: ignore[arg-type]
                       max_context_bytes=1, s3_options=_options(parts))


async def _resolve(deps: GatewayDeps, data: dict[str, Any]) -> tuple[Any, ev.Lineage]:
    text = msgspec.json.encode({"entrypoint": "python3 train.py", "searcher": {"name": "single", "metric": "rows"},
                                "data": data}).decode()
    config, _ = parse_config(text)
    return await lineage.resolve(deps, config, text, "sha256:code", None)


def _refusal(exc: pytest.ExceptionInfo[ClientException]) -> tuple[int, str, list[str]]:
    extra = exc.value.extra
    paths = [e["path"] for e in extra["errors"]] if isinstance(extra, dict) else []
    return exc.value.status_code, exc.value.detail, paths


@pytest.fixture(scope="module")
def store_table(parts: p.RunningParts) -> str:
    uri = f"s3://kiln-extra/tables/{uuid.uuid4().hex}/t"
    _write_versions(uri, _options(parts), checkpoint_at_1=True)
    return uri


async def test_the_gateway_pins_versions_of_a_table_in_the_store(parts: p.RunningParts, store_table: str) -> None:
    deps = _deps(parts)
    config, found = await _resolve(deps, {"delta_table": store_table, "batch_size": 4})
    assert found.data is not None
    assert (found.data.table, found.data.version, found.data.latest) == (store_table, 2, True)
    assert found.data.table_id and found.data.committed_at
    assert config.data == {"delta_table": store_table, "batch_size": 4, "version": 2}  # what is recorded
    assert found.config_digest.startswith("sha256:") and found.code_digest == "sha256:code"
    config, found = await _resolve(deps, {"delta_table": store_table, "version": 0})
    assert found.data is not None and (found.data.version, found.data.latest) == (0, False)
    assert config.data["version"] == 0

    with pytest.raises(ClientException) as err:
        await _resolve(deps, {"delta_table": store_table, "version": 5})
    code, detail, paths = _refusal(err)
    assert (code, paths) == (400, ["data.version"])
    assert "version 5" in detail and "latest version is 2" in detail and store_table in detail

    missing = store_table.rsplit("/", 1)[0] + "/nothing-here"
    with pytest.raises(ClientException) as err:
        await _resolve(deps, {"delta_table": missing})
    assert _refusal(err)[0] == 400 and "no Delta table" in _refusal(err)[1] and missing in _refusal(err)[1]
    with pytest.raises(ClientException) as err:
        await _resolve(deps, {"delta_table": "s3://no-such-bucket/t"})
    assert _refusal(err)[:2] == (400, "data.delta_table: bucket 'no-such-bucket' does not exist on the stack's S3"
                                      " store (table 's3://no-such-bucket/t')")
    with pytest.raises(ClientException) as err:
        await _resolve(deps, {"delta_table": "s3://kiln/checkpoints/3"})
    assert _refusal(err)[0] == 400 and "Kiln's own checkpoints/" in _refusal(err)[1]


async def test_a_store_that_is_down_is_a_503_not_the_configs_fault(parts: p.RunningParts, store_table: str) -> None:
    dead = Minio("127.0.0.1:1", access_key="k", secret_key="s", secure=False,
                 http_client=urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=1.0, read=1.0)))
    with pytest.raises(Unavailable) as err:
        await _resolve(_deps(parts, dead), {"delta_table": store_table})
    assert err.value.down == ["s3"]


async def test_the_gateway_pins_versions_of_a_table_on_disk(tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    _write_versions(path, None)
    deps = GatewayDeps(pool=None, bus=None, minio=None, bucket="kiln", max_context_bytes=1)  # type: ignore[arg-type]
    for named in (path, f"file://{path}"):
        config, found = await _resolve(deps, {"delta_table": named})
        assert found.data is not None and (found.data.version, found.data.latest) == (2, True)
        assert config.data["version"] == 2
    _, found = await _resolve(deps, {"delta_table": path, "version": 1})
    assert found.data is not None and found.data.version == 1
    with pytest.raises(ClientException) as err:
        await _resolve(deps, {"delta_table": path, "version": 3})
    assert _refusal(err)[0] == 400 and _refusal(err)[2] == ["data.version"]
    with pytest.raises(ClientException) as err:
        await _resolve(deps, {"delta_table": str(tmp_path / "none")})
    assert _refusal(err)[0] == 400 and "no Delta table" in _refusal(err)[1]
    # A table in the store with a gateway that has no store for data: refused, saying so.
    with pytest.raises(ClientException) as err:
        await _resolve(deps, {"delta_table": "s3://data/t"})
    assert "no S3 store configured" in _refusal(err)[1]


async def _no_stops(who: Identity, on_stop: Any) -> None:
    await asyncio.Event().wait()


async def _append(event: Any) -> int:
    return 1


async def test_a_trial_reads_exactly_its_pinned_version_through_its_link(parts: p.RunningParts, store_table: str,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.data

    minio = p.s3_client(parts.cfg)
    location = ds.locate(store_table)
    # Another table beside it, which this trial must not reach.
    other = f"s3://kiln-extra/{location.prefix.rsplit('/', 1)[0]}/other"
    write_deltalake(other, pa.table({"x": [100]}), storage_options={**_options(parts), **WRITE})
    exp = 900_000 + uuid.uuid4().int % 50_000
    who = Identity(experiment_id=exp, trial_id=1, allocation_id="1.1")
    link = TrialLink(socket_path(tmp_path / "1.1"), who, _append, _no_stops, store=MinioStore(minio, "kiln"),
                     grant=StoreGrant.of(exp).with_table(location, "kiln"))
    await link.start()

    def trial(version: int) -> dict[str, Any]:
        info = ClusterInfo(master_url="", cluster_id="", allocation_id="1.1", worker_id="w", link_path=str(link.path),
                           s3_endpoint=parts.s3_endpoint, s3_bucket="kiln",
                           trial=TrialInfo(trial_id=1, experiment_id=exp, hparams={}, trial_seed=0,
                                           config={"data": {"delta_table": store_table, "version": version}}))
        monkeypatch.setenv(CLUSTER_INFO_ENV, msgspec.json.encode(info).decode())
        data = kiln.data.delta_table(cache_dir=tmp_path / "cache")
        xs = sorted(data.to_pyarrow(["x"]).column("x").to_pylist())
        batches = [b["x"].tolist() for b in data.torch_batches(2, columns=["x"], shuffle=True, seed=3)]
        return {"version": data.version, "rows": data.num_rows, "xs": xs, "batched": sorted(sum(batches, [])),
                "batch_sizes": [len(b) for b in batches], "pa_rows": sum(len(b) for b in data.to_batches(2))}

    try:
        # The newest version is on the store, yet each trial reads the one its config pins: v1 from its checkpoint
        # (the commits before it never copied), v0 from the first commit, v2 from the checkpoint and one commit.
        for version, xs in ((1, [1, 2, 3, 4, 5]), (0, [1, 2, 3]), (2, list(range(1, 10)))):
            out = await asyncio.to_thread(trial, version)
            assert (out["version"], out["rows"], out["xs"], out["batched"], out["pa_rows"]) == \
                (version, len(xs), xs, xs, len(xs))
            assert max(out["batch_sizes"]) == 2
        copied = {str(f.relative_to(tmp_path / "cache")).split("/", 1)[1] for f in (tmp_path / "cache").rglob("*")
                  if f.is_file()}
        assert "_delta_log/00000000000000000001.json" not in copied  # the checkpoint stood in for it
        assert "_delta_log/_last_checkpoint" not in copied and any("p=a%20b/" in f for f in copied)

        def escape() -> list[str]:
            bus = TrialBus(str(link.path), exp, 1, "1.1")
            refused = []
            other_prefix = ds.locate(other).prefix
            for attempt in (lambda: bus.list_keys(f"{other_prefix}/", "kiln-extra"),
                            lambda: bus.presign("GET", f"{other_prefix}/_delta_log/00000000000000000000.json",
                                                "kiln-extra"),
                            lambda: bus.presign("PUT", f"{location.prefix}/_delta_log/00000000000000000009.json",
                                                "kiln-extra"),
                            lambda: bus.list_keys("", "kiln-extra"),
                            lambda: bus.list_keys(f"{location.prefix}/")):  # the same prefix in the cluster's bucket
                try:
                    attempt()
                except LinkError as exc:
                    refused.append(str(exc))
            bus.close()
            return refused

        refused = await asyncio.to_thread(escape)
        assert len(refused) == 5, refused
        assert link.refused == 5
    finally:
        await link.close()
    # Nothing was written to the table.
    assert DeltaTable(store_table, storage_options=_options(parts)).version() == 2


def test_local_tables_are_read_in_place_at_the_named_version(tmp_path: Path) -> None:
    import kiln.data

    path = str(tmp_path / "t")
    _write_versions(path, None)
    for version, rows in ((0, 3), (1, 5), (None, 9)):
        data = kiln.data.delta_table(path, version)
        assert (data.num_rows, len(data.to_pyarrow())) == (rows, rows)
    with pytest.raises(LookupError, match="names no data.delta_table|not a trial"):
        os.environ.pop(CLUSTER_INFO_ENV, None)
        kiln.data.delta_table()
