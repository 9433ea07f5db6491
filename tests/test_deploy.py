"""Production settings: Django's deploy checks, HTTPS, headers and the admin."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client, RequestFactory

from gateway_project.errors import csrf_failure
from gateway_project.logging import request_id_var

BASE_DIR = Path(__file__).resolve().parent.parent
YEAR_SECONDS = 31536000


def production_env(tmp_path, **overrides) -> dict[str, str]:
    """Return the environment of a production deployment, without test settings."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "gateway.example.com",
        "CSRF_TRUSTED_ORIGINS": "https://gateway.example.com",
        "CORS_ALLOWED_ORIGINS": "https://app.example.com",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    env.update(overrides)
    return env


def deploy_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "manage.py",
            "check",
            "--deploy",
            "--fail-level",
            "WARNING",
        ],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deploy_check_passes_in_production(tmp_path):
    result = deploy_check(production_env(tmp_path))

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_deploy_check_passes_with_hsts_preload(tmp_path):
    result = deploy_check(production_env(tmp_path, SECURE_HSTS_PRELOAD="true"))

    assert result.returncode == 0, result.stderr


def test_deploy_check_flags_plain_http(tmp_path):
    result = deploy_check(production_env(tmp_path, SECURE_SSL_REDIRECT="false"))

    assert result.returncode != 0
    assert "security.W008" in result.stderr


def test_deploy_check_flags_short_secret_key(tmp_path):
    result = deploy_check(production_env(tmp_path, DJANGO_SECRET_KEY="too-short"))

    assert result.returncode != 0
    assert "security.W009" in result.stderr


@pytest.fixture
def https_redirect(settings):
    settings.SECURE_SSL_REDIRECT = True


def test_plain_http_redirects_to_https(https_redirect):
    response = Client().get("/prompts")

    assert response.status_code == 301
    assert response["Location"] == "https://testserver/prompts"


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_answer_over_plain_http(https_redirect, path):
    response = Client().get(path)

    assert response.status_code == 200


def test_https_response_carries_security_headers():
    response = Client().get("/health", secure=True)

    assert response["Strict-Transport-Security"] == (
        f"max-age={YEAR_SECONDS}; includeSubDomains"
    )
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"


@pytest.mark.django_db
def test_admin_redirects_anonymous_user_to_login():
    response = Client().get("/admin/")

    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/admin/"


@pytest.mark.django_db
def test_admin_rejects_non_staff_user(django_user_model):
    user = django_user_model.objects.create_user("member", password="unused")
    client = Client()
    client.force_login(user)

    response = client.get("/admin/")

    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/admin/"


def test_csrf_failure_uses_error_shape():
    # Every API endpoint is CSRF exempt, so the failure view is called directly.
    request = RequestFactory().post("/prompts/x/chat", data={})
    token = request_id_var.set("csrf-1")
    try:
        response = csrf_failure(request, reason="CSRF cookie not set.")
    finally:
        request_id_var.reset(token)

    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content) == {
        "error": {
            "code": "forbidden",
            "message": "CSRF verification failed: CSRF cookie not set. API "
            "clients need no CSRF token, so check that POST /prompts/x/chat is a "
            "documented endpoint (GET /docs lists them).",
        },
        "request_id": "csrf-1",
    }


@pytest.mark.django_db
def test_admin_csrf_failure_keeps_html_page():
    client = Client(enforce_csrf_checks=True)

    response = client.post("/admin/login/", {"username": "a", "password": "b"})

    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/html")
