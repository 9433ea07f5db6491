"""The prompt registry's admin: choosing the active version, read-only history."""

import io
import json

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from llm.keys import api_key_create
from prompts_registry.models import Prompt, PromptActivation, PromptVersion
from prompts_registry.signals import prompt_activated

pytestmark = pytest.mark.django_db

TEMPLATE = """\
name: {name}
version: {version}
description: {name} version {version}.
template: "{name} {version}: {{{{ text }}}}"
variables:
  text:
    type: string
"""


def write_prompts(root, names, versions=(1, 2)):
    for name in names:
        for version in versions:
            path = root / name / f"v{version}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(TEMPLATE.format(name=name, version=version))
    call_command("sync_prompts", "--path", str(root), stdout=io.StringIO())


@pytest.fixture
def prompts(tmp_path):
    write_prompts(tmp_path, ["greeting", "farewell"])


def staff_user(username: str, *permissions: str) -> User:
    user = User.objects.create_user(username, password="unused", is_staff=True)
    for codename in permissions:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def editor() -> Client:
    """A staff member who may change prompts and nothing else."""
    return logged_in(staff_user("editor", "change_prompt"))


@pytest.fixture
def viewer() -> Client:
    """A staff member who may only view prompts."""
    return logged_in(staff_user("viewer", "view_prompt"))


@pytest.fixture
def outsider() -> Client:
    """A logged-in user who is not staff."""
    return logged_in(User.objects.create_user("outsider", password="unused"))


@pytest.fixture
def superuser() -> Client:
    return logged_in(User.objects.create_superuser("root", password="unused"))


@pytest.fixture
def api_client() -> Client:
    _, raw_key = api_key_create(name="admin tests")
    return Client(headers={"Authorization": f"Bearer {raw_key}"})


def change_url(prompt: Prompt) -> str:
    return reverse("admin:prompts_registry_prompt_change", args=[prompt.pk])


def change_form_data(page, **fields) -> dict:
    """Build a change form POST from the GET page, as a browser would submit it.

    The read-only inlines still need their management forms in the POST.
    """
    data = {}
    for inline in page.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        for name in management.fields:
            data[management.add_prefix(name)] = management[name].value()
    data.update(fields)
    return data


def render_version(api_client, name: str) -> dict:
    response = api_client.post(
        f"/prompts/{name}/render",
        data=json.dumps({"variables": {"text": "hi"}}),
        content_type="application/json",
    )
    assert response.status_code == 200
    return response.json()


def test_staff_activation_applies_to_next_render(
    prompts, editor, api_client, django_capture_on_commit_callbacks
):
    greeting = Prompt.objects.get(name="greeting")
    first = greeting.versions.get(version=1)
    assert render_version(api_client, "greeting")["version"] == 2
    page = editor.get(change_url(greeting))
    received = []

    def receiver(sender, **kwargs):
        received.append({key: kwargs[key] for key in kwargs if key != "signal"})

    prompt_activated.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            response = editor.post(
                change_url(greeting), change_form_data(page, active_version=first.pk)
            )
    finally:
        prompt_activated.disconnect(receiver)

    assert response.status_code == 302
    rendered = render_version(api_client, "greeting")
    assert rendered["version"] == 1
    assert rendered["user"] == "greeting 1: hi"
    history = PromptActivation.objects.filter(source=PromptActivation.Source.ADMIN)
    assert history.count() == 1
    activation = history.get()
    assert activation.changed_by.username == "editor"
    assert activation.previous_version.version == 2
    assert activation.version == first
    assert activation.prompt == greeting
    assert received == [
        {
            "prompt_name": "greeting",
            "version": 1,
            "previous_version": 2,
            "changed_by": "editor",
        }
    ]


def test_rollback_is_choosing_previous_version_again(prompts, editor, api_client):
    greeting = Prompt.objects.get(name="greeting")
    versions = {row.version: row.pk for row in greeting.versions.all()}

    for version in (1, 2):
        page = editor.get(change_url(greeting))
        editor.post(
            change_url(greeting),
            change_form_data(page, active_version=versions[version]),
        )

    assert render_version(api_client, "greeting")["version"] == 2
    history = PromptActivation.objects.filter(prompt=greeting).order_by("id")
    assert [
        (row.previous_version and row.previous_version.version, row.version.version)
        for row in history
    ] == [(None, 2), (2, 1), (1, 2)]


def test_saving_unchanged_version_records_nothing(prompts, editor):
    greeting = Prompt.objects.get(name="greeting")
    page = editor.get(change_url(greeting))
    before = PromptActivation.objects.count()

    response = editor.post(
        change_url(greeting),
        change_form_data(page, active_version=greeting.active_version_id),
    )

    assert response.status_code == 302
    assert PromptActivation.objects.count() == before


def test_version_choices_exclude_other_prompts(prompts, editor):
    greeting = Prompt.objects.get(name="greeting")

    page = editor.get(change_url(greeting))

    choices = page.context["adminform"].form.fields["active_version"].queryset
    assert set(choices) == set(greeting.versions.all())
    content = page.content.decode()
    for version in greeting.versions.all():
        assert f'<option value="{version.pk}"' in content
    for version in PromptVersion.objects.filter(prompt__name="farewell"):
        assert f'<option value="{version.pk}"' not in content


