from django.urls import path

from llm.consumers import ChatConsumer

websocket_urlpatterns = [
    path("ws/chat", ChatConsumer.as_asgi(), name="ws-chat"),
]
