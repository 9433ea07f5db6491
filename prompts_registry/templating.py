"""The Jinja2 environment of prompt templates and the types of their variables.

Sync-time validation and request-time rendering share this module, so a
template that passes ``sync_prompts`` renders with the same rules.
"""

import functools
import math

from django.conf import settings
from jinja2 import StrictUndefined, Template, TemplateRuntimeError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

# Python 3.11 refuses to convert an int of more than 4300 digits to a string
# (sys.get_int_max_str_digits), so a template could not print a larger number
# anyway. Products and powers beyond it are rejected before they are computed.
MAX_INTEGER_DIGITS = 4300
_MAX_INTEGER_BITS = math.ceil(MAX_INTEGER_DIGITS * math.log2(10))

# lipsum and namespace can build text without bound (lipsum(n) writes n
# paragraphs, a namespace attribute can double on every loop pass), and cycler
# and joiner have no use in a prompt. All four are also the usual starting
# points of template injection payloads, so prompt templates may not use them.
BLOCKED_GLOBALS = ("cycler", "joiner", "lipsum", "namespace")


class TemplateLimitExceeded(TemplateRuntimeError):
    """Raised when an operator in a template would build a value too large."""


class PromptSandbox(SandboxedEnvironment):
    """Jinja2's sandbox, with ``*`` and ``**`` bounded by the size of a prompt.

    Without the bound a single ``{{ text * n }}`` allocates gigabytes, and
    ``{{ 7 ** 30000000 }}`` holds the GIL, and so stalls every thread of the
    process, for tens of seconds before any length check runs.
    Jinja2 does not fold intercepted operators at compile time either, so
    ``{{ 7 ** 99999999 }}`` fails when rendered instead of hanging the sync.

    NOTE: filters and methods that take a width (``center``, ``format``,
    ``str.ljust``) and the CPU time of nested loops stay unbounded. Only the
    length of the rendered text is checked while it is produced.
    """

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            _check_product(left, right)
        elif operator == "**":
            _check_power(left, right)
        return super().call_binop(context, operator, left, right)


# StrictUndefined turns a missing variable into an error instead of an empty
# string. Autoescape is off because prompts are plain text, not HTML.
# trim_blocks and lstrip_blocks keep {% if %} and {% for %} lines from leaving
# blank lines and indentation in the rendered prompt.
environment = PromptSandbox(
    undefined=StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
)

# Names that a template may use without declaring them: Jinja2's globals
# (range, dict, ...). blocked_uses rejects the BLOCKED_GLOBALS among them.
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


def parse_template(source: str) -> nodes.Template:
    """Parse and compile a template and return its syntax tree.

    Raises ``jinja2.TemplateSyntaxError`` when the template does not parse or
    compile (an unknown filter, for example, fails at compile time).
    """
    ast = environment.parse(source)
    environment.compile(ast)
    return ast


def template_variables(ast: nodes.Template) -> set[str]:
    """Return the variables a template reads from its context."""
    return meta.find_undeclared_variables(ast) - BUILTIN_NAMES


def fixed_text_length(ast: nodes.Template) -> int:
    """Return the length of the literal text that every render contains.

    Only text outside ``{% %}`` blocks counts, because text inside an ``if``
    or a loop may not be rendered at all.
    """
    return sum(
        len(child.data)
        for statement in ast.body
        if isinstance(statement, nodes.Output)
        for child in statement.nodes
        if isinstance(child, nodes.TemplateData)
    )


def blocked_uses(ast: nodes.Template) -> list[tuple[str, int]]:
    """Return each dunder attribute and blocked global a template uses, with its line.

    The sandbox raises SecurityError for a dunder attribute at render time,
    so a template that uses one fails on every request that reaches it.
    """
    uses = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Name)):
        if isinstance(node, nodes.Name):
            if node.ctx == "load" and node.name in BLOCKED_GLOBALS:
                uses.append((node.name, node.lineno))
            continue
        name = _accessed_attribute(node)
        if name is not None and name.startswith("__"):
            uses.append((f"the attribute {name}", node.lineno))
    return uses


def _accessed_attribute(node: nodes.Node) -> str | None:
    """Return the attribute name that a Getattr, Getitem or attr filter reads."""
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node, nodes.Getitem):
        argument = node.arg
    elif node.name == "attr" and node.args:
        argument = node.args[0]
    else:
        return None
    if isinstance(argument, nodes.Const) and isinstance(argument.value, str):
        return argument.value
    return None


# Synced versions never change, so a compiled template keyed by its source
# text can never be stale: the active version is still read from the database
# on every render.
@functools.lru_cache(maxsize=256)
def compiled_template(source: str) -> Template:
    return environment.from_string(source)


def max_text_chars() -> int:
    """Return the longest text a template may build: the larger length limit."""
    return max(settings.CHAT_MAX_PROMPT_CHARS, settings.CHAT_MAX_SYSTEM_CHARS)


def _check_product(left: object, right: object) -> None:
    """Raise TemplateLimitExceeded when ``left * right`` would be too large."""
    if isinstance(left, int) and isinstance(right, int):
        # A product has at most as many bits as its factors together.
        if left.bit_length() + right.bit_length() > _MAX_INTEGER_BITS:
            raise TemplateLimitExceeded(
                f"'*' would produce a number of {MAX_INTEGER_DIGITS} digits or more"
            )
        return
    sequence, count = (left, right) if isinstance(right, int) else (right, left)
    if not isinstance(count, int) or count <= 1:
        return
    if isinstance(sequence, str):
        size = len(sequence) * count
    elif isinstance(sequence, list | tuple):
        # A repeated list is cheap to build but prints as the repr of every
        # item, so its printed size is what must fit.
        size = len(repr(sequence)) * count
    else:
        return
    limit = max_text_chars()
    if size > limit:
        kind = "a string" if isinstance(sequence, str) else "an array"
        raise TemplateLimitExceeded(
            f"'*' would build {kind} of {size} characters, more than the {limit} "
            "a prompt may have"
        )


def _check_power(base: object, exponent: object) -> None:
    """Raise TemplateLimitExceeded when ``base ** exponent`` would be too large."""
    if not (isinstance(base, int) and isinstance(exponent, int)):
        # Float powers overflow to an OverflowError at once.
        return
    if exponent < 2 or abs(base) < 2:
        return
    # The first test keeps the estimate's float product from overflowing.
    if (
        exponent > _MAX_INTEGER_BITS
        or exponent * math.log2(abs(base)) > _MAX_INTEGER_BITS
    ):
        raise TemplateLimitExceeded(
            f"'**' would produce a number of {MAX_INTEGER_DIGITS} digits or more"
        )


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
