"""Validation of prompt files, without a database."""

import os
import textwrap
from pathlib import Path

import pytest
from django.conf import settings

from prompts_registry.loading import (
    InvalidPromptFile,
    load_prompt_file,
    load_prompt_folder,
)

VALID = """\
name: greeting
version: 1
description: Greet someone.
system: You are friendly.
template: |
  Say hello to {{ who }} in {{ words }} words.
parameters:
  temperature: 0.5
  max_tokens: 64
variables:
  who:
    type: string
    description: The person to greet.
  words:
    type: integer
    default: 10
"""


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path, root: Path) -> list[str]:
    with pytest.raises(InvalidPromptFile) as raised:
        load_prompt_file(path, root=root)
    return [str(error) for error in raised.value.errors]


def test_shipped_prompts_are_valid():
    folder = load_prompt_folder(Path(settings.PROMPTS_DIR))

    assert folder.errors == []
    versions = {(file.name, file.version) for file in folder.files}
    assert {("summarizer", 1), ("summarizer", 2)} <= versions
    assert len({name for name, _ in versions}) >= 2
    assert all(file.model is None for file in folder.files)


def test_valid_file_is_normalized(tmp_path):
    path = write(tmp_path, "greeting/v1.yaml", VALID)

    prompt = load_prompt_file(path, root=tmp_path)

    assert prompt.name == "greeting"
    assert prompt.version == 1
    assert prompt.description == "Greet someone."
    assert prompt.template == "Say hello to {{ who }} in {{ words }} words.\n"
    assert prompt.system == "You are friendly."
    assert prompt.model is None
    assert prompt.parameters == {"temperature": 0.5, "max_tokens": 64}
    assert prompt.variables == {
        "who": {"type": "string", "description": "The person to greet."},
        "words": {"type": "integer", "default": 10},
    }
    assert prompt.source_path == "greeting/v1.yaml"
    assert len(prompt.content_hash) == 64


def test_untyped_and_empty_variable_specs_are_accepted(tmp_path):
    path = write(
        tmp_path,
        "echo/v1.yaml",
        """\
        name: echo
        version: 1
        description: Echo.
        template: "{{ a }} {{ b }}"
        variables:
          a:
          b: {default: [1, 2]}
        """,
    )

    prompt = load_prompt_file(path, root=tmp_path)

    assert prompt.variables == {"a": {}, "b": {"default": [1, 2]}}
    assert prompt.parameters == {}
    assert prompt.system is None


def test_content_hash_ignores_comments_and_key_order(tmp_path):
    original = write(tmp_path, "a/greeting/v1.yaml", VALID)
    reordered_lines = VALID.splitlines()
    reordered = "# A comment.\n" + "\n".join(reordered_lines[2:] + reordered_lines[:2])
    rewritten = write(tmp_path, "b/greeting/v1.yaml", reordered + "\n")

    first = load_prompt_file(original, root=tmp_path / "a")
    second = load_prompt_file(rewritten, root=tmp_path / "b")

    assert first.content_hash == second.content_hash


def test_content_hash_changes_with_template(tmp_path):
    original = write(tmp_path, "a/greeting/v1.yaml", VALID)
    edited = write(tmp_path, "b/greeting/v1.yaml", VALID.replace("hello", "hi"))

    first = load_prompt_file(original, root=tmp_path / "a")
    second = load_prompt_file(edited, root=tmp_path / "b")

    assert first.content_hash != second.content_hash


