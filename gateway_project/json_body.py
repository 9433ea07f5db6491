"""Client JSON, from REST bodies and websocket frames, read under one set of rules.

Every view and the websocket read client JSON through this module, so they
accept and reject the same input:

- The text is UTF-8, as RFC 8259 section 8.1 requires between systems. A
  leading byte order mark is skipped. A Content-Type charset other than utf-8
  is rejected with 415.
- NaN, Infinity and numbers beyond a float's range are rejected: they are not
  JSON, and range checks such as "temperature from 0 to 2" cannot catch them.
- Arrays and objects nest at most MAX_JSON_DEPTH levels. Deeper input reaches
  Python's recursion limit in the parser, or later in code that walks it.
- No string, neither a name nor a value, contains NUL or a lone surrogate (a
  \\ud800-\\udfff escape without its pair). A lone surrogate has no UTF-8
  encoding, so it would fail every later step that encodes the text.
"""

import json
import math
import re
import sys
from typing import Any, Literal

from django.http import HttpRequest
from django.utils.http import parse_header_parameters
from rest_framework.parsers import BaseParser

from gateway_project.errors import ApiError, InvalidField, printable

MAX_JSON_DEPTH = 64
# The maximum number of unknown fields an error message lists by name. The
# rest are only counted.
MAX_NAMED_FIELDS = 10
JSON_MEDIA_TYPE = "application/json"

Subject = Literal["body", "frame"]
_FIXES = {"body": "send a JSON object", "frame": "send one JSON object per frame"}
_UTF8_BOM = b"\xef\xbb\xbf"
_FORBIDDEN_CHARACTER = re.compile("[\x00\ud800-\udfff]")


def json_object_body(request: HttpRequest, *, example: str) -> dict:
    """Return the JSON object in the body of a Django request; raise ApiError.

    The body is read through ``request.body``, so a chunked body without
    Content-Length is read like any other, and Django raises RequestDataTooBig
    (413 in the error shape) for one over DATA_UPLOAD_MAX_MEMORY_SIZE.
    ``example`` is a body the endpoint accepts, quoted when the body is not an
    object.
    """
    if request.content_type != JSON_MEDIA_TYPE:
        raise ApiError(
            "Content-Type must be application/json; send the body as JSON.",
            code="unsupported_media_type",
            status_code=415,
        )
    check_charset(request.content_params)
    raw = request.body
    if not raw:
        raise ApiError(
            f"The body is empty; send a JSON object, for example {example}.",
            code="invalid_json",
        )
    body = json_object(json_loads(raw, subject="body"), subject="body", example=example)
    check_strings(body)
    return body


def check_charset(content_params: dict[str, str]) -> None:
    """Raise 415 unless the Content-Type names no charset or names UTF-8."""
    charset = content_params.get("charset")
    if charset is None or charset.lower() in ("utf-8", "utf8"):
        return
    raise ApiError(
        f"The charset {charset!r} is not supported: send the body as UTF-8, with "
        "Content-Type: application/json or application/json; charset=utf-8.",
        code="unsupported_media_type",
        status_code=415,
    )


def json_loads(data: str | bytes, *, subject: Subject) -> Any:
    """Decode JSON text under the rules above; raise ApiError(code="invalid_json").

    Strings are not checked here; ``check_strings`` does that, naming the field.
    """
    text = _utf8_text(data, subject) if isinstance(data, bytes) else data
    try:
        value = json.loads(
            text.removeprefix("\ufeff"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_integer,
        )
    except RecursionError:
        raise _too_deep(subject) from None
    except ValueError as error:
        raise ApiError(
            f"The {subject} is not valid JSON ({error}); {_FIXES[subject]}.",
            code="invalid_json",
        ) from None
    _check_depth(value, subject)
    return value


def json_object(value: Any, *, subject: Subject, example: str) -> dict:
    """Return ``value`` if it is a JSON object; raise ApiError otherwise."""
    if isinstance(value, dict):
        return value
    raise ApiError(
        f"The {subject} must be a JSON object, not {json_type_name(value)}; send "
        f"for example {example}.",
        code="invalid_json",
    )


def check_strings(value: Any) -> None:
    """Raise InvalidField naming the first string with NUL or a lone surrogate.

    Object names are checked as well as values. The error's field is the
    string's path, such as ``variables.text``.
    """
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path, is_name=False)
        elif isinstance(item, dict):
            for name in item:
                _check_text(name, (*path, name), is_name=True)
            # Reversed, so the stack visits the values in document order.
            stack.extend(
                (child, (*path, name)) for name, child in reversed(item.items())
            )
        elif isinstance(item, list):
            stack.extend(
                (item[index], (*path, index)) for index in range(len(item) - 1, -1, -1)
            )


