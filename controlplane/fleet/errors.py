"""The fleet's own refusals: a command that cannot be carried out as asked.

The store's refusals (``store.errors``), the trust repositories' and the selectors' are
raised through fleet commands unchanged; these are the ones the fleet's rules add. The API
maps every one of them to a status through its one table (``api.refusals``).
"""

from __future__ import annotations


class FleetRefusal(Exception):
    """Base of the fleet commands' own refusals."""


class InvalidCommand(FleetRefusal):
    """A command whose arguments break a fleet rule (a name of the wrong form, say)."""


class InvalidOperatorName(InvalidCommand):
    """An operator name outside ``rbac.NAME_PATTERN``."""


class OperatorExists(FleetRefusal):
    """An operator with that name already exists."""