# Each case: the file's text, then every error expected, as printed. "{path}"
# stands for the file's path.
INVALID_FILES = {
    "unknown top-level key": (
        VALID + "temprature: 1\n",
        [
            "{path}:17: temprature: is not a known key. Did you mean 'template'? "
            "Allowed keys: name, version, description, template, system, model, "
            "parameters, variables."
        ],
    ),
    "parameter at top level": (
        VALID + "top_p: 0.9\n",
        ["{path}:17: top_p: is a parameter: move it under parameters."],
    ),
    "unknown parameter": (
        VALID.replace("max_tokens: 64", "max_token: 64"),
        [
            "{path}:9: parameters.max_token: is not a known key. Did you mean "
            "'max_tokens'? Allowed keys: temperature, max_tokens, top_p, top_k."
        ],
    ),
    "temperature out of range": (
        VALID.replace("temperature: 0.5", "temperature: 2.5"),
        ["{path}:8: parameters.temperature: must be from 0 to 2, got 2.5."],
    ),
    "top_p out of range": (
        VALID.replace("temperature: 0.5", "top_p: -0.1"),
        ["{path}:8: parameters.top_p: must be from 0 to 1, got -0.1."],
    ),
    "max_tokens zero": (
        VALID.replace("max_tokens: 64", "max_tokens: 0"),
        ["{path}:9: parameters.max_tokens: must be at least 1, got 0."],
    ),
    "top_k not an integer": (
        VALID.replace("max_tokens: 64", "top_k: 2.5"),
        ["{path}:9: parameters.top_k: must be an integer, got number."],
    ),
    "temperature as string": (
        VALID.replace("temperature: 0.5", "temperature: hot"),
        ["{path}:8: parameters.temperature: must be a number, got string."],
    ),
    "parameters not a mapping": (
        VALID.replace(
            "parameters:\n  temperature: 0.5\n  max_tokens: 64\n", "parameters: 5\n"
        ),
        ["{path}:7: parameters: must be a mapping, got integer."],
    ),
    "name differs from folder": (
        VALID.replace("name: greeting", "name: greetings"),
        [
            "{path}:1: name: must equal the folder name 'greeting', got "
            "'greetings': rename the folder or fix the name."
        ],
    ),
    "version differs from file name": (
        VALID.replace("version: 1", "version: 2"),
        ["{path}:2: version: must equal the number in the file name (1), got 2."],
    ),
    "version as string": (
        VALID.replace("version: 1", 'version: "1"'),
        ["{path}:2: version: must be an integer, got string."],
    ),
    "template missing": (
        VALID.replace(
            "template: |\n  Say hello to {{ who }} in {{ words }} words.\n", ""
        ),
        ["{path}: template: is required."],
    ),
    "template not a string": (
        VALID.replace(
            "template: |\n  Say hello to {{ who }} in {{ words }} words.\n",
            "template: [a, b]\n",
        ),
        ["{path}:5: template: must be a string, got array."],
    ),
    "description empty": (
        VALID.replace("description: Greet someone.", 'description: " "'),
        ["{path}:3: description: must not be empty: write text or leave the key out."],
    ),
    "template uses undeclared variable": (
        VALID.replace("{{ who }}", "{{ whom }}"),
        [
            "{path}:5: template: uses undeclared variables: whom. Declare them "
            "under variables, or remove them from the template."
        ],
    ),
    "system uses undeclared variable": (
        VALID.replace("You are friendly.", "You are {{ mood }}."),
        [
            "{path}:4: system: uses undeclared variables: mood. Declare them "
            "under variables, or remove them from the system."
        ],
    ),
    "template does not compile": (
        VALID.replace("{{ who }}", "{% if who %}"),
        [
            "{path}:5: template: is not a valid Jinja2 template: Unexpected end "
            "of template. Jinja was looking for the following tags: 'elif' or "
            "'else' or 'endif'. The innermost block that needs to be closed is "
            "'if'. (line 1 of the template)."
        ],
    ),
    "template uses unknown filter": (
        VALID.replace("{{ who }}", "{{ who | shout }}"),
        [
            "{path}:5: template: is not a valid Jinja2 template: No filter named "
            "'shout'. (line 1 of the template)."
        ],
    ),
    "default of wrong type": (
        VALID.replace("default: 10", "default: ten"),
        ["{path}:16: variables.words.default: must be an integer, got string."],
    ),
    "default is a date": (
        VALID.replace("type: integer\n    default: 10", "default: 2024-01-31"),
        [
            "{path}:15: variables.words.default: must be a JSON value, got date: "
            "quote it to make it a string."
        ],
    ),
    "default is null": (
        VALID.replace("default: 10", "default: null"),
        [
            "{path}:16: variables.words.default: must not be null: give a value, "
            "or remove default to make the variable required."
        ],
    ),
    "unknown variable type": (
        VALID.replace("type: integer", "type: int"),
        [
            "{path}:15: variables.words.type: must be one of string, integer, "
            "number, boolean."
        ],
    ),
    "unknown variable key": (
        VALID.replace("default: 10", "defualt: 10"),
        [
            "{path}:16: variables.words.defualt: is not a known key. Did you mean "
            "'default'? Allowed keys: type, default, description."
        ],
    ),
    "reserved variable name": (
        VALID.replace("words", "range"),
        ["{path}:14: variables.range: is a name Jinja2 reserves: choose another name."],
    ),
    "invalid variable name": (
        VALID.replace("words", "max-words"),
        [
            "{path}:14: variables.max-words: is not a valid variable name: use "
            "letters, digits and '_', starting with a letter or '_'.",
            "{path}:5: template: uses undeclared variables: max, words. Declare "
            "them under variables, or remove them from the template.",
        ],
    ),
    "model with spaces": (
        VALID + "model: gemini flash\n",
        [
            "{path}:17: model: must be a model name of 1 to 100 characters "
            "without spaces, or be left out to use the default model."
        ],
    ),
    "duplicate key": (
        VALID + "description: Again.\n",
        [
            "{path}:17: description: is a duplicate key (first on line 3): "
            "remove one of them."
        ],
    ),
    "invalid YAML": (
        "name: greeting\nversion: 1\n  template: [\n",
        ["{path}:3: is not valid YAML: mapping values are not allowed here."],
    ),
    "not a mapping": (
        "- name: greeting\n",
        ["{path}: must be a YAML mapping, got array."],
    ),
    "empty file": (
        "# nothing yet\n",
        [
            "{path}: is empty: a prompt file needs name, version, description "
            "and template."
        ],
    ),
    "YAML anchor": (
        VALID.replace("default: 10", "default: &ten 10"),
        [
            "{path}:16: defines the YAML anchor &ten: prompt files may not use "
            "anchors or aliases, so write the value out in full."
        ],
    ),
    "YAML alias": (
        VALID.replace("default: 10", "default: *ten"),
        [
            "{path}:16: uses the YAML alias *ten: prompt files may not use "
            "anchors or aliases, so write the value out in full."
        ],
    ),
    "YAML merge key": (
        VALID + "extra: {<<: *base}\n",
        [
            "{path}:17: uses the YAML alias *base: prompt files may not use "
            "anchors or aliases, so write the value out in full."
        ],
    ),
    "nesting too deep": (
        VALID.replace("default: 10", "default: " + "[" * 40 + "]" * 40),
        ["{path}:16: nests values more than 32 levels deep: flatten them."],
    ),
    "template reads a dunder attribute": (
        VALID.replace("{{ who }}", "{{ who.__class__ }}"),
        [
            "{path}:5: template: uses the attribute __class__ (line 1 of the "
            "template). Prompt templates may not read dunder attributes, nor use "
            "cycler, joiner, lipsum, namespace: remove them."
        ],
    ),
    "template reads dunders by item and attr filter": (
        VALID.replace(
            "{{ who }}", "{{ who['__class__'] }}\n  {{ who | attr('__doc__') }}"
        ),
        [
            "{path}:5: template: uses the attribute __class__ (line 1 of the "
            "template), the attribute __doc__ (line 2 of the template). Prompt "
            "templates may not read dunder attributes, nor use cycler, joiner, "
            "lipsum, namespace: remove them."
        ],
    ),
    "system uses lipsum": (
        VALID.replace("You are friendly.", "You are {{ lipsum(1) }}."),
        [
            "{path}:4: system: uses lipsum (line 1 of the system). Prompt "
            "templates may not read dunder attributes, nor use cycler, joiner, "
            "lipsum, namespace: remove them."
        ],
    ),
}


