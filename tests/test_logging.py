import json
import logging

from gateway_project.logging import JsonFormatter, SkipUpstreamStatuses


def request_record(status_code: int) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "django.request", "levelno": 40})
    record.status_code = status_code
    return record


def test_upstream_statuses_are_skipped():
    skip = SkipUpstreamStatuses()

    assert skip.filter(request_record(503)) is False
    assert skip.filter(request_record(504)) is False


def test_internal_and_bad_gateway_errors_are_kept():
    skip = SkipUpstreamStatuses()

    assert skip.filter(request_record(500)) is True
    assert skip.filter(request_record(502)) is True


def test_json_lines_keep_extra_fields():
    record = logging.makeLogRecord(
        {"name": "llm.cache", "levelno": 20, "levelname": "INFO", "msg": "cache_lookup"}
    )
    record.cache_hit = True
    record.request_id = "r-1"

    line = json.loads(JsonFormatter().format(record))

    assert line["message"] == "cache_lookup"
    assert line["cache_hit"] is True
    assert line["request_id"] == "r-1"
