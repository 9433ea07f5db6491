import pytest
from django.test import Client


def test_health_returns_ok():
    response = Client().get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_health_answers_head_without_body():
    response = Client().head("/health")

    assert response.status_code == 200
    assert response.content == b""


def test_health_rejects_post_with_405():
    response = Client(enforce_csrf_checks=True).post(
        "/health", headers={"X-Request-ID": "r1"}
    )

    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json() == {
        "error": {
            "code": "method_not_allowed",
            "message": "POST is not allowed on /health; use GET.",
        },
        "request_id": "r1",
    }


@pytest.mark.django_db
def test_ready_reports_database_and_redis():
    response = Client().get("/ready")

    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


@pytest.mark.django_db
def test_ready_names_redis_when_it_is_stopped(redis_server):
    redis_server.stop()

    response = Client().get("/ready")

    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready"
    assert "redis" in body["error"]["message"]
    assert body["checks"] == {"database": "ok", "redis": "failed"}


def test_request_id_is_echoed_when_valid():
    response = Client().get("/health", headers={"X-Request-ID": "abc-123"})

    assert response["X-Request-ID"] == "abc-123"


def test_request_id_is_replaced_when_invalid():
    response = Client().get("/health", headers={"X-Request-ID": "bad id\n"})

    assert response["X-Request-ID"] != "bad id\n"
    assert len(response["X-Request-ID"]) == 32


def test_unknown_path_returns_error_shape():
    response = Client().get("/no-such-endpoint", headers={"X-Request-ID": "r1"})

    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "No endpoint at /no-such-endpoint."},
        "request_id": "r1",
    }
