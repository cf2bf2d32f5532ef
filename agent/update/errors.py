"""Typed errors of the update path, each saying whether retrying can help."""

from __future__ import annotations


class AgentError(Exception):
    """Base: ``transient`` errors are retried with backoff; fatal ones are reported, not retried."""

    transient = False


class ControlPlaneUnavailable(AgentError):
    """The control plane did not answer; the agent keeps serving and tries again."""

    transient = True


class EnrollmentRefused(AgentError):
    """The control plane refused the bootstrap token (unknown, used up or expired)."""


class NotEnrolled(AgentError):
    """No identity in the state dir and no bootstrap token to obtain one."""


class InsufficientDisk(AgentError):
    """Not enough free disk for the download; nothing was written."""


class NoUsableVariant(AgentError):
    """No variant of the release can run on this device; the message says why."""


class ArtifactUnavailable(AgentError):
    """The control plane does not have, or will not serve, an artifact."""
