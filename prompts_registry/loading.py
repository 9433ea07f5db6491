"""Read and validate prompt files, ``<PROMPTS_DIR>/<name>/v<N>.yaml``.

Nothing here touches the database, so ``sync_prompts --dry-run`` and the tests
can validate a folder on its own. Every error names the file and, where the
YAML parser gives them, the key and the line.
"""

import difflib
import hashlib
import json
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from django.conf import settings
from jinja2 import TemplateSyntaxError

from prompts_registry.templating import (
    BLOCKED_GLOBALS,
    RESERVED_NAMES,
    VARIABLE_TYPES,
    blocked_uses,
    fixed_text_length,
    json_type_name,
    parse_template,
    template_variables,
    type_mismatch,
)

VERSION_FILE_NAME = re.compile(r"^v([1-9][0-9]*)\.yaml$")
# Prompt names appear in URLs (/prompts/<name>) and in channel-layer group names.
PROMPT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MODEL_NAME = re.compile(r"^\S{1,100}$")

KEYS = (
    "name",
    "version",
    "description",
    "template",
    "system",
    "model",
    "parameters",
    "variables",
)
REQUIRED_KEYS = ("name", "version", "description", "template")
VARIABLE_KEYS = ("type", "default", "description")
# The length limit that every render of each template key must fit.
TEMPLATE_LIMITS = {
    "template": "CHAT_MAX_PROMPT_CHARS",
    "system": "CHAT_MAX_SYSTEM_CHARS",
}
# A prompt file nests four levels deep at most outside variable defaults.
# The limit keeps the recursive YAML composer far from Python's recursion limit.
MAX_YAML_DEPTH = 32


@dataclass(frozen=True)
class ParameterRule:
    type: str
    minimum: int
    maximum: int | None = None


PARAMETERS = {
    "temperature": ParameterRule("number", 0, 2),
    "max_tokens": ParameterRule("integer", 1),
    "top_p": ParameterRule("number", 0, 1),
    "top_k": ParameterRule("integer", 1),
}


@dataclass(frozen=True)
class PromptFileError:
    """One problem in a prompt file, with the key and line when they are known."""

    path: str
    message: str
    key: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        location = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.key:
            return f"{location}: {self.key}: {self.message}"
        return f"{location}: {self.message}"


class InvalidPromptFile(Exception):
    """Raised when a prompt file fails validation. ``errors`` lists every problem."""

    def __init__(self, errors: list[PromptFileError]):
        super().__init__("\n".join(str(error) for error in errors))
        self.errors = errors


@dataclass(frozen=True)
class PromptFile:
    """The validated content of one prompt file, ready to become a PromptVersion."""

    name: str
    version: int
    description: str
    template: str
    system: str | None
    model: str | None
    parameters: dict
    variables: dict
    content_hash: str
    # Relative to the prompts folder with "/" separators, e.g. "summarizer/v1.yaml".
    source_path: str


@dataclass
class PromptFolder:
    """Everything found under a prompts folder, valid or not."""

    files: list[PromptFile] = field(default_factory=list)
    errors: list[PromptFileError] = field(default_factory=list)
    # Every prompt folder and every v<N>.yaml seen, including invalid ones, so
    # that a broken file is not also reported as missing.
    prompt_names: set[str] = field(default_factory=set)
    versions: set[tuple[str, int]] = field(default_factory=set)


def load_prompt_folder(root: Path) -> PromptFolder:
    """Read and validate every ``<name>/v<N>.yaml`` below ``root``.

    Files other than YAML are skipped, so a prompt folder may contain a README.
    Hidden files and folders are skipped too.
    """
    folder = PromptFolder()
    if not root.is_dir():
        message = "is not a folder: set PROMPTS_DIR or pass --path."
        folder.errors.append(PromptFileError(str(root), message))
        return folder

    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            outside = _link_outside_root(entry, root)
            if outside is not None:
                folder.errors.append(outside)
                continue
            _load_prompt_subfolder(entry, root, folder)
        elif entry.suffix in (".yaml", ".yml"):
            message = (
                "is outside a prompt folder: move it to "
                f"{root / entry.stem / 'v1.yaml'}, in a folder named after the prompt."
            )
            folder.errors.append(PromptFileError(str(entry), message))
    return folder


