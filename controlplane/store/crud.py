"""The names other packages still import from the store's former single query module.

The queries now live by aggregate: ``access`` (enrollment and operator tokens), ``devices``
(devices and certificates), ``bundles``, ``deployments``, ``pins``, ``labels``,
``telemetry_reads``; refusals in ``errors``, shared values in ``values``. This module keeps the
three names ``trust`` and ``telemetry`` import from here working until they import those
modules; nothing in the store imports it.
"""

from __future__ import annotations

from edgefleet.controlplane.store.deployments import Release
from edgefleet.controlplane.store.devices import revoked_certificates
from edgefleet.controlplane.store.values import as_utc

__all__ = ["Release", "as_utc", "revoked_certificates"]
