import logging

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.decorators import api_view
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from gateway_project.errors import error_body, json_error_response, method_not_allowed

logger = logging.getLogger(__name__)


# Exempt from CSRF checks, so a POST gets the 405 below instead of a CSRF 403.
@csrf_exempt
async def health(request: HttpRequest) -> HttpResponse:
    """Report that the process is up. It checks no dependency.

    The view is async, so it runs on the event loop and never waits for a
    worker thread. A CPU-bound call that holds the GIL still delays it.
    """
    if request.method not in ("GET", "HEAD"):
        response = json_error_response(
            method_not_allowed(request.method, request.path, ["GET"])
        )
        response["Allow"] = "GET, HEAD"
        return response
    return JsonResponse({"status": "ok"})


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as error:
        return f"database: {error}"
    return None


def _check_redis() -> str | None:
    if not settings.REDIS_URL:
        return None
    from django_redis import get_redis_connection
    from redis.exceptions import RedisError

    try:
        get_redis_connection("l2").ping()
    except (RedisError, OSError) as error:
        return f"redis: {error}"
    return None


@api_view(["GET", "HEAD"])
def ready(request):
    """Report whether the database and, when configured, Redis answer."""
    checks = {"database": _check_database(), "redis": _check_redis()}
    failures = {name: problem for name, problem in checks.items() if problem}
    if failures:
        logger.warning("Readiness check failed: %s", "; ".join(failures.values()))
        body = error_body(
            "not_ready",
            f"Dependency check failed: {', '.join(sorted(failures))}.",
            field=None,
        )
        body["checks"] = {
            name: ("failed" if name in failures else "ok") for name in checks
        }
        return Response(body, status=503)
    return Response(
        {
            "status": "ready",
            "checks": {
                "database": "ok",
                "redis": "ok" if settings.REDIS_URL else "not configured",
            },
        }
    )


class _JsonUnlessDocument:
    """Render every response except the document itself as JSON.

    The schema view renders YAML and the Swagger UI view renders an HTML
    template. Their errors, and OPTIONS, which the Swagger UI template
    cannot render, leave in the gateway's JSON shape instead.
    """

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        document = request.method in ("GET", "HEAD") and response.status_code < 400
        if isinstance(response, Response) and not document:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
        return response


class SchemaView(_JsonUnlessDocument, SpectacularAPIView):
    """The OpenAPI document, as YAML unless the client asks for JSON."""


class DocsView(_JsonUnlessDocument, SpectacularSwaggerView):
    """Swagger UI for the OpenAPI document."""
