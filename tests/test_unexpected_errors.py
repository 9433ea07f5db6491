import logging

import pytest
from django.test import AsyncClient, Client

from tests.chat_support import request_id_filter

pytestmark = pytest.mark.urls("tests.urls_failing")

EXPECTED = {
    "error": {
        "code": "internal_error",
        "message": "The gateway failed unexpectedly.",
    },
    "request_id": "boom-1",
}


def logged_failures(caplog) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and record.exc_info
    ]


def test_drf_view_failure_is_500_in_error_shape(caplog):
    request_id_filter(caplog)

    response = Client().get("/failing/drf", headers={"X-Request-ID": "boom-1"})

    assert response.status_code == 500
    assert response.json() == EXPECTED
    records = logged_failures(caplog)
    assert len(records) == 1
    assert records[0].request_id == "boom-1"
    assert records[0].exc_info[0] is RuntimeError


async def test_chat_view_failure_is_500_in_error_shape(caplog):
    request_id_filter(caplog)

    response = await AsyncClient().post(
        "/failing/chat",
        data="{}",
        content_type="application/json",
        headers={"X-Request-ID": "boom-1"},
    )

    assert response.status_code == 500
    assert response.json() == EXPECTED
    records = logged_failures(caplog)
    assert len(records) == 1
    assert records[0].request_id == "boom-1"
    assert records[0].exc_info[0] is RuntimeError
