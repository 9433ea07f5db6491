from django.urls import path

from prompts_registry import converters, views  # noqa: F401 - registers prompt_name

# The paths have no trailing slash, so no request depends on APPEND_SLASH,
# which cannot redirect a POST without losing its body.
urlpatterns = [
    path("prompts", views.PromptListApi.as_view(), name="prompt-list"),
    path(
        "prompts/<prompt_name:name>",
        views.PromptDetailApi.as_view(),
        name="prompt-detail",
    ),
    path(
        "prompts/<prompt_name:name>/render",
        views.PromptRenderApi.as_view(),
        name="prompt-render",
    ),
]
