"""Reads of the prompt registry, including rendering a prompt for a model call."""

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, QuerySet
from jinja2 import TemplateError
from jinja2.sandbox import SecurityError
from rest_framework import status

from gateway_project.errors import ApiError, InvalidField, NotFound
from prompts_registry.models import Prompt, PromptVersion
from prompts_registry.templating import compiled_template, type_mismatch

logger = logging.getLogger(__name__)


class PromptVersionInvalid(ApiError):
    """Raised when a synced prompt version breaks the template sandbox's rules.

    The fault lies with the prompt file, not with the request, so the status
    is 500 and the message tells an operator to fix the prompt.
    """

    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    default_code = "prompt_invalid"


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt version rendered with the caller's variables, ready for a model."""

    name: str
    version: int
    system: str | None
    user: str
    # None means the version sets no model, so the default model applies.
    model: str | None
    # Only the keys the version sets: temperature, max_tokens, top_p, top_k.
    parameters: dict


def prompt_list(*, names: list[str] | None = None) -> QuerySet[Prompt]:
    """Return the prompts with their active version and number of versions.

    ``names`` limits the list to those prompts, as an API key may.
    """
    prompts = Prompt.objects.select_related("active_version").annotate(
        version_count=Count("versions")
    )
    if names is not None:
        prompts = prompts.filter(name__in=names)
    return prompts.order_by("name")


def prompt_get(*, name: str) -> Prompt:
    """Return the prompt called ``name`` with its active version, or raise NotFound."""
    try:
        return Prompt.objects.select_related("active_version").get(name=name)
    except Prompt.DoesNotExist:
        raise NotFound(
            f"Prompt {name!r} was not found: GET /prompts lists the prompts."
        ) from None


def prompt_versions(*, prompt: Prompt) -> QuerySet[PromptVersion]:
    return prompt.versions.order_by("-version")


def prompt_version_get(*, name: str, version: int | None = None) -> PromptVersion:
    """Return version ``version`` of the prompt, or its active version when None.

    Each call reads the database, so an activation in the admin applies to the
    next request in every process.
    """
    if version is None:
        prompt = prompt_get(name=name)
        if prompt.active_version is None:
            raise NotFound(
                f"Prompt {name!r} has no active version: choose one in the admin."
            )
        prompt.active_version.prompt = prompt
        return prompt.active_version

    try:
        return PromptVersion.objects.select_related("prompt").get(
            prompt__name=name, version=version
        )
    except PromptVersion.DoesNotExist:
        pass
    prompt = prompt_get(name=name)
    numbers = ", ".join(
        str(number)
        for number in prompt_versions(prompt=prompt).values_list("version", flat=True)
    )
    raise NotFound(
        f"Prompt {name!r} has no version {version}: its versions are {numbers}.",
        field="version",
    )


def prompt_render(
    *, name: str, variables: dict, version: int | None = None
) -> RenderedPrompt:
    """Render a prompt's active version, or ``version``, with ``variables``.

    Raises NotFound for an unknown prompt or version,
    InvalidField(field="variables.<name>") for a missing, undeclared or
    wrongly typed variable, InvalidField(field="variables") for values the
    template cannot render or that make the text too long, and
    PromptVersionInvalid when the template breaks the sandbox's rules.
    """
    prompt_version = prompt_version_get(name=name, version=version)
    context = _template_context(prompt_version, variables)
    label = f"{name} v{prompt_version.version}"

    user = _render(prompt_version.template, context, label, "CHAT_MAX_PROMPT_CHARS")
    system = None
    if prompt_version.system:
        system = _render(prompt_version.system, context, label, "CHAT_MAX_SYSTEM_CHARS")
    return RenderedPrompt(
        name=name,
        version=prompt_version.version,
        system=system,
        user=user,
        model=prompt_version.model or None,
        parameters=dict(prompt_version.parameters),
    )


def _template_context(prompt_version: PromptVersion, variables: dict) -> dict:
    """Return the variables with defaults filled in, after checking each one."""
    declared = prompt_version.variables
    label = f"{prompt_version.prompt.name} v{prompt_version.version}"

    for name in variables:
        if name not in declared:
            names = ", ".join(sorted(declared)) or "none"
            raise InvalidField(
                f"variables.{name} is not declared by the prompt {label}: its "
                f"variables are {names}.",
                field=f"variables.{name}",
            )

    context = {}
    for name, spec in declared.items():
        if name in variables:
            value = variables[name]
        elif "default" in spec:
            value = spec["default"]
        else:
            raise InvalidField(
                f"variables.{name} is missing: the prompt {label} requires it.",
                field=f"variables.{name}",
            )
        problem = type_mismatch(value, spec.get("type"))
        if problem:
            raise InvalidField(
                f"variables.{name} {problem}.", field=f"variables.{name}"
            )
        context[name] = value
    return context


def _render(source: str, context: dict, label: str, limit_setting: str) -> str:
    """Render ``source``, stopping as soon as the text passes the length limit.

    The text is produced piece by piece, so a loop that would print gigabytes
    fails after the first piece over the limit.
    """
    limit = getattr(settings, limit_setting)
    pieces = []
    length = 0
    try:
        for piece in compiled_template(source).generate(context):
            length += len(piece)
            if length > limit:
                raise InvalidField(
                    f"The rendered prompt {label} has more than {limit_setting} "
                    f"({limit}) characters: shorten the variables.",
                    field="variables",
                )
            pieces.append(piece)
    except SecurityError as error:
        # sync_prompts rejects the dunder attributes it finds in a template,
        # so this is one it cannot find (an attribute named by a variable, or
        # a version synced before that check existed).
        logger.error("Prompt %s failed the template sandbox: %s", label, error)
        raise PromptVersionInvalid(
            f"The prompt {label} uses something the template sandbox blocks, so it "
            "cannot render. An operator must fix the prompt file and sync a new "
            "version, or activate another version."
        ) from None
    except (TemplateError, TypeError, ValueError, ArithmeticError) as error:
        # Types are checked already, so a failure here comes from a value the
        # template cannot handle (an untyped variable used as a number, say),
        # or from a value that makes '*' or '**' build too much
        # (TemplateLimitExceeded).
        raise InvalidField(
            f"Rendering the prompt {label} failed with these variables: "
            f"{str(error).rstrip('.')}. Check the variable values.",
            field="variables",
        ) from None
    return "".join(pieces)
