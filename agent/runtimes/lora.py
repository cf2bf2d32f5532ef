"""LoRA adapters over a loaded base model: the protocol a runtime offers, what it reports, its refusals.

A LoRA adapter is a small file of low-rank weight deltas trained for one base model. A
runtime that offers `LoraRuntime` loads adapters next to its base (which stays loaded, and
keeps serving while adapters come and go), and a request picks one by name with
`SamplingParams.lora` (`edgefleet.agent.runtimes.base.LoraRequest`). The description of such
a runtime lists `Capability.LORA`; `require_support` refuses a request naming an adapter
to any other.

Every refusal is a `LoraError` (a `Refusal`: the same file or name fails the same way), except
`UnknownLora`, which is an invalid request (the name is the client's mistake, a 400 or a 404).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from edgefleet.agent.runtimes.base import InvalidPromptError, RuntimeFailure
from edgefleet.protos.fleet.release import Refusal

# Adapter names, as a request names them: what model names may be, and no ':' or '/', so
# that an API may join a base and an adapter name with either.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class LoraError(RuntimeFailure, Refusal):
    """An adapter could not be loaded (never raised itself; see the subclasses)."""


class LoraFileInvalid(LoraError):
    """The file is not a LoRA adapter in this runtime's format (missing, not GGUF, not an
    adapter, truncated, tensors without their pair, or larger than the limit)."""


class LoraMismatch(LoraError):
    """A LoRA adapter, but for another model: another architecture, a tensor the base does not
    have, or a shape that does not fit the base's weight. ``tensor`` names the first misfit."""

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        self.tensor = tensor
        super().__init__(message)


class LoraLoadFailed(LoraError):
    """The backend refused an adapter that passed every check made before it (out of memory)."""


class LoraNameRefused(LoraError):
    """The name is malformed, or an adapter is already loaded under it (unload it first)."""


class TooManyLoras(LoraError):
    """The runtime holds as many adapters as it is allowed to."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"at most {limit} LoRA adapters may be loaded over one model; unload one first")


class UnknownLora(InvalidPromptError, LookupError):
    """A request (or an unload) names an adapter that is not loaded over this model."""

    def __init__(self, name: str, loaded: Sequence[str]) -> None:
        self.name = name
        self.loaded = tuple(loaded)
        listing = ", ".join(f"`{n}`" for n in self.loaded) or "none"
        super().__init__(f"no LoRA adapter `{name}` is loaded over this model (loaded: {listing})")


def check_name(name: str) -> None:
    """Raises LoraNameRefused unless ``name`` is 1-64 letters, digits, '.', '_' or '-' (not first),
    and not "latest" (Ollama's default tag: ``model:latest`` is the model itself)."""
    if name.lower() == "latest":
        raise LoraNameRefused("a LoRA adapter may not be named 'latest': model:latest is the model itself")
    if not _NAME.fullmatch(name):
        raise LoraNameRefused(
            f"invalid LoRA adapter name {name[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


@dataclass(frozen=True, slots=True)
class LoraInfo:
    """One loaded adapter, as listings report it."""

    name: str
    path: Path
    size_bytes: int  # the file's size; its weights take about as much memory
    rank: int  # the largest rank of its weight pairs
    alpha: float  # the file's adapter.lora.alpha (0: none; the scale is then used as it is)
    tensors: int  # base weights it patches
    architecture: str


@runtime_checkable
class LoraRuntime(Protocol):
    """A runtime that loads LoRA adapters over its base model (llama.cpp does)."""

    def load_lora(self, name: str, path: Path) -> LoraInfo:
        """Load the adapter at ``path`` under ``name``; the base keeps serving meanwhile."""
        ...

    def unload_lora(self, name: str) -> None:
        """Stop new requests from using ``name`` and free it once the generation using it ends."""
        ...

    def loras(self) -> tuple[LoraInfo, ...]:
        """The adapters requests may name now, by name."""
        ...
