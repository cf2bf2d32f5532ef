"""Telemetry from the fleet: MQTT in, database rows out, dashboards fed.

Ingestion, at-least-once with dedup: the MQTT subscriber and the ingestor's lifecycle
(`ingest`), the bounded hand-off between its network and writer threads (`inbox`), decoding
and checks (`decode`, with record bounds in `record_shape`), the supervised batch writer with
group commit and dead letters (`batch_writer`), and its counters and health clocks
(`ingest_health`). Also retention and hourly rollups (`retention`), the Prometheus exporter
(`exporter`), retiring a replica's broker session (`retire`) and the zero-setup embedded broker
(`broker`). Imports `store`, `trust` (the CRL the broker checks) and `edgefleet.protos`.
"""
