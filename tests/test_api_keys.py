import io
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import CommandError, call_command
from django.forms.models import model_to_dict
from django.test import Client
from django.utils import timezone

from gateway_project.errors import error_payload
from gateway_project.settings import gateway_auth_mode
from llm.keys import (
    ApiKeyForbidden,
    ApiKeyInvalid,
    ApiKeyMissing,
    ApiKeyRevoked,
    api_key_authenticate,
    api_key_check_model,
    api_key_check_prompt,
    api_key_create,
    api_key_from_header,
    api_key_from_scope_async,
    api_key_recheck,
    api_key_revoke,
    bearer_token,
    cache_scope_for,
    hash_key,
    websocket_bearer_token,
)
from llm.models import ApiKey

ROOT = Path(__file__).resolve().parent.parent


def body_of(error):
    status, body, headers = error_payload(error)
    return status, body


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_superuser("admin", "a@example.com", "pw")


@pytest.fixture
def outsider(db):
    return get_user_model().objects.create_user("outsider", "o@example.com", "pw")


@pytest.fixture
def admin_client(staff):
    client = Client()
    client.force_login(staff)
    return client


# Creation


@pytest.mark.django_db
def test_create_stores_only_hash():
    key, raw_key = api_key_create(name="billing", requests_per_minute=10)

    row = ApiKey.objects.filter(pk=key.pk).values().get()
    assert raw_key.startswith("gw_")
    assert len(raw_key) == 46
    assert row["key_hash"] == hash_key(raw_key)
    assert row["prefix"] == raw_key[:11]
    secret_part = raw_key[11:]
    for column, value in row.items():
        assert secret_part not in str(value), column


@pytest.mark.django_db
def test_create_makes_distinct_keys():
    _, first = api_key_create(name="one")
    _, second = api_key_create(name="two")

    assert first != second


@pytest.mark.django_db
def test_create_rejects_unserved_model():
    with pytest.raises(ValidationError) as caught:
        api_key_create(name="typo", allowed_models=["gemini-9"])

    assert caught.value.message_dict == {
        "allowed_models": [
            "Not served: gemini-9. Choose from gemini-3.5-flash, "
            "smollm2-135m-instruct, or leave empty to allow all."
        ]
    }
    assert ApiKey.objects.count() == 0


@pytest.mark.django_db
def test_create_rejects_zero_limit():
    with pytest.raises(ValidationError) as caught:
        api_key_create(name="zero", tokens_per_day=0)

    assert list(caught.value.message_dict) == ["tokens_per_day"]


# Authentication


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_authenticate_rejects_missing_key(raw):
    with pytest.raises(ApiKeyMissing) as caught:
        api_key_authenticate(raw)

    assert body_of(caught.value) == (
        401,
        {
            "error": {
                "code": "unauthenticated",
                "message": "An API key is required: send the header "
                "`Authorization: Bearer <key>`.",
            },
            "request_id": "-",
        },
    )


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["other prefix", "changed secret", "never made"])
def test_authenticate_rejects_unknown_key(kind):
    _, raw_key = api_key_create(name="real")
    raw = {
        "other prefix": "sk_" + raw_key[3:],
        "changed secret": raw_key[:-1] + ("A" if raw_key[-1] != "A" else "B"),
        "never made": "gw_" + "x" * 43,
    }[kind]

    with pytest.raises(ApiKeyInvalid) as caught:
        api_key_authenticate(raw)

    status, body = body_of(caught.value)
    assert status == 401
    assert body["error"] == {
        "code": "unauthenticated",
        "message": "The API key is not valid: check that it was copied whole, or "
        "ask an administrator for a new one.",
    }


@pytest.mark.django_db
def test_authenticate_rejects_revoked_key_at_once():
    key, raw_key = api_key_create(name="leaked")
    api_key_authenticate(raw_key)

    api_key_revoke(ApiKey.objects.get(pk=key.pk))

    with pytest.raises(ApiKeyRevoked) as caught:
        api_key_authenticate(raw_key)
    assert body_of(caught.value) == (
        401,
        {
            "error": {
                "code": "key_revoked",
                "message": f"The API key {key.prefix}… was revoked: ask an "
                "administrator for a new one.",
            },
            "request_id": "-",
        },
    )