def _load_prompt_subfolder(directory: Path, root: Path, folder: PromptFolder) -> None:
    name = directory.name
    if not PROMPT_NAME.match(name):
        message = (
            "is not a valid prompt name: use 1 to 100 lowercase letters, digits, "
            "'-' or '_', starting with a letter or digit."
        )
        folder.errors.append(PromptFileError(str(directory), message))
        return
    folder.prompt_names.add(name)

    version_files = []
    misnamed_files = 0
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix not in (".yaml", ".yml"):
            continue
        match = VERSION_FILE_NAME.match(path.name)
        if match is None:
            message = "is not a version file name: name it v<N>.yaml, e.g. v1.yaml."
            folder.errors.append(PromptFileError(str(path), message))
            misnamed_files += 1
            continue
        version_files.append((int(match.group(1)), path))

    if not version_files and not misnamed_files:
        message = "contains no version file: add v1.yaml or remove the folder."
        folder.errors.append(PromptFileError(str(directory), message))

    for version, path in sorted(version_files):
        folder.versions.add((name, version))
        try:
            folder.files.append(load_prompt_file(path, root=root))
        except InvalidPromptFile as error:
            folder.errors.extend(error.errors)


def load_prompt_file(path: Path, *, root: Path) -> PromptFile:
    """Read and validate one ``<root>/<name>/v<N>.yaml``.

    Raises InvalidPromptFile listing every problem found in the file.
    """
    display_path = str(path)
    outside = _link_outside_root(path, root)
    if outside is not None:
        raise InvalidPromptFile([outside])
    try:
        text = _read_limited(path).decode("utf-8")
    except UnicodeDecodeError as error:
        message = f"is not valid UTF-8 (byte {error.start}): save the file as UTF-8."
        raise InvalidPromptFile([PromptFileError(display_path, message)]) from None
    except _FileRejected as rejected:
        raise InvalidPromptFile(
            [PromptFileError(display_path, str(rejected))]
        ) from None
    except OSError as error:
        message = f"could not be read: {error.strerror}."
        raise InvalidPromptFile([PromptFileError(display_path, message)]) from None

    data, key_lines, errors = _parse_yaml(text, display_path)
    if data is None and errors:
        raise InvalidPromptFile(errors)

    match = VERSION_FILE_NAME.match(path.name)
    checker = _DocumentChecker(display_path, key_lines)
    checker.errors.extend(errors)
    content = checker.check(
        data,
        expected_name=path.parent.name,
        expected_version=int(match.group(1)) if match else None,
    )
    if checker.errors:
        raise InvalidPromptFile(checker.errors)

    return PromptFile(
        name=content["name"],
        version=content["version"],
        description=content["description"],
        template=content["template"],
        system=content.get("system"),
        model=content.get("model"),
        parameters=content.get("parameters", {}),
        variables=content.get("variables", {}),
        content_hash=content_hash(content),
        source_path=path.relative_to(root).as_posix(),
    )


class _FileRejected(Exception):
    """Raised with the reason why a prompt file is not read at all."""


def _read_limited(path: Path) -> bytes:
    """Return the bytes of a regular file no larger than PROMPT_FILE_MAX_BYTES."""
    limit = settings.PROMPT_FILE_MAX_BYTES
    # Opening a named pipe would block until something writes to it.
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise _FileRejected("is not a regular file: replace it with a YAML file.")
    if info.st_size <= limit:
        with path.open("rb") as file:
            # One byte past the limit shows a file that grew after the stat.
            data = file.read(limit + 1)
        if len(data) <= limit:
            return data
    raise _FileRejected(
        f"is larger than PROMPT_FILE_MAX_BYTES ({limit} bytes): shorten the "
        "prompt, or raise PROMPT_FILE_MAX_BYTES."
    )


