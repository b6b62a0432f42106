"""The client turns every error body the gateway sends into a readable APIError (no traceback)."""

from __future__ import annotations

import httpx
import pytest

from kiln.client import APIError, Client


def _check(status: int, body: object) -> APIError:
    client = Client("http://127.0.0.1:1", token="t")
    try:
        with pytest.raises(APIError) as info:
            client._check(httpx.Response(status, json=body))
    finally:
        client.close()
    return info.value


def test_a_litestar_validation_error_whose_extra_is_a_list() -> None:
    """Found: `kiln experiment set priority 3 100` crashed with AttributeError on a list `extra`."""
    err = _check(400, {"status_code": 400, "detail": "Validation failed for POST /api/v1/experiments/3/resources",
                       "extra": [{"message": "Input should be less than or equal to 99", "key": "priority",
                                  "source": "body"}]})
    assert err.errors == [{"path": "priority", "message": "Input should be less than or equal to 99"}]
    assert "priority: Input should be less than or equal to 99" in str(err)


def test_kiln_s_own_field_errors() -> None:
    err = _check(400, {"detail": "invalid experiment config",
                       "extra": {"errors": [{"path": "searcher.metric", "message": "required"}]}})
    assert err.errors == [{"path": "searcher.metric", "message": "required"}] and err.status == 400


@pytest.mark.parametrize("extra", [None, "text", 3, [1, "x"]])
def test_odd_extras_do_not_crash(extra: object) -> None:
    assert _check(409, {"detail": "conflict", "extra": extra}).errors == []


def test_the_live_stream_skips_keep_alive_comments_as_the_gateway_encodes_them() -> None:
    """Found: `kiln experiment create --follow` crashed (JSONDecodeError) on the first keep-alive, which the gateway
    (Litestar) sends as a comment with an empty data line, after 15 s without events (a slow start on 2 slots)."""
    from litestar.response.sse import ServerSentEventMessage

    body = b"".join(m.encode() for m in (
        ServerSentEventMessage(event="progress", data='{"progress": 0.5}'),
        ServerSentEventMessage(comment="keep-alive"),
        ServerSentEventMessage(event="end", data="{}")))
    client = Client("http://gateway.test", token="t")
    client._http = httpx.Client(base_url="http://gateway.test",
                                transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body)))
    try:
        assert list(client.stream_experiment(1)) == [("progress", {"progress": 0.5}), ("end", {})]
    finally:
        client.close()