def test_posting_other_prompts_version_is_rejected(prompts, editor):
    greeting = Prompt.objects.get(name="greeting")
    farewell_version = PromptVersion.objects.filter(prompt__name="farewell").first()
    page = editor.get(change_url(greeting))
    before = PromptActivation.objects.count()

    response = editor.post(
        change_url(greeting),
        change_form_data(page, active_version=farewell_version.pk),
    )

    assert response.status_code == 200
    assert "active_version" in response.context["adminform"].form.errors
    greeting.refresh_from_db()
    assert greeting.active_version.version == 2
    assert PromptActivation.objects.count() == before


def test_non_staff_user_is_sent_to_login(prompts, outsider):
    greeting = Prompt.objects.get(name="greeting")
    first = greeting.versions.get(version=1)

    page = outsider.get(change_url(greeting))
    response = outsider.post(change_url(greeting), {"active_version": first.pk})

    assert page.status_code == 302
    assert page["Location"].startswith(reverse("admin:login"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    greeting.refresh_from_db()
    assert greeting.active_version.version == 2
    assert not PromptActivation.objects.filter(source="admin").exists()


def test_staff_without_change_permission_is_forbidden(prompts, viewer):
    greeting = Prompt.objects.get(name="greeting")
    first = greeting.versions.get(version=1)

    page = viewer.get(change_url(greeting))
    response = viewer.post(change_url(greeting), {"active_version": first.pk})

    assert page.status_code == 200
    assert response.status_code == 403
    greeting.refresh_from_db()
    assert greeting.active_version.version == 2
    assert not PromptActivation.objects.filter(source="admin").exists()


def test_change_page_shows_templates_and_history(prompts, editor):
    greeting = Prompt.objects.get(name="greeting")

    page = editor.get(change_url(greeting))

    content = page.content.decode()
    assert page.status_code == 200
    assert "greeting 2: {{ text }}" in content
    assert "greeting 1: {{ text }}" in content
    assert "Activation history" in content
    assert "sync_prompts" in content


def test_change_list_shows_summary_columns(prompts, editor):
    response = editor.get(reverse("admin:prompts_registry_prompt_changelist"))

    rows = {prompt.name: prompt for prompt in response.context["cl"].result_list}
    assert response.status_code == 200
    assert rows["greeting"].version_count == 2
    assert rows["greeting"].active_version.version == 2
    assert rows["greeting"].last_change is not None
    assert '<td class="field-active_version_number">v2</td>' in (
        response.content.decode()
    )


def test_change_list_queries_do_not_grow_with_prompts(tmp_path, editor):
    url = reverse("admin:prompts_registry_prompt_changelist")
    write_prompts(tmp_path / "few", ["a1", "a2"])
    with CaptureQueriesContext(connection) as few:
        editor.get(url)
    write_prompts(tmp_path / "many", ["b1", "b2", "b3", "b4", "b5"], versions=(1,))

    with CaptureQueriesContext(connection) as many:
        response = editor.get(url)

    assert len(response.context["cl"].result_list) == 7
    assert len(many) == len(few)


def test_versions_are_read_only(prompts, superuser):
    version = PromptVersion.objects.get(prompt__name="greeting", version=1)
    change = reverse("admin:prompts_registry_promptversion_change", args=[version.pk])

    page = superuser.get(change)
    edit = superuser.post(change, {"template": "changed"})
    add = superuser.get(reverse("admin:prompts_registry_promptversion_add"))
    delete = superuser.post(
        reverse("admin:prompts_registry_promptversion_delete", args=[version.pk]),
        {"post": "yes"},
    )

    assert page.status_code == 200
    assert "greeting 1: {{ text }}" in page.content.decode()
    assert edit.status_code == 403
    assert add.status_code == 403
    assert delete.status_code == 403
    version.refresh_from_db()
    assert version.template == "greeting 1: {{ text }}"


def test_prompts_cannot_be_added_or_deleted(prompts, superuser):
    greeting = Prompt.objects.get(name="greeting")

    add = superuser.get(reverse("admin:prompts_registry_prompt_add"))
    delete = superuser.post(
        reverse("admin:prompts_registry_prompt_delete", args=[greeting.pk]),
        {"post": "yes"},
    )

    assert add.status_code == 403
    assert delete.status_code == 403
    assert Prompt.objects.filter(name="greeting").exists()


def test_activation_history_is_read_only(prompts, superuser):
    activation = PromptActivation.objects.first()
    change = reverse(
        "admin:prompts_registry_promptactivation_change", args=[activation.pk]
    )

    listing = superuser.get(
        reverse("admin:prompts_registry_promptactivation_changelist")
    )
    edit = superuser.post(change, {"source": "admin"})

    assert listing.status_code == 200
    assert edit.status_code == 403
    activation.refresh_from_db()
    assert activation.source == PromptActivation.Source.SYNC