@pytest.mark.parametrize("case", INVALID_FILES)
def test_invalid_file_names_file_key_and_line(tmp_path, case):
    text, expected = INVALID_FILES[case]
    path = tmp_path / "greeting" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(text, encoding="utf-8")

    errors = errors_of(path, tmp_path)

    assert errors == [message.format(path=path) for message in expected]


def test_file_that_is_not_utf8_is_rejected(tmp_path):
    path = tmp_path / "greeting" / "v1.yaml"
    path.parent.mkdir()
    path.write_bytes(VALID.encode("utf-8") + b"# caf\xe9\n")

    errors = errors_of(path, tmp_path)

    assert errors == [
        f"{path}: is not valid UTF-8 (byte {len(VALID) + 5}): save the file as UTF-8."
    ]


def test_billion_laughs_is_rejected_before_expansion(tmp_path):
    # Nine levels of nine aliases each would expand to 9**9 strings.
    lines = ['  a0: &a0 "lol"']
    for level in range(1, 10):
        aliases = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"  a{level}: &a{level} [{aliases}]")
    bomb = "\n".join(lines)
    text = VALID + f"  bomb:\n    default:\n{textwrap.indent(bomb, '    ')}\n"
    path = write(tmp_path, "greeting/v1.yaml", text)

    errors = errors_of(path, tmp_path)

    assert errors == [
        f"{path}:19: defines the YAML anchor &a0: prompt files may not use "
        "anchors or aliases, so write the value out in full."
    ]


