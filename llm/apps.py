from django.apps import AppConfig


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
