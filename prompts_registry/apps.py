from django.apps import AppConfig


class PromptsRegistryConfig(AppConfig):
    name = "prompts_registry"
    verbose_name = "Prompt registry"
