"""No prompt, answer or API key reaches the logs at INFO or above.

Each test sends requests that carry distinctive texts and then searches every
captured record, formatted as the production JSON formatter writes it (message,
extra fields and traceback), for those texts.
"""

import io
import json
import logging

import pytest
from django.core.management import call_command
from django.test import AsyncClient

from gateway_project.logging import JsonFormatter
from llm.keys import api_key_create, api_key_revoke
from tests.chat_support import read_events
from tests.fake_gemini import Reply

PROMPT = "Describe the violet heron of Lake Ostrava"
SYSTEM = "Speak like a lighthouse keeper from Tromso"
ANSWER_CHUNKS = ["Zanzibar quokka", " marmalade orbit"]
VARIABLE_TEXT = "Minutes of the tangerine committee on Thursday"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def captured(caplog):
    """Capture INFO and above from every logger, non-propagating ones included.

    The "django" logger does not propagate to the root logger, where caplog
    listens, so caplog's handler is added to it directly.
    """
    caplog.set_level(logging.INFO)
    isolated = [
        logging.getLogger(name)
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and not logger.propagate
    ]
    for logger in isolated:
        logger.addHandler(caplog.handler)
    yield caplog
    for logger in isolated:
        logger.removeHandler(caplog.handler)


@pytest.fixture
def raw_key() -> str:
    _, raw = api_key_create(name="log hygiene")
    return raw


@pytest.fixture
def prompts():
    call_command("sync_prompts", stdout=io.StringIO())


@pytest.fixture
def revoked_key() -> str:
    key, raw = api_key_create(name="revoked for log hygiene")
    api_key_revoke(key)
    return raw


def leaks(caplog, secrets: list[str]) -> list[str]:
    """Return the formatted INFO+ records that contain any of ``secrets``."""
    formatter = JsonFormatter()
    found = []
    for record in caplog.records:
        if record.levelno < logging.INFO:
            continue
        # The texts searched for contain nothing that JSON escapes.
        line = formatter.format(record)
        if any(secret in line for secret in secrets):
            found.append(line)
    return found


def sensitive_texts(raw_key: str) -> list[str]:
    return [PROMPT, SYSTEM, VARIABLE_TEXT, *ANSWER_CHUNKS, raw_key]


def bearer(raw_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw_key}"}


async def post(path: str, body: dict, headers: dict[str, str]):
    return await AsyncClient().post(
        path, data=json.dumps(body), content_type="application/json", headers=headers
    )


def test_leak_check_finds_logged_prompt(captured):
    logging.getLogger("llm.views").info("Chat prompt: %s", PROMPT)
    logging.getLogger("django.request").error("Failed", extra={"body": SYSTEM})

    assert len(leaks(captured, [PROMPT, SYSTEM])) == 2


async def test_chat_logs_no_prompt_or_answer(captured, fake_gemini, raw_key):
    fake_gemini.default_reply = Reply(chunks=ANSWER_CHUNKS)
    body = {"prompt": PROMPT, "system": SYSTEM}

    whole = await post("/chat", body, bearer(raw_key))
    cached = await post("/chat", body, bearer(raw_key))
    stream = await post("/chat/stream", {**body, "cache": False}, bearer(raw_key))
    events = await read_events(stream)

    assert whole.status_code == 200
    assert whole.json()["response"] == "".join(ANSWER_CHUNKS)
    assert cached["X-Cache"] == "hit-l1"
    assert events[-1].name == "done"
    assert captured.records, "no log record was captured"
    assert leaks(captured, sensitive_texts(raw_key)) == []


async def test_failed_chat_logs_no_prompt(captured, fake_gemini, raw_key):
    body = {"prompt": PROMPT, "system": SYSTEM, "cache": False}

    fake_gemini.default_reply = Reply(block_reason="SAFETY")
    blocked = await post("/chat", body, bearer(raw_key))
    fake_gemini.default_reply = Reply(chunks=ANSWER_CHUNKS, drop_after_chunks=1)
    broken = await post("/chat/stream", body, bearer(raw_key))
    events = await read_events(broken)
    fake_gemini.default_reply = Reply(status=401)
    auth_failed = await post("/chat", body, bearer(raw_key))
    # Retried until UPSTREAM_RETRY_MAX_SECONDS, logging each retry.
    fake_gemini.default_reply = Reply(status=503)
    unavailable = await post("/chat", body, bearer(raw_key))

    assert blocked.status_code == 422
    assert events[-1].name == "error"
    assert auth_failed.status_code == 502
    assert unavailable.status_code == 503
    assert any(record.levelno >= logging.WARNING for record in captured.records)
    assert leaks(captured, sensitive_texts(raw_key)) == []


async def test_prompt_chat_and_render_log_no_text(
    captured, fake_gemini, raw_key, prompts
):
    fake_gemini.default_reply = Reply(chunks=ANSWER_CHUNKS)
    body = {"variables": {"text": VARIABLE_TEXT, "focus": PROMPT}}

    rendered = await post("/prompts/summarizer/render", body, bearer(raw_key))
    answered = await post("/prompts/summarizer/chat", body, bearer(raw_key))

    assert rendered.status_code == 200
    assert VARIABLE_TEXT in rendered.json()["user"]
    assert answered.status_code == 200
    assert leaks(captured, sensitive_texts(raw_key)) == []


async def test_rejected_keys_are_not_logged(captured, revoked_key):
    unknown = "gw_" + "x" * 43

    invalid = await post("/chat", {"prompt": PROMPT}, bearer(unknown))
    revoked = await post("/chat", {"prompt": PROMPT}, bearer(revoked_key))

    assert invalid.status_code == 401
    assert revoked.status_code == 401
    assert revoked.json()["error"]["code"] == "key_revoked"
    assert leaks(captured, [unknown, revoked_key, PROMPT]) == []
