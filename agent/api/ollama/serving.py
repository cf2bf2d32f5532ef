"""POST /api/chat and /api/generate: Ollama's generation endpoints on the same models, queue and
limits as /v1/*.

A request goes the way an OpenAI one does (edgefleet.agent.api.serving_base): sizes checked
before anything else, the model leased and a queue slot taken (or 429), the prompt validated
in a worker thread before any byte is sent, tokens pumped from their own thread, the model
stopped when the client leaves, exactly one InferenceStats reported. Only the framing differs:
one JSON object (stream: false) or JSON lines (stream true or absent, Ollama's default) with a
last line that says done, why, and the figures. A failure after the first line arrives as an
`{"error": ...}` line, which Ollama clients raise as an error. A `format` becomes a grammar
the runtime decodes under (edgefleet.agent.api.ollama.structured), so the reply parses.

The figures partition the request's time, in nanoseconds: load_duration runs from the start to
the opened generation (queueing, leasing, reloading an unloaded model, templating: what
Ollama's scheduler and loader account there), prompt_eval_duration to the first token,
eval_duration from it to the end; total_duration is their sum.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from typing import ClassVar, Generic, TypeVar

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from edgefleet.agent.api.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected, unless_disconnected
from edgefleet.agent.api.errors import APIError, api_error_for
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.offload import TokenPump, collect
from edgefleet.agent.api.ollama import ndjson, structured
from edgefleet.agent.api.ollama.errors import option_error
from edgefleet.agent.api.ollama.options import OptionRefused
from edgefleet.agent.api.ollama.protocol import (
    LATEST,
    AssistantMessage,
    DoneReason,
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaError,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaGenerationRequest,
    OllamaResponseModel,
    Timings,
)
from edgefleet.agent.api.serving_base import CLIENT_DISCONNECTED, Admission, ServingEndpoint, error_code
from edgefleet.agent.api.timing import RequestTimer
from edgefleet.agent.runtimes.base import (
    Capability,
    ChatMessage,
    ContextLengthExceeded,
    Delta,
    FinishReason,
    Generation,
    InvalidPromptError,
    Runtime,
    SamplingParams,
)
from edgefleet.agent.runtimes.model_table import ModelTable

RequestT = TypeVar("RequestT", bound=OllamaGenerationRequest)


def resolve(models: ModelTable, requested: str) -> str:
    """The served name a request means: Ollama spells "name" as "name:latest" too."""
    if requested.endswith(LATEST) and models.get(requested) is None:
        base = requested.removesuffix(LATEST)
        if models.get(base) is not None:
            return base
    return requested


def nanos(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def timings(timer: RequestTimer, *, opened_at: float, prompt_tokens: int, completion_tokens: int) -> Timings:
    """The figures of a finished generation (see the module docstring)."""
    finished = timer.finished_at if timer.finished_at is not None else time.perf_counter()
    first = timer.first_token_at if timer.first_token_at is not None else finished
    return Timings(
        total_duration=nanos(finished - timer.started_at),
        load_duration=nanos(opened_at - timer.started_at),
        prompt_eval_count=prompt_tokens,
        prompt_eval_duration=nanos(first - opened_at),
        eval_count=completion_tokens,
        eval_duration=nanos(finished - first),
    )


class OllamaGenerating(ServingEndpoint, ABC, Generic[RequestT]):
    """One Ollama generation endpoint; instances live on app.state and serve every request."""

    prompt_param: ClassVar[str]  # the request field prompt errors point at

    @abstractmethod
    def check_size(self, limits: RequestLimits, request: RequestT) -> None:
        """Refuse a prompt beyond `limits` (raises RequestLimitExceeded); nothing is tokenized yet."""

    @abstractmethod
    def load_only(self, request: RequestT) -> bool:
        """An empty request: Ollama's way to load a model, answered with done_reason "load"."""

    @abstractmethod
    def open_generation(self, runtime: Runtime, request: RequestT, params: SamplingParams) -> Generation:
        """Validate the prompt and return a generation not yet started (runs in a worker thread)."""

    @abstractmethod
    def piece(self, *, model: str, text: str, done: bool) -> OllamaResponseModel:
        """One object: a chunk of text, or (done) the final object before its figures are added."""

    async def handle(self, request: RequestT, raw: Request) -> Response:
        timer = self.timer(model=request.model, stream=request.stream)
        self.enforce(timer, lambda limits: self.check_size(limits, request))
        options = request.sampling_options()
        try:  # compiled before queueing: a schema the engine refuses costs the model nothing
            constraint = await run_in_threadpool(structured.format_constraint, request.format)
        except APIError as refused:
            timer.report(error=error_code(refused))
            raise
        admission = await self.admit(resolve(self._models, request.model), raw, timer)
        try:
            description = admission.runtime.describe()
            options.check_window(description.n_ctx)
            if constraint is not None:
                structured.check_runtime(description)
        except OptionRefused as exc:
            admission.release()
            error = option_error(exc)
            timer.report(error=error_code(error))
            raise error from exc
        except APIError as refused:
            admission.release()
            timer.report(error=error_code(refused))
            raise
        if self.load_only(request):
            # The model is leased, so it is here; a model its keep-alive unloaded loads again on
            # the first request that uses it, not on this one.
            admission.release()
            timer.report()
            final = self._final(timer.model, "", "load", None)
            return JSONResponse(final.body())
        params = dataclasses.replace(options.sampling_params(), constraint=constraint, lora=admission.lora)
        generation = await self._open(admission, request, params, timer)
        opened_at = time.perf_counter()
        # From here the pump's thread owns the admission: it releases it once the generation
        # is closed, whatever the outcome, so the slot frees only when the model is idle.
        pump = TokenPump(generation, on_done=admission.release)
        pump.start()
        if request.stream:
            return await self._stream(raw, pump, generation, timer, opened_at)
        return await self._complete(raw, pump, generation, timer, opened_at)

    async def _open(
        self, admission: Admission, request: RequestT, params: SamplingParams, timer: RequestTimer
    ) -> Generation:
        try:
            return await run_in_threadpool(self.open_generation, admission.runtime, request, params)
        except Exception as exc:
            admission.release()
            error = api_error_for(exc, param=self.prompt_param)
            prompt_tokens = exc.prompt_tokens if isinstance(exc, ContextLengthExceeded) else 0
            timer.report(prompt_tokens=prompt_tokens, error=error_code(error))
            raise error from exc
        except BaseException:
            admission.release()
            raise

    def _final(
        self, model: str, text: str, reason: DoneReason, figures: Timings | None
    ) -> OllamaResponseModel:
        final = self.piece(model=model, text=text, done=True)
        update: dict[str, object] = {"done_reason": reason}
        if figures is not None:
            update.update(figures.model_dump(exclude_none=True))
        return final.model_copy(update=update)

    async def _complete(
        self, raw: Request, pump: TokenPump, generation: Generation, timer: RequestTimer, opened_at: float
    ) -> Response:
        try:
            collected = await unless_disconnected(raw, collect(pump, generation))
        except ClientDisconnected:
            timer.report(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                error=CLIENT_DISCONNECTED,
            )
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:
            error = api_error_for(exc, param=self.prompt_param)
            timer.report(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                error=error_code(error),
            )
            raise error from exc
        finally:
            pump.cancel()
        completion = collected.completion
        if collected.first_delta_at is not None:
            timer.mark_first_token(collected.first_delta_at)
        timer.mark_finished(collected.finished_at)
        timer.report(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
        figures = timings(
            timer,
            opened_at=opened_at,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )
        final = self._final(timer.model, completion.text, completion.finish_reason, figures)
        return JSONResponse(final.body())

    async def _stream(
        self, raw: Request, pump: TokenPump, generation: Generation, timer: RequestTimer, opened_at: float
    ) -> Response:
        try:
            # The first delta comes before the headers, so an early failure keeps its own status.
            first = await unless_disconnected(raw, pump.next())
        except ClientDisconnected:
            pump.cancel()
            timer.report(prompt_tokens=generation.prompt_tokens, error=CLIENT_DISCONNECTED)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:
            pump.cancel()
            error = api_error_for(exc, param=self.prompt_param)
            timer.report(prompt_tokens=generation.prompt_tokens, error=error_code(error))
            raise error from exc
        except BaseException:
            pump.cancel()
            raise
        if first is not None:
            timer.mark_first_token()
        return ndjson.NDJSONResponse(self._lines(first, pump, generation, timer, opened_at))

    async def _lines(
        self,
        first: Delta | None,
        pump: TokenPump,
        generation: Generation,
        timer: RequestTimer,
        opened_at: float,
    ) -> AsyncGenerator[str, None]:
        outcome = CLIENT_DISCONNECTED  # until the stream is known to have ended properly
        finish: FinishReason = "length"

        def report() -> None:
            timer.report(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                error=outcome,
            )

        try:
            delta = first
            while delta is not None:
                if delta.text:
                    yield ndjson.line(self.piece(model=timer.model, text=delta.text, done=False).body())
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
                delta = await pump.next()
            timer.mark_finished()
            outcome = ""
            report()
            figures = timings(
                timer,
                opened_at=opened_at,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
            )
            yield ndjson.line(self._final(timer.model, "", finish, figures).body())
        except Exception as exc:  # mid-stream: an error line, which Ollama clients raise
            error = api_error_for(exc, param=self.prompt_param)
            outcome = error_code(error)
            report()
            yield ndjson.line(OllamaError(error=error.info.message, code=error.info.code).body())
        finally:
            pump.cancel()
            report()  # a departed client; otherwise already reported, and this does nothing


class OllamaChat(OllamaGenerating[OllamaChatRequest]):
    endpoint = "ollama.chat"
    capability = Capability.CHAT
    capability_name = "chat"
    prompt_param = "messages"

    def check_size(self, limits: RequestLimits, request: OllamaChatRequest) -> None:
        limits.check_count(
            "messages", len(request.messages), limit=limits.max_messages, setting="max_messages"
        )
        limits.check_chars("messages", (message.content for message in request.messages))

    def load_only(self, request: OllamaChatRequest) -> bool:
        return not request.messages

    def open_generation(
        self, runtime: Runtime, request: OllamaChatRequest, params: SamplingParams
    ) -> Generation:
        messages = [ChatMessage(role=m.role, content=m.content) for m in request.messages]
        return runtime.chat_stream(messages, params)

    def piece(self, *, model: str, text: str, done: bool) -> OllamaResponseModel:
        return OllamaChatResponse(model=model, message=AssistantMessage(content=text), done=done)


class OllamaGenerate(OllamaGenerating[OllamaGenerateRequest]):
    """Every generative model completes text; the chat template is used when there is one."""

    endpoint = "ollama.generate"
    capability = Capability.COMPLETIONS
    capability_name = "text generation"
    prompt_param = "prompt"

    def check_size(self, limits: RequestLimits, request: OllamaGenerateRequest) -> None:
        limits.check_chars("prompt", [request.prompt, request.system or ""])

    def load_only(self, request: OllamaGenerateRequest) -> bool:
        return not request.prompt

    def open_generation(
        self, runtime: Runtime, request: OllamaGenerateRequest, params: SamplingParams
    ) -> Generation:
        templated = not request.raw and Capability.CHAT in runtime.describe().capabilities
        if not templated:
            if request.system:
                raise InvalidPromptError(
                    "system needs the model's chat template, which raw mode (or a model without "
                    "one) leaves out; put the system text in the prompt instead"
                )
            return runtime.complete_stream(request.prompt, params)
        messages = [ChatMessage(role="system", content=request.system)] if request.system else []
        messages.append(ChatMessage(role="user", content=request.prompt))
        return runtime.chat_stream(messages, params)

    def piece(self, *, model: str, text: str, done: bool) -> OllamaResponseModel:
        return OllamaGenerateResponse(model=model, response=text, done=done)