@pytest.mark.django_db
def test_revoke_is_recorded_once():
    key, _ = api_key_create(name="leaked")
    api_key_revoke(key)
    first_revoked_at = ApiKey.objects.get(pk=key.pk).revoked_at

    api_key_revoke(ApiKey.objects.get(pk=key.pk))

    assert first_revoked_at is not None
    assert ApiKey.objects.get(pk=key.pk).revoked_at == first_revoked_at


@pytest.mark.django_db
def test_authenticate_returns_key_and_sets_last_used():
    key, raw_key = api_key_create(name="billing")
    before = timezone.now()

    authenticated = api_key_authenticate(f"  {raw_key} ")

    assert authenticated.pk == key.pk
    last_used_at = ApiKey.objects.get(pk=key.pk).last_used_at
    assert last_used_at is not None
    assert last_used_at >= before


@pytest.mark.django_db
def test_last_used_written_at_most_once_a_minute(django_assert_num_queries):
    key, raw_key = api_key_create(name="busy")
    with django_assert_num_queries(2):
        api_key_authenticate(raw_key)

    with django_assert_num_queries(1):
        api_key_authenticate(raw_key)

    two_minutes_ago = timezone.now() - timedelta(minutes=2)
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=two_minutes_ago)
    with django_assert_num_queries(2):
        api_key_authenticate(raw_key)
    assert ApiKey.objects.get(pk=key.pk).last_used_at > two_minutes_ago


@pytest.mark.django_db
def test_recheck_picks_up_changes():
    key, _ = api_key_create(name="socket", requests_per_minute=10)
    ApiKey.objects.filter(pk=key.pk).update(requests_per_minute=5)

    fresh = api_key_recheck(key)

    assert fresh.requests_per_minute == 5
    assert api_key_recheck(None) is None


@pytest.mark.django_db
def test_recheck_rejects_revoked_and_deleted_keys():
    revoked, _ = api_key_create(name="revoked")
    deleted, _ = api_key_create(name="deleted")
    api_key_revoke(ApiKey.objects.get(pk=revoked.pk))
    ApiKey.objects.filter(pk=deleted.pk).delete()

    with pytest.raises(ApiKeyRevoked):
        api_key_recheck(revoked)
    with pytest.raises(ApiKeyInvalid) as caught:
        api_key_recheck(deleted)
    assert str(caught.value.detail) == (
        "The API key was deleted: ask an administrator for a new one."
    )


# Allowed models and prompts


@pytest.mark.django_db
def test_empty_allow_lists_allow_everything():
    key, _ = api_key_create(name="open")

    api_key_check_model(key, "gemini-3.5-flash")
    api_key_check_prompt(key, "summarize")


def test_absent_key_allows_everything():
    api_key_check_model(None, "gemini-3.5-flash")
    api_key_check_prompt(None, "summarize")


@pytest.mark.django_db
def test_model_allow_list_rejects_other_models():
    key, _ = api_key_create(name="local only", allowed_models=["smollm2-135m-instruct"])
    api_key_check_model(key, "smollm2-135m-instruct")

    with pytest.raises(ApiKeyForbidden) as caught:
        api_key_check_model(key, "gemini-3.5-flash")

    assert body_of(caught.value) == (
        403,
        {
            "error": {
                "code": "forbidden",
                "message": "This API key may not use model 'gemini-3.5-flash'; it "
                "may use smollm2-135m-instruct. Ask an administrator to add the "
                "model to the key's allowed models.",
                "field": "model",
            },
            "request_id": "-",
        },
    )


