"""The local SmolLM2 adapter, running the real model on the CPU.

The model is small but shares the CPU with everything else, so the tests ask
for few tokens, except where a generation must stay busy until it is cancelled.
"""

import asyncio
import logging
import time

import pytest

from gateway_project.errors import InvalidField
from llm.errors import LLMError, ModelBusy
from llm.providers import get_provider
from llm.providers.base import GenerationRequest, StreamEnd
from llm.providers.local import LocalProvider, load_model, model_path

MODEL = "smollm2-135m-instruct"
# At temperature 0 the model writes this story past any token limit used here.
LONG_PROMPT = "Write a long story about a dragon who learns to fly."


@pytest.fixture
def provider() -> LocalProvider:
    return get_provider(MODEL)


@pytest.fixture(scope="module")
def reference_llama():
    """A second copy of the model, called directly through llama-cpp-python."""
    return load_model(model_path(), context_tokens=2048)


def chat_request(prompt: str, **options) -> GenerationRequest:
    return GenerationRequest(model=MODEL, prompt=prompt, temperature=0.0, **options)


async def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "finish_reason"),
    [("Say hi.", 5, "length"), ("Say hi.", 100, "stop")],
)
async def test_complete_matches_llama_output(
    provider, reference_llama, prompt, max_tokens, finish_reason
):
    request = chat_request(prompt, max_tokens=max_tokens, system="Be brief.")
    expected = reference_llama.create_chat_completion(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": prompt},
        ],
        max_tokens=max_tokens,
        temperature=0.0,
    )

    completion = await provider.complete(request)

    assert completion.text == expected["choices"][0]["message"]["content"]
    assert completion.text
    assert completion.model == MODEL
    assert completion.finish_reason == finish_reason
    assert completion.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == expected["usage"]["total_tokens"]


async def test_stream_yields_tokens_then_end(provider):
    items = [item async for item in provider.stream(chat_request("Hi", max_tokens=6))]

    chunks = items[:-1]
    end = items[-1]
    assert len(chunks) > 1
    assert all(isinstance(chunk, str) for chunk in chunks)
    assert end == StreamEnd(model=MODEL, finish_reason="length", usage=end.usage)
    assert end.usage.completion_tokens == 6


async def test_cancelled_stream_frees_model(provider, caplog):
    caplog.set_level(logging.INFO, logger="llm.providers.local")
    stream = provider.stream(chat_request(LONG_PROMPT, max_tokens=512))
    await anext(stream)

    await stream.aclose()
    completion = await provider.complete(chat_request("Hi", max_tokens=2))

    assert completion.usage.completion_tokens == 2
    cancelled = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Local generation cancelled")
    ]
    assert len(cancelled) == 1
    tokens_before_cancel = int(cancelled[0].split()[-2])
    assert tokens_before_cancel < 512


async def test_full_queue_raises_model_busy(provider, settings):
    settings.LOCAL_MODEL_QUEUE_SIZE = 1
    running = provider.stream(chat_request(LONG_PROMPT, max_tokens=512))
    await anext(running)
    waiting = provider.stream(chat_request("Hi", max_tokens=2))
    waiting_first = asyncio.create_task(anext(waiting))
    await wait_until(lambda: provider.waiting_requests() == 1)
    rejected = provider.stream(chat_request("Hi", max_tokens=2))

    with pytest.raises(ModelBusy) as raised:
        await anext(rejected)

    assert raised.value.status_code == 503
    assert "LOCAL_MODEL_QUEUE_SIZE=1" in str(raised.value)
    await running.aclose()
    assert isinstance(await waiting_first, str)
    await waiting.aclose()


async def test_cancelled_waiting_request_frees_slot(provider, settings):
    settings.LOCAL_MODEL_QUEUE_SIZE = 1
    running = provider.stream(chat_request(LONG_PROMPT, max_tokens=512))
    await anext(running)
    waiting = asyncio.create_task(provider.complete(chat_request("Hi", max_tokens=2)))
    await wait_until(lambda: provider.waiting_requests() == 1)

    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)

    assert provider.waiting_requests() == 0
    await running.aclose()


async def test_missing_model_file_names_setting(provider, settings, tmp_path):
    settings.LOCAL_MODEL_PATH = str(tmp_path / "missing.gguf")

    with pytest.raises(LLMError) as raised:
        await provider.complete(chat_request("Hi", max_tokens=2))

    assert "missing.gguf does not exist" in str(raised.value)
    assert "LOCAL_MODEL_PATH" in str(raised.value)


async def test_prompt_longer_than_context_is_invalid(provider):
    request = chat_request("word " * 3000, max_tokens=2)

    with pytest.raises(InvalidField) as raised:
        await provider.complete(request)

    assert raised.value.field == "prompt"
    assert "exceed context window of 2048" in str(raised.value)
