"""The one interface every model provider implements."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "safety", "other")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that shapes a model's response. The cache key is built from it."""

    model: str
    prompt: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class Completion:
    text: str
    model: str
    finish_reason: str
    usage: Usage = field(default_factory=Usage)


@dataclass
class StreamEnd:
    """Final item of a stream: the metadata of the whole answer, without its text."""

    model: str
    finish_reason: str
    usage: Usage = field(default_factory=Usage)


class Provider:
    """Base class of the provider adapters.

    ``complete`` returns a whole answer. ``stream`` yields ``str`` chunks as the
    vendor produces them, then exactly one ``StreamEnd``. Both raise only
    ``llm.errors.LLMError`` subclasses; closing the stream's generator early
    (``aclose``) stops the vendor call.
    """

    name: str = ""

    async def complete(self, request: GenerationRequest) -> Completion:
        raise NotImplementedError

    def stream(self, request: GenerationRequest) -> AsyncIterator[str | StreamEnd]:
        raise NotImplementedError