@pytest.mark.django_db
def test_prompt_allow_list_rejects_other_prompts():
    key, _ = api_key_create(name="support", allowed_prompts=["summarize", "triage"])
    api_key_check_prompt(key, "triage")

    with pytest.raises(ApiKeyForbidden) as caught:
        api_key_check_prompt(key, "translate")

    assert body_of(caught.value) == (
        403,
        {
            "error": {
                "code": "forbidden",
                "message": "This API key may not use prompt 'translate'; it may use "
                "summarize, triage. Ask an administrator to add the prompt to the "
                "key's allowed prompts.",
            },
            "request_id": "-",
        },
    )


# Headers and GATEWAY_AUTH


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer gw_abc", "gw_abc"),
        ("bearer   gw_abc  ", "gw_abc"),
    ],
)
def test_bearer_token_parses_header(header, token):
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwdw==", "Bearer", "Bearer   ", "gw_x"]
)
def test_bearer_token_rejects_malformed_header(header):
    with pytest.raises(ApiKeyMissing) as caught:
        bearer_token(header)

    message = str(caught.value.detail)
    assert message == (
        "The Authorization header is malformed: send `Authorization: Bearer <key>`."
    )
    assert "dXNlcjpwdw" not in message


def test_websocket_token_read_from_header():
    scope = {"headers": [(b"origin", b"x"), (b"authorization", b"Bearer gw_abc")]}

    assert websocket_bearer_token(scope) == "gw_abc"


def test_websocket_token_read_from_subprotocols():
    scope = {"headers": [], "subprotocols": ["bearer", "gw_abc"]}

    assert websocket_bearer_token(scope) == "gw_abc"


def test_websocket_token_rejects_bearer_subprotocol_without_key():
    scope = {"headers": [], "subprotocols": ["bearer"]}

    with pytest.raises(ApiKeyMissing):
        websocket_bearer_token(scope)


def test_websocket_token_never_read_from_query_string():
    scope = {
        "headers": [],
        "query_string": b"api_key=gw_abc&key=gw_abc&token=gw_abc",
    }

    assert websocket_bearer_token(scope) is None


@pytest.mark.django_db
def test_required_auth_rejects_request_without_key(settings):
    settings.GATEWAY_AUTH = "required"

    with pytest.raises(ApiKeyMissing):
        api_key_from_header(None)


@pytest.mark.django_db
def test_auth_off_serves_request_without_key(settings):
    settings.GATEWAY_AUTH = "off"
    key, raw_key = api_key_create(name="still checked")
    api_key_revoke(key)

    assert api_key_from_header(None) is None
    with pytest.raises(ApiKeyRevoked):
        api_key_from_header(f"Bearer {raw_key}")


@pytest.mark.django_db(transaction=True)
async def test_scope_authentication_runs_from_async_code():
    key, raw_key = await api_key_create_async(name="socket")
    scope = {"headers": [(b"authorization", f"Bearer {raw_key}".encode())]}

    authenticated = await api_key_from_scope_async(scope)

    assert authenticated.pk == key.pk


async def api_key_create_async(**fields):
    from channels.db import database_sync_to_async

    return await database_sync_to_async(api_key_create)(**fields)


@pytest.mark.parametrize(
    ("debug", "hosts"),
    [
        (False, ["127.0.0.1"]),
        (True, ["127.0.0.1", "gateway.example.com"]),
        (True, ["*"]),
        (True, []),
    ],
)
def test_auth_off_rejected_outside_debug_loopback(monkeypatch, debug, hosts):
    monkeypatch.setenv("GATEWAY_AUTH", "off")

    with pytest.raises(ImproperlyConfigured) as caught:
        gateway_auth_mode(debug=debug, allowed_hosts=hosts)

    assert str(caught.value).startswith("GATEWAY_AUTH=off is rejected because")


def test_auth_off_names_every_problem(monkeypatch):
    monkeypatch.setenv("GATEWAY_AUTH", "off")

    with pytest.raises(ImproperlyConfigured) as caught:
        gateway_auth_mode(debug=False, allowed_hosts=["*"])

    assert str(caught.value).startswith(
        "GATEWAY_AUTH=off is rejected because DJANGO_DEBUG is false and "
        "ALLOWED_HOSTS is *."
    )


