"""Request-scoped log context: every line logged while a request is handled
carries its request id, in text and in JSON output."""

import contextvars
import json
import logging
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "request_id", default="-"
)

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class SkipUpstreamStatuses(logging.Filter):
    """Drop django.request's line for a 503 or 504.

    Those statuses are typed upstream errors (vendor down or slow, circuit
    open, model busy) that the Gemini adapter and the breaker already log, once
    per retry or state change. Under a vendor outage Django would add one ERROR
    line per request. A 500 and a 502 (such as the vendor refusing the
    gateway's key, which an operator must fix) are still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "status_code", None) not in {503, 504}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line, with ``extra`` fields kept."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
