"""Async views that use sessions and messages, for the middleware tests."""

from django.contrib import messages
from django.http import JsonResponse
from django.urls import path


async def remember(request):
    await request.session.aset("colour", "blue")
    return JsonResponse({"status": "ok"})


async def recall(request):
    return JsonResponse({"colour": await request.session.aget("colour")})


async def notify(request):
    messages.info(request, "Saved.")
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("remember", remember),
    path("recall", recall),
    path("notify", notify),
]