@pytest.mark.parametrize(
    ("value", "debug", "hosts", "mode"),
    [
        (None, False, ["gateway.example.com"], "required"),
        ("required", False, ["*"], "required"),
        ("off", True, ["127.0.0.1", "localhost", "[::1]"], "off"),
    ],
)
def test_auth_mode_accepted(monkeypatch, value, debug, hosts, mode):
    if value is None:
        monkeypatch.delenv("GATEWAY_AUTH", raising=False)
    else:
        monkeypatch.setenv("GATEWAY_AUTH", value)

    assert gateway_auth_mode(debug=debug, allowed_hosts=hosts) == mode


def manage_check(**env) -> subprocess.CompletedProcess:
    environment = {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        "DJANGO_SECRET_KEY": "check-only-secret",
        **env,
    }
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manage_check_fails_with_auth_off_in_production():
    result = manage_check(GATEWAY_AUTH="off", DJANGO_DEBUG="false")

    assert result.returncode != 0
    assert "ImproperlyConfigured: GATEWAY_AUTH=off is rejected" in result.stderr


def test_manage_check_warns_with_auth_off_on_loopback():
    result = manage_check(
        GATEWAY_AUTH="off", DJANGO_DEBUG="true", ALLOWED_HOSTS="127.0.0.1,localhost"
    )

    assert result.returncode == 0, result.stderr
    assert "WARNING llm.apps [-] GATEWAY_AUTH=off:" in result.stderr


# Cache scope


@pytest.mark.django_db
def test_cache_scope_follows_setting(settings):
    key, _ = api_key_create(name="tenant")

    settings.CACHE_SCOPE = "shared"
    assert cache_scope_for(key) is None

    settings.CACHE_SCOPE = "per_key"
    assert cache_scope_for(key) == f"key:{key.pk}"
    assert cache_scope_for(None) is None


# create_api_key command


@pytest.mark.django_db
def test_command_prints_key_once(staff):
    stdout, stderr = io.StringIO(), io.StringIO()

    call_command(
        "create_api_key",
        "billing",
        "--owner=admin",
        "--models=gemini-3.5-flash",
        "--prompts=summarize,triage",
        "--rpm=30",
        "--tpm=5000",
        "--tokens-per-day=100000",
        stdout=stdout,
        stderr=stderr,
    )

    raw_key = stdout.getvalue().strip()
    assert stdout.getvalue() == raw_key + "\n"
    key = api_key_authenticate(raw_key)
    assert stderr.getvalue() == (
        f"Created API key {key.prefix}… (billing). Copy it now; it is not shown "
        "again:\n"
    )
    assert raw_key[11:] not in stderr.getvalue()
    assert model_to_dict(
        key,
        fields=[
            "name",
            "owner",
            "allowed_models",
            "allowed_prompts",
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
        ],
    ) == {
        "name": "billing",
        "owner": staff.pk,
        "allowed_models": ["gemini-3.5-flash"],
        "allowed_prompts": ["summarize", "triage"],
        "requests_per_minute": 30,
        "tokens_per_minute": 5000,
        "tokens_per_day": 100000,
    }


@pytest.mark.django_db
def test_command_defaults_to_unlimited():
    stdout = io.StringIO()

    call_command("create_api_key", "open", stdout=stdout, stderr=io.StringIO())

    key = api_key_authenticate(stdout.getvalue().strip())
    assert key.owner is None
    assert key.allowed_models == []
    assert key.requests_per_minute is None
    assert key.tokens_per_day is None


@pytest.mark.django_db
def test_command_rejects_unknown_owner():
    with pytest.raises(CommandError) as caught:
        call_command("create_api_key", "x", "--owner=nobody", stdout=io.StringIO())

    assert str(caught.value) == (
        "No user named 'nobody': create it first or leave out --owner."
    )
    assert ApiKey.objects.count() == 0


