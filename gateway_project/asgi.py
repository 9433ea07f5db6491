"""ASGI entry point: HTTP goes to Django, websockets to the ``llm`` consumers."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

# daphne serves no static files itself. The admin's few assets are served from
# the apps' static folders here; a busy deployment would put them behind a CDN.
django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from llm.routing import websocket_urlpatterns  # noqa: E402
from llm.ws_origin import allowed_hosts_origin_validator  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": allowed_hosts_origin_validator(URLRouter(websocket_urlpatterns)),
    }
)

from django.conf import settings  # noqa: E402

from llm.providers import get_provider  # noqa: E402

# Import the providers of the served models now: importing google-genai takes
# a few hundred ms, which the first requests would otherwise wait for.
for _model in settings.LLM_MODELS:
    get_provider(_model)
# The objects built so far live as long as the process. Frozen, they are left
# out of full garbage collections, which otherwise scan them all and pause the
# event loop for tens of ms.
gc.freeze()
