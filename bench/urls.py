from django.http import JsonResponse
from django.urls import path

from gateway_project.urls import handler404, handler500, urlpatterns  # noqa: F401


async def floor(request):
    """Return a fixed JSON body: what any async Django view costs on this server."""
    return JsonResponse({"status": "ok"})


urlpatterns = [path("bench/floor", floor), *urlpatterns]
