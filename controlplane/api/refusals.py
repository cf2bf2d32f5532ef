"""Refusals: the one table from typed errors to gRPC status codes, and who the call is from.

Why one table: every refusal a caller reads, whether the API's own (a request of the wrong
shape, a missing identity), a domain command's (``fleet``, ``store``, ``rollouts``, ``trust``)
or a selector's, gets its status here and nowhere else, so one kind of error reads the same
from every RPC and a new error type is a new row, not a new ``except`` per call site.

Handlers raise typed errors. The call guard (``guard``) turns any error this table lists into
a ``Refused`` (``refusal_of``), audits it and fails the call; a domain command run through
``run_command`` is refused under the change it would have made (``deploy``, ``m@1``) instead
of the method's name. Anything the table does not list is a bug (INTERNAL, logged).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import grpc
from cryptography.exceptions import UnsupportedAlgorithm
from sqlmodel import Session

from edgefleet.controlplane.api.bundle_upload import PushRefused
from edgefleet.controlplane.api.limits import RequestTooLarge
from edgefleet.controlplane.api.pages import InvalidPageToken
from edgefleet.controlplane.fleet.errors import InvalidCommand, OperatorExists
from edgefleet.controlplane.rollouts.commands import ImpossibleTransition, RolloutConflict, RolloutExists
from edgefleet.controlplane.rollouts.convert import InvalidRollout
from edgefleet.controlplane.rollouts.store import RolloutNotFound
from edgefleet.controlplane.store.blobs import BlobNotFound, InvalidDigest
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.errors import (
    BundleExists,
    BundleNotFound,
    DeviceNotFound,
    InvalidPin,
    TokenRejected,
)
from edgefleet.controlplane.trust.ca import CertificateError
from edgefleet.controlplane.trust.keys import KeyStoreError
from edgefleet.controlplane.trust.repositories import RepositoryRefusal
from edgefleet.protos.fleet.release import ReleaseError
from edgefleet.protos.fleet.selectors import SelectorError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who an authenticated call is from: ``operator:NAME`` or ``device:ID``."""

    actor: str
    is_operator: bool


CALLER: ContextVar[Caller | None] = ContextVar("edgefleet_caller", default=None)
"""Set by authentication for the rest of the call; each call runs in its own task (its own
context), and the guard resets it at the start of every call."""


class Refusal(Exception):
    """A refusal the API makes itself; its subclass decides the status (``STATUS_CODES``).

    ``action``/``target`` name it in the audit trail. A request refused for its shape, before
    it amounts to a change, keeps the default (``rpc.METHOD``, the method as target); a change
    refused for what it would do names the change (``deploy``, ``m@1``).
    ``audited=False`` marks an answer rather than a refusal (metadata a TUF client probes for
    that does not exist yet); ``charges=False`` keeps an unauthenticated refusal from spending
    the peer's bucket (a device with a certificate the CA issued is no stranger).
    """

    def __init__(
        self,
        message: str,
        *,
        action: str = "",
        target: str = "",
        actor: str = "",
        audited: bool = True,
        charges: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.action = action
        self.target = target
        self.actor = actor
        self.audited = audited
        self.charges = charges


class InvalidRequest(Refusal):
    """The request cannot be carried out as sent (a field missing or of the wrong form)."""


class Unauthenticated(Refusal):
    """The caller could not be identified, or its identity is revoked."""


class NotPermitted(Refusal):
    """The caller is known but may not do this (too small a role, a spent token)."""


class NotFound(Refusal):
    """What the request names does not exist, or not for this caller."""


class OutOfRange(Refusal):
    """A position past the end of what the request names."""


STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    # the API's own
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotPermitted: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    RequestTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidPageToken: grpc.StatusCode.INVALID_ARGUMENT,
    PushRefused: grpc.StatusCode.INVALID_ARGUMENT,
    # labels and selectors (edgefleet.protos.fleet.selectors)
    SelectorError: grpc.StatusCode.INVALID_ARGUMENT,
    # the store
    TokenRejected: grpc.StatusCode.PERMISSION_DENIED,
    BundleExists: grpc.StatusCode.ALREADY_EXISTS,
    BundleNotFound: grpc.StatusCode.NOT_FOUND,
    DeviceNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidPin: grpc.StatusCode.INVALID_ARGUMENT,
    BlobNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidDigest: grpc.StatusCode.INVALID_ARGUMENT,
    # fleet commands
    InvalidCommand: grpc.StatusCode.INVALID_ARGUMENT,
    OperatorExists: grpc.StatusCode.ALREADY_EXISTS,
    # rollouts
    InvalidRollout: grpc.StatusCode.INVALID_ARGUMENT,
    RolloutExists: grpc.StatusCode.ALREADY_EXISTS,
    RolloutConflict: grpc.StatusCode.FAILED_PRECONDITION,
    ImpossibleTransition: grpc.StatusCode.FAILED_PRECONDITION,
    RolloutNotFound: grpc.StatusCode.NOT_FOUND,
    # trust: repositories, keys, the fleet CA, releases
    RepositoryRefusal: grpc.StatusCode.FAILED_PRECONDITION,
    KeyStoreError: grpc.StatusCode.FAILED_PRECONDITION,
    CertificateError: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedAlgorithm: grpc.StatusCode.INVALID_ARGUMENT,
    ReleaseError: grpc.StatusCode.INVALID_ARGUMENT,
}
"""Each refusal's status; the first class of the error's MRO that is listed wins."""


class Refused(Exception):
    """A refusal with its status resolved (only ``refusal_of`` makes one): what the guard
    audits and fails the call with. The fields are ``Refusal``'s."""

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


def status_code(error: type[Exception]) -> grpc.StatusCode | None:
    """The status an error of this class is refused with, or None: not a refusal, a bug."""
    return next((STATUS_CODES[k] for k in error.__mro__ if k in STATUS_CODES), None)


def refusal_of(exc: Exception, *, action: str = "", target: str = "", actor: str = "") -> Refused | None:
    """The refusal ``exc`` amounts to, or None for an error the table does not list.

    A ``Refusal`` keeps its own message and naming. Any other listed error is named by
    ``action``/``target``/``actor`` when given (a refused change: its message as raised), else
    by the method, with its class named in the message (it reached the guard unexpected)."""
    if isinstance(exc, Refused):
        return exc
    code = status_code(type(exc))
    if code is None:
        return None
    if isinstance(exc, Refusal):
        return Refused(
            code,
            exc.message,
            action=exc.action or action,
            target=exc.target or target,
            actor=exc.actor or actor,
            audited=exc.audited,
            charges=exc.charges,
        )
    if action:
        return Refused(code, str(exc), action=action, target=target, actor=actor)
    return Refused(code, f"{type(exc).__name__}: {exc}")


def refused(exc: Exception, *, action: str, target: str = "", actor: str = "") -> Exception:
    """``exc`` as the refusal of the change ``action`` on ``target``, to raise in its place; an
    error the table does not list is returned as it is (a bug, which the guard reports)."""
    return refusal_of(exc, action=action, target=target, actor=actor) or exc


async def run_command(
    db: Database, command: Callable[[Session], T], *, action: str, target: str = "", actor: str = ""
) -> T:
    """Runs one domain command in one transaction; a refusal it raises fails the call as a
    ``Refused`` named ``action``/``target``, which the guard audits under the caller (the
    command audits its own success in its transaction). Errors the table does not list
    propagate: they are bugs."""
    try:
        return await db.run(command)
    except Exception as exc:
        raise refused(exc, action=action, target=target, actor=actor) from exc
