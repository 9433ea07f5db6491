from django.contrib import admin
from django.urls import include, path

from gateway_project import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", views.health, name="health"),
    path("ready", views.ready, name="ready"),
    path("schema", views.SchemaView.as_view(), name="schema"),
    path("docs", views.DocsView.as_view(url_name="schema"), name="docs"),
    path("", include("prompts_registry.urls")),
    path("", include("llm.urls")),
]

handler400 = "gateway_project.errors.handler400"
handler404 = "gateway_project.errors.handler404"
handler500 = "gateway_project.errors.handler500"
