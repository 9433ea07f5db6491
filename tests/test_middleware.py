import pytest
from django.conf import settings
from django.contrib.sessions.models import Session
from django.test import AsyncClient

pytestmark = [
    pytest.mark.urls("tests.urls_middleware"),
    pytest.mark.django_db(transaction=True),
]


async def test_async_view_session_is_saved():
    client = AsyncClient()

    response = await client.get("/remember")

    assert response.status_code == 200
    assert settings.SESSION_COOKIE_NAME in response.cookies
    assert await Session.objects.acount() == 1


async def test_saved_session_is_read_back():
    client = AsyncClient()
    await client.get("/remember")

    response = await client.get("/recall")

    assert response.json() == {"colour": "blue"}


async def test_untouched_session_is_not_saved():
    response = await AsyncClient().get("/recall")

    assert response.json() == {"colour": None}
    assert settings.SESSION_COOKIE_NAME not in response.cookies
    assert await Session.objects.acount() == 0


async def test_async_view_message_is_stored():
    response = await AsyncClient().get("/notify")

    assert response.status_code == 200
    assert "messages" in response.cookies
