"""sync_prompts and the activation service, against the test database."""

import io
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command, execute_from_command_line
from django.core.management.base import CommandError

from prompts_registry.models import (
    ImmutableRowError,
    Prompt,
    PromptActivation,
    PromptVersion,
)
from prompts_registry.services import prompt_activate
from prompts_registry.signals import prompt_activated

pytestmark = pytest.mark.django_db

TEMPLATE = """\
name: {name}
version: {version}
description: {name} version {version}.
template: "Say {{{{ word }}}} ({version})."
variables:
  word:
    type: string
"""


def write_version(root: Path, name: str, version: int, text: str | None = None):
    path = root / name / f"v{version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text or TEMPLATE.format(name=name, version=version))
    return path


def sync(root: Path, *args: str, stderr: io.StringIO | None = None) -> str:
    """Run sync_prompts on ``root`` and return its standard output."""
    output = io.StringIO()
    call_command(
        "sync_prompts",
        "--path",
        str(root),
        *args,
        stdout=output,
        stderr=stderr or io.StringIO(),
    )
    return output.getvalue()


def row_counts() -> tuple[int, int, int]:
    return (
        Prompt.objects.count(),
        PromptVersion.objects.count(),
        PromptActivation.objects.count(),
    )


@pytest.fixture
def prompts_root(tmp_path) -> Path:
    write_version(tmp_path, "greeting", 1)
    write_version(tmp_path, "greeting", 2)
    write_version(tmp_path, "farewell", 1)
    return tmp_path


@pytest.fixture
def activations():
    """Every prompt_activated signal sent during the test, as keyword arguments."""
    received = []

    def receiver(sender, **kwargs):
        kwargs.pop("signal")
        received.append(kwargs)

    prompt_activated.connect(receiver)
    yield received
    prompt_activated.disconnect(receiver)


def test_sync_creates_versions_and_activates_highest(prompts_root):
    output = sync(prompts_root)

    greeting = Prompt.objects.get(name="greeting")
    assert list(greeting.versions.values_list("version", flat=True)) == [2, 1]
    assert greeting.active_version.version == 2
    assert greeting.description == "greeting version 2."
    assert Prompt.objects.get(name="farewell").active_version.version == 1
    version = greeting.versions.get(version=2)
    assert version.template == "Say {{ word }} (2)."
    assert version.variables == {"word": {"type": "string"}}
    assert version.parameters == {}
    assert version.system == ""
    assert version.model == ""
    assert version.source_path == "greeting/v2.yaml"
    assert output.splitlines() == [
        "Created farewell v1",
        "Created greeting v1",
        "Created greeting v2",
        "Activated farewell v1 (first sync)",
        "Activated greeting v2 (first sync)",
        f"Prompt versions in {prompts_root}: 3 created, 0 unchanged, 0 errors.",
    ]


def test_first_sync_records_one_activation_per_prompt(prompts_root):
    sync(prompts_root)

    history = PromptActivation.objects.get(prompt__name="greeting")
    assert history.version.version == 2
    assert history.previous_version is None
    assert history.changed_by is None
    assert history.source == PromptActivation.Source.SYNC
    assert PromptActivation.objects.count() == 2


