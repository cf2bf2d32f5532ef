"""The base of the agent's own errors.

Every package of the agent may raise one, from device identity up to the update path, so the
base lives below them all. It is not an error family: each concrete error is also a
`Refusal` or a `TransientFailure` (see ``edgefleet.agent.update.errors``) where code must
decide whether to retry; this base only lets the command line report any of them in one line.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of the agent's own errors, for the command line's last-resort report."""
