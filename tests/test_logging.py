import json
import logging
import os
import subprocess
import sys
from pathlib import Path

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


def test_start_up_says_when_redis_is_off(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"REDIS_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env.update(
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="start-up-test-" + "x" * 50,
        DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3",
        LOG_LEVEL="info",
    )

    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "REDIS_URL is not set: the response cache has only" in result.stderr