def test_first_sync_sends_signal_after_commit(
    prompts_root, activations, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        sync(prompts_root)
        assert activations == []

    assert len(callbacks) == 2
    assert activations == [
        {
            "prompt_name": "farewell",
            "version": 1,
            "previous_version": None,
            "changed_by": None,
        },
        {
            "prompt_name": "greeting",
            "version": 2,
            "previous_version": None,
            "changed_by": None,
        },
    ]


def test_second_sync_changes_nothing(prompts_root):
    sync(prompts_root)
    before = row_counts()
    hashes = list(PromptVersion.objects.values_list("content_hash", flat=True))

    output = sync(prompts_root)

    assert row_counts() == before
    assert list(PromptVersion.objects.values_list("content_hash", flat=True)) == hashes
    assert output.splitlines() == [
        f"Prompt versions in {prompts_root}: 0 created, 3 unchanged, 0 errors."
    ]


def test_sync_ignores_comment_only_edit(prompts_root):
    sync(prompts_root)
    path = prompts_root / "greeting" / "v1.yaml"
    path.write_text("# Reviewed.\n" + path.read_text())

    output = sync(prompts_root)

    assert "0 created, 3 unchanged, 0 errors" in output


def test_sync_rejects_changed_version(prompts_root):
    sync(prompts_root)
    before = row_counts()
    path = prompts_root / "greeting" / "v1.yaml"
    path.write_text(path.read_text().replace("Say", "Shout"))
    write_version(prompts_root, "farewell", 2)
    errors = io.StringIO()

    with pytest.raises(CommandError) as raised:
        sync(prompts_root, stderr=errors)

    assert row_counts() == before
    assert not PromptVersion.objects.filter(prompt__name="farewell", version=2)
    assert (
        PromptVersion.objects.get(prompt__name="greeting", version=1).template
        == "Say {{ word }} (1)."
    )
    synced_on = PromptVersion.objects.get(prompt__name="greeting", version=1)
    assert errors.getvalue().splitlines() == [
        f"{path}: differs from version 1 as synced on "
        f"{synced_on.created_at:%Y-%m-%d}, and a synced version never changes: "
        "restore the file and put the change in a new file greeting/v3.yaml."
    ]
    assert str(raised.value) == (
        "Prompt sync failed with 1 error, listed above, and wrote nothing. Fix "
        "the files and run sync_prompts again."
    )


def test_sync_rejects_malformed_file_atomically(prompts_root):
    sync(prompts_root)
    before = row_counts()
    write_version(prompts_root, "greeting", 3)
    write_version(prompts_root, "newcomer", 1)
    broken = write_version(
        prompts_root,
        "farewell",
        2,
        TEMPLATE.format(name="farewell", version=2) + "    bogus: 1\n",
    )
    errors = io.StringIO()

    with pytest.raises(CommandError):
        sync(prompts_root, stderr=errors)

    assert row_counts() == before
    assert not Prompt.objects.filter(name="newcomer").exists()
    assert errors.getvalue().splitlines() == [
        f"{broken}:8: variables.word.bogus: is not a known key. Allowed keys: "
        "type, default, description."
    ]


def test_sync_rejects_yaml_bomb_and_oversized_file(prompts_root, settings):
    settings.PROMPT_FILE_MAX_BYTES = 1024
    # Nine levels of nine aliases each would expand to 9**9 strings.
    levels = ['      l0: &l0 "lol"'] + [
        f"      l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]"
        for level in range(1, 10)
    ]
    bomb = write_version(
        prompts_root,
        "bomb",
        1,
        TEMPLATE.format(name="bomb", version=1)
        + "    default:\n"
        + "\n".join(levels)
        + "\n",
    )
    large = write_version(
        prompts_root,
        "large",
        1,
        TEMPLATE.format(name="large", version=1) + "#" * 1024 + "\n",
    )
    errors = io.StringIO()

    with pytest.raises(CommandError):
        sync(prompts_root, stderr=errors)

    assert row_counts() == (0, 0, 0)
    assert errors.getvalue().splitlines() == [
        f"{bomb}:9: defines the YAML anchor &l0: prompt files may not use anchors "
        "or aliases, so write the value out in full.",
        f"{large}: is larger than PROMPT_FILE_MAX_BYTES (1024 bytes): shorten the "
        "prompt, or raise PROMPT_FILE_MAX_BYTES.",
    ]


def test_sync_of_empty_database_is_all_or_nothing(prompts_root):
    write_version(prompts_root, "broken", 1, "name: broken\nversion: 1\n")

    with pytest.raises(CommandError):
        sync(prompts_root)

    assert row_counts() == (0, 0, 0)


def test_later_sync_keeps_active_version(prompts_root):
    sync(prompts_root)
    write_version(prompts_root, "greeting", 3)

    output = sync(prompts_root)

    greeting = Prompt.objects.get(name="greeting")
    assert greeting.versions.count() == 3
    assert greeting.active_version.version == 2
    assert PromptActivation.objects.filter(prompt=greeting).count() == 1
    assert output.splitlines() == [
        "Created greeting v3",
        f"Prompt versions in {prompts_root}: 1 created, 3 unchanged, 0 errors.",
    ]


def test_sync_reports_orphans_and_keeps_them(prompts_root):
    sync(prompts_root)
    (prompts_root / "farewell" / "v1.yaml").unlink()
    (prompts_root / "farewell").rmdir()
    (prompts_root / "greeting" / "v1.yaml").unlink()
    before = row_counts()

    output = sync(prompts_root)

    assert row_counts() == before
    assert output.splitlines() == [
        f"Prompt farewell is in the database but has no folder in {prompts_root}; "
        "it is kept.",
        "greeting v1 is in the database but has no file greeting/v1.yaml; it is kept.",
        f"Prompt versions in {prompts_root}: 0 created, 1 unchanged, 0 errors.",
    ]


def test_dry_run_writes_nothing(prompts_root):
    output = sync(prompts_root, "--dry-run")

    assert row_counts() == (0, 0, 0)
    assert output.splitlines() == [
        "Would create farewell v1",
        "Would create greeting v1",
        "Would create greeting v2",
        "Would activate farewell v1 (first sync)",
        "Would activate greeting v2 (first sync)",
        f"Prompt versions in {prompts_root}: 3 to create, 0 unchanged, 0 errors "
        "(nothing written).",
    ]


def test_dry_run_fails_on_invalid_file(prompts_root):
    write_version(prompts_root, "broken", 1, "name: broken\n")

    with pytest.raises(CommandError):
        sync(prompts_root, "--dry-run")

    assert row_counts() == (0, 0, 0)


def test_check_passes_when_in_sync(prompts_root):
    sync(prompts_root)

    output = sync(prompts_root, "--check")

    assert "0 to create, 3 unchanged, 0 errors (nothing written)" in output


def test_check_fails_on_new_file_without_writing(prompts_root):
    sync(prompts_root)
    write_version(prompts_root, "greeting", 3)
    before = row_counts()

    with pytest.raises(CommandError) as raised:
        sync(prompts_root, "--check")

    assert row_counts() == before
    assert str(raised.value) == (
        f"Prompt files in {prompts_root} are not synced (1 new version): run "
        "sync_prompts."
    )


def test_check_fails_on_changed_file(prompts_root):
    sync(prompts_root)
    path = prompts_root / "farewell" / "v1.yaml"
    path.write_text(path.read_text().replace("Say", "Whisper"))

    with pytest.raises(CommandError):
        sync(prompts_root, "--check")


def test_check_exits_with_status_1(prompts_root, capsys):
    with pytest.raises(SystemExit) as raised:
        execute_from_command_line(
            ["manage.py", "sync_prompts", "--check", "--path", str(prompts_root)]
        )

    assert raised.value.code == 1
    assert "(3 new versions)" in capsys.readouterr().err
    assert row_counts() == (0, 0, 0)


def test_shipped_prompts_sync():
    output = sync(Path(settings.PROMPTS_DIR))

    assert "0 errors" in output
    summarizer = Prompt.objects.get(name="summarizer")
    assert summarizer.active_version.version == 2
    assert set(summarizer.versions.values_list("version", flat=True)) == {1, 2}
    assert Prompt.objects.count() >= 2
    assert "0 created" in sync(Path(settings.PROMPTS_DIR))


def test_activate_records_history_and_signal(
    prompts_root, activations, django_capture_on_commit_callbacks
):
    sync(prompts_root)
    editor = User.objects.create_user("editor")
    greeting = Prompt.objects.get(name="greeting")
    first = greeting.versions.get(version=1)

    with django_capture_on_commit_callbacks(execute=True):
        activation = prompt_activate(prompt=greeting, version=first, user=editor)

    greeting.refresh_from_db()
    assert greeting.active_version == first
    assert greeting.description == "greeting version 1."
    assert activation.previous_version.version == 2
    assert activation.version == first
    assert activation.changed_by == editor
    assert activation.source == PromptActivation.Source.ADMIN
    assert activations == [
        {
            "prompt_name": "greeting",
            "version": 1,
            "previous_version": 2,
            "changed_by": "editor",
        }
    ]


def test_activate_same_version_is_noop(prompts_root, activations):
    sync(prompts_root)
    greeting = Prompt.objects.get(name="greeting")
    before = row_counts()

    activation = prompt_activate(
        prompt=greeting, version=greeting.active_version, user=None
    )

    assert activation is None
    assert row_counts() == before


def test_activate_rejects_other_prompts_version(prompts_root):
    sync(prompts_root)
    greeting = Prompt.objects.get(name="greeting")
    farewell_version = PromptVersion.objects.get(prompt__name="farewell")

    with pytest.raises(ValueError):
        prompt_activate(prompt=greeting, version=farewell_version, user=None)

    greeting.refresh_from_db()
    assert greeting.active_version.version == 2


def test_synced_version_cannot_be_saved_again(prompts_root):
    sync(prompts_root)
    version = PromptVersion.objects.get(prompt__name="greeting", version=1)
    version.template = "Something else."

    with pytest.raises(ImmutableRowError):
        version.save()

    version.refresh_from_db()
    assert version.template == "Say {{ word }} (1)."


def test_activation_history_cannot_be_edited(prompts_root):
    sync(prompts_root)
    activation = PromptActivation.objects.first()

    with pytest.raises(ImmutableRowError):
        activation.save()
