"""Prompt frames render registry prompts; subscribers hear about activations."""

import asyncio
import logging
import re
import time

import pytest
import redis
from channels.db import database_sync_to_async
from django.conf import settings

from llm.keys import api_key_revoke
from llm.models import ApiKey
from llm.prompt_events import prompt_group_name
from prompts_registry.models import Prompt
from prompts_registry.services import prompt_activate, prompts_sync
from tests.ws_support import (
    bearer,
    chat_round_trip,
    chat_socket,
    create_api_key,
    receive,
    receive_until_end,
)

pytestmark = pytest.mark.django_db(transaction=True)

GREETING_V1 = """\
name: greeting
version: 1
description: Greets someone.
template: "Say hello to {{ who }}."
variables:
  who: {type: string}
"""
GREETING_V2 = """\
name: greeting
version: 2
description: Greets someone warmly.
template: "Say a warm hello to {{ who }}."
system: Answer in one sentence.
parameters: {temperature: 0.3}
variables:
  who: {type: string}
"""


@pytest.fixture
def greeting(tmp_path):
    """The prompt "greeting" with versions 1 and 2, version 2 active."""
    folder = tmp_path / "greeting"
    folder.mkdir()
    (folder / "v1.yaml").write_text(GREETING_V1)
    (folder / "v2.yaml").write_text(GREETING_V2)
    prompts_sync(root=tmp_path)
    return "greeting"


def activate(name: str, version: int) -> None:
    prompt = Prompt.objects.get(name=name)
    prompt_activate(prompt=prompt, version=prompt.versions.get(version=version))


async def test_prompt_frame_renders_active_version(fake_gemini, greeting):
    async with chat_socket() as socket:
        await socket.send_json_to(
            {
                "type": "prompt",
                "id": "p",
                "name": "greeting",
                "variables": {"who": "Ada"},
            }
        )
        frames = await receive_until_end(socket, "p")

    start = frames[0]
    assert start.pop("request_id")
    assert start == {
        "type": "start",
        "id": "p",
        "model": "gemini-3.5-flash",
        "cached": False,
        "prompt": "greeting",
        "version": 2,
    }
    assert frames[-1]["type"] == "done"
    body = fake_gemini.calls[0].body
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Say a warm hello to Ada."}]}
    ]
    assert body["systemInstruction"]["parts"] == [{"text": "Answer in one sentence."}]
    assert body["generationConfig"] == {"temperature": 0.3}


async def test_prompt_frame_overrides_version_parameters(fake_gemini, greeting):
    async with chat_socket() as socket:
        await socket.send_json_to(
            {
                "type": "prompt",
                "id": "p",
                "name": "greeting",
                "version": 1,
                "variables": {"who": "Ada"},
                "temperature": 1.5,
                "max_tokens": 20,
            }
        )
        frames = await receive_until_end(socket, "p")

    assert frames[-1]["type"] == "done"
    body = fake_gemini.calls[0].body
    assert body["contents"][0]["parts"] == [{"text": "Say hello to Ada."}]
    assert body["generationConfig"] == {"temperature": 1.5, "maxOutputTokens": 20}


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    [
        ({"name": "nope", "variables": {}}, "not_found", None),
        ({"name": "greeting", "variables": {}}, "invalid_field", "variables.who"),
        (
            {"name": "greeting", "variables": {"who": 3}},
            "invalid_field",
            "variables.who",
        ),
        ({"name": "greeting", "variables": []}, "invalid_field", "variables"),
        ({"name": "greeting", "version": 9, "variables": {}}, "not_found", "version"),
        ({"variables": {"who": "Ada"}}, "invalid_field", "name"),
        (
            {"name": "greeting", "variables": {"who": "A"}, "tone": 1},
            "invalid_field",
            "tone",
        ),
    ],
    ids=[
        "unknown-prompt",
        "missing-variable",
        "wrong-variable-type",
        "variables-not-object",
        "unknown-version",
        "missing-name",
        "unknown-field",
    ],
)
async def test_bad_prompt_frame_is_named(fake_gemini, greeting, frame, code, field):
    async with chat_socket() as socket:
        await socket.send_json_to({"type": "prompt", "id": "bad", **frame})
        error = await receive(socket)
        check = await chat_round_trip(socket)

    assert error["type"] == "error"
    assert error["id"] == "bad"
    assert error["error"]["code"] == code
    assert error["error"].get("field") == field
    assert check["type"] == "done"
    assert fake_gemini.call_count == 1


async def test_subscriber_hears_activation(greeting):
    async with chat_socket() as socket:
        await socket.send_json_to(
            {"type": "subscribe", "id": "sub", "prompt": "greeting"}
        )
        subscribed = await receive(socket)
        await database_sync_to_async(activate)("greeting", 1)
        event = await receive(socket)

    assert subscribed == {"type": "subscribed", "id": "sub", "prompt": "greeting"}
    assert event == {
        "type": "prompt_activated",
        "id": "sub",
        "prompt": "greeting",
        "version": 1,
        "previous_version": 2,
    }


