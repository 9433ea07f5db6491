"""One error shape for the whole API.

Every 4xx and 5xx body is ``{"error": {"code", "message", "field"?},
"request_id"}``. DRF views reach it through ``exception_handler``; plain async
views and websocket consumers call ``error_payload`` directly, so the shape is
built in one place.
"""

import logging

from django.conf import settings
from django.core.exceptions import DisallowedHost, PermissionDenied, RequestDataTooBig
from django.http import Http404, JsonResponse
from django.urls import reverse
from django.views import csrf, defaults
from rest_framework import exceptions, status
from rest_framework.response import Response

from gateway_project.logging import request_id_var

logger = logging.getLogger(__name__)


class ApiError(exceptions.APIException):
    """An error the API reports to the caller with a code and, if known, a field."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_request"
    default_detail = "The request is invalid."
    retry_after: float | None = None

    def __init__(self, message=None, *, code=None, field=None, status_code=None):
        super().__init__(message or self.default_detail, code or self.default_code)
        self.code = code or self.default_code
        self.field = field
        if status_code is not None:
            self.status_code = status_code


class InvalidField(ApiError):
    default_code = "invalid_field"


class NotFound(ApiError):
    status_code = status.HTTP_404_NOT_FOUND
    default_code = "not_found"
    default_detail = "The resource was not found."


def _first_validation_error(detail, path=""):
    """Return ``(field_path, message)`` for the first message in a DRF error tree."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                return _first_validation_error(value, path)
            child = f"{path}.{key}" if path else str(key)
            return _first_validation_error(value, child)
    if isinstance(detail, list) and detail:
        if all(isinstance(item, (dict, list)) for item in detail):
            for index, item in enumerate(detail):
                if item:
                    return _first_validation_error(item, f"{path}[{index}]")
        return _first_validation_error(detail[0], path)
    return (path or None), str(detail)


def printable(text: str) -> str:
    """Return ``text`` with unprintable characters written as Python escapes.

    Messages that quote client input go through it, so a NUL, a control
    character or a lone surrogate (which UTF-8 cannot encode) reaches the
    client as ``\\x00`` or ``\\ud800`` and never breaks the response.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


# Messages quote client input, which may be kilobytes long. The middle of a
# long message is cut, because its start names the problem and its end the fix.
MAX_MESSAGE_CHARS = 1000
MAX_FIELD_CHARS = 200


def _shortened(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def error_body(code: str, message: str, field: str | None = None) -> dict:
    error = {
        "code": code,
        "message": _shortened(printable(message), MAX_MESSAGE_CHARS),
    }
    if field:
        error["field"] = _shortened(printable(field), MAX_FIELD_CHARS)
    return {"error": error, "request_id": request_id_var.get()}


def request_too_large() -> ApiError:
    return ApiError(
        f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} "
        "bytes (MAX_REQUEST_BYTES); send a smaller body.",
        code="request_too_large",
        status_code=413,
    )


def method_not_allowed(method: str, path: str, allowed: list[str]) -> ApiError:
    return ApiError(
        f"{method} is not allowed on {path}; use {', '.join(allowed)}.",
        code="method_not_allowed",
        status_code=405,
    )


def error_payload(exc: Exception) -> tuple[int, dict, dict]:
    """Translate an exception into ``(status, body, headers)``.

    Unknown exceptions become a 500 that is logged with the traceback; their
    text is never sent to the caller.
    """
    headers = {}
    if isinstance(exc, Http404):
        exc = NotFound(str(exc) or None)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = request_too_large()

    if isinstance(exc, ApiError):
        body = error_body(exc.code, str(exc.detail), exc.field)
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return exc.status_code, body, headers

    if isinstance(exc, exceptions.ValidationError):
        field, message = _first_validation_error(exc.detail)
        if field and not message.startswith(field):
            message = f"{field}: {message}"
        return 400, error_body("invalid_field", message, field), headers

    if isinstance(exc, exceptions.APIException):
        code = {
            exceptions.ParseError: "invalid_json",
            exceptions.UnsupportedMediaType: "unsupported_media_type",
            exceptions.MethodNotAllowed: "method_not_allowed",
            exceptions.NotAuthenticated: "unauthenticated",
            exceptions.AuthenticationFailed: "unauthenticated",
            exceptions.PermissionDenied: "forbidden",
            exceptions.NotFound: "not_found",
            exceptions.Throttled: "rate_limited",
        }.get(type(exc), exc.default_code)
        message = str(exc.detail)
        if isinstance(exc, exceptions.UnsupportedMediaType):
            message = f"{message} Send the body as application/json."
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = str(max(1, round(wait)))
        return exc.status_code, error_body(code, message), headers

    logger.error("Unhandled error while serving the request", exc_info=exc)
    return (
        500,
        error_body("internal_error", "The gateway failed unexpectedly."),
        headers,
    )


def exception_handler(exc, context):
    """DRF exception handler: every error leaves in the gateway's error shape."""
    view = context.get("view")
    if isinstance(exc, exceptions.MethodNotAllowed) and view is not None:
        # DRF has already set the Allow header, OPTIONS included. The message
        # names only the methods a client would use.
        request = context["request"]
        allowed = [m for m in view.allowed_methods if m not in ("HEAD", "OPTIONS")]
        exc = method_not_allowed(request.method, request.path, allowed)
    status_code, body, headers = error_payload(exc)
    return Response(body, status=status_code, headers=headers)


def json_error_response(exc: Exception) -> JsonResponse:
    status_code, body, headers = error_payload(exc)
    response = JsonResponse(body, status=status_code)
    for name, value in headers.items():
        response[name] = value
    return response


def handler404(request, exception=None):
    return JsonResponse(
        error_body("not_found", f"No endpoint at {request.path}."), status=404
    )


def handler400(request, exception=None):
    """Return a 400 that Django raised before any view, in the error shape.

    Under the admin, Django's own page is kept for the browser.
    """
    if request.path.startswith(reverse("admin:index")):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return json_error_response(exception)
    if isinstance(exception, DisallowedHost):
        # request.get_host() would raise again, so the raw header is read.
        host = request.META.get("HTTP_HOST", "")
        return JsonResponse(
            error_body(
                "invalid_host",
                f"The Host header {host!r} is not in the gateway's ALLOWED_HOSTS: "
                "send the host name the gateway is served under, or add this "
                "host to ALLOWED_HOSTS.",
            ),
            status=400,
        )
    return JsonResponse(
        error_body(
            "invalid_request",
            "The request is malformed; check its headers and body.",
        ),
        status=400,
    )


def handler500(request):
    return JsonResponse(
        error_body("internal_error", "The gateway failed unexpectedly."), status=500
    )


def csrf_failure(request, reason=""):
    """CSRF_FAILURE_VIEW: a 403 in the error shape, except on the admin's forms.

    The API's POST endpoints are exempt from CSRF checks, so only a method an
    endpoint does not accept, such as POST /metrics, reaches this view.
    """
    if request.path.startswith(reverse("admin:index")):
        return csrf.csrf_failure(request, reason)
    return JsonResponse(
        error_body(
            "forbidden",
            f"CSRF verification failed: {reason} API clients need no CSRF "
            f"token, so check that {request.method} {request.path} is a "
            "documented endpoint (GET /docs lists them).",
        ),
        status=403,
    )
