"""Typed errors of the update path, in two families: refusals and transient failures.

A ``Refusal`` (bad metadata or bytes, an unsafe archive, a model the runtime will not load, a
config the device cannot use) is reported, and the same generation is not tried again. A
``TransientFailure`` (the control plane is away, a connection reset, a disk full or busy for the
moment) leaves the phase where it is and is retried; it is never reported as a refusal. The two
roots are defined with release verification (edgefleet.protos.fleet.release), the lowest code
that raises them, and re-exported here: the update path catches the family, never a list of
classes, so a transient error cannot be refused by accident.

``AgentError`` is what the command line prints and exits on; it is no family. An OSError has no
family until ``typed_os_errors`` sorts it by errno.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from edgefleet.agent.errors import AgentError
from edgefleet.protos.fleet.release import Refusal, TransientFailure

__all__ = [
    "TRANSIENT_ERRNOS",
    "AgentError",
    "ArtifactUnavailable",
    "ControlPlaneUnavailable",
    "DiskBusy",
    "DiskRefused",
    "EnrollmentRefused",
    "InsufficientDisk",
    "NoUsableVariant",
    "NotEnrolled",
    "Refusal",
    "TransientFailure",
    "os_error_family",
    "typed_os_errors",
]


class ControlPlaneUnavailable(AgentError, TransientFailure):
    """The control plane did not answer; the agent keeps serving and tries again."""


class EnrollmentRefused(AgentError, Refusal):
    """The control plane refused the bootstrap token (unknown, used up or expired)."""


class NotEnrolled(AgentError, Refusal):
    """No identity in the state dir and no bootstrap token to obtain one."""


class InsufficientDisk(AgentError, Refusal):
    """Not enough free disk for the download, checked before it starts; nothing was written.
    A refusal: the release does not fit this device as it is, which the operator must see (a
    disk that fills up during the download is a DiskBusy, retried)."""


class NoUsableVariant(AgentError, Refusal):
    """No variant of the release can run on this device; the message says why."""


class ArtifactUnavailable(AgentError, Refusal):
    """The control plane does not have, or will not serve, an artifact."""


TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,  # full now; another writer (logs, the outbox) may free it, the part file resumes
        errno.EDQUOT,
        errno.EIO,  # the disk failed this request; the release is not at fault, so not refused
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ETXTBSY,
        errno.EMFILE,  # descriptors run out while requests are in flight, and come back
        errno.ENFILE,
        errno.ENOMEM,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
"""Errnos of a device that cannot do it right now. Every other errno (EACCES, EPERM, EROFS,
ENOENT, ELOOP from a link planted where a download goes, EFBIG, ENAMETOOLONG, ...) is the same
on every try until someone changes the device, so it is reported, as a refusal."""


class DiskBusy(AgentError, TransientFailure):
    """A local read or write failed with a transient errno (TRANSIENT_ERRNOS); retried."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


class DiskRefused(AgentError, Refusal):
    """A local read or write failed in a way retrying cannot mend (permissions, a read-only
    file system, a missing directory); reported with the errno's text."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


def os_error_family(exc: OSError) -> DiskBusy | DiskRefused:
    """``exc`` as the family its errno belongs to (no errno: a refusal, nothing says it passes)."""
    message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if exc.errno in TRANSIENT_ERRNOS:
        return DiskBusy(message, exc.errno)
    return DiskRefused(message, exc.errno)


@contextmanager
def typed_os_errors() -> Iterator[None]:
    """Raises an OSError from the block as DiskBusy or DiskRefused (``from`` the original)."""
    try:
        yield
    except OSError as exc:
        raise os_error_family(exc) from exc
