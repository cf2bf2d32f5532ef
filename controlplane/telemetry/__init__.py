"""Telemetry from the fleet: MQTT in, database rows out, dashboards fed.

Ingestion (`ingest`: subscriber and supervised batch writer, at-least-once with dedup),
record decoding and bounds (`record_shape`), retention and hourly rollups (`retention`), the
Prometheus exporter (`exporter`), retiring a replica's broker session (`retire`) and the
zero-setup embedded broker (`broker`). Imports `store`, `trust` (the CRL the broker checks)
and `edgefleet.protos`.
"""
