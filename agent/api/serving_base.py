"""What chat and text completions share: pick the model, generate off the loop, stream, report.

Subclasses say how a request becomes a generation and how deltas become OpenAI objects;
this class owns the order of operations that makes the API safe: lease the model, validate
the prompt before any byte is sent (so prompt errors get a real status code), generate in
a worker thread, stop when the client leaves, release the lease, and report exactly one
InferenceStats per request.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from typing import ClassVar, Generic, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from agent.api import sse
from agent.api.errors import INVALID_REQUEST, APIError, api_error_for
from agent.api.offload import TokenPump, collect_in_thread
from agent.api.protocol import ErrorResponse, SamplingRequest, UsageInfo
from agent.api.timing import RequestTimer
from agent.runtimes.base import Completion, ContextLengthExceeded, Delta, Generation, Runtime, SamplingParams
from agent.serving import ActiveModel, Lease, NoActiveModel
from agent.stats import InferenceStats

RequestT = TypeVar("RequestT", bound=SamplingRequest)


class OpenAIServing(ABC, Generic[RequestT]):
    """One generation endpoint; instances live on `app.state` and are shared by all requests."""

    endpoint: ClassVar[str]  # InferenceStats.endpoint
    id_prefix: ClassVar[str]  # OpenAI object id prefix
    prompt_param: ClassVar[str]  # the request field prompt errors point at

    def __init__(self, *, active: ActiveModel, observer: Callable[[InferenceStats], None]) -> None:
        self._active = active
        self._observer = observer

    @abstractmethod
    def open_generation(self, runtime: Runtime, request: RequestT) -> Generation:
        """Validate the prompt and return a generation not yet started (runs in a worker thread)."""

    @abstractmethod
    def build_response(self, *, request_id: str, model: str, completion: Completion) -> BaseModel:
        """The non-streamed response body."""

    @abstractmethod
    def build_chunks(
        self, *, request_id: str, created: int, model: str, delta: Delta, first: bool
    ) -> list[BaseModel]:
        """The stream chunks one delta becomes (`first`: the first delta of the stream)."""

    @abstractmethod
    def build_usage_chunk(self, *, request_id: str, created: int, model: str, usage: UsageInfo) -> BaseModel:
        """The trailing chunk carrying usage, for stream_options.include_usage."""

    def rejected(self, error: APIError, *, model: str = "") -> None:
        """Report a request refused before it reached this class (malformed body)."""
        timer = RequestTimer(observer=self._observer, endpoint=self.endpoint, model=model, stream=False)
        timer.report(error=error.info.code or error.info.type)

    async def handle(self, request: RequestT) -> Response:
        timer = RequestTimer(
            observer=self._observer, endpoint=self.endpoint, model=request.model, stream=request.stream
        )
        try:
            lease = self._lease(request.model)
        except APIError as refused:
            timer.report(error=_code(refused))
            raise
        timer.model = lease.runtime.describe().model_id
        try:
            generation = await run_in_threadpool(self.open_generation, lease.runtime, request)
        except Exception as exc:
            lease.release()
            error = api_error_for(exc, param=self.prompt_param)
            prompt_tokens = exc.prompt_tokens if isinstance(exc, ContextLengthExceeded) else 0
            timer.report(prompt_tokens=prompt_tokens, error=_code(error))
            raise error from exc
        if request.stream:
            return await self._stream(request, lease, generation, timer)
        return await self._complete(lease, generation, timer)

    @staticmethod
    def sampling_params(request: SamplingRequest, *, max_tokens: int | None) -> SamplingParams:
        """OpenAI's defaults for omitted fields (temperature 1, top_p 1)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=request.stop_sequences(),
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
        )

    def _lease(self, requested: str) -> Lease:
        try:
            lease = self._active.lease()
        except NoActiveModel as exc:
            raise api_error_for(exc) from exc
        served = lease.runtime.describe().model_id
        if requested != served:
            lease.release()
            raise APIError(
                404,
                f"The model `{requested}` does not exist on this device; it serves `{served}`.",
                type=INVALID_REQUEST,
                code="model_not_found",
                param="model",
            )
        return lease

    async def _complete(self, lease: Lease, generation: Generation, timer: RequestTimer) -> Response:
        try:
            collected = await collect_in_thread(generation)
        except Exception as exc:
            error = api_error_for(exc, param=self.prompt_param)
            timer.report(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                error=_code(error),
            )
            raise error from exc
        finally:
            lease.release()
        completion = collected.completion
        if collected.first_delta_at is not None:
            timer.mark_first_token(collected.first_delta_at)
        timer.mark_finished(collected.finished_at)
        timer.report(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens)
        body = self.build_response(
            request_id=self._new_id(), model=timer.model, completion=completion
        ).model_dump(mode="json")
        return JSONResponse(body)

    async def _stream(
        self, request: RequestT, lease: Lease, generation: Generation, timer: RequestTimer
    ) -> Response:
        pump = TokenPump(generation, on_done=lease.release)
        pump.start()
        try:
            # Wait for the first delta before sending headers: a failure this early still gets
            # its own status code instead of an error buried in a 200 stream.
            first = await pump.next()
        except Exception as exc:
            pump.cancel()
            error = api_error_for(exc, param=self.prompt_param)
            timer.report(prompt_tokens=generation.prompt_tokens, error=_code(error))
            raise error from exc
        except BaseException:
            pump.cancel()
            raise
        timer.mark_first_token()
        events = self._events(request, first, pump, generation, timer)
        return sse.EventStreamResponse(events)

    async def _events(
        self,
        request: RequestT,
        first: Delta | None,
        pump: TokenPump,
        generation: Generation,
        timer: RequestTimer,
    ) -> AsyncGenerator[str, None]:
        request_id = self._new_id()
        created = int(timer.started_at_wall)
        exclude = None if request.include_usage() else {"usage"}
        outcome = "client_disconnected"  # until the stream is known to have ended properly
        try:
            delta, is_first = first, True
            while delta is not None:
                for chunk in self.build_chunks(
                    request_id=request_id, created=created, model=timer.model, delta=delta, first=is_first
                ):
                    yield sse.event(chunk.model_dump_json(exclude=exclude))
                is_first = False
                delta = await pump.next()
            timer.mark_finished()
            if request.include_usage():
                usage = UsageInfo.of(
                    prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens
                )
                chunk = self.build_usage_chunk(
                    request_id=request_id, created=created, model=timer.model, usage=usage
                )
                yield sse.event(chunk.model_dump_json())
            outcome = ""
            yield sse.DONE
        except Exception as exc:  # a failure mid-stream: tell the client in-band, as OpenAI does
            error = api_error_for(exc, param=self.prompt_param)
            outcome = _code(error)
            yield sse.event(ErrorResponse(error=error.info).model_dump_json())
            yield sse.DONE
        finally:
            pump.cancel()
            timer.report(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                error=outcome,
            )

    def _new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"


def _code(error: APIError) -> str:
    return error.info.code or error.info.type