def test_file_over_size_limit_is_rejected(tmp_path, settings):
    settings.PROMPT_FILE_MAX_BYTES = 1024
    padding = "# padding\n" * 103
    path = write(tmp_path, "greeting/v1.yaml", VALID + padding)

    errors = errors_of(path, tmp_path)

    assert errors == [
        f"{path}: is larger than PROMPT_FILE_MAX_BYTES (1024 bytes): shorten the "
        "prompt, or raise PROMPT_FILE_MAX_BYTES."
    ]


def test_file_at_size_limit_is_read(tmp_path, settings):
    settings.PROMPT_FILE_MAX_BYTES = 1024
    padding = "#" * (1024 - len(VALID) - 1) + "\n"
    path = write(tmp_path, "greeting/v1.yaml", VALID + padding)

    prompt = load_prompt_file(path, root=tmp_path)

    assert path.stat().st_size == 1024
    assert prompt.name == "greeting"


def test_named_pipe_is_rejected_without_reading(tmp_path):
    path = tmp_path / "greeting" / "v1.yaml"
    path.parent.mkdir()
    os.mkfifo(path)

    errors = errors_of(path, tmp_path)

    assert errors == [f"{path}: is not a regular file: replace it with a YAML file."]


def test_symlinked_file_outside_root_is_rejected(tmp_path):
    outside = write(tmp_path, "elsewhere/greeting.yaml", VALID)
    root = tmp_path / "prompts"
    link = root / "greeting" / "v1.yaml"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)

    folder = load_prompt_folder(root)

    assert [str(error) for error in folder.errors] == [
        f"{link}: is a symbolic link to {outside}, outside {root}: copy the file "
        "or folder into the prompts folder instead."
    ]
    assert folder.files == []


def test_symlinked_folder_outside_root_is_rejected(tmp_path):
    write(tmp_path, "elsewhere/greeting/v1.yaml", VALID)
    root = tmp_path / "prompts"
    root.mkdir()
    (root / "greeting").symlink_to(tmp_path / "elsewhere" / "greeting")

    folder = load_prompt_folder(root)

    assert [str(error) for error in folder.errors] == [
        f"{root / 'greeting'}: is a symbolic link to "
        f"{tmp_path / 'elsewhere' / 'greeting'}, outside {root}: copy the file or "
        "folder into the prompts folder instead."
    ]
    assert folder.files == []


def test_symlink_inside_root_is_followed(tmp_path):
    write(tmp_path, "greeting/v1.yaml", VALID)
    (tmp_path / "greeting" / "v2.yaml").symlink_to(
        write(
            tmp_path,
            "shared/greeting-v2.yaml",
            VALID.replace("version: 1", "version: 2"),
        )
    )

    folder = load_prompt_folder(tmp_path)

    assert [(file.name, file.version) for file in folder.files] == [
        ("greeting", 1),
        ("greeting", 2),
    ]
    assert [str(error) for error in folder.errors] == [
        f"{tmp_path / 'shared/greeting-v2.yaml'}: is not a version file name: "
        "name it v<N>.yaml, e.g. v1.yaml."
    ]