async def test_subscribe_without_id_echoes_null(greeting):
    async with chat_socket() as socket:
        await socket.send_json_to({"type": "subscribe", "prompt": "greeting"})
        subscribed = await receive(socket)
        await database_sync_to_async(activate)("greeting", 1)
        event = await receive(socket)

    assert subscribed == {"type": "subscribed", "id": None, "prompt": "greeting"}
    assert event["id"] is None
    assert event["version"] == 1


async def test_unsubscribed_socket_hears_nothing(fake_gemini, greeting):
    async with chat_socket() as socket:
        await socket.send_json_to({"type": "subscribe", "prompt": "greeting"})
        await receive(socket)
        await socket.send_json_to({"type": "unsubscribe", "prompt": "greeting"})
        unsubscribed = await receive(socket)
        await database_sync_to_async(activate)("greeting", 1)
        # The next frame is the chat's, not an activation event.
        check = await chat_round_trip(socket)

    assert unsubscribed == {"type": "unsubscribed", "id": None, "prompt": "greeting"}
    assert check["type"] == "done"


async def test_subscribe_to_unknown_prompt_is_error(fake_gemini, greeting):
    async with chat_socket() as socket:
        await socket.send_json_to({"type": "subscribe", "id": "s", "prompt": "nope"})
        error = await receive(socket)
        check = await chat_round_trip(socket)

    assert error["type"] == "error"
    assert error["id"] == "s"
    assert error["error"]["code"] == "not_found"
    assert error["error"]["field"] == "prompt"
    assert "nope" in error["error"]["message"]
    assert check["type"] == "done"


def group_members(group: str) -> set[str]:
    """Channel names in a channels_redis group, read from Redis itself."""
    client = redis.Redis.from_url(settings.REDIS_SERVER.url)
    try:
        return {
            member.decode() for member in client.zrange(f"asgi:group:{group}", 0, -1)
        }
    finally:
        client.close()


async def wait_for_member(group: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(group_members, group):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_socket_survives_redis_restart(fake_gemini, greeting, redis_server):
    async with chat_socket() as socket:
        await socket.send_json_to({"type": "subscribe", "prompt": "greeting"})
        await receive(socket)
        redis_server.stop()
        during_outage = await chat_round_trip(socket)
        await socket.send_json_to(
            {"type": "subscribe", "id": "s2", "prompt": "greeting"}
        )
        rejection = await receive(socket)
        redis_server.start()
        # The restarted Redis is empty, so the subscription exists again only
        # once the consumer has rejoined its group.
        rejoined = await wait_for_member("prompt.greeting")
        await database_sync_to_async(activate)("greeting", 1)
        event = await receive(socket)

    assert during_outage["type"] == "done"
    assert rejection["error"] == {
        "code": "subscriptions_unavailable",
        "message": "Subscriptions are unavailable right now; retry later.",
    }
    assert rejoined
    assert event["type"] == "prompt_activated"
    assert event["version"] == 1


def test_activation_survives_stopped_redis(greeting, redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="llm.prompt_events")
    redis_server.stop()

    activate("greeting", 1)

    assert Prompt.objects.get(name="greeting").active_version.version == 1
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith(
        "Could not notify websocket subscribers that prompt 'greeting' is now at "
        "version 1:"
    )


@pytest.mark.parametrize(
    "name",
    ["greeting", "a" * 100, "with space", "ünïcode", "x" * 92 + "-suffix"],
)
def test_group_name_is_valid_for_channels(name):
    group = prompt_group_name(name)

    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,99}", group)
    assert group.startswith("prompt.")


def test_group_names_of_similar_prompts_differ():
    assert prompt_group_name("a b") != prompt_group_name("a_b")
    assert prompt_group_name("a" * 100) != prompt_group_name("a" * 99 + "b")
    assert prompt_group_name("greeting") == "prompt.greeting"


@database_sync_to_async
def revoke_key(raw_key: str) -> None:
    api_key_revoke(ApiKey.objects.get(prefix=raw_key[:11]))


async def test_revoked_subscriber_hears_no_activation(greeting):
    raw_key = await create_api_key()
    async with chat_socket([bearer(raw_key)]) as socket:
        await socket.send_json_to(
            {"type": "subscribe", "id": "sub", "prompt": "greeting"}
        )
        await receive(socket)
        await revoke_key(raw_key)
        await database_sync_to_async(activate)("greeting", 1)
        event = await receive(socket)
        await database_sync_to_async(activate)("greeting", 2)
        assert await socket.receive_nothing(timeout=0.3)

    assert event["type"] == "error"
    assert event["id"] == "sub"
    assert event["error"]["code"] == "key_revoked"
