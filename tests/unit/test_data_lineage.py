"""Data versions and lineage, the pure parts: the ``data`` block's Delta part, digests, which log files a version
needs, the trial's grant for the table, the read-model row and the API's answer. No I/O."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pyarrow as pa
import pytest
import torch
from litestar.testing import TestClient
from nats.js.api import PubAck

from kiln.data import _tensors
from schemas import context
from schemas import data as ds
from schemas import events as ev
from schemas.config import ConfigError, config_from_wire, config_to_dict, parse_config
from services.gateway.app import GatewayDeps, create_app
from services.gateway.queries import experiment_lineage
from services.tracker.projection import Fold, Item
from services.worker.link import StoreGrant, store_refusal
from tests.unit.test_gateway_errors import AUTH, _OkPool

REPO = Path(__file__).resolve().parents[2]
BASE = {"entrypoint": "python3 train.py", "searcher": {"name": "single", "metric": "rows"}}


def _parse(data: Any) -> Any:
    return parse_config({**BASE, "data": data})[0]


# -- the data block ------------------------------------------------------------------------------------------------


def test_a_delta_table_in_data_is_typed_and_the_users_own_keys_stay() -> None:
    cfg = _parse({"delta_table": "s3://data/digits/train", "version": 3, "batch_size": 32, "url": "x"})
    assert cfg.delta_source == ds.DeltaSource(table="s3://data/digits/train", version=3)
    assert cfg.data == {"delta_table": "s3://data/digits/train", "version": 3, "batch_size": 32, "url": "x"}
    assert _parse({"delta_table": "/srv/tables/t"}).delta_source == ds.DeltaSource(table="/srv/tables/t")
    assert _parse({"delta_table": "file:///srv/t", "version": None}).delta_source == ds.DeltaSource(table="file:///srv/t")


def test_a_data_block_without_a_table_is_the_users_alone() -> None:
    # Determined users put anything in data, a "version" of their own included: not read as a table version.
    cfg = _parse({"version": "v2-final", "url": "https://example.org/d.tgz"})
    assert cfg.delta_source is None and cfg.data["version"] == "v2-final"
    assert _parse({}).delta_source is None


@pytest.mark.parametrize(("data", "path", "words"), [
    ({"delta_table": "tables/t"}, "data.delta_table", "absolute path"),
    ({"delta_table": "gs://b/t"}, "data.delta_table", "gs:// tables are not supported yet"),
    ({"delta_table": "s3://data"}, "data.delta_table", "name the table's directory"),
    ({"delta_table": "s3://data/"}, "data.delta_table", "name the table's directory"),
    ({"delta_table": "s3://Bad_Bucket/t"}, "data.delta_table", "is not a bucket name"),
    ({"delta_table": "s3://data/a/../b"}, "data.delta_table", "'..'"),
    ({"delta_table": "/srv/../etc"}, "data.delta_table", "'..'"),
    ({"delta_table": "s3://data/a?x=1"}, "data.delta_table", "only letters, digits"),  # delta-rs would cut it
    ({"delta_table": "s3://data/a b/%zz"}, "data.delta_table", "only letters, digits"),
    ({"delta_table": "/srv/t#1"}, "data.delta_table", "not allowed"),
    ({"delta_table": ""}, "data.delta_table", "expected a table URI"),
    ({"delta_table": 5}, "data.delta_table", "expected a table URI"),
    ({"delta_table": "/srv/t", "version": -1}, "data.version", "int >= 0"),
    ({"delta_table": "/srv/t", "version": True}, "data.version", "int >= 0"),
    ({"delta_table": "/srv/t", "version": "3"}, "data.version", "int >= 0"),
    ({"delta_table": "/srv/t", "version": 2**63}, "data.version", "int >= 0"),
])
def test_a_bad_table_or_version_is_refused_at_its_path(data: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(data)
    assert [(e.path, words in e.message) for e in err.value.errors] == [(path, True)], err.value.errors


def test_the_pinned_version_travels_with_the_recorded_config() -> None:
    cfg = _parse({"delta_table": "s3://data/t", "batch_size": 8})
    recorded = msgspec.structs.replace(cfg, data=ds.pinned(cfg.data, 4))
    wire = config_to_dict(recorded)
    assert wire["data"] == {"delta_table": "s3://data/t", "batch_size": 8, "version": 4}
    # What every reader of the event sees (worker, trial): the pinned version, never "latest".
    assert config_from_wire(wire).delta_source == ds.DeltaSource(table="s3://data/t", version=4)


@pytest.mark.parametrize(("uri", "where"), [
    ("s3://data/a/b/", ds.TableLocation(kind="s3", bucket="data", prefix="a/b")),
    ("/srv/t/", ds.TableLocation(kind="local", path="/srv/t")),
    ("file:///srv/t", ds.TableLocation(kind="local", path="/srv/t")),
])
def test_uris_locate_a_bucket_and_prefix_or_a_directory(uri: str, where: ds.TableLocation) -> None:
    assert ds.locate(uri) == where
    assert ds.locate(where.uri) == where


def test_storage_options_for_the_stacks_store() -> None:
    plain = ds.s3_storage_options("127.0.0.1:9000", "k", "s", secure=False)
    assert plain["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and plain["AWS_ALLOW_HTTP"] == "true"
    assert (plain["AWS_ACCESS_KEY_ID"], plain["AWS_SECRET_ACCESS_KEY"]) == ("k", "s")
    tls = ds.s3_storage_options("s3.example.org", "k", "s", secure=True)
    assert tls["AWS_ENDPOINT_URL"] == "https://s3.example.org" and tls["AWS_ALLOW_HTTP"] == "false"


# -- which log files a version needs -------------------------------------------------------------------------------


def _c(v: int) -> str:
    return f"{v:020d}.json"


def _cp(v: int, part: int | None = None, parts: int | None = None) -> str:
    return f"{v:020d}.checkpoint.parquet" if part is None else f"{v:020d}.checkpoint.{part:010d}.{parts:010d}.parquet"


@pytest.mark.parametrize(("names", "version", "needed"), [
    ([_c(0), _c(1), _c(2)], 1, [_c(0), _c(1)]),
    ([_c(0), _c(1), _c(2), "_last_checkpoint", "00000000000000000001.crc"], 2, [_c(0), _c(1), _c(2)]),
    # A checkpoint at or below the version replaces the commits before it.
    ([*map(_c, range(13)), _cp(10)], 12, [_cp(10), _c(11), _c(12)]),
    ([*map(_c, range(13)), _cp(10)], 10, [_cp(10)]),
    # ...one after it is no use (and _last_checkpoint, which names it, is never copied).
    ([*map(_c, range(13)), _cp(10), "_last_checkpoint"], 9, list(map(_c, range(10)))),
    # Log cleaned up before the checkpoint: only the checkpoint and what follows are there.
    ([_cp(10), _c(10), _c(11)], 11, [_cp(10), _c(11)]),
    # A multi-part checkpoint counts only with every part; an incomplete one is passed over.
    ([*map(_c, range(6)), _cp(3, 1, 2), _cp(3, 2, 2), _cp(5, 1, 2)], 5, [_cp(3, 1, 2), _cp(3, 2, 2), _c(4), _c(5)]),
    ([_c(0)], 3, [_c(0)]),  # the reader itself notices the missing versions
    ([], 0, []),
])
def test_a_version_needs_its_newest_checkpoint_and_the_commits_after(names: list[str], version: int,
                                                                    needed: list[str]) -> None:
    assert ds.log_files_for(names, version) == needed


# -- the trial's grant ---------------------------------------------------------------------------------------------


def test_a_trial_may_read_its_experiments_table_and_nothing_beside_it() -> None:
    grant = StoreGrant.of(7).with_table(ds.locate("s3://data/tables/t1"), "kiln")
    assert grant.elsewhere == (("data", "tables/t1/"),)
    for method, key in (("GET", "tables/t1/_delta_log/00000000000000000000.json"), ("LIST", "tables/t1/_delta_log/"),
                        ("GET", "tables/t1/p=a%20b/part-0.parquet"), ("LIST", "tables/t1/")):
        assert store_refusal(grant, method, key, "data") == "", (method, key)
    refused = [
        ("PUT", "tables/t1/_delta_log/00000000000000000009.json", "data", "only read"),
        ("GET", "tables/t10/x.parquet", "data", "outside"),  # a sibling sharing the name's start
        ("LIST", "tables/", "data", "outside"),
        ("LIST", "", "data", "empty"),
        ("GET", "tables/t1/../t2/x", "data", "'..'"),
        ("GET", "tables/t1/x.parquet", "other", "nothing in bucket 'other'"),
        ("GET", "tables/t1/x.parquet", "", "outside"),  # the same key in the cluster's bucket is not granted
    ]
    for method, key, bucket, words in refused:
        assert words in store_refusal(grant, method, key, bucket), (method, key, bucket)
    # Its own checkpoints are as before.
    assert store_refusal(grant, "PUT", "checkpoints/7/u/model.pt") == ""


def test_a_table_in_the_clusters_bucket_is_granted_there_read_only() -> None:
    grant = StoreGrant.of(7).with_table(ds.locate("s3://kiln/data/t"), "kiln")
    assert grant.read == ("checkpoints/7/", "data/t/") and grant.write == ("checkpoints/7/",)
    assert store_refusal(grant, "GET", "data/t/_delta_log/00000000000000000000.json") == ""
    assert "outside" in store_refusal(grant, "PUT", "data/t/_delta_log/00000000000000000001.json")
    # A local table needs no grant; no table, none either.
    assert StoreGrant.of(7).with_table(ds.locate("/srv/t"), "kiln") == StoreGrant.of(7)
    assert StoreGrant.of(7).with_table(None, "kiln") == StoreGrant.of(7)


# -- lineage: digests, the event, the row, the answer --------------------------------------------------------------


def test_the_config_digest_is_of_the_text_as_submitted() -> None:
    text = "name: t\nentrypoint: python3 train.py\n"
    assert ev.config_digest(text) == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert ev.config_digest(text) != ev.config_digest(text + "# a comment\n")  # the text, not its meaning


CONFIG = ("name: t\nentrypoint: python3 train.py\n"
          "searcher: {name: single, metric: loss, max_length: {batches: 10}}\ndata: {batch_size: 8}\n")


def test_a_submission_records_its_lineage(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    published: list[Any] = []

    async def publish_ack(event: Any) -> PubAck:
        published.append(event)
        return PubAck(stream="KILN_EVENTS", seq=41)

    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        bus = SimpleNamespace(is_connected=True, publish_ack=publish_ack)
        minio = SimpleNamespace(stat_object=lambda bucket, key: None)
        yield GatewayDeps(pool=_OkPool(), bus=bus, minio=minio, bucket="kiln",  # type: ignore[arg-type]
                          max_context_bytes=1 << 20)

    blob = context.pack(tmp_path)
    with TestClient(create_app(deps, max_body_bytes=4 << 20)) as http:
        resp = http.post("/api/v1/experiments", data={"config": CONFIG}, headers=AUTH,
                         files={"context": ("c.tar.gz", blob, "application/gzip")})
    assert resp.status_code == 201, resp.text
    (event,) = published
    assert event.lineage == ev.Lineage(config_digest=ev.config_digest(CONFIG), code_digest=context.digest(blob))
    assert event.config["data"] == {"batch_size": 8}  # no table: nothing pinned, the user's data untouched


LINEAGE = ev.Lineage(config_digest="sha256:c", code_digest="sha256:d",
                     data=ev.DataVersion(table="s3://data/t", version=1, latest=True, table_id="id-1",
                                         committed_at=1.5),
                     parent=ev.SourceCheckpoint(uuid="u", experiment_id=3, trial_id=4, steps_completed=20,
                                                storage="s3://kiln/checkpoints/3", named_by="source_trial_id"))


def _submitted(lineage: ev.Lineage | None) -> ev.ExperimentSubmitted:
    return ev.ExperimentSubmitted(experiment_id=1, config={**BASE}, config_yaml="name: x\n", context_digest="sha256:d",
                                  context_size=1, seed=1, submitted_at=100.0, lineage=lineage)


def test_the_read_model_keeps_the_recorded_lineage_and_nothing_for_older_events() -> None:
    f = Fold()
    f.apply(Item(seq=1, ts=1.0, event=_submitted(LINEAGE)))
    assert json.loads(f.experiments[1]["lineage"]) == msgspec.to_builtins(LINEAGE)
    old = Fold()
    old.apply(Item(seq=1, ts=1.0, event=_submitted(None)))
    assert old.experiments[1]["lineage"] is None


def test_the_api_answers_the_recorded_lineage_or_the_digests_it_can_derive() -> None:
    answer = experiment_lineage(1, json.loads(msgspec.json.encode(LINEAGE)), "name: x\n", "sha256:d")
    assert (answer.data, answer.parent, answer.recorded) == (LINEAGE.data, LINEAGE.parent, True)
    derived = experiment_lineage(1, None, "name: x\n", "sha256:d")
    assert (derived.config_digest, derived.code_digest) == (ev.config_digest("name: x\n"), "sha256:d")
    assert (derived.data, derived.parent, derived.recorded) == (None, None, False)


def test_an_event_with_lineage_reads_back_and_an_old_reader_skips_it() -> None:
    wire = msgspec.json.encode(_submitted(LINEAGE))
    assert msgspec.json.decode(wire, type=ev.ExperimentSubmitted).lineage == LINEAGE

    class OldSubmitted(msgspec.Struct, kw_only=True, tag="ExperimentSubmitted", tag_field="type"):
        experiment_id: int
        config: dict[str, Any]

    assert msgspec.json.decode(wire, type=OldSubmitted).experiment_id == 1


# -- tensors -------------------------------------------------------------------------------------------------------


def test_numeric_and_fixed_length_list_columns_become_tensors() -> None:
    table = pa.table({"x": pa.array([1, 2, 3], pa.int64()), "y": [0.5, 1.5, 2.5], "ok": [True, False, True],
                      "v": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32(), 2)),
                      "w": [[1, 2], [3, 4], [5, 6]]})
    t = _tensors(table)
    assert t["x"].tolist() == [1, 2, 3] and t["x"].dtype == torch.int64
    assert t["y"].tolist() == [0.5, 1.5, 2.5] and t["ok"].dtype == torch.bool
    assert t["v"].shape == (3, 2) and t["v"].dtype == torch.float32 and t["v"][2].tolist() == [5.0, 6.0]
    assert t["w"].shape == (3, 2) and t["w"][1].tolist() == [3, 4]


@pytest.mark.parametrize(("column", "words"), [
    (pa.array(["a", "b"]), "no tensor form"),
    (pa.array([[1, 2], [3]]), "no tensor form"),  # ragged
    (pa.array([1, None]), "nulls"),
])
def test_columns_without_a_tensor_form_are_refused_by_name(column: pa.Array, words: str) -> None:
    with pytest.raises((TypeError, ValueError), match=words) as err:
        _tensors(pa.table({"col": column}))
    assert "'col'" in str(err.value)


def test_kiln_data_loads_no_deltalake_pyarrow_or_torch_until_used() -> None:
    code = "import kiln, kiln.data, json, sys; kiln.data; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    roots = {m.split(".")[0] for m in json.loads(out.stdout.splitlines()[-1])}
    assert not roots & {"deltalake", "pyarrow", "torch", "services", "httpx"}
