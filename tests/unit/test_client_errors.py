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
