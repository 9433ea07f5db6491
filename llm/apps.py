import logging

from django.apps import AppConfig
from django.conf import settings

logger = logging.getLogger(__name__)


class LlmConfig(AppConfig):
    name = "llm"
    verbose_name = "LLM service"

    def ready(self):
        from llm.prompt_events import broadcast_prompt_activated
        from prompts_registry.signals import prompt_activated

        # Tells websocket subscribers in every process about admin activations.
        prompt_activated.connect(
            broadcast_prompt_activated, dispatch_uid="llm.broadcast_prompt_activated"
        )

        if not settings.REDIS_URL:
            logger.info(
                "REDIS_URL is not set: the response cache has only its in-process "
                "L1 tier, rate limits are counted per process, and websocket "
                "subscribers hear only of activations made in this process."
            )

        if settings.GATEWAY_AUTH == "off":
            logger.warning(
                "GATEWAY_AUTH=off: requests without an API key are served without "
                "limits. Keep the server bound to 127.0.0.1, and never deploy "
                "this way."
            )
