"""What every model endpoint shares: pick the model, check it can do the job, queue, report.

`ServingEndpoint` owns the steps before any work starts: lease the model named, refuse
models without the endpoint's capability, and wait for a slot in the admission queue (or
be turned away with 429, or give up when the client leaves). A name ``<model>:<adapter>``
leases the model and carries the LoRA adapter on the admission, for that request's
`SamplingParams.lora` only (vLLM's and Ollama's way to name a variant of a model); the
request is reported, and answered, under that name. `OpenAIServing` adds what
chat and text completions share: validate the prompt before any byte is sent (so prompt
errors get a real status code), generate in a worker thread, stop when the client leaves,
release the lease and slot, and report exactly one InferenceStats per request.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from typing import ClassVar, Generic, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from edgefleet.agent.api import sse
from edgefleet.agent.api.admission import AdmissionQueue, QueueFull, Slot
from edgefleet.agent.api.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected, unless_disconnected
from edgefleet.agent.api.errors import INVALID_REQUEST, RATE_LIMITED, APIError, api_error_for
from edgefleet.agent.api.limits import RequestLimitExceeded, RequestLimits
from edgefleet.agent.api.offload import TokenPump, collect
from edgefleet.agent.api.protocol import ErrorResponse, SamplingRequest, UsageInfo
from edgefleet.agent.api.timing import RequestTimer
from edgefleet.agent.runtimes.base import (
    Capability,
    Completion,
    ContextLengthExceeded,
    Delta,
    Generation,
    LoraRequest,
    Runtime,
    SamplingParams,
)
from edgefleet.agent.runtimes.model_table import (
    ADAPTER_SEPARATOR,
    Lease,
    ModelNotServed,
    ModelTable,
    NoActiveModel,
)
from edgefleet.agent.stats import InferenceStats

RequestT = TypeVar("RequestT", bound=SamplingRequest)

SEED_MASK = 0xFFFF_FFFF  # runtimes take 32-bit seeds; OpenAI clients may send any integer
CLIENT_DISCONNECTED = "client_disconnected"  # InferenceStats.error when the client left early


class Admission:
    """A request's lease on the model plus its queue slot; `release` frees both, from any thread.

    `lora` is the adapter the request named (``<model>:<adapter>``), None for the model itself."""

    __slots__ = ("lease", "lora", "slot")

    def __init__(self, lease: Lease, slot: Slot, lora: LoraRequest | None = None) -> None:
        self.lease = lease
        self.slot = slot
        self.lora = lora

    @property
    def runtime(self) -> Runtime:
        return self.lease.runtime

    @property
    def model(self) -> str:
        """The name the request is served, answered and counted under."""
        return served_name(self.runtime, self.lora)

    def release(self) -> None:
        try:
            self.slot.release()
        finally:
            self.lease.release()


class ServingEndpoint:
    """One model endpoint; instances live on `app.state` and are shared by all requests."""

    endpoint: ClassVar[str]  # InferenceStats.endpoint
    capability: ClassVar[Capability]  # what the model must be able to do
    capability_name: ClassVar[str]  # the capability as error messages name it
    applies_lora: ClassVar[bool] = True  # False: a request naming an adapter is refused (embeddings)

    def __init__(
        self,
        *,
        models: ModelTable,
        queue: AdmissionQueue,
        observer: Callable[[InferenceStats], None],
        limits: RequestLimits,
    ) -> None:
        self._models = models
        self._queue = queue
        self._observer = observer
        self._limits = limits

    def timer(self, *, model: str, stream: bool) -> RequestTimer:
        return RequestTimer(observer=self._observer, endpoint=self.endpoint, model=model, stream=stream)

    def rejected(self, error: APIError, *, model: str = "") -> None:
        """Report a request refused before it reached this class (malformed body)."""
        self.timer(model=model, stream=False).report(error=error_code(error))

    def enforce(self, timer: RequestTimer, check: Callable[[RequestLimits], None]) -> None:
        """Run a size check before the request takes a lease, a slot or a tokenizer; refusals are reported."""
        try:
            check(self._limits)
        except RequestLimitExceeded as exc:
            error = api_error_for(exc)
            timer.report(error=error_code(error))
            raise error from exc

    async def admit(self, requested: str, raw: Request, timer: RequestTimer) -> Admission:
        """Lease the model, check its capability and wait for a slot; failures are reported."""
        try:
            lease, lora = self._lease(requested)
        except APIError as refused:
            timer.report(error=error_code(refused))
            raise
        timer.model = served_name(lease.runtime, lora)  # one of served_names(): a bounded label
        try:
            slot = await unless_disconnected(raw, self._queue.admit())
        except QueueFull as full:
            lease.release()
            error = APIError(
                429,
                str(full),
                type=RATE_LIMITED,
                code="queue_full",
                headers={"Retry-After": str(full.retry_after_s)},
            )
            timer.report(error=error_code(error))
            raise error from full
        except BaseException as exc:  # the client left while waiting, or the server is stopping
            lease.release()
            if isinstance(exc, ClientDisconnected):
                timer.report(error=CLIENT_DISCONNECTED)
            raise
        return Admission(lease, slot, lora)

    def _lease(self, requested: str) -> tuple[Lease, LoraRequest | None]:
        """The lease and the adapter named; every refusal is decided before anything queues."""
        try:
            lease, lora = self._models.lease_model(requested)
        except (NoActiveModel, ModelNotServed) as exc:
            raise api_error_for(exc) from exc
        try:
            self._check(lease.runtime, lora)
        except APIError:
            lease.release()
            raise
        return lease, lora

    def _check(self, runtime: Runtime, lora: LoraRequest | None) -> None:
        description = runtime.describe()
        served = description.model_id
        if lora is not None and not self.applies_lora:
            raise APIError(
                400,
                f"`{served_name(runtime, lora)}` is a LoRA adapter over `{served}`, and "
                f"{self.capability_name} never apply an adapter; name the model `{served}`.",
                type=INVALID_REQUEST,
                code="adapter_not_supported",
                param="model",
            )
        if self.capability not in description.capabilities:
            can = ", ".join(sorted(c.value for c in description.capabilities)) or "nothing"
            raise APIError(
                400,
                f"The model `{served}` does not support {self.capability_name} (it supports: {can}).",
                type=INVALID_REQUEST,
                code="capability_not_supported",
                param="model",
            )
        if lora is not None and Capability.LORA not in description.capabilities:
            raise APIError(
                400,
                f"The model `{served}` cannot apply LoRA adapters, so `{served_name(runtime, lora)}` "
                "cannot be served.",
                type=INVALID_REQUEST,
                code="capability_not_supported",
                param="model",
            )


class OpenAIServing(ServingEndpoint, ABC, Generic[RequestT]):
    """A generation endpoint (chat or text completions)."""

    id_prefix: ClassVar[str]  # OpenAI object id prefix
    prompt_param: ClassVar[str]  # the request field prompt errors point at

    @abstractmethod
    def check_size(self, limits: RequestLimits, request: RequestT) -> None:
        """Refuse a prompt beyond `limits` (raises RequestLimitExceeded); nothing is tokenized yet."""

    @abstractmethod
    def open_generation(self, runtime: Runtime, request: RequestT, lora: LoraRequest | None) -> Generation:
        """Validate the prompt and return a generation not yet started (runs in a worker thread);
        `lora` is the admission's adapter, for `sampling_params`."""

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

    async def handle(self, request: RequestT, raw: Request) -> Response:
        timer = self.timer(model=request.model, stream=request.stream)
        self.enforce(timer, lambda limits: self.check_size(limits, request))
        admission = await self.admit(request.model, raw, timer)
        try:
            generation = await run_in_threadpool(
                self.open_generation, admission.runtime, request, admission.lora
            )
        except Exception as exc:
            admission.release()
            error = api_error_for(exc, param=self.prompt_param)
            prompt_tokens = exc.prompt_tokens if isinstance(exc, ContextLengthExceeded) else 0
            timer.report(prompt_tokens=prompt_tokens, error=error_code(error))
            raise error from exc
        except BaseException:
            admission.release()
            raise
        # From here the pump's thread owns the admission: it releases it once the generation
        # is closed, whatever the outcome, so the slot frees only when the model is idle.
        pump = TokenPump(generation, on_done=admission.release)
        pump.start()
        if request.stream:
            return await self._stream(request, raw, pump, generation, timer)
        return await self._complete(raw, pump, generation, timer)

    @staticmethod
    def sampling_params(
        request: SamplingRequest,
        *,
        max_tokens: int | None,
        logprobs: int | None = None,
        lora: LoraRequest | None = None,
    ) -> SamplingParams:
        """OpenAI's defaults for omitted fields (temperature 1, top_p 1, no top-k cut); `lora`
        applies the admission's adapter to this request only."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=None if request.seed is None else request.seed & SEED_MASK,
            stop=request.stop_sequences(),
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            top_k=max(0, request.top_k or 0),  # -1 (vLLM) and 0 (llama.cpp) both mean no cut
            logit_bias=request.token_biases(),
            logprobs=logprobs,
            lora=lora,
        )

    async def _complete(
        self, raw: Request, pump: TokenPump, generation: Generation, timer: RequestTimer
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
        body = self.build_response(
            request_id=self._new_id(), model=timer.model, completion=completion
        ).model_dump(mode="json")
        return JSONResponse(body)

    async def _stream(
        self, request: RequestT, raw: Request, pump: TokenPump, generation: Generation, timer: RequestTimer
    ) -> Response:
        try:
            # Wait for the first delta before sending headers: a failure this early still gets
            # its own status code instead of an error buried in a 200 stream.
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
        outcome = CLIENT_DISCONNECTED  # until the stream is known to have ended properly

        def report() -> None:
            """Before [DONE] too: a client that stops reading there finds the request counted."""
            timer.report(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                error=outcome,
            )

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
                # OpenAI's shape: one last chunk with no choices, carrying the whole request's usage.
                usage = UsageInfo.of(
                    prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens
                )
                chunk = self.build_usage_chunk(
                    request_id=request_id, created=created, model=timer.model, usage=usage
                )
                yield sse.event(chunk.model_dump_json())
            outcome = ""
            report()
            yield sse.DONE
        except Exception as exc:  # a failure mid-stream: tell the client in-band, as OpenAI does
            error = api_error_for(exc, param=self.prompt_param)
            outcome = error_code(error)
            report()
            yield sse.event(ErrorResponse(error=error.info).model_dump_json())
            yield sse.DONE
        finally:
            pump.cancel()
            report()  # a departed client; otherwise already reported, and this does nothing

    def _new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"


def error_code(error: APIError) -> str:
    return error.info.code or error.info.type


def served_name(runtime: Runtime, lora: LoraRequest | None) -> str:
    """``<model>`` or ``<model>:<adapter>``, as `ModelTable.served_names` lists it."""
    model = runtime.describe().model_id
    return model if lora is None else f"{model}{ADAPTER_SEPARATOR}{lora.name}"
