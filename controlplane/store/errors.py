"""The store's refusals: what a query or command found that the caller should see as such.

One module so the API's refusal table and the rollout engine name them without importing
every query module; each is a ``StoreError``.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of store refusals that operators and devices should see as such."""


class TokenRejected(StoreError):
    """The bootstrap token is unknown, used up or expired."""


class BundleExists(StoreError):
    """A bundle with that name and version was already pushed with different metadata."""


class BundleNotFound(StoreError):
    """No bundle with that name and version."""


class DeviceNotFound(StoreError):
    """No device with that id."""


class InvalidPin(StoreError):
    """A pin request that names no scope, two scopes, or not exactly one of variant and format."""