def test_fixed_text_over_limits_is_rejected(tmp_path, settings):
    settings.CHAT_MAX_PROMPT_CHARS = 20
    settings.CHAT_MAX_SYSTEM_CHARS = 10
    path = write(tmp_path, "greeting/v1.yaml", VALID)

    errors = errors_of(path, tmp_path)

    # "Say hello to ", " in " and " words." are the template's fixed text:
    # Jinja2 drops the final newline.
    assert errors == [
        f"{path}:5: template: has 24 characters of fixed text, more than "
        "CHAT_MAX_PROMPT_CHARS (20), so every render would be rejected: shorten "
        "the template.",
        f"{path}:4: system: has 17 characters of fixed text, more than "
        "CHAT_MAX_SYSTEM_CHARS (10), so every render would be rejected: shorten "
        "the system.",
    ]


def test_text_inside_blocks_is_not_fixed_text(tmp_path, settings):
    settings.CHAT_MAX_PROMPT_CHARS = 40
    long_line = "x" * 50
    text = VALID.replace(
        "Say hello to {{ who }} in {{ words }} words.",
        f"{{% if words > 5 %}}\n  {long_line}\n  {{% else %}}\n  {long_line}\n"
        "  {% endif %}",
    )
    path = write(tmp_path, "greeting/v1.yaml", text)

    prompt = load_prompt_file(path, root=tmp_path)

    assert long_line in prompt.template


def test_underscore_keys_of_variables_are_allowed(tmp_path):
    text = VALID.replace("{{ who }}", "{{ who._id }} {{ who['_name'] }}").replace(
        "type: string\n    description: The person", "description: The person"
    )
    path = write(tmp_path, "greeting/v1.yaml", text)

    prompt = load_prompt_file(path, root=tmp_path)

    assert "who._id" in prompt.template


def test_every_error_in_a_file_is_reported(tmp_path):
    text = VALID.replace("temperature: 0.5", "temperature: 9").replace(
        "version: 1", "version: 3"
    )
    path = write(tmp_path, "greeting/v1.yaml", text)

    errors = errors_of(path, tmp_path)

    assert errors == [
        f"{path}:2: version: must equal the number in the file name (1), got 3.",
        f"{path}:8: parameters.temperature: must be from 0 to 2, got 9.",
    ]


def test_folder_reports_misplaced_and_misnamed_files(tmp_path):
    write(tmp_path, "greeting/v1.yaml", VALID)
    write(tmp_path, "greeting/v2.yml", VALID)
    write(tmp_path, "greeting/draft.yaml", VALID)
    write(tmp_path, "greeting/README.md", "Notes are skipped.")
    write(tmp_path, "loose.yaml", VALID)
    write(tmp_path, "Bad Name/v1.yaml", VALID)
    (tmp_path / "empty").mkdir()
    write(tmp_path, ".hidden/v1.yaml", "not: valid: yaml")

    folder = load_prompt_folder(tmp_path)

    assert [str(error) for error in folder.errors] == [
        f"{tmp_path / 'Bad Name'}: is not a valid prompt name: use 1 to 100 "
        "lowercase letters, digits, '-' or '_', starting with a letter or digit.",
        f"{tmp_path / 'empty'}: contains no version file: add v1.yaml or remove "
        "the folder.",
        f"{tmp_path / 'greeting/draft.yaml'}: is not a version file name: name it "
        "v<N>.yaml, e.g. v1.yaml.",
        f"{tmp_path / 'greeting/v2.yml'}: is not a version file name: name it "
        "v<N>.yaml, e.g. v1.yaml.",
        f"{tmp_path / 'loose.yaml'}: is outside a prompt folder: move it to "
        f"{tmp_path / 'loose/v1.yaml'}, in a folder named after the prompt.",
    ]
    assert [(file.name, file.version) for file in folder.files] == [("greeting", 1)]
    assert folder.prompt_names == {"greeting", "empty"}


def test_folder_orders_versions_numerically(tmp_path):
    for version in (10, 2, 1):
        text = VALID.replace("version: 1", f"version: {version}")
        write(tmp_path, f"greeting/v{version}.yaml", text)

    folder = load_prompt_folder(tmp_path)

    assert [file.version for file in folder.files] == [1, 2, 10]
    assert folder.versions == {("greeting", 1), ("greeting", 2), ("greeting", 10)}


def test_missing_folder_is_an_error(tmp_path):
    folder = load_prompt_folder(tmp_path / "absent")

    assert [str(error) for error in folder.errors] == [
        f"{tmp_path / 'absent'}: is not a folder: set PROMPTS_DIR or pass --path."
    ]
