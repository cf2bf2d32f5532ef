"""Refusals as typed exceptions, and who the current call is from.

Handlers and authentication raise ``Refused`` with the status the caller should read; the
call guard (``edgefleet.controlplane.api.guard``) audits it and fails the call. Kept apart from the
guard so authentication can raise it without importing everything the guard maps.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True, slots=True)
class Caller:
    """Who an authenticated call is from: ``operator:NAME`` or ``device:ID``."""

    actor: str
    is_operator: bool


CALLER: ContextVar[Caller | None] = ContextVar("edgefleet_caller", default=None)
"""Set by authentication for the rest of the call; each call runs in its own task (its own
context), and the guard resets it at the start of every call."""


class Refused(Exception):
    """A refusal with the status the caller should read.

    ``action``/``target`` name it in the audit trail. A request refused for its shape, before
    it amounts to a change, keeps the default (``rpc.METHOD``, the method as target); a change
    refused for what it would do names the change (``deploy``, ``m@1``).
    ``audited=False`` marks an answer rather than a refusal (metadata a TUF client probes for
    that does not exist yet); ``charges=False`` keeps an unauthenticated refusal from spending
    the peer's bucket (a device with a certificate the CA issued is no stranger).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        action: str = "",
        target: str = "",
        actor: str = "",
        audited: bool = True,
        charges: bool = True,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.action = action
        self.target = target
        self.actor = actor
        self.audited = audited
        self.charges = charges


def invalid(message: str, **kwargs: Any) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, message, **kwargs)
