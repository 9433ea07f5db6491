"""A URL configuration with views that fail unexpectedly, for the 500 tests."""

from django.urls import path
from rest_framework.decorators import api_view

from gateway_project.urls import handler404, handler500, urlpatterns  # noqa: F401
from llm.views import _chat_endpoint


@api_view(["GET"])
def failing_drf_view(request):
    raise RuntimeError("secret detail that must not reach the client")


@_chat_endpoint("failing")
async def failing_chat_view(request, outcome):
    raise RuntimeError("secret detail that must not reach the client")


urlpatterns = [
    path("failing/drf", failing_drf_view),
    path("failing/chat", failing_chat_view),
    *urlpatterns,
]
