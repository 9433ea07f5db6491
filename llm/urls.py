from django.urls import path

from llm import views
from prompts_registry import converters  # noqa: F401 - registers prompt_name

urlpatterns = [
    path("chat", views.chat, name="chat"),
    path("chat/stream", views.chat_stream_view, name="chat-stream"),
    path("prompts/<prompt_name:name>/chat", views.prompt_chat, name="prompt-chat"),
    path(
        "prompts/<prompt_name:name>/chat/stream",
        views.prompt_chat_stream,
        name="prompt-chat-stream",
    ),
    path("metrics", views.metrics, name="metrics"),
]