def _link_outside_root(path: Path, root: Path) -> PromptFileError | None:
    """Return an error when ``path`` resolves to a place outside ``root``.

    A symbolic link inside the prompts folder could otherwise make
    sync_prompts read, and store as a prompt, any file the process can read.
    """
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return PromptFileError(
        str(path),
        f"is a symbolic link to {target}, outside {root}: copy the file or "
        "folder into the prompts folder instead.",
    )


def content_hash(content: dict) -> str:
    """Return the sha256 of the content as canonical JSON.

    Comments, key order, quoting style and line endings of the YAML file do not
    change it. Optional keys that are absent or empty are left out of
    ``content``, so adding a new optional key to the schema keeps old hashes.
    """
    canonical = json.dumps(
        content, sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _parse_yaml(
    text: str, display_path: str
) -> tuple[object, dict[str, int], list[PromptFileError]]:
    """Parse YAML text into data plus the line of every mapping key.

    ``yaml.safe_load`` silently keeps the last of two equal keys. Composing
    the node tree first lets duplicates be rejected and keys be located.
    """
    loader = _PromptFileLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _StructureRejected as error:
        message = f"{error.problem}."
        return None, {}, [PromptFileError(display_path, message, line=error.line)]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or "could not be parsed"
        if error.context:
            problem = f"{problem} ({error.context})"
        message = f"is not valid YAML: {problem}."
        line = mark.line + 1 if mark else None
        return None, {}, [PromptFileError(display_path, message, line=line)]
    except yaml.YAMLError as error:
        message = f"is not valid YAML: {error}."
        return None, {}, [PromptFileError(display_path, message)]
    finally:
        loader.dispose()

    key_lines: dict[str, int] = {}
    errors: list[PromptFileError] = []
    if node is not None:
        _collect_key_lines(node, "", key_lines, errors, display_path)
    return data, key_lines, errors


class _StructureRejected(yaml.YAMLError):
    """Raised when a prompt file uses YAML that the loader does not accept."""

    def __init__(self, problem: str, mark: yaml.Mark):
        super().__init__(problem)
        self.problem = problem
        self.line = mark.line + 1


class _PromptFileLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases, and with a nesting limit.

    Each alias repeats its anchor's whole value, so a few lines of nested
    aliases expand to gigabytes (the "billion laughs" attack). Prompt files
    have no need for them, so the first anchor or alias stops the parse
    before anything is expanded.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _StructureRejected(
                f"uses the YAML alias *{event.anchor}: prompt files may not use "
                "anchors or aliases, so write the value out in full",
                event.start_mark,
            )
        if getattr(event, "anchor", None) is not None:
            raise _StructureRejected(
                f"defines the YAML anchor &{event.anchor}: prompt files may not use "
                "anchors or aliases, so write the value out in full",
                event.start_mark,
            )
        if self.depth >= MAX_YAML_DEPTH:
            raise _StructureRejected(
                f"nests values more than {MAX_YAML_DEPTH} levels deep: flatten them",
                event.start_mark,
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _collect_key_lines(node, prefix, key_lines, errors, display_path):
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _collect_key_lines(item, prefix, key_lines, errors, display_path)
        return
    if not isinstance(node, yaml.MappingNode):
        return

    seen: set[str] = set()
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
            continue
        key = f"{prefix}.{key_node.value}" if prefix else key_node.value
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
            message = (
                f"is a duplicate key (first on line {key_lines[key]}): "
                "remove one of them."
            )
            errors.append(PromptFileError(display_path, message, key, line))
            continue
        seen.add(key_node.value)
        key_lines[key] = line
        _collect_key_lines(value_node, key, key_lines, errors, display_path)


class _DocumentChecker:
    """Validator of the parsed data of one prompt file, collecting every error."""

    def __init__(self, display_path: str, key_lines: dict[str, int]):
        self.display_path = display_path
        self.key_lines = key_lines
        self.errors: list[PromptFileError] = []

    def error(self, key: str | None, message: str) -> None:
        self.errors.append(
            PromptFileError(self.display_path, message, key, self._line_of(key))
        )

    def _line_of(self, key: str | None) -> int | None:
        # A key the file does not contain (a missing one) gets its parent's line.
        while key:
            if key in self.key_lines:
                return self.key_lines[key]
            key = key.rpartition(".")[0]
        return None

    def check(self, data, *, expected_name, expected_version) -> dict:
        """Return the normalized content of the file, recording errors on the way."""
        if data is None:
            self.error(
                None,
                "is empty: a prompt file needs name, version, "
                "description and template.",
            )
            return {}
        if not isinstance(data, dict):
            self.error(None, f"must be a YAML mapping, got {json_type_name(data)}.")
            return {}

        for key in data:
            if key in PARAMETERS:
                self.error(key, "is a parameter: move it under parameters.")
            elif key not in KEYS:
                self.error(str(key), _unknown_key_message(str(key), KEYS))
        for key in REQUIRED_KEYS:
            if data.get(key) is None:
                self.error(key, "is required.")

        content: dict = {}
        if data.get("name") is not None:
            content["name"] = self._check_name(data["name"], expected_name)
        if data.get("version") is not None:
            content["version"] = self._check_version(data["version"], expected_version)
        for key in ("description", "template", "system"):
            if data.get(key) is not None:
                content[key] = self._check_text(key, data[key])
        if data.get("model") is not None:
            content["model"] = self._check_model(data["model"])
        # Empty parameters and variables are left out, as if the key were absent.
        if data.get("parameters") is not None:
            parameters = self._check_parameters(data["parameters"])
            if parameters:
                content["parameters"] = parameters
        if data.get("variables") is not None:
            variables = self._check_variables(data["variables"])
            if variables:
                content["variables"] = variables

        self._check_templates(content, data.get("variables"))
        return content

    def _check_name(self, value, expected_name: str) -> str:
        if value != expected_name:
            self.error(
                "name",
                f"must equal the folder name {expected_name!r}, got {value!r}: "
                "rename the folder or fix the name.",
            )
        return value

    def _check_version(self, value, expected_version: int | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error("version", f"must be an integer, got {json_type_name(value)}.")
        elif value != expected_version:
            self.error(
                "version",
                f"must equal the number in the file name ({expected_version}), "
                f"got {value}.",
            )
        return value

    def _check_text(self, key: str, value) -> str:
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {json_type_name(value)}.")
        elif not value.strip():
            self.error(key, "must not be empty: write text or leave the key out.")
        return value

    def _check_model(self, value) -> str:
        if not isinstance(value, str) or not MODEL_NAME.match(value):
            self.error(
                "model",
                "must be a model name of 1 to 100 characters without spaces, or be "
                "left out to use the default model.",
            )
        return value

    def _check_parameters(self, value) -> dict:
        if not isinstance(value, dict):
            self.error("parameters", f"must be a mapping, got {json_type_name(value)}.")
            return {}
        for name, number in value.items():
            key = f"parameters.{name}"
            rule = PARAMETERS.get(name)
            if rule is None:
                self.error(key, _unknown_key_message(str(name), PARAMETERS))
                continue
            problem = type_mismatch(number, rule.type)
            if problem is None:
                problem = _range_problem(number, rule)
            if problem:
                self.error(key, f"{problem}.")
        return value

    def _check_variables(self, value) -> dict:
        if not isinstance(value, dict):
            self.error(
                "variables",
                f"must be a mapping of variable names, got {json_type_name(value)}.",
            )
            return {}
        variables = {}
        for name, spec in value.items():
            key = f"variables.{name}"
            if not isinstance(name, str) or not VARIABLE_NAME.match(name):
                self.error(
                    key,
                    "is not a valid variable name: use letters, digits and '_', "
                    "starting with a letter or '_'.",
                )
                continue
            if name in RESERVED_NAMES:
                self.error(key, "is a name Jinja2 reserves: choose another name.")
                continue
            variables[name] = self._check_variable(key, spec)
        return variables

    def _check_variable(self, key: str, spec) -> dict:
        if spec is None:
            return {}
        if not isinstance(spec, dict):
            self.error(
                key,
                "must be a mapping with optional type, default and description, "
                f"got {json_type_name(spec)}.",
            )
            return {}
        for name in spec:
            if name not in VARIABLE_KEYS:
                self.error(
                    f"{key}.{name}", _unknown_key_message(str(name), VARIABLE_KEYS)
                )

        declared_type = spec.get("type")
        if "type" in spec and declared_type not in VARIABLE_TYPES:
            self.error(f"{key}.type", f"must be one of {', '.join(VARIABLE_TYPES)}.")
            declared_type = None
        if "description" in spec and not isinstance(spec["description"], str):
            self.error(f"{key}.description", "must be a string.")
        if "default" in spec:
            self._check_default(f"{key}.default", spec["default"], declared_type)
        return {name: spec[name] for name in VARIABLE_KEYS if name in spec}

    def _check_default(self, key: str, value, declared_type: str | None) -> None:
        if value is None:
            self.error(
                key,
                "must not be null: give a value, or remove default to make the "
                "variable required.",
            )
        elif not _is_json_value(value):
            self.error(
                key,
                f"must be a JSON value, got {type(value).__name__}: quote it to make "
                "it a string.",
            )
        else:
            problem = type_mismatch(value, declared_type)
            if problem:
                self.error(key, f"{problem}.")

    def _check_templates(self, content: dict, raw_variables) -> None:
        # Names declared with an invalid spec still count as declared, so one
        # mistake is not reported twice.
        declared = set(raw_variables) if isinstance(raw_variables, dict) else set()
        for key in ("template", "system"):
            source = content.get(key)
            if not isinstance(source, str):
                continue
            try:
                ast = parse_template(source)
            except TemplateSyntaxError as error:
                self.error(
                    key,
                    f"is not a valid Jinja2 template: {error.message} (line "
                    f"{error.lineno} of the {key}).",
                )
                continue
            self._check_template_safety(key, ast)
            undeclared = sorted(template_variables(ast) - declared)
            if undeclared:
                self.error(
                    key,
                    f"uses undeclared variables: {', '.join(undeclared)}. Declare "
                    f"them under variables, or remove them from the {key}.",
                )

    def _check_template_safety(self, key: str, ast) -> None:
        """Record the uses the sandbox blocks and fixed text that cannot fit."""
        uses = [f"{use} (line {line} of the {key})" for use, line in blocked_uses(ast)]
        if uses:
            self.error(
                key,
                f"uses {', '.join(uses)}. Prompt templates may not read dunder "
                f"attributes, nor use {', '.join(BLOCKED_GLOBALS)}: remove them.",
            )
        setting = TEMPLATE_LIMITS[key]
        limit = getattr(settings, setting)
        length = fixed_text_length(ast)
        if length > limit:
            self.error(
                key,
                f"has {length} characters of fixed text, more than {setting} "
                f"({limit}), so every render would be rejected: shorten the {key}.",
            )


def _unknown_key_message(key: str, allowed) -> str:
    message = "is not a known key."
    close = difflib.get_close_matches(key, list(allowed), n=1)
    if close:
        message += f" Did you mean {close[0]!r}?"
    return f"{message} Allowed keys: {', '.join(allowed)}."


def _range_problem(number: float, rule: ParameterRule) -> str | None:
    if rule.maximum is None:
        if number < rule.minimum:
            return f"must be at least {rule.minimum}, got {number}"
        return None
    if not rule.minimum <= number <= rule.maximum:
        return f"must be from {rule.minimum} to {rule.maximum}, got {number}"
    return None


def _is_json_value(value) -> bool:
    """Return whether a YAML value survives a JSON round trip unchanged.

    YAML turns unquoted dates and timestamps into date objects, which the
    database's JSON column cannot store.
    """
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, str) and _is_json_value(item) for key, item in value.items()
        )
    return False
