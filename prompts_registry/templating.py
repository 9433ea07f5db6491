"""The Jinja2 environment of prompt templates and the types of their variables.

Sync-time validation and request-time rendering share this module, so a
template that passes ``sync_prompts`` renders with the same rules.
"""

import functools
import math

from jinja2 import StrictUndefined, Template, meta
from jinja2.sandbox import SandboxedEnvironment

# StrictUndefined turns a missing variable into an error instead of an empty
# string. Autoescape is off because prompts are plain text, not HTML.
# trim_blocks and lstrip_blocks keep {% if %} and {% for %} lines from leaving
# blank lines and indentation in the rendered prompt.
environment = SandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
)

# Names that a template may use without declaring them: Jinja2's globals
# (range, dict, namespace, ...).
BUILTIN_NAMES = frozenset(environment.globals)

# Names that Jinja2 gives a meaning of its own, so a variable cannot use them.
RESERVED_NAMES = (
    frozenset(
        {"true", "false", "none", "True", "False", "None", "loop", "self", "caller"}
        | {"varargs", "kwargs", "and", "or", "not", "in", "is", "if", "else"}
    )
    | BUILTIN_NAMES
)

VARIABLE_TYPES = ("string", "integer", "number", "boolean")

_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
}


def template_variables(source: str) -> set[str]:
    """Return the variables a template reads from its context.

    Raises ``jinja2.TemplateSyntaxError`` when the template does not parse or
    compile (an unknown filter, for example, fails at compile time).
    """
    ast = environment.parse(source)
    environment.compile(ast)
    return meta.find_undeclared_variables(ast) - BUILTIN_NAMES


# Synced versions never change, so a compiled template keyed by its source
# text can never be stale: the active version is still read from the database
# on every render.
@functools.lru_cache(maxsize=256)
def compiled_template(source: str) -> Template:
    return environment.from_string(source)


def type_mismatch(value: object, declared_type: str | None) -> str | None:
    """Return why ``value`` does not match ``declared_type``, or None if it does.

    JSON has no separate integer type, but 100.0 is still rejected for an
    integer variable, and booleans never count as numbers.
    """
    if declared_type is None:
        return None
    if declared_type == "string":
        matches = isinstance(value, str)
    elif declared_type == "boolean":
        matches = isinstance(value, bool)
    elif declared_type == "integer":
        matches = isinstance(value, int) and not isinstance(value, bool)
    else:
        matches = isinstance(value, int | float) and not isinstance(value, bool)
        if matches and not math.isfinite(value):
            return f"must be a finite number, got {value}"
    if matches:
        return None
    return f"must be {_TYPE_NAMES[declared_type]}, got {json_type_name(value)}"


def json_type_name(value: object) -> str:
    """Return the JSON name of a value's type, as a caller of the API sees it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
