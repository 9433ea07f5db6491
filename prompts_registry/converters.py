from django.urls import register_converter

from prompts_registry.loading import PROMPT_NAME


class PromptNameConverter:
    """Match only names a prompt can have, so a stray byte never reaches a query.

    A NUL in a name, for one, would make PostgreSQL raise instead of finding
    nothing; such a path is a 404 before any view runs.
    """

    regex = PROMPT_NAME.pattern.removeprefix("^").removesuffix("$")

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(PromptNameConverter, "prompt_name")