def field_path(path: tuple) -> str:
    """Join object names and array indexes as ``variables.items[2]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{printable(part)}" if text else printable(part)
    return text


def unknown_fields_message(unknown: list[str], allowed: list[str]) -> str:
    """Name up to MAX_NAMED_FIELDS unknown fields, and all the allowed ones."""
    names = ", ".join(printable(name) for name in unknown[:MAX_NAMED_FIELDS])
    if len(unknown) > MAX_NAMED_FIELDS:
        names += f" and {len(unknown) - MAX_NAMED_FIELDS} more"
    verb = "is not a known field" if len(unknown) == 1 else "are not known fields"
    return f"{names} {verb}; allowed fields: {', '.join(sorted(allowed))}."


def json_type_name(value: Any) -> str:
    """Name the JSON type of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class JSONBodyParser(BaseParser):
    """DRF parser for ``request.data`` that applies this module's rules.

    DRF reads no body without a Content-Length, so a view that may receive
    chunked bodies calls ``json_object_body`` instead.
    """

    media_type = JSON_MEDIA_TYPE

    def parse(self, stream, media_type=None, parser_context=None):
        _, content_params = parse_header_parameters(media_type or self.media_type)
        check_charset(content_params)
        value = json_loads(stream.read(), subject="body")
        check_strings(value)
        return value


def _utf8_text(data: bytes, subject: Subject) -> str:
    offset = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[offset:].decode("utf-8")
    except UnicodeDecodeError as error:
        position = offset + error.start
        raise ApiError(
            f"The {subject} is not valid UTF-8 (byte 0x{data[position]:02x} at "
            f"position {position}: {error.reason}); send the JSON encoded as UTF-8.",
            code="invalid_json",
        ) from None


def _reject_constant(name: str):
    # Python's json module accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is out of range for a number")
    return number


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        # Python refuses to convert integers with more than
        # sys.get_int_max_str_digits() digits (4300 by default).
        raise ValueError(
            f"an integer of {len(text.lstrip('-'))} digits is longer than the "
            f"limit of {sys.get_int_max_str_digits()}"
        ) from None


def _check_depth(value: Any, subject: Subject) -> None:
    level = [value]
    for depth in range(1, MAX_JSON_DEPTH + 2):
        containers = [item for item in level if isinstance(item, dict | list)]
        if not containers:
            return
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(subject)
        level = [
            child
            for container in containers
            for child in (
                container.values() if isinstance(container, dict) else container
            )
        ]


def _too_deep(subject: Subject) -> ApiError:
    return ApiError(
        f"The {subject} nests arrays or objects more than {MAX_JSON_DEPTH} levels "
        f"deep; {_FIXES[subject]} with less nesting.",
        code="invalid_json",
    )


def _check_text(text: str, path: tuple, *, is_name: bool) -> None:
    if "\x00" not in text and text.isascii():
        return
    match = _FORBIDDEN_CHARACTER.search(text)
    if match is None:
        return
    field = field_path(path)
    subject = f"The name {field}" if is_name else field
    if match.group() == "\x00":
        problem = "a NUL character"
        fix = "remove it"
    else:
        problem = f"a lone surrogate ({printable(match.group())})"
        fix = (
            "send valid Unicode text, in which a \\ud800-\\udbff escape is always "
            "followed by a \\udc00-\\udfff escape"
        )
    raise InvalidField(
        f"{subject} contains {problem} at position {match.start()}; {fix}.",
        field=field,
    )
