"""How the agent's long-running tasks are run and stopped: task groups, one stop, one error.

The agent enters everything it starts (the API socket, the loaded models, the API server, the
control-plane channel, telemetry, the loops) into one ``contextlib.AsyncExitStack`` in start
order, the tasks into ``asyncio.TaskGroup``s inside it. Then whatever ends the process - a stop
request, a task that fails, a start-up step that fails half-way - unwinds the stack: what
started last stops first and nothing that started is left running. No list of tasks is kept by
hand: a task group cancels its own tasks, and the stack knows what was entered.

A stop is ``StopRequested`` raised out of the body; task groups collect it (and any failure)
into an exception group, which ``the_failure`` turns back into the one error worth reporting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from edgefleet.agent.errors import AgentError


class StopRequested(Exception):
    """Raised out of the agent's body when a stop was asked: it cancels the task groups on its
    way out, and is no failure."""


class TaskEnded(AgentError):
    """A task that should run as long as the agent returned by itself; nothing would do its job."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the agent's {name} task ended unexpectedly")
        self.name = name


def start_essential(
    group: asyncio.TaskGroup, coro: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Starts ``coro`` in ``group`` as a task that must not end before the agent: returning is
    a ``TaskEnded`` failure, which stops the agent like any other."""

    async def essential() -> None:
        await coro
        raise TaskEnded(name)

    return group.create_task(essential(), name=name)


async def until_stopped(stop: asyncio.Event) -> None:
    """Waits for the stop request, then raises StopRequested to unwind what started."""
    await stop.wait()
    raise StopRequested


def the_failure(error: BaseException) -> BaseException | None:
    """The error to report from what ended the agent, or None for a plain stop.

    Task groups nest failures in exception groups; the first leaf that is neither a stop nor a
    cancellation is what went wrong (others are usually its consequences)."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = the_failure(inner)
            if found is not None:
                return found
        return None
    if isinstance(error, StopRequested | asyncio.CancelledError):
        return None
    return error
