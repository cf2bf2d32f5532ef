"""``n`` > 1: several choices for one request, generated one after another from the same prompt.

Every runtime generates one sequence at a time (a generation holds the model's only slot), so
`ChoicesGeneration` opens the runtime's generation n times in a row, tagging each delta with
its choice's index; the request keeps its admission slot throughout, so nothing else runs
between the choices. With a seed, choice i samples with seed + i: the same request gives the
same n choices, and they differ from each other (one seed for all would give n copies).
Usage counts the prompt once and the tokens of every choice, as OpenAI does.

`Choices` gathers the deltas of a finished request back into one Completion per choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from edgefleet.agent.runtimes.base import (
    Completion,
    Delta,
    FinishReason,
    Generation,
    SamplingParams,
    TokenLogprob,
)

MAX_CHOICES = 8  # n is at most this: each choice costs a whole generation on the device


class ChoicesGeneration:
    """n generations of one prompt, one after another; deltas carry their choice's index."""

    def __init__(self, first: Generation, open_choice: Callable[[int], Generation], n: int) -> None:
        self._current = first
        self._open_choice = open_choice  # opens choice i (i >= 1), on the consuming thread
        self._n = n
        self._index = 0
        self._finished_tokens = 0  # completion tokens of the choices already done
        self._prompt_tokens = first.prompt_tokens

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._finished_tokens + self._current.completion_tokens

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        while True:
            try:
                return replace(next(self._current), index=self._index)
            except StopIteration:
                if self._index + 1 >= self._n:
                    raise
            self._finished_tokens += self._current.completion_tokens
            self._current.close()
            self._index += 1
            self._current = self._open_choice(self._index)

    def close(self) -> None:
        self._current.close()


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    finish: FinishReason = "length"
    logprobs: list[TokenLogprob] | None = None


class Choices:
    """Deltas in, one Completion per choice out (choice 0 carries the others)."""

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}

    def add(self, delta: Delta) -> None:
        choice = self._choices.setdefault(delta.index, _Choice())
        choice.parts.append(delta.text)
        if delta.logprobs is not None:
            choice.logprobs = [] if choice.logprobs is None else choice.logprobs
            choice.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish = delta.finish_reason

    def completion(self, *, prompt_tokens: int, completion_tokens: int) -> Completion:
        built = [
            Completion(
                text="".join(choice.parts),
                finish_reason=choice.finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                logprobs=None if choice.logprobs is None else tuple(choice.logprobs),
            )
            for _, choice in sorted(self._choices.items())
        ] or [Completion(text="", finish_reason="length", prompt_tokens=prompt_tokens, completion_tokens=0)]
        return replace(built[0], further_choices=tuple(built[1:]))


def open_choices(open_choice: Callable[[int], Generation], n: int) -> Generation:
    """Choice 0 opened now (so the prompt is validated before any answer), the rest in turn."""
    first = open_choice(0)
    return first if n == 1 else ChoicesGeneration(first, open_choice, n)


def for_choice(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s sampling: seed + index, so seeded choices are reproducible yet differ."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + index) & 0xFFFF_FFFF)