@pytest.mark.django_db
def test_command_rejects_unserved_model():
    with pytest.raises(CommandError) as caught:
        call_command("create_api_key", "x", "--models=gpt-9", stdout=io.StringIO())

    assert str(caught.value).startswith(
        "The key was not created. allowed_models: Not served: gpt-9."
    )


# Admin


def add_form(**fields) -> dict:
    return {
        "name": "web frontend",
        "owner": "",
        "allowed_models": "gemini-3.5-flash, smollm2-135m-instruct",
        "allowed_prompts": "",
        "requests_per_minute": "60",
        "tokens_per_minute": "",
        "tokens_per_day": "200000",
        "_save": "Save",
        **fields,
    }


def test_admin_shows_new_key_once(admin_client):
    response = admin_client.post("/admin/llm/apikey/add/", add_form())

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    key = ApiKey.objects.get()
    raw_key = response.context["raw_key"]
    assert api_key_authenticate(raw_key).pk == key.pk
    assert raw_key in response.content.decode()
    assert key.allowed_models == ["gemini-3.5-flash", "smollm2-135m-instruct"]
    assert key.allowed_prompts == []
    assert key.requests_per_minute == 60
    assert key.tokens_per_minute is None
    assert key.tokens_per_day == 200000

    secret_part = raw_key[11:]
    for url in [
        f"/admin/llm/apikey/{key.pk}/change/",
        "/admin/llm/apikey/",
        "/admin/",
    ]:
        page = admin_client.get(url)
        assert page.status_code == 200, url
        assert secret_part not in page.content.decode(), url
        assert key.prefix in page.content.decode() or url == "/admin/", url


def test_admin_rejects_unserved_model(admin_client):
    response = admin_client.post(
        "/admin/llm/apikey/add/", add_form(allowed_models="gemini-9")
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        "allowed_models": [
            "Not served: gemini-9. Choose from gemini-3.5-flash, "
            "smollm2-135m-instruct, or leave empty to allow all."
        ]
    }
    assert ApiKey.objects.count() == 0


def test_admin_refuses_non_staff_user(outsider):
    client = Client()
    client.force_login(outsider)

    add_page = client.get("/admin/llm/apikey/add/")
    response = client.post("/admin/llm/apikey/add/", add_form())

    assert add_page.status_code == 302
    assert add_page["Location"].startswith("/admin/login/")
    assert response.status_code == 302
    assert ApiKey.objects.count() == 0


def test_admin_refuses_staff_without_permission(db):
    clerk = get_user_model().objects.create_user("clerk", password="pw")
    clerk.is_staff = True
    clerk.save()
    client = Client()
    client.force_login(clerk)

    response = client.post("/admin/llm/apikey/add/", add_form())

    assert response.status_code == 403
    assert ApiKey.objects.count() == 0


def test_admin_action_revokes_keys(admin_client):
    first, first_raw = api_key_create(name="first")
    second, second_raw = api_key_create(name="second")
    kept, kept_raw = api_key_create(name="kept")

    response = admin_client.post(
        "/admin/llm/apikey/",
        {"action": "revoke_selected", "_selected_action": [first.pk, second.pk]},
        follow=True,
    )

    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert messages == [
        "Revoked 2 API key(s); they are rejected from the next request on."
    ]
    for raw_key in (first_raw, second_raw):
        with pytest.raises(ApiKeyRevoked):
            api_key_authenticate(raw_key)
    assert api_key_authenticate(kept_raw).pk == kept.pk
    assert ApiKey.objects.get(pk=first.pk).revoked_at is not None


def test_admin_revoked_field_revokes_for_good(admin_client):
    key, raw_key = api_key_create(name="leaked")
    change_url = f"/admin/llm/apikey/{key.pk}/change/"
    form = add_form(name="leaked", allowed_models="", revoked="on")

    response = admin_client.post(change_url, form)

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked is True
    assert key.revoked_at is not None
    with pytest.raises(ApiKeyRevoked):
        api_key_authenticate(raw_key)

    form.pop("revoked")
    admin_client.post(change_url, form)
    key.refresh_from_db()
    assert key.revoked is True
